"""The paper's Copilot: every Pilot layer copied, adapted with LoRA. Checked against the plain (fully trained)
Copilot it is built from, and against full recomputation where the plain one is."""

import subprocess
import sys

import pytest
import torch
from conftest import tiny_pilot
from test_callback import pattern_dataset, run, trainer_args
from test_generation import BEAMS, NEW_TOKENS, StepRecorder, prompt_inputs, record_corrections, reference_correction
from transformers import AutoModel, Trainer

from hf_copilot import PAPER_LORA, CopilotCallback, CopilotConfig, CopilotLogitsProcessor, CopilotModel, MistakeLog
from hf_copilot import CopilotTrainingConfig, CopilotUpdater
from hf_copilot.pilot_shape import decoder_layers

LORA = dict(PAPER_LORA, lora_dropout=0.0)  # dropout off where outputs are compared exactly


def full_depth(pilot, lora=LORA, **config):
    return CopilotModel.from_pilot(pilot, num_hidden_layers=pilot.config.num_hidden_layers, lora=lora, **config)


def randomise(copilot, seed=1, std=0.5):
    """Non-zero head and adapters, so that corrections are large and the adapters matter."""
    torch.manual_seed(seed)
    with torch.no_grad():
        copilot.correction_head.weight.normal_(std=std)
        for name, parameter in copilot.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    return copilot.eval()


def teacher_forced(copilot, seed=0):
    torch.manual_seed(seed)
    hidden = torch.randn(2, 7, copilot.config.pilot_hidden_size)
    return copilot(pilot_hidden_states=hidden, pilot_input_states=torch.randn_like(hidden),
                   input_errors=torch.randn(2, 7, copilot.config.vocab_size) * 0.1).corrections


def test_full_depth_copies_every_pilot_layer():
    pilot = tiny_pilot("llama")
    copilot = full_depth(pilot, lora=None)
    assert len(copilot.layers) == len(decoder_layers(pilot)) == pilot.config.num_hidden_layers
    for copilot_layer, pilot_layer in zip(copilot.layers, decoder_layers(pilot)):
        source = dict(pilot_layer.named_parameters())
        for name, parameter in copilot_layer.named_parameters():
            pilot_name = name.replace("cross_attn.", "self_attn.").replace("cross_attention_layernorm",
                                                                           "input_layernorm")
            assert torch.equal(parameter, source[pilot_name]), name
    assert torch.equal(copilot.error_projection.weight, pilot.get_input_embeddings().weight)


def test_lora_copilot_trains_adapters_and_new_parts_only():
    copilot = full_depth(tiny_pilot("llama"))
    trainable = {name for name, p in copilot.named_parameters() if p.requires_grad}
    assert trainable, "nothing would train"
    for name in trainable:
        assert "lora_" in name or not name.startswith("layers."), name
    assert {"error_projection.weight", "correction_head.weight", "memory_norm.weight", "norm.weight"} <= trainable
    lora_modules = {name.rsplit(".lora_", 1)[0] for name in trainable if "lora_A" in name}
    assert len(lora_modules) == 7 * copilot.config.num_hidden_layers  # q, k, v, o, gate, up, down in every block
    assert copilot.num_parameters(only_trainable=True) < copilot.num_parameters()


def test_untrained_lora_copilot_corrects_by_exactly_zero_and_equals_its_plain_twin():
    pilot = tiny_pilot("llama")
    lora = full_depth(pilot).eval()
    assert teacher_forced(lora).abs().max() == 0
    plain = full_depth(pilot, lora=None).eval()
    with torch.no_grad():  # the same non-zero head on both: B = 0 makes the adapted blocks the pretrained ones
        plain.correction_head.weight.normal_(std=0.5)
        lora.correction_head.weight.copy_(plain.correction_head.weight)
    torch.testing.assert_close(teacher_forced(lora), teacher_forced(plain), atol=1e-6, rtol=1e-5)


def test_updates_move_adapters_and_head_but_never_the_pretrained_block_weights():
    pilot = tiny_pilot("llama")
    copilot = full_depth(pilot, lora=PAPER_LORA)
    frozen = {name: p.clone() for name, p in copilot.named_parameters() if not p.requires_grad}
    trainable = {name: p.clone() for name, p in copilot.named_parameters() if p.requires_grad}
    updater = CopilotUpdater(copilot, CopilotTrainingConfig(learning_rate=1e-2, warmup_ratio=0.0), total_updates=3)
    assert {id(p) for p in updater.trainable} == {id(p) for p in copilot.parameters() if p.requires_grad}
    log = _log_of(pilot)
    for _ in range(3):
        updater.step(log)
    current = dict(copilot.named_parameters())
    for name, before in frozen.items():
        assert torch.equal(current[name], before), name
    moved = [name for name, before in trainable.items() if not torch.equal(current[name], before)]
    assert "correction_head.weight" in moved and any("lora_B" in name for name in moved)


