"""Fault injection: the Copilot never stops or changes the Pilot's run, nothing known to be broken is saved, every
file is written atomically and verified when read back, and bad options and data rows are refused up front.

Faults are injected from outside the code under test: NaN/inf through forward hooks, kill -9 of a training
subprocess at each stage of a checkpoint save, bytes overwritten in saved files, edited metadata, bad CLI options
and malformed data files.
"""

import importlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import qa_examples, qa_tokenizer, tiny_pilot
from test_callback import pattern_dataset, trainer_args
from test_generation import generate, noisy_copilot
from transformers import Trainer, TrainerCallback

from hf_copilot import CopilotCallback, CopilotLogitsProcessor, CopilotModel, CopilotUpdater, MistakeLog, PilotTap
from hf_copilot.copilot_checkpoint import MISTAKE_LOG_NAME, STATE_MANIFEST_NAME, TRAINING_STATE_NAME
from hf_copilot.recipes.cli import main
from hf_copilot.recipes.scoring import Decoding, evaluate_decodings
from hf_copilot.recipes.tasks import DEFAULT_FORMAT, load_examples_file
from hf_copilot.safe_io import DamagedFileError, torch_load_checked
from hf_copilot.training import CopilotTrainingConfig


ROOT = Path(__file__).parent.parent


def new_callback(**options):
    copilot = CopilotModel.from_pilot(tiny_pilot("llama"), num_hidden_layers=2)
    return CopilotCallback(copilot, **{"batch_size": 4, **options})


