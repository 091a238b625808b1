"""Supervised fine-tuning: label masking and truncation, joint Copilot training, LoRA save/load."""

import copy
import shutil

import pytest
import torch
from conftest import qa_examples, qa_tokenizer, tiny_pilot
from transformers import AutoModelForCausalLM, TrainerCallback

from hf_copilot import CopilotModel
from hf_copilot.errors import IGNORE_INDEX
from hf_copilot.recipes.finetune import add_lora, finetune, load_pilot, save_pilot
from hf_copilot.recipes.prompts import encode_example
from hf_copilot.recipes.tasks import DEFAULT_FORMAT, Example

FMT = DEFAULT_FORMAT


def word_ids(tokenizer, text):
    """Reference tokenisation: the word-level vocabulary looked up word by word."""
    vocab = tokenizer.get_vocab()
    return [vocab[word] for word in text.split()]


@pytest.fixture(scope="module")
def tokenizer():
    return qa_tokenizer()


def test_encode_example_masks_exactly_the_prompt(tokenizer):
    for example in qa_examples(6):
        prompt, target = word_ids(tokenizer, FMT.prompt(example)), word_ids(tokenizer, FMT.target(example))
        row = encode_example(example, tokenizer, FMT, max_length=256)
        assert row["input_ids"] == prompt + target + [tokenizer.eos_token_id]
        assert row["attention_mask"] == [1] * len(row["input_ids"])
        assert row["labels"] == [IGNORE_INDEX] * len(prompt) + target + [tokenizer.eos_token_id]


def test_encode_example_truncates_the_prompt_from_the_left(tokenizer):
    example = qa_examples(5)[4]  # the longest question: 5 words
    prompt, target = word_ids(tokenizer, FMT.prompt(example)), word_ids(tokenizer, FMT.target(example))
    target = target + [tokenizer.eos_token_id]
    for room in (1, 7):
        row = encode_example(example, tokenizer, FMT, max_length=len(target) + room)
        assert len(row["input_ids"]) == len(target) + room
        assert row["input_ids"] == prompt[-room:] + target  # the end of the prompt ("### Response:") survives
        assert row["labels"] == [IGNORE_INDEX] * room + target
    assert prompt[-2:] == word_ids(tokenizer, "### Response:")


def test_encode_example_refuses_a_target_that_does_not_fit(tokenizer):
    example = Example("q1 ?", " ".join(["red"] * 10))  # free-form: the target is the answer, 10 tokens + EOS
    with pytest.raises(ValueError, match="11 tokens.*max_length=8"):
        encode_example(example, tokenizer, FMT, max_length=8)
    with pytest.raises(ValueError, match="max_length=11"):  # no room left for even one prompt token
        encode_example(example, tokenizer, FMT, max_length=11)
    assert len(encode_example(example, tokenizer, FMT, max_length=12)["input_ids"]) == 12


def run_finetune(tmp_path, tokenizer, copilot=None, pilot=None, **kwargs):
    pilot = pilot if pilot is not None else tiny_pilot("llama")
    options = dict(max_steps=3, batch_size=4, learning_rate=1e-3, progress=False, seed=0)
    options.update(kwargs)
    trainer = finetune(pilot, tokenizer, qa_examples(8), FMT, tmp_path, copilot=copilot, **options)
    return pilot, trainer


@pytest.mark.slow
def test_finetune_trains_the_copilot_alongside_and_leaves_the_pilot_untouched(tmp_path, tokenizer):
    plain_pilot, _ = run_finetune(tmp_path / "plain", tokenizer)

    copilot = CopilotModel.from_pilot(tiny_pilot("llama"), num_hidden_layers=2)
    before = copy.deepcopy(copilot.state_dict())
    joint_pilot, trainer = run_finetune(tmp_path / "joint", tokenizer, copilot=copilot,
                                        copilot_options=dict(batch_size=4, learning_rate=3e-3))
    assert trainer.state.global_step == 3

    changed = [name for name, value in copilot.state_dict().items() if not torch.equal(value, before[name])]
    assert "correction_head.weight" in changed  # zero-initialised: it moved only by training
    assert len(changed) > len(before) // 2

    saved = CopilotModel.from_pretrained(tmp_path / "joint" / "copilot")
    for name, value in copilot.state_dict().items():
        assert torch.equal(saved.state_dict()[name], value), name

    untrained = tiny_pilot("llama").state_dict()
    moved = False
    for name, value in plain_pilot.state_dict().items():
        assert torch.equal(joint_pilot.state_dict()[name], value), name
        moved |= not torch.equal(untrained[name], value)
    assert moved  # the Pilot did train


