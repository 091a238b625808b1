"""The trainers, engines and launchers users run (docs/integrations.md). What they capture is checked against an
independent recompute: every document the Pilot trained on, run alone through a plain forward (no TRL, no packing,
no sharding); multi-process runs against each other and against an uninterrupted run."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_pilot, word_tokenizer
from test_callback import SEQ
from datasets import Dataset
from transformers import DataCollatorWithFlattening, Trainer

from hf_copilot import CopilotCallback, CopilotLogitsProcessor, CopilotMetrics, CopilotModel, MistakeLog
from hf_copilot.errors import IGNORE_INDEX
from hf_copilot.pilot import PilotTap

TOP_K = 16
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }} </s>"
    "{% endgeneration %}{% else %}{{ m['content'] }} {% endif %}{% endfor %}"
)


def conversations(n=16):
    """Prompts and completions of different lengths, no two alike (each logged sequence is matched by content)."""
    rows = []
    for i in range(n):
        prompt = " ".join(f"w{4 + (3 * i + j) % 50}" for j in range(3 + i % 4))
        completion = " ".join(f"w{54 + (i + 5 * j) % 40}" for j in range(2 + i % 3))
        rows.append((prompt, completion))
    return rows


def sft_dataset(style):
    if style == "assistant_only":
        return Dataset.from_list([{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]}
                                  for p, c in conversations()])
    if style == "text":
        return Dataset.from_list([{"text": f"{p} {c}"} for p, c in conversations()])
    return Dataset.from_list([{"prompt": p, "completion": c} for p, c in conversations()])


def fresh_copilot(pilot):
    """A Copilot whose head is not zero, so that its corrections depend on everything it reads."""
    copilot = CopilotModel.from_pilot(pilot, num_hidden_layers=2).eval()
    with torch.no_grad():
        copilot.correction_head.weight.normal_(std=0.1, generator=torch.Generator().manual_seed(0))
    return copilot


def reference_log(pilot, documents):
    """The unpacked recompute: each (input_ids, labels) document alone through a plain forward of the Pilot."""
    log = MistakeLog(top_k=TOP_K)
    with PilotTap(pilot, mode="generate") as tap:
        for step, (ids, labels) in enumerate(documents):
            with torch.no_grad():
                pilot(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
            (record,) = tap.pop_records()
            log.add(record, step=step)
    return log


def by_labels(log, copilot):
    """Every sequence of ``log`` keyed by its next-token labels: its states and the Copilot's corrections."""
    batch = log.sample(10_000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        corrections = copilot(**batch.copilot_inputs()).corrections
    sequences = {}
    for row, length in enumerate(batch.attention_mask.sum(-1).tolist()):
        key = tuple(batch.errors.labels[row, :length].tolist())
        assert key not in sequences, "two logged sequences with the same labels: the test data must be unique"
        sequences[key] = (batch.pilot_input_states[row, :length], batch.pilot_hidden_states[row, :length],
                          batch.errors.probs[row, :length], corrections[row, :length])
    return sequences


def assert_same_sequences(log, reference, copilot):
    logged, expected = by_labels(log, copilot), by_labels(reference, copilot)
    assert sorted(logged) == sorted(expected)  # the same documents, the same labels, the same boundaries
    for key, tensors in expected.items():
        for name, got, want in zip(("input states", "hidden states", "probs", "corrections"), logged[key], tensors):
            # States are stored in bf16: a batched and a lone forward may round a value to neighbouring bf16 numbers.
            torch.testing.assert_close(got, want, atol=0.05 * float(want.abs().max()), rtol=0,
                                       msg=lambda message, name=name, key=key: f"{name} of {key}: {message}")


def sft_trainer(tmp_path, style, pilot, callback, eval_dataset=None, **config):
    from trl import SFTConfig, SFTTrainer

    tokenizer = word_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=1, learning_rate=0.0,
                     report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0,
                     completion_only_loss=style == "completion_only", assistant_only_loss=style == "assistant_only",
                     **config)
    return SFTTrainer(model=pilot, args=args, train_dataset=sft_dataset(style), eval_dataset=eval_dataset,
                      processing_class=tokenizer, callbacks=[callback])