def train(output, callback, dataset=None, pilot=None, resume=None, **args):
    trainer = Trainer(model=pilot or tiny_pilot("llama"), args=trainer_args(output, **args),
                      train_dataset=dataset or pattern_dataset())
    callback.attach(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def all_finite(module):
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


# ---- 1. non-finite values never reach the Copilot -----------------------------------------------------------------

class PoisonLogits:
    """A forward hook on the Pilot that replaces the logits the tap reads (after the loss was computed from the
    real ones, so the Pilot trains as usual) with ``value`` at one position of the first row, in chosen forwards."""

    def __init__(self, value, forwards):
        self.value, self.forwards, self.seen, self.poisoned = value, set(forwards), 0, 0

    def __call__(self, module, args, output):
        if not (module.training and torch.is_grad_enabled()):
            return
        self.seen += 1
        if self.seen in self.forwards:
            logits = output.logits.detach().clone()
            logits[0, 5, 7] = self.value
            output.logits = logits
            self.poisoned += 1


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_logit_is_left_out_and_the_copilot_stays_finite(tmp_path, value):
    pilot = tiny_pilot("llama")
    poison = PoisonLogits(value, forwards=[2, 4])
    pilot.register_forward_hook(poison, prepend=True)
    callback = new_callback()
    with pytest.warns(RuntimeWarning, match="non-finite") as caught:
        trainer = train(tmp_path, callback, pilot=pilot)
    assert sum("non-finite logits" in str(w.message) for w in caught) == 1  # warned once
    assert poison.poisoned == 2
    assert callback.mistake_log.stats()["skipped_non_finite_sequences"] == 2
    assert trainer.state.log_history[-2]["copilot_skipped_sequences"] == 2
    assert callback.mistake_log.stats()["sequences"] == 6 * 4 - 2  # every other sequence of the 6 steps is kept
    assert all_finite(callback.copilot) and callback.updater.updates == 6
    # The Pilot trained exactly as without the Copilot.
    plain = train(tmp_path / "plain", CopilotCallback(CopilotModel.from_pilot(tiny_pilot("llama"), 2), batch_size=4))
    for a, b in zip(plain.model.parameters(), trainer.model.parameters()):
        assert torch.equal(a, b)


def test_minus_infinity_logits_are_legitimate(tmp_path):
    """A banned token (-inf logit) has probability 0: a finite error, kept."""
    pilot = tiny_pilot("llama")
    pilot.register_forward_hook(PoisonLogits(float("-inf"), forwards=[1]), prepend=True)
    callback = new_callback()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(tmp_path, callback, pilot=pilot, max_steps=2)
    assert callback.mistake_log.stats()["skipped_non_finite_sequences"] == 0
    assert callback.mistake_log.stats()["sequences"] == 8


@pytest.mark.parametrize("max_grad_norm, autocast", [(1.0, None), (0.0, None), (1.0, torch.float16)],
                         ids=["clipped", "unclipped", "fp16"])
def test_a_non_finite_update_is_skipped_and_leaves_weights_and_moments(tmp_path, max_grad_norm, autocast):
    callback = new_callback()
    train(tmp_path, callback, max_steps=2)
    copilot, log = callback.copilot, callback.mistake_log
    updater = CopilotUpdater(copilot, CopilotTrainingConfig(batch_size=4, max_grad_norm=max_grad_norm), 10,
                             autocast_dtype=autocast)
    updater.step(log)  # moments exist from here on
    before = {name: p.detach().clone() for name, p in copilot.named_parameters()}
    moments = [state["exp_avg"].clone() for state in updater.optimizer.state.values()]
    handle = copilot.norm.register_forward_hook(lambda module, args, output: output * float("nan"))
    with pytest.warns(RuntimeWarning, match="non-finite loss or gradient"):
        loss = updater.step(log)
    handle.remove()
    assert math.isnan(loss) and updater.skipped_updates == 1
    for name, p in copilot.named_parameters():
        assert torch.equal(p, before[name]), name
    for state, moment in zip(updater.optimizer.state.values(), moments):
        assert torch.equal(state["exp_avg"], moment) and int(state["step"]) == 1
    updater.step(log)  # a finite update lands again
    assert updater.skipped_updates == 1
    assert any(not torch.equal(p, before[name]) for name, p in copilot.named_parameters())


def test_an_fp16_overflow_lowers_the_loss_scale_without_counting_a_fault(tmp_path):
    """Under fp16 the loss is scaled; scaled gradients that overflow are the scaler's business: the step is skipped,
    the scale lowered (and kept across a resume), and no fault is counted or warned about."""
    callback = new_callback()
    train(tmp_path, callback, max_steps=2)
    copilot, log = callback.copilot, callback.mistake_log
    updater = CopilotUpdater(copilot, CopilotTrainingConfig(batch_size=4), 10, autocast_dtype=torch.float16)
    updater.step(log)
    updater.scaler.update(new_scale=2.0 ** 120)  # far past fp16's range: every scaled gradient overflows
    before = {name: p.detach().clone() for name, p in copilot.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        loss = updater.step(log)
    assert math.isfinite(loss) and updater.skipped_updates == 0
    assert updater.scaler.get_scale() == 2.0 ** 119
    for name, p in copilot.named_parameters():
        assert torch.equal(p, before[name]), name
    resumed = CopilotUpdater(copilot, CopilotTrainingConfig(batch_size=4), 10, autocast_dtype=torch.float16)
    resumed.load_state_dict(updater.state_dict())
    assert resumed.scaler.get_scale() == 2.0 ** 119


# ---- 4. the log's budget never stops the Pilot --------------------------------------------------------------------

def padded_to(row, length):
    pad = length - len(row["input_ids"])
    return {"input_ids": torch.nn.functional.pad(row["input_ids"], (0, pad)),
            "attention_mask": torch.nn.functional.pad(row["attention_mask"], (0, pad)),
            "labels": torch.nn.functional.pad(row["labels"], (0, pad), value=-100)}


def test_a_micro_batch_over_the_log_budget_is_skipped_not_raised(tmp_path):
    """Rows of 16 tokens padded to 128, but one row really 128 tokens long: its micro-batch alone needs more than
    the budget (about 450 bytes a token here)."""
    dataset = [padded_to(row, 128) for row in pattern_dataset()]
    dataset[5] = {name: torch.cat([value] * 8) for name, value in pattern_dataset()[5].items()}
    callback = new_callback(log_max_bytes=50_000)
    with pytest.warns(RuntimeWarning, match="more than max_bytes=50000"):
        trainer = train(tmp_path, callback, dataset=dataset, max_steps=8)
    assert trainer.state.global_step == 8
    assert callback.mistake_log.stats()["skipped_oversized_records"] == 1
    assert max(entry.get("copilot_skipped_records", 0) for entry in trainer.state.log_history) == 1
    assert 0 < callback.mistake_log.bytes <= 50_000 and callback.updater.updates == 8


# ---- 2. crash-safe checkpoints: kill -9 during each stage of the save ---------------------------------------------

SAVE_STAGES = {  # what is interrupted, at its 2nd call: the save of checkpoint-4 (checkpoint-2 is complete)
    "copilot weights": "hf_copilot.safe_io.replace_folder_files",
    "mistake log": "hf_copilot.mistake_log.save_file",
    "training state": "hf_copilot.copilot_checkpoint.atomic_write",
    "checksums": "hf_copilot.copilot_checkpoint.write_manifest",
}


def _run_until_killed(output, target, save_total_limit):
    """In a forked child: a checkpointing run whose ``target`` function SIGKILLs the process at its 2nd call."""
    module_name, name = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    original, calls = getattr(module, name), []

    def killing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(module, name, killing)
    train(output, new_callback(save_mistake_log=True), max_steps=6, save_strategy="steps", save_steps=2,
          save_total_limit=save_total_limit)


def killed_run(output, stage, save_total_limit=None):
    """kill -9 of a training subprocess (forked, so it starts in no time) in the middle of a checkpoint save."""
    child = multiprocessing.get_context("fork").Process(target=_run_until_killed,
                                                        args=(output, SAVE_STAGES[stage], save_total_limit))
    child.start()
    child.join(timeout=300)
    assert child.exitcode == -signal.SIGKILL
    assert (output / "checkpoint-4" / "trainer_state.json").exists()


def resume(output, checkpoint="checkpoint-4", **options):
    callback = new_callback(save_mistake_log=True, **options)
    train(output, callback, resume=str(output / checkpoint), max_steps=6)
    return callback


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(SAVE_STAGES))
def test_kill_during_a_checkpoint_save_falls_back_to_the_last_complete_copilot_state(tmp_path, stage):
    output = tmp_path / "run"
    killed_run(output, stage)
    with pytest.warns(RuntimeWarning, match="the Copilot resumes from .*checkpoint-2 \\(step 2\\)"):
        callback = resume(output)
    # Resumed from checkpoint-2's Copilot (2 updates), then the Pilot's steps 5 and 6.
    assert callback.updater.updates == 4 and all_finite(callback.copilot)
    assert not list(output.rglob("*.partial"))


@pytest.mark.slow
def test_kill_with_no_complete_copilot_state_left_says_what_to_do(tmp_path):
    output = tmp_path / "run"
    killed_run(output, "mistake log", save_total_limit=1)
    assert not (output / "checkpoint-2").exists()  # Trainer rotated it out before the Copilot's save began
    with pytest.raises(DamagedFileError, match="resume_from=False"):
        resume(output)
    callback = resume(output, resume_from=False)  # a new Copilot beside the resumed Pilot
    assert callback.updater.updates == 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A complete checkpoint with the Copilot's state and log."""
    output = tmp_path_factory.mktemp("checkpoint")
    train(output, new_callback(save_mistake_log=True), max_steps=2, save_strategy="steps", save_steps=2)
    return output / "checkpoint-2"


def damaged_copy(checkpoint, tmp_path):
    """A copy of the whole checkpoint to damage; returns its copilot folder."""
    shutil.copytree(checkpoint, tmp_path / "checkpoint-2")
    return tmp_path / "checkpoint-2" / "copilot"


def test_a_truncated_training_state_is_named(checkpoint, tmp_path):
    copy = damaged_copy(checkpoint, tmp_path)
    state = copy / TRAINING_STATE_NAME.format(rank=0)
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(DamagedFileError, match=f"{state}.*truncated or damaged"):
        torch_load_checked(state, weights_only=False)
    with pytest.raises(DamagedFileError, match=f"{state} is damaged: its SHA-256 differs"):
        resume(tmp_path, checkpoint="checkpoint-2")


def test_a_checkpoint_without_its_checksums_is_incomplete(checkpoint, tmp_path):
    copy = damaged_copy(checkpoint, tmp_path)
    (copy / STATE_MANIFEST_NAME.format(rank=0)).unlink()
    with pytest.raises(DamagedFileError, match="did not finish"):
        resume(tmp_path, checkpoint="checkpoint-2")


# ---- 3. damaged weights and edited logs are refused ---------------------------------------------------------------

def overwrite(path, offset_from_end, data):
    raw = bytearray(path.read_bytes())
    raw[-offset_from_end:-offset_from_end + len(data)] = data
    path.write_bytes(bytes(raw))


def test_damaged_copilot_weights_are_refused_with_or_without_checksums(checkpoint, tmp_path):
    copy = damaged_copy(checkpoint, tmp_path)
    overwrite(copy / "model.safetensors", 4000, b"\xff" * 1000)  # NaN float32 values
    with pytest.raises(DamagedFileError, match="model.safetensors is damaged"):
        CopilotModel.from_pretrained(copy)
    (copy / "checksums.json").unlink()  # a folder saved by hand: the weights themselves are checked
    with pytest.raises(DamagedFileError, match="NaN/inf"):
        CopilotModel.from_pretrained(copy)


def test_non_finite_weights_are_never_saved(tmp_path):
    copilot = CopilotModel.from_pilot(tiny_pilot("llama"), num_hidden_layers=2)
    copilot.save_pretrained(tmp_path / "copilot")
    saved = (tmp_path / "copilot" / "model.safetensors").read_bytes()
    with torch.no_grad():
        copilot.correction_head.weight[3, 2] = float("nan")
    with pytest.raises(ValueError, match="Refusing to save.*correction_head.weight"):
        copilot.save_pretrained(tmp_path / "copilot")
    assert (tmp_path / "copilot" / "model.safetensors").read_bytes() == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copilot"]  # no staging folder left


def test_a_copilot_gone_non_finite_is_not_checkpointed_and_the_pilot_goes_on(tmp_path):
    """Weights broken outside the guarded updates (here by hand, after step 3): the Pilot's checkpoints are still
    written, the Copilot's are skipped with a warning, and the run finishes."""
    callback = new_callback()

    class BreakTheCopilot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                with torch.no_grad():
                    callback.copilot.correction_head.weight[0, 0] = float("nan")

    trainer = Trainer(model=tiny_pilot("llama"), train_dataset=pattern_dataset(), callbacks=[BreakTheCopilot()],
                      args=trainer_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=2))
    callback.attach(trainer)
    with pytest.warns(RuntimeWarning, match="hold NaN/inf, so it is not saved") as caught:
        trainer.train()
    assert trainer.state.global_step == 6
    assert (tmp_path / "checkpoint-2" / "copilot" / "model.safetensors").is_file()
    for step in (4, 6):
        assert (tmp_path / f"checkpoint-{step}" / "model.safetensors").is_file()  # the Pilot's checkpoint
        assert not (tmp_path / f"checkpoint-{step}" / "copilot").exists()
    assert not (tmp_path / "copilot").exists()  # nor the final save
    assert sum("so it is not saved" in str(w.message) for w in caught) == 3