@pytest.mark.slow
def test_lora_adapter_saves_and_merges_back(tmp_path, tokenizer):
    base_dir = tmp_path / "base"
    tiny_pilot("llama").save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = add_lora(base, rank=4)
    run_finetune(tmp_path / "lora", tokenizer, pilot=peft_model, max_steps=4, learning_rate=1e-2)

    adapter_dir = save_pilot(peft_model, tokenizer, tmp_path / "adapter")
    assert (adapter_dir / "adapter_config.json").is_file()
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    assert not (adapter_dir / "model.safetensors").exists()  # only the adapter, not a second full copy

    merged, loaded_tokenizer = load_pilot(adapter_dir)
    assert not hasattr(merged, "peft_config")
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    ids = torch.tensor([word_ids(tokenizer, FMT.prompt(example))[-12:] for example in qa_examples(3)])
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        actual = merged(input_ids=ids).logits
        untouched = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    assert (expected - untouched).abs().max() > 1e-3  # the adapter learned something, so the check has teeth

    # A full Pilot saved over the adapter is what loads back, and the reverse (a re-run into the same --output).
    full = tiny_pilot("llama", seed=1)
    save_pilot(full, tokenizer, adapter_dir)
    assert not (adapter_dir / "adapter_config.json").exists()
    with torch.no_grad():
        torch.testing.assert_close(load_pilot(adapter_dir)[0](input_ids=ids).logits, full(input_ids=ids).logits)
    save_pilot(peft_model, tokenizer, adapter_dir)
    assert not (adapter_dir / "model.safetensors").exists()
    with torch.no_grad():
        torch.testing.assert_close(load_pilot(adapter_dir)[0](input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    mixed = tmp_path / "mixed"  # both kinds of files: refused, never a guess
    shutil.copytree(adapter_dir, mixed)
    full.save_pretrained(tmp_path / "full")
    shutil.copy(tmp_path / "full" / "model.safetensors", mixed)
    with pytest.raises(ValueError, match="both a LoRA adapter .* and a full model"):
        load_pilot(mixed)

    shutil.rmtree(base_dir)
    with pytest.raises(FileNotFoundError, match=rf"(?s)adapter.*{base_dir.name}.*no longer exists"):
        load_pilot(adapter_dir)


class StopAfterFirstEpoch(TrainerCallback):
    """Stands in for a killed run: training stops right after the first epoch's checkpoint is written."""

    def on_save(self, args, state, control, **kwargs):
        raise KeyboardInterrupt


@pytest.mark.slow
def test_an_interrupted_epoch_run_resumes_to_the_uninterrupted_result(tmp_path, tokenizer):
    def copilot():
        return CopilotModel.from_pilot(tiny_pilot("llama"), num_hidden_layers=2)

    options = dict(max_steps=-1, epochs=2, save_each_epoch=True,
                   copilot_options=dict(batch_size=4, save_mistake_log=True))  # the log too, for an exact resume
    full_pilot, _ = run_finetune(tmp_path / "full", tokenizer, copilot=copilot(), **options)
    assert sorted(path.name for path in (tmp_path / "full").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    with pytest.raises(KeyboardInterrupt):
        run_finetune(tmp_path / "cut", tokenizer, copilot=copilot(), callbacks=[StopAfterFirstEpoch()], **options)
    resumed_pilot, trainer = run_finetune(tmp_path / "cut", tokenizer, copilot=copilot(), **options)
    assert trainer.state.global_step == 4
    for name, value in full_pilot.state_dict().items():
        torch.testing.assert_close(resumed_pilot.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    full, resumed = (CopilotModel.from_pretrained(tmp_path / run / "copilot") for run in ("full", "cut"))
    for name, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