def sft_documents(tmp_path, style):
    """The tokenized examples and the labels TRL trains on (prompt or user turns masked), read from an unpacked
    SFTTrainer's dataset."""
    dataset = sft_trainer(tmp_path / "reference", style, tiny_pilot("llama"), CopilotCallback(
        fresh_copilot(tiny_pilot("llama")))).train_dataset
    return [(row["input_ids"], row.get("labels") or row["input_ids"]) for row in dataset]


@pytest.mark.parametrize("style, packing", [("text", False), ("completion_only", False), ("assistant_only", False),
                                            ("completion_only", True)])
def test_sft_trainer_logs_each_document_as_an_unpacked_recompute(tmp_path, style, packing):
    """TRL's SFTTrainer runs the Pilot with its fused LM head (no logits in the output) and, with packing, puts
    several documents in one row; the log still holds each document as the Pilot alone would have shown it."""
    pilot = tiny_pilot("llama")
    callback = CopilotCallback(fresh_copilot(pilot), top_k=TOP_K, log_rounds=100, batch_size=4)
    trainer = sft_trainer(tmp_path / "run", style, pilot, callback, packing=packing, max_length=64)
    trainer.train()  # learning rate 0: the Pilot that made the log is the one the reference runs
    if packing:
        assert len(callback.mistake_log) == 1 and callback.mistake_log.stats()["sequences"] == 16
    reference = reference_log(tiny_pilot("llama").train(), sft_documents(tmp_path, style))
    assert_same_sequences(callback.mistake_log, reference, fresh_copilot(pilot))


@pytest.mark.parametrize("packing", [False, True])
def test_sft_trainer_evaluations_measure_each_document_as_alone(tmp_path, packing):
    """SFTTrainer evaluations (fused LM head, packed rows when packing) report the Copilot metrics of each
    document run alone through a plain forward."""
    pilot = tiny_pilot("llama")
    copilot = fresh_copilot(pilot)
    callback = CopilotCallback(copilot, top_k=TOP_K, batch_size=4)
    trainer = sft_trainer(tmp_path / "run", "completion_only", pilot, callback, packing=packing, max_length=64,
                          eval_dataset=sft_dataset("completion_only"), eval_strategy="epoch",
                          per_device_eval_batch_size=8)
    trainer.train()
    (entry,) = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    expected = CopilotMetrics(copilot, top_k=TOP_K)
    with PilotTap(pilot, mode="generate") as tap:
        for ids, labels in sft_documents(tmp_path, "completion_only"):
            with torch.no_grad():
                pilot(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
            expected.add(*tap.pop_records())
    expected = expected.results()
    assert entry["eval_copilot_tokens"] == expected["tokens"]
    for name, value in expected.items():
        assert entry[f"eval_copilot_{name}"] == pytest.approx(value, rel=1e-4, abs=1e-6), name


def test_fused_lm_head_forward_records_what_a_plain_forward_records():
    from trl.trainer.utils import add_fused_lm_head

    fused, plain = tiny_pilot("llama").train(), tiny_pilot("llama").train()
    add_fused_lm_head(fused)
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    records = []
    for model, options in ((fused, {"fused_lm_head": True}), (plain, {})):
        with PilotTap(model, errors_top_k=TOP_K) as tap:
            model(input_ids=ids, labels=ids, **options).loss.backward()
            records += tap.pop_records()
    assert records[0].vocab_size == VOCAB
    for name in ("labels", "ids", "probs"):
        torch.testing.assert_close(getattr(records[0].compact_errors, name), getattr(records[1].compact_errors, name))
    scaled = tiny_pilot("llama", logit_scale=0.5).train()
    add_fused_lm_head(scaled)
    with PilotTap(scaled, errors_top_k=TOP_K), pytest.raises(RuntimeError, match="logit_scale"):
        scaled(input_ids=ids, labels=ids, fused_lm_head=True)


def test_padding_free_batches_of_data_collator_with_flattening(tmp_path):
    documents = [([1] + [4 + (5 * i + j) % 90 for j in range(3 + i % 5)], None) for i in range(12)]
    documents = [(ids, [IGNORE_INDEX] + ids[1:]) for ids, _ in documents]
    rows = [{"input_ids": ids, "labels": labels} for ids, labels in documents]
    pilot = tiny_pilot("llama")
    callback = CopilotCallback(fresh_copilot(pilot), top_k=TOP_K, log_rounds=100, batch_size=4)
    from test_callback import trainer_args

    trainer = Trainer(model=pilot, args=trainer_args(tmp_path, max_steps=3, learning_rate=0.0), train_dataset=rows,
                      data_collator=DataCollatorWithFlattening())
    callback.attach(trainer)
    trainer.train()
    assert [entry.num_sequences for entry in callback.mistake_log._entries] == [4, 4, 4]
    assert_same_sequences(callback.mistake_log, reference_log(tiny_pilot("llama").train(), documents),
                          fresh_copilot(pilot))


def test_a_packed_row_is_split_where_positions_restart():
    pilot = tiny_pilot("llama").train()
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
    with PilotTap(pilot) as tap:
        pilot(input_ids=ids, labels=ids, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2]]))
        (packed,) = tap.pop_records()
        pilot(input_ids=ids, labels=ids)
        (plain,) = tap.pop_records()
    assert packed.document_starts().nonzero()[:, 1].tolist() == [0, 4, 6]
    # The last token of each document has no target: the next one starts another document.
    expected = ids[0, 1:].tolist() + [IGNORE_INDEX]
    expected[3] = expected[5] = IGNORE_INDEX
    assert packed.next_token_labels()[0].tolist() == expected
    assert plain.document_starts().nonzero()[:, 1].tolist() == [0]
    # Flash-attention kwargs (DataCollatorWithFlattening(return_flash_attn_kwargs=True)) give the boundaries directly.
    from_offsets = dataclasses.replace(plain, cu_seq_lens=torch.tensor([0, 4, 6, 9], dtype=torch.int32))
    assert torch.equal(from_offsets.document_starts(), packed.document_starts())