def test_a_pilot_folder_is_not_loaded_as_a_copilot(tmp_path):
    tiny_pilot("llama").save_pretrained(tmp_path / "pilot")
    with pytest.raises(ValueError, match="holds a 'llama' model, not a 'copilot' one"):
        CopilotModel.from_pretrained(tmp_path / "pilot")


LOG_EDITS = {
    "not JSON": lambda meta, text: text[:-5],
    "steps removed": lambda meta, text: json.dumps({k: v for k, v in meta.items() if k != "steps"}),
    "top_k a string": lambda meta, text: json.dumps({**meta, "top_k": "8"}),
    "unknown dtype": lambda meta, text: json.dumps({**meta, "storage_dtype": "float7"}),
    "a list": lambda meta, text: json.dumps([meta]),
    "more steps than entries": lambda meta, text: json.dumps({**meta, "steps": meta["steps"] + [9]}),
}


@pytest.mark.parametrize("edit", list(LOG_EDITS))
def test_an_edited_log_is_refused_naming_the_file(checkpoint, tmp_path, edit):
    copy = damaged_copy(checkpoint, tmp_path) / MISTAKE_LOG_NAME.format(rank=0)
    metadata = copy / "mistake_log.json"
    text = metadata.read_text()
    metadata.write_text(LOG_EDITS[edit](json.loads(text), text))
    with pytest.raises(DamagedFileError, match=str(copy)):
        MistakeLog.load(copy)