def _log_of(pilot, rounds=3):
    from hf_copilot import PilotTap

    log = MistakeLog(max_rounds=8, top_k=8)
    pilot.train()
    with PilotTap(pilot) as tap:
        for step, row in enumerate(pattern_dataset()[:rounds]):
            pilot(**{k: v[None] for k, v in row.items()}).loss.backward()
            for record in tap.pop_records():
                log.add(record, step=step)
    pilot.zero_grad(set_to_none=True)
    return log.until(rounds)


@pytest.mark.slow
def test_save_and_load_round_trip_in_a_fresh_process(tmp_path):
    copilot = randomise(full_depth(tiny_pilot("llama"), lora=PAPER_LORA))
    copilot.save_pretrained(tmp_path)
    expected = teacher_forced(copilot)
    torch.save(expected, tmp_path / "expected.pt")
    script = (
        "import torch, hf_copilot\n"
        "from transformers import AutoModel\n"
        f"copilot = AutoModel.from_pretrained({str(tmp_path)!r}).eval()\n"
        "assert type(copilot).__name__ == 'CopilotModel' and copilot.config.lora['r'] == 32\n"
        "assert all(p.requires_grad == ('lora_' in n or not n.startswith('layers.')) "
        "for n, p in copilot.named_parameters())\n"
        "torch.manual_seed(0)\n"
        "h = torch.randn(2, 7, copilot.config.pilot_hidden_size)\n"
        "out = copilot(pilot_hidden_states=h, pilot_input_states=torch.randn_like(h),\n"
        "              input_errors=torch.randn(2, 7, copilot.config.vocab_size) * 0.1).corrections\n"
        f"torch.testing.assert_close(out, torch.load({str(tmp_path / 'expected.pt')!r}))\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)


def test_merged_copilot_gives_the_same_corrections():
    copilot = randomise(full_depth(tiny_pilot("llama")))
    before = teacher_forced(copilot)
    merged = copilot.merge_lora()
    assert merged.config.lora is None and not any("lora_" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(teacher_forced(merged), before, atol=1e-5, rtol=1e-4)
    reloaded = CopilotConfig.from_dict(merged.config.to_dict())
    assert reloaded.lora is None


def test_lora_copilot_beam_search_corrections_match_full_recompute():
    pilot = tiny_pilot("llama")
    copilot = randomise(full_depth(pilot))
    inputs = prompt_inputs()
    recorder = StepRecorder()
    corrections, handle = record_corrections(copilot)
    try:
        with CopilotLogitsProcessor(copilot, pilot, lam=1.0) as processor:
            pilot.generate(logits_processor=[processor, recorder], max_new_tokens=NEW_TOKENS,
                           min_new_tokens=NEW_TOKENS, **BEAMS, **inputs)
    finally:
        handle.remove()
    prompt_mask = inputs["attention_mask"].repeat_interleave(BEAMS["num_beams"], 0)
    prompt_length = recorder.input_ids[0].shape[1]
    for ids, correction in zip(recorder.input_ids, corrections):
        mask = torch.cat([prompt_mask, torch.ones(ids.shape[0], ids.shape[1] - prompt_length, dtype=torch.long)], 1)
        expected = reference_correction(copilot, pilot, ids, mask, prompt_length)
        torch.testing.assert_close(correction, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_joint_training_resumes_to_the_same_lora_copilot(tmp_path):
    def callback():
        pilot = tiny_pilot("llama")
        return CopilotCallback(full_depth(pilot, lora=PAPER_LORA), batch_size=4, save_mistake_log=True)

    full = callback()
    run(tmp_path / "full", full, args=trainer_args(tmp_path / "full", max_steps=6))
    interrupted = tmp_path / "resumed"
    run(interrupted, callback(), args=trainer_args(interrupted, max_steps=6, save_strategy="steps", save_steps=3))
    resumed = callback()
    trainer = Trainer(model=tiny_pilot("llama"), args=trainer_args(interrupted, max_steps=6),
                      train_dataset=pattern_dataset())
    resumed.attach(trainer)
    trainer.train(resume_from_checkpoint=str(interrupted / "checkpoint-3"))
    for (name, a), b in zip(full.copilot.state_dict().items(), resumed.copilot.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    saved = AutoModel.from_pretrained(tmp_path / "full" / "copilot")
    assert saved.config.lora == full.copilot.config.lora
    for (name, a), b in zip(full.copilot.state_dict().items(), saved.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("lora, message", [({"r": 0}, "positive integer"), ({"rank": 4}, "Unknown LoRA"),
                                           ({"target_modules": ["lm_head"]}, "subset"),
                                           ({"lora_dropout": 1.5}, r"\[0, 1\)")])
def test_bad_lora_settings_are_refused(lora, message):
    with pytest.raises(ValueError, match=message):
        CopilotConfig(lora=lora)


def test_a_peft_lora_config_is_accepted():
    from peft import LoraConfig

    config = CopilotConfig(lora=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    assert config.lora == {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