def launch(script, *arguments, launcher="torchrun"):
    """Runs ``tests/<script>`` in 2 processes (gloo on the CPU) and fails with their output if it fails.

    ``launcher="accelerate"`` starts them with ``accelerate launch --multi_gpu``, which on a machine without GPUs
    runs 2 CPU processes (``--cpu --num_processes 2`` would start one)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    if launcher == "accelerate":
        with socket.socket() as probe:  # a free port, as torchrun --standalone finds one
            probe.bind(("localhost", 0))
            port = probe.getsockname()[1]
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(port)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(Path(__file__).with_name(script)), *map(str, arguments)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


linux_only = pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is exercised on Linux CI")


@pytest.mark.parametrize("engine, launcher", [("ddp", "torchrun"), ("ddp", "accelerate"), ("zero2", "torchrun"),
                                              ("zero3", "torchrun")])
@pytest.mark.slow
@linux_only
def test_two_processes_resume_to_the_copilot_of_an_uninterrupted_run(tmp_path, engine, launcher):
    """Under torchrun (DDP, DeepSpeed ZeRO-2 and ZeRO-3 on the CPU) and accelerate launch (DDP), both ranks end
    with the same Copilot, and a run resumed from the step-2 checkpoint (each rank reloading its own Mistake Log and
    state) ends with it too. Under ZeRO-3 the Pilot is partitioned as it is built, and from_pilot still copies its
    full weights."""
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    # The first DeepSpeed run on a machine compiles a CPU communication op (about 75 s), then it is cached.
    launch("distributed_train.py", tmp_path, engine, launcher=launcher)
    copilots = {name: torch.load(tmp_path / f"{name}.pt") for name in
                ("full_rank0", "full_rank1", "resumed_rank0", "resumed_rank1")}
    for name, copilot in copilots.items():
        assert json.loads((tmp_path / f"{name}.json").read_text()) == {"vocab_size": VOCAB, "copied_layer_0": True}
        for key, tensor in copilot.items():
            torch.testing.assert_close(tensor, copilots["full_rank0"][key], atol=1e-6, rtol=1e-5,
                                       msg=lambda message, name=name, key=key: f"{name} {key}: {message}")
    # Evaluation metrics are summed over both ranks (8 rows of SEQ - 3 labelled tokens), the same on each, and a
    # resumed run reports at step 4 what the uninterrupted one did.
    evaluations = {name: [{key: value for key, value in entry.items() if key == "step" or "copilot" in key}
                          for entry in json.loads((tmp_path / f"{name}_evaluations.json").read_text())]
                   for name in copilots}
    full = evaluations["full_rank0"]
    assert [entry["step"] for entry in full] == [2, 4]
    assert all(entry["eval_copilot_tokens"] == 8 * (SEQ - 3) for entry in full)
    assert evaluations["full_rank1"] == full
    for name in ("resumed_rank0", "resumed_rank1"):  # the step-2 entry came with the checkpoint's log history
        assert evaluations[name][-1] == pytest.approx(full[1], rel=1e-5), name
    initial = torch.load(tmp_path / "full_start.pt")
    assert any(not torch.equal(copilots["full_rank0"][key], initial[key]) for key in initial)  # it did train
    assert (tmp_path / "full" / "checkpoint-2" / "copilot" / "mistake_log_rank1").is_dir()


@pytest.mark.slow
@linux_only
def test_fsdp2_capture_and_from_pilot_equal_an_unsharded_recompute(tmp_path):
    """fully_shard swaps each decoder layer's class for a subclass (FSDPLlamaDecoderLayer) and holds each rank's
    shard of a weight: the tap still finds the layers, what it records from the sharded Pilot is what the unsharded
    Pilot shows, and from_pilot copies whole weights into the same Copilot."""
    launch("fsdp2_capture.py", tmp_path)
    for rank in (0, 1):
        records = torch.load(tmp_path / f"records_rank{rank}.pt")
        assert records["sharded"].pop("class") == "FSDPLlamaDecoderLayer"
        assert records["plain"].pop("class") == "LlamaDecoderLayer"
        sharded, plain = records["sharded"].pop("copilot"), records["plain"].pop("copilot")
        assert sharded.keys() == plain.keys()
        copied = [key for key in plain if key.startswith("layers.") or key == "error_projection.weight"]
        assert len(copied) > 10 and all(torch.equal(sharded[key], plain[key]) for key in copied)
        for name, tensor in records["plain"].items():
            torch.testing.assert_close(records["sharded"][name], tensor, msg=lambda message, name=name: f"{name}: "
                                       f"{message}")


def test_from_pilot_copies_a_peft_wrapped_pilot_completely():
    """A LoRA adapter moves each wrapped weight under `base_layer`; from_pilot copies the same tensors as from the
    bare Pilot (the fresh ones are drawn from the same seed, so every tensor must match)."""
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(tiny_pilot("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    copilots = []
    for pilot in (tiny_pilot("llama"), wrapped):
        torch.manual_seed(1)
        copilots.append(CopilotModel.from_pilot(pilot, num_hidden_layers=2).state_dict())
    for key, tensor in copilots[0].items():
        assert torch.equal(copilots[1][key], tensor), key


def test_compiled_pilot_records_without_graph_breaks_or_recompiles():
    """The hooks run inside a torch.compile'd forward: they must neither break its graph nor make it recompile
    from one step to the next, and they record what an eager forward records. Records are taken after every
    forward, as CopilotCallback does (a growing list of records would change the hook's guards at each step)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pilot = tiny_pilot("llama").train()
    compiled = torch.compile(pilot, backend="eager")
    batches = [torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed)) for seed in range(3)]
    graphs, records = [], []
    with PilotTap(compiled, errors_top_k=TOP_K) as tap:
        for ids in batches:
            compiled(input_ids=ids, labels=ids).loss.backward()
            records += tap.pop_records()
            graphs.append(counters["stats"]["unique_graphs"])
    assert not counters["graph_break"]
    assert graphs[0] > 0 and graphs[0] == graphs[-1]  # compiled once, reused for the next steps
    with PilotTap(pilot, errors_top_k=TOP_K) as tap:
        for ids in batches:
            pilot(input_ids=ids, labels=ids)
        for compiled_record, eager in zip(records, tap.pop_records()):
            torch.testing.assert_close(compiled_record.hidden_states, eager.hidden_states)
            torch.testing.assert_close(compiled_record.compact_errors.probs, eager.compact_errors.probs)