def test_damaged_log_tensors_are_refused(checkpoint, tmp_path):
    copy = damaged_copy(checkpoint, tmp_path) / MISTAKE_LOG_NAME.format(rank=0)
    overwrite(copy / "mistake_log.safetensors", 500, b"\x00" * 100)
    with pytest.raises(DamagedFileError, match="mistake_log.safetensors is damaged"):
        MistakeLog.load(copy)
    (copy / "mistake_log.safetensors").unlink()
    with pytest.raises(DamagedFileError, match="is missing"):
        MistakeLog.load(copy)


# ---- 5. an interrupted train() leaves nothing behind --------------------------------------------------------------

class Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise KeyboardInterrupt


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_an_interrupted_train_does_not_leak_its_tap(tmp_path):
    pilot = tiny_pilot("llama")
    clean = hook_count(pilot)
    callback = new_callback()
    trainer = Trainer(model=pilot, args=trainer_args(tmp_path, max_steps=6), train_dataset=pattern_dataset(),
                      callbacks=[Interrupt()])
    callback.attach(trainer)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert hook_count(pilot) > clean  # Trainer calls no callback on an exception
    # Training forwards outside Trainer: the tap notices nobody collects its records, drops them and detaches.
    batch = {k: torch.stack([row[k] for row in pattern_dataset(2)]) for k in ("input_ids", "labels")}
    pilot.train()
    with pytest.warns(RuntimeWarning, match="never collected"):
        for _ in range(10):
            pilot(**batch).loss.backward()
    assert hook_count(pilot) == clean and not callback.tap.records
    # A second train() runs one tap and a log of its own rounds only.
    trainer.callback_handler.callbacks = [c for c in trainer.callback_handler.callbacks if not isinstance(c, Interrupt)]
    seen = []
    trainer.add_callback(type("Count", (TrainerCallback,), {"on_step_begin": lambda self, *a, **k: seen.append(
        hook_count(pilot))})())
    with PilotTap(pilot) as tap:
        one_tap = len(tap._handles)
    trainer.train()
    assert set(seen) == {clean + one_tap}
    assert callback.mistake_log.steps == [1, 2, 3, 4, 5, 6] and hook_count(pilot) == clean


# ---- 6. no silent no-ops --------------------------------------------------------------------------------------------

def unlabelled(n=16):
    rows = pattern_dataset(n)
    for row in rows:
        row["labels"] = torch.full_like(row["labels"], -100)
    return rows


def length_one(n=16):
    return [{k: v[:1] for k, v in row.items()} for row in pattern_dataset(n)]


@pytest.mark.parametrize("dataset", [unlabelled, length_one])
def test_a_copilot_that_learned_nothing_says_so(tmp_path, dataset):
    callback = new_callback()
    with pytest.warns(RuntimeWarning, match="took no update.*labels are not all -100"):
        train(tmp_path, callback, dataset=dataset(), max_steps=2)
    assert callback.updater.updates == 0


def test_a_run_shorter_than_update_every_says_so(tmp_path):
    callback = new_callback(update_every=5)
    with pytest.warns(RuntimeWarning, match="took no update.*update_every=5 is more than the 2 Pilot steps"):
        train(tmp_path, callback, max_steps=2)
    assert callback.updater.updates == 0


def test_the_copilot_is_left_in_eval_mode(tmp_path):
    callback = new_callback()
    train(tmp_path, callback, max_steps=2)
    assert not callback.copilot.training and not any(m.training for m in callback.copilot.modules())


# ---- 10. the processor ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama():
    pilot = tiny_pilot("llama")
    return pilot, noisy_copilot(pilot)


@pytest.mark.parametrize("lam", [float("nan"), -1.0, 1e39, float("inf"), True])
def test_lam_is_checked_when_set_later(llama, lam):
    with CopilotLogitsProcessor(*reversed(llama), lam=1.0) as processor:
        with pytest.raises(ValueError, match="lam"):
            processor.lam = lam
        assert processor.lam == 1.0


def test_continuing_from_a_rectified_output_matches_a_fresh_processor(llama):
    pilot, copilot = llama
    prompt = dict(input_ids=torch.tensor([[5, 6, 7, 8, 9]]), max_new_tokens=4)
    with CopilotLogitsProcessor(copilot, pilot, lam=1.0) as reused:
        first = generate(pilot, reused, **prompt)
        continued = generate(pilot, reused, input_ids=first, max_new_tokens=4)
    with CopilotLogitsProcessor(copilot, pilot, lam=1.0) as fresh:
        expected = generate(pilot, fresh, input_ids=first, max_new_tokens=4)
    assert torch.equal(continued, expected)