def test_a_saved_copilot_names_its_pilot_and_explains_itself(tmp_path):
    from transformers import AutoModel, AutoModelForCausalLM

    tiny_pilot("llama").save_pretrained(tmp_path / "pilot")
    pilot = AutoModelForCausalLM.from_pretrained(tmp_path / "pilot")
    copilot = CopilotModel.from_pilot(pilot, num_hidden_layers=2, pilot_revision="0123abc")
    copilot.save_pretrained(tmp_path / "copilot")
    loaded = AutoModel.from_pretrained(tmp_path / "copilot")
    assert type(loaded) is CopilotModel
    assert (loaded.config.pilot_name_or_path, loaded.config.pilot_revision) == (str(tmp_path / "pilot"), "0123abc")
    card = (tmp_path / "copilot" / "README.md").read_text()
    for needed in (str(tmp_path / "pilot"), "0123abc", "pip install hf_copilot", "import hf_copilot",
                   "AutoModel.from_pretrained", "library_name: hf_copilot"):
        assert needed in card, needed
    (tmp_path / "copilot" / "README.md").write_text("my own card")
    copilot.save_pretrained(tmp_path / "copilot")  # a card the user wrote stays
    assert (tmp_path / "copilot" / "README.md").read_text() == "my own card"


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_the_model_cards_snippet_loads_the_pilot_and_the_copilot(tmp_path, kind):
    """The card's code runs as written up to generate() (which needs the user's inputs), for either kind of Pilot."""
    tiny_pilot(kind).save_pretrained(tmp_path / "pilot")
    pilot = tiny_pilot(kind)
    pilot.config.name_or_path = str(tmp_path / "pilot")
    CopilotModel.from_pilot(pilot, num_hidden_layers=2).save_pretrained(tmp_path / "copilot")
    card = (tmp_path / "copilot" / "README.md").read_text()
    code = card.split("```python\n")[1].split("```")[0].replace("<this folder or repository>", str(tmp_path / "copilot"))
    lines = code.strip().splitlines()
    assert lines[-1].startswith("output = pilot.generate(")
    namespace = {}
    exec("\n".join(lines[:-1]), namespace)
    assert type(namespace["pilot"]) is type(pilot)
    assert isinstance(namespace["processor"], CopilotLogitsProcessor)


def test_rectified_decoding_in_the_evaluations_during_training(tmp_path):
    """The documented route (docs/integrations.md): a Seq2SeqTrainer whose evaluate() passes the processor to
    generate(), so the evaluations Trainer runs during training decode with the Copilot being trained (Trainer
    generates in evaluation only when it has a compute_metrics)."""
    from test_callback import pattern_dataset, trainer_args
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    from hf_copilot import CopilotLogitsProcessor

    pilot = tiny_pilot("t5")
    rows = [{"input_ids": row["input_ids"][:8], "attention_mask": row["attention_mask"][:8],
             "labels": row["input_ids"][8:].clone()} for row in pattern_dataset(16)]
    copilot = CopilotModel.from_pilot(pilot, num_hidden_layers=2)
    processor = CopilotLogitsProcessor(copilot, pilot, lam=1.0, top_analysis=1)
    calls = []

    class RectifiedSeq2SeqTrainer(Seq2SeqTrainer):
        def evaluate(self, *args, **gen_kwargs):
            calls.append(len(processor.analysis))
            return super().evaluate(*args, logits_processor=[processor], **gen_kwargs)

    fields = trainer_args(tmp_path, max_steps=4).to_dict() | dict(
        output_dir=str(tmp_path), eval_strategy="steps", eval_steps=2, predict_with_generate=True,
        generation_max_length=4, per_device_eval_batch_size=4)
    trainer = RectifiedSeq2SeqTrainer(model=pilot, args=Seq2SeqTrainingArguments(**fields), train_dataset=rows,
                                      eval_dataset=rows[:4], callbacks=[CopilotCallback(copilot, batch_size=4)],
                                      compute_metrics=lambda prediction: {"rows": len(prediction.predictions)})
    with processor, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert calls[0] == 0 and calls[1] > 0 and processor.analysis  # both evaluations generated through it
    # The updater leaves the Copilot in eval mode between updates, so the recipe raises no train-mode warning.
    assert not [w for w in caught if "train mode" in str(w.message)]
    assert len(processor.tap.records) <= 2  # and it kept none of the training forwards in between
    # The callback measured the Copilot in both evaluations, from the loss forwards (generate()'s carry no labels).
    entries = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert [entry["eval_copilot_tokens"] for entry in entries] == [4 * 8, 4 * 8]