def test_a_copilot_in_train_mode_is_put_in_eval_mode(llama):
    pilot = llama[0]
    copilot = noisy_copilot(pilot, attention_dropout=0.5)
    inputs = dict(input_ids=torch.tensor([[5, 6, 7, 8, 9]]), max_new_tokens=4)
    with CopilotLogitsProcessor(copilot, pilot, lam=1.0) as processor:
        expected = generate(pilot, processor, **inputs)
    copilot.train()
    with CopilotLogitsProcessor(copilot, pilot, lam=1.0) as processor, pytest.warns(RuntimeWarning,
                                                                                    match="train mode"):
        assert torch.equal(generate(pilot, processor, **inputs), expected)
    assert not copilot.training


# ---- 8, 7. the CLI refuses bad options before any work ------------------------------------------------------------

@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_pilot("llama").save_pretrained(root / "pilot")
    qa_tokenizer().save_pretrained(root / "pilot")
    CopilotModel.from_pilot(tiny_pilot("llama"), num_hidden_layers=2).save_pretrained(root / "copilot")
    rows = [{"question": ex.question, "answer": ex.answer, **({"choices": list(ex.choices)} if ex.choices else {})}
            for ex in qa_examples(8)]
    (root / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def eval_argv(root, *extra, output=None, copilot=None):
    return ["eval", "--model", str(root / "pilot"), "--copilot", str(copilot or root / "copilot"), "--data",
            str(root / "data.jsonl"), "--output", str(output or root / "eval"), "--beams", "1", *extra]


BAD_OPTIONS = {
    "--lams=-1,0.5": (["--lams=-1,0.5"], "argument --lams: '-1' is not a fusion weight"),
    "--lams nan": (["--lams", "nan"], "'nan' is not a fusion weight"),
    "--lams 1e39": (["--lams", "1e39"], "'1e39' is not a fusion weight"),
    "--beams 0": (["--beams", "0"], "argument --beams: '0' is not a positive integer"),
    "--batch-size 0": (["--batch-size", "0"], "argument --batch-size: '0' is not a positive integer"),
    "--spaces prob": (["--spaces", "prob"], "'prob' is not a fusion space"),
    "--test-size with --data": (["--test-size", "3"], "hf-copilot eval: error: --test-size chooses the rows of a --task"),
    "--data-seed with --data": (["--data-seed", "3"], "--data-seed chooses the rows of a --task; --data uses its whole"),
}


@pytest.mark.parametrize("option", list(BAD_OPTIONS))
def test_bad_eval_options_are_one_line_errors(user_files, capsys, option):
    extra, message = BAD_OPTIONS[option]
    with pytest.raises(SystemExit) as exit_:
        main(eval_argv(user_files, *extra))
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2 and message in stderr and stderr.count("\n") == 1


@pytest.mark.parametrize("epochs", ["0", "-1", "nan"])
def test_train_refuses_epochs_that_train_nothing(user_files, capsys, epochs):
    with pytest.raises(SystemExit):
        main(["train", "--model", str(user_files / "pilot"), "--data", str(user_files / "data.jsonl"), "--output",
              str(user_files / "train"), f"--epochs={epochs}"])
    assert f"argument --epochs: '{epochs}' is not a positive finite number" in capsys.readouterr().err


def train_argv(root, *extra, output=None):
    return ["train", "--model", str(root / "pilot"), "--data", str(root / "data.jsonl"), "--output",
            str(output or root / "train"), *extra]


@pytest.mark.parametrize("extra, message", [
    (["--copilot-layers", "1"], "argument --copilot-layers: '1' is not 'all' or a layer count of 2 or more"),
    (["--copilot-correction", "rerank"], "argument --copilot-correction: invalid choice: 'rerank'"),
], ids=["one layer", "a retired correction"])
def test_bad_train_option_combinations_are_refused_while_parsing(user_files, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_:
        main(train_argv(user_files, *extra))
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2 and message in stderr and stderr.count("\n") == 1


@pytest.mark.parametrize("extra, message", [
    (["--copilot-layers", "5"], "--copilot-layers 5 is deeper than the Pilot (4 layers), whose layers the Copilot "
                                "copies: pass 4 or fewer, or 'all'."),
    (["--max-length", "2"], "--max-length 2 leaves no room for a prompt: the longest answer is"),
], ids=["deeper than the pilot", "max-length below the answers"])
def test_train_refuses_what_needs_the_model_before_loading_it(user_files, capsys, tmp_path, monkeypatch, extra,
                                                              message):
    def no_loading(*args, **kwargs):
        raise AssertionError("the Pilot's weights were loaded before the options were checked")

    monkeypatch.setattr("hf_copilot.recipes.cli.AutoModelForCausalLM.from_pretrained", no_loading)
    output = tmp_path / "run"
    assert main(train_argv(user_files, *extra, output=output)) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hf-copilot train: error: {message}")
    assert not output.exists()  # a failed command leaves no empty folder behind


def test_eval_refuses_a_max_length_without_room_before_loading_any_weights(user_files, capsys, tmp_path,
                                                                         monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the options were checked")

    monkeypatch.setattr("hf_copilot.recipes.finetune.AutoModelForCausalLM.from_pretrained", no_loading)
    monkeypatch.setattr("hf_copilot.recipes.cli.CopilotModel.from_pretrained", no_loading)
    output = tmp_path / "new" / "runs" / "eval"  # three folders the command has to make
    assert main(eval_argv(user_files, "--max-length", "2", output=output)) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"hf-copilot eval: error: --max-length 2 (the Pilot takes 256 positions) leaves no room for a "
                     f"prompt before {DEFAULT_FORMAT.max_new_tokens} answer tokens; raise --max-length."]
    assert not (tmp_path / "new").exists()  # every folder it made is gone again


def test_eval_names_an_empty_pilot_folder_and_a_copilot_of_another_pilot(user_files, capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = eval_argv(user_files, output=tmp_path / "eval")
    argv[argv.index("--model") + 1] = str(empty)
    assert main(argv) == 1
    assert f"{empty} holds no saved model (neither config.json nor adapter_config.json)" in capsys.readouterr().err
    CopilotModel.from_pilot(tiny_pilot("qwen2"), num_hidden_layers=2).save_pretrained(tmp_path / "qwen2-copilot")
    assert main(eval_argv(user_files, output=tmp_path / "eval", copilot=tmp_path / "qwen2-copilot")) == 1
    error = capsys.readouterr().err
    assert "was not trained with --model" in error and "built for a 'qwen2' one" in error
    assert not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_a_pilot_folder_as_copilot_is_refused_in_one_line_without_traceback(user_files):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "hf_copilot", *eval_argv(user_files, copilot=user_files / "pilot")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"hf-copilot eval: error: {user_files / 'pilot'} holds a 'llama' model, not a 'copilot' one (its config.json "
        "says model_type='llama'). Point at the folder the copilot was saved to."]


def test_eval_output_is_checked_before_any_work(user_files, capsys, tmp_path):
    existing = tmp_path / "results"
    existing.write_text("mine")
    argv = eval_argv(user_files, output=existing)
    argv[argv.index("--model") + 1] = str(tmp_path / "no-such-pilot")  # would fail later, when loading
    assert main(argv) == 1
    assert f"--output {existing} is an existing file" in capsys.readouterr().err
    assert existing.read_text() == "mine"
    assert main(eval_argv(user_files, output=existing / "eval")) == 1  # a folder that cannot be made
    assert f"--output {existing / 'eval'} is not a writable folder" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main(eval_argv(user_files, output=locked)) == 1
        assert "is not a writable folder" in capsys.readouterr().err


def test_data_errors_and_warnings_reach_the_cli_user_as_one_line(user_files, capsys, tmp_path):
    data = tmp_path / "data.jsonl"
    row = json.dumps({"question": "q", "answer": "a"}).encode()
    data.write_bytes(row + b"\n" + row + b"\n" + b'{"question": "caf\xe9", "answer": "b"}\n')
    argv = eval_argv(user_files, output=tmp_path / "eval")
    argv[argv.index("--data") + 1] = str(data)
    assert main(argv) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"hf-copilot eval: error: {data}, line 3: byte 0xe9 is not UTF-8; save the file as UTF-8."]
    data.write_bytes(row + b"\n" + row + b"\n")  # a warning, then train stops at the missing model folder
    assert main(["train", "--model", str(tmp_path / "missing"), "--data", str(data), "--output",
                 str(tmp_path / "train")]) == 1
    warning, error = capsys.readouterr().err.splitlines()
    assert warning == (f"hf-copilot: warning: {data}: 1 row(s) repeat an earlier one (line 2 repeats line 1); they "
                       "are kept, and count twice in training and accuracy.")
    assert error.startswith(f"hf-copilot train: error: No model folder at '{tmp_path / 'missing'}'")


def test_eval_cuts_long_prompts_and_says_how_many(user_files, capsys, tmp_path):
    data = tmp_path / "long.jsonl"
    rows = [json.loads(line) for line in (user_files / "data.jsonl").read_text().splitlines()]
    rows[0]["question"] = " ".join(["q1"] * 3000) + " ?"  # far past the Pilot's 256 positions
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = eval_argv(user_files, "--lams", "1", "--spaces", "logits", output=tmp_path / "eval")
    argv[argv.index("--data") + 1] = str(data)
    assert main(argv) == 0
    room = 256 - DEFAULT_FORMAT.max_new_tokens  # eval's default --max-length is train's
    assert f"1 of 8 prompts are longer than {room} tokens" in capsys.readouterr().out
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["prompts_cut"] == 1 and not (tmp_path / "eval" / "results.partial.json").exists()


def test_partial_answers_are_handed_out_as_decodings_finish():
    pilot, tokenizer = tiny_pilot("llama"), qa_tokenizer()
    copilot = noisy_copilot(pilot)
    examples = qa_examples(4)
    decodings = [Decoding(), Decoding(1.0, "logits"), Decoding(num_beams=2), Decoding(1.0, "logits", 2)]
    seen = []
    rows = evaluate_decodings(pilot, tokenizer, examples, DEFAULT_FORMAT, decodings, copilot=copilot, batch_size=4,
                              on_answers=lambda answers: seen.append({d.name: list(a) for d, a in answers.items()}))
    assert [len(answers) for answers in seen] == [2, 3, 4]  # greedy pair (screened together), then one by one
    assert seen[-1] == {row["decoding"]: row["answers"] for row in rows}


# ---- 9. data files ------------------------------------------------------------------------------------------------

BAD_FILES = {
    "not UTF-8": ("data.jsonl", b'{"question": "a", "answer": "b"}\n\n{"question": "caf\xe9", "answer": "b"}\n',
                  r"data.jsonl, line 3: byte 0xe9 is not UTF-8"),
    "open quote": ("data.csv", b'question,answer\nq1,a1\n"q2,a2\nq3,a3\n', r"data.csv, line 3: .*quote"),
    "duplicate choices": ("data.jsonl", b'{"question": "q", "answer": "a", "choices": ["a", "b", "a"]}\n',
                          r"data.jsonl, line 1: 'choices' lists \['a'\] more than once"),
    "empty choice": ("data.csv", b"question,answer,choices\nq,a,a||b\n", r"data.csv, line 2: .*empty choice"),
    "no header": ("data.csv", b"q1,a1\n", r"data.csv, line 1: the header 'q1,a1' does not name"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_data_files_name_the_file_and_line(tmp_path, case):
    name, content, message = BAD_FILES[case]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_examples_file(tmp_path / name)


@pytest.mark.parametrize("content", [
    "\ufeffquestion,answer,choices\nq1,a,a|b\n\"q2, long\",c,\n",
    "question;answer;choices\nq1;a;a|b\n\"q2; long\";c;\n",
    "question\tanswer\tchoices\nq1\ta\ta|b\nq2; long\tc\t\n",
], ids=["BOM", "semicolons", "tabs"])
def test_csv_dialects_load(tmp_path, content):
    (tmp_path / "data.csv").write_text(content, encoding="utf-8")
    examples = load_examples_file(tmp_path / "data.csv")
    assert [(e.question, e.answer, e.choices) for e in examples] == [("q1", "a", ("a", "b")),
                                                                     (examples[1].question, "c", None)]
    assert examples[1].question in ("q2, long", "q2; long")


def test_repeated_rows_are_warned_with_their_lines(tmp_path):
    row = json.dumps({"question": "q", "answer": "a"})
    (tmp_path / "data.jsonl").write_text(f"{row}\n{json.dumps({'question': 'r', 'answer': 'a'})}\n{row}\n")
    with pytest.warns(UserWarning, match="1 row\\(s\\) repeat an earlier one \\(line 3 repeats line 1\\)"):
        assert len(load_examples_file(tmp_path / "data.jsonl")) == 3

