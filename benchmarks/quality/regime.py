"""When does a Copilot pay? A regime map over training rows and Pilot size, against a Pilot trained longer and a
larger Pilot (issue "When does a Copilot pay?").

    python -m benchmarks.quality.regime                                  # the pre-registered CPU grid, resumable
    python -m benchmarks.quality.regime --pilots xs --seeds 0            # part of it (cells run in the grid's order)
    python -m benchmarks.quality.regime --report-only                    # table and figure from committed cells
    bash benchmarks/gpu_regime.sh                                        # the GPU edition: torch + transformers only
    python -m benchmarks.quality.regime --edition smoke --runs /tmp/rs   # every stage on a toy grid, a minute on CPU
    python -m benchmarks.quality.regime --edition bridge                 # SmolLM2 + LoRA (regime_bridge.py)
    python -m benchmarks.quality.regime --edition plateau                # 8x the steps: Pilots at their plateau
    python -m benchmarks.quality.regime --transfer arithmetic,xs,25000   # seed 0's Copilots on seed 1's Pilot

Pilots are Llama-style decoders trained from scratch on tasks generated in-process
(:mod:`benchmarks.quality.generated_tasks`); nothing is downloaded and neither ``datasets`` nor ``peft`` is
imported, so the GPU edition runs on a machine with torch and transformers alone (Trainer also needs accelerate).
The bridge edition adapts SmolLM2-135M with LoRA instead (:mod:`benchmarks.quality.regime_bridge`). The design
below is also written, with its sizes, in docs/results.md ("The regime map").

**The pre-registered design** (fixed in this file before the first cell ran; the CPU grid is :data:`EDITIONS`
``["cpu"]``). One cell is (task, Pilot size, training rows, seed). Its stages, each run once and kept on disk:

  joint     the Pilot trains ``steps`` optimizer steps (AdamW, cosine, batch ``batch_size``) with four Copilots beside
            it, trained jointly through :class:`~hf_copilot.CopilotCallback` (batch = the Pilot's, one update per
            step, the Pilot's learning rate): the 2-layer Copilot and a Copilot of the Pilot's own depth, each with
            the paper's ``vocabulary`` head and with the ``logit_residual`` head. The validation loss is measured
            ten times; the Pilot (and its Copilots, from the same checkpoint) is the best of those. The Pilot's
            training does not depend on its Copilots, so this Pilot is also the "Pilot alone" arm.
            Then: each Copilot's fit to its own log (its loss ÷ the all-zero loss, mean of its last three logged
            values), its held-out ratio on the test items (teacher-forced), and its greedy setting (fusion space and
            λ over :data:`SETTINGS`) chosen on the validation items, or no rectification when no setting beats the
            Pilot alone there; the chosen setting then decodes the test items.
  longer    (b) the Pilot alone, same seed, trained ``steps × (1 + r)`` steps, r the Pilot-sized Copilot's measured
            share of the joint run's time (the larger of its two heads); same best-of-ten selection.
  larger    (d) a Pilot of the same depth widened until its parameter count matches Pilot + the Pilot-sized Copilot,
            same data and steps (so about the same time); same selection.

Accuracy is exact match of the greedy answer on the test items. Each arm is compared with the Pilot alone, and each
Copilot arm with (b) and with (d), item by item (paired; :mod:`hf_copilot.recipes.significance`), per seed and
pooled over the seeds. The target (a Copilot arm above both (b) and (d) by ≥ 5 % relative) is tested per (task,
Pilot, rows, Copilot arm) with the larger of its two pooled p-values, Holm-corrected over every such test of the
grid that ran. Every cell that ran is reported.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from hf_copilot import CopilotCallback, CopilotLogitsProcessor, CopilotMetrics, CopilotModel
from hf_copilot.errors import IGNORE_INDEX
from hf_copilot.pilot import PilotTap
from hf_copilot.safe_io import atomic_write_text

from benchmarks.quality.generated_tasks import VOCABULARY, Item, Splits, make_splits

RESULTS = Path(__file__).parent / "results"
PILOTS = {  # from-scratch Llama shapes: 1.1M, 4.3M, 14M and 114M parameters with this vocabulary (tied embeddings)
    "xs": dict(hidden_size=128, num_hidden_layers=4, learning_rate=1e-3),
    "s": dict(hidden_size=256, num_hidden_layers=4, learning_rate=1e-3),
    "m": dict(hidden_size=384, num_hidden_layers=6, learning_rate=7e-4),
    "l": dict(hidden_size=768, num_hidden_layers=12, learning_rate=3e-4),  # the GPU edition only
    # The bridge to a real LM (benchmarks/quality/regime_bridge.py): pretrained, LoRA as in the paper.
    "smollm2": dict(model="smollm2-135m", lora_rank=32, lora_dropout=0.05, learning_rate=2e-4),
}
HEAD_WIDTH = 32  # attention head width; heads = hidden_size / 32
SETTINGS = [("probs", lam) for lam in (0.1, 0.3, 0.5, 0.8, 1.0)] + [("logits", lam) for lam in (1.0, 3.0)]
"""The greedy settings λ is chosen among on validation items (the paper's grid in probability space, two in logit
space)."""
COPILOTS = {"small_vocabulary": (2, "vocabulary"), "small_residual": (2, "logit_residual"),
            "full_vocabulary": (None, "vocabulary"), "full_residual": (None, "logit_residual")}
"""Copilot name -> (layers, None: the Pilot's depth; correction head)."""
PILOT_SIZED = [name for name, (layers, _) in COPILOTS.items() if layers is None]
"""The Copilots (b) and (d) are matched to."""
ARMS = (*COPILOTS, "longer", "larger")
TARGET_GAIN = 0.05  # relative, over both (b) and (d)
ROWS = (1562, 6250, 25000, 100000)  # x4 steps; at 600 steps of 64 rows, from 25 epochs down to no row seen twice
EDITIONS = {
    # 2 CPU cores, about 8 hours in all, run block by block in this order: the smallest Pilot over every data size
    # first (seed 0 of both tasks, then seeds 1 and 2), then the larger Pilots as far as the time reaches.
    "cpu": dict(steps=600, batch_size=64, validation=1000, test=2000, eval_batch_size=500, blocks=[
        dict(pilots=("xs",), tasks=("arithmetic", "sorting"), rows=ROWS, seeds=(0, 1, 2)),
        dict(pilots=("s",), tasks=("arithmetic",), rows=(6250, 100000), seeds=(0,)),
        dict(pilots=("m",), tasks=("arithmetic",), rows=(100000,), seeds=(0,))]),
    # Registered 2026-12-07, after the xs block showed (b) gaining up to +13 points at 600 steps and before any of
    # this ran: the same cells at 8x the steps (3 epochs of 100,000 rows), a budget meant to reach the Pilot's
    # plateau, which (b) then tests. About 70 minutes a cell, 7 hours in all; arithmetic first.
    "plateau": dict(steps=4800, batch_size=64, validation=1000, test=2000, eval_batch_size=500, blocks=[
        dict(pilots=("xs",), tasks=("arithmetic",), rows=(100000,), seeds=(0, 1, 2)),
        dict(pilots=("xs",), tasks=("sorting",), rows=(100000,), seeds=(0, 1, 2))]),
    # One GPU, at most 10 minutes: larger Pilots and more data (results under --out, tabulated on any machine).
    "gpu": dict(steps=2000, batch_size=256, validation=2000, test=4000, eval_batch_size=2000, blocks=[
        dict(pilots=("m", "l"), tasks=("arithmetic",), rows=(100000, 1600000), seeds=(0,))]),
    # The bridge: SmolLM2-135M with LoRA on 6,400 generated arithmetic rows, one epoch of batch 16 (2 CPU cores).
    "bridge": dict(steps=400, batch_size=16, validation=500, test=1000, eval_batch_size=100, blocks=[
        dict(pilots=("smollm2",), tasks=("arithmetic",), rows=(6400,), seeds=(0, 1, 2))]),
    # The bridge's stages on toy sizes (tests pass a tiny --model).
    "bridge_smoke": dict(steps=10, batch_size=4, validation=12, test=16, eval_batch_size=16, blocks=[
        dict(pilots=("smollm2",), tasks=("arithmetic",), rows=(32,), seeds=(0,))]),
    # Every stage on toy sizes: seconds on a CPU, for checking the script end to end.
    "smoke": dict(steps=20, batch_size=8, validation=24, test=32, eval_batch_size=32, blocks=[
        dict(pilots=("xs",), tasks=("arithmetic", "sorting"), rows=(64,), seeds=(0,)),
        dict(pilots=("xs",), tasks=("arithmetic",), rows=(64,), seeds=(1,))]),
}


def grid(edition: str) -> list[tuple[str, int, str, int]]:
    """The edition's cells as (Pilot, seed, task, rows), in the order they run."""
    cells = []
    for block in EDITIONS[edition]["blocks"]:
        for pilot, seed, task, rows in itertools.product(block["pilots"], block["seeds"], block["tasks"],
                                                         block["rows"]):
            if (pilot, seed, task, rows) not in cells:
                cells.append((pilot, seed, task, rows))
    return cells


def pilot_config(hidden_size: int, num_hidden_layers: int, **_) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(VOCABULARY), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                       num_hidden_layers=num_hidden_layers, num_attention_heads=hidden_size // HEAD_WIDTH,
                       num_key_value_heads=hidden_size // HEAD_WIDTH, max_position_embeddings=64,
                       tie_word_embeddings=True, pad_token_id=VOCABULARY.pad_token_id,
                       bos_token_id=VOCABULARY.bos_token_id, eos_token_id=VOCABULARY.eos_token_id)


def parameter_count(config: LlamaConfig) -> int:
    with torch.device("meta"):
        return LlamaForCausalLM(config).num_parameters()


def widened(shape: dict, parameters: int) -> dict:
    """``shape`` at the width (a multiple of the head width, same depth) whose parameter count is nearest
    ``parameters``: the (d) control's Pilot."""
    widths = range(shape["hidden_size"], 8 * shape["hidden_size"] + 1, HEAD_WIDTH)
    width = min(widths, key=lambda w: abs(parameter_count(pilot_config(w, shape["num_hidden_layers"])) - parameters))
    return dict(shape, hidden_size=width)


class Tokens(NamedTuple):
    """The two token ids the data and decoding need besides the items' own."""

    pad: int
    eos: int


SCRATCH_TOKENS = Tokens(VOCABULARY.pad_token_id, VOCABULARY.eos_token_id)


def encoded(item: Item, tokens: Tokens = SCRATCH_TOKENS) -> dict:
    ids = [*item.prompt, *item.answer, tokens.eos]
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(item.prompt) + ids[len(item.prompt):]}


def collate(rows: list[dict], pad: int = SCRATCH_TOKENS.pad) -> dict:
    """Right-padded batch; padding is masked out of attention and labels."""
    width = max(len(row["input_ids"]) for row in rows)

    def padded(name, value):
        return torch.tensor([row[name] + [value] * (width - len(row[name])) for row in rows])

    mask = torch.tensor([[1] * len(row["input_ids"]) + [0] * (width - len(row["input_ids"])) for row in rows])
    return {"input_ids": padded("input_ids", pad), "attention_mask": mask,
            "labels": padded("labels", IGNORE_INDEX)}


def left_padded(items: list[Item], pad: int, device) -> dict:
    width = max(len(item.prompt) for item in items)
    return {"input_ids": torch.tensor([[pad] * (width - len(i.prompt)) + list(i.prompt) for i in items], device=device),
            "attention_mask": torch.tensor([[0] * (width - len(i.prompt)) + [1] * len(i.prompt) for i in items],
                                           device=device)}


@torch.no_grad()
def answers_right(pilot, items: list[Item], batch_size: int, copilot=None, setting=None,
                  tokens: Tokens = SCRATCH_TOKENS) -> list[bool]:
    """Greedy decoding (rectified by ``copilot`` at ``setting`` = (space, λ) when given): is each answer exact?"""
    device = next(pilot.parameters()).device
    order = sorted(range(len(items)), key=lambda i: len(items[i].prompt))
    right = [False] * len(items)
    processor = None if copilot is None else CopilotLogitsProcessor(copilot, pilot, lam=setting[1], space=setting[0])
    try:
        for start in range(0, len(order), batch_size):
            chosen = [items[i] for i in order[start:start + batch_size]]
            inputs = left_padded(chosen, tokens.pad, device)
            generated = pilot.generate(**inputs, do_sample=False, num_beams=1,
                                       max_new_tokens=max(len(i.answer) for i in chosen) + 1,
                                       pad_token_id=tokens.pad, eos_token_id=tokens.eos,
                                       logits_processor=[processor] if processor else None)
            for index, item, row in zip(order[start:], chosen, generated[:, inputs["input_ids"].shape[1]:].tolist()):
                answer = row[:row.index(tokens.eos)] if tokens.eos in row else None
                right[index] = answer is not None and tuple(answer) == item.answer
    finally:
        if processor is not None:
            processor.close()
    return right


@torch.no_grad()
def heldout_ratios(pilot, copilots: dict, items: list[Item], batch_size: int,
                   tokens: Tokens = SCRATCH_TOKENS) -> dict[str, float]:
    """Each Copilot's held-out ratio on ``items``, teacher-forced: its RMSE ÷ the all-zero predictor's on the
    Pilot's errors over the answer tokens, from one Pilot pass."""
    device = next(pilot.parameters()).device
    metrics = {name: CopilotMetrics(copilot) for name, copilot in copilots.items()}
    with PilotTap(pilot, mode="generate") as tap:
        for start in range(0, len(items), batch_size):
            rows = [encoded(item, tokens) for item in items[start:start + batch_size]]
            batch = {name: value.to(device) for name, value in collate(rows, tokens.pad).items()}
            pilot(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            for record in tap.pop_records():
                labelled = replace(record, labels=batch["labels"], labels_aligned=False)
                for metric in metrics.values():
                    metric.add(labelled)
    return {name: metric.results()["heldout_ratio"] for name, metric in metrics.items()}


def setting_name(space: str, lam: float) -> str:
    return f"{space}@{lam:g}"


def parse_setting(name: str) -> tuple[str, float]:
    """(space, λ) of a stored setting name such as ``probs@0.5``."""
    space, lam = name.split("@")
    return space, float(lam)


def bits(right: list[bool]) -> str:
    return "".join("1" if r else "0" for r in right)


def unbits(text: str) -> list[bool]:
    return [c == "1" for c in text]


class Cell:
    """One (task, Pilot, rows, seed) cell: its folder, its result so far, and stages that skip when done. This one
    trains Pilots from scratch; :class:`benchmarks.quality.regime_bridge.BridgeCell` adapts a pretrained one."""

    tokens = SCRATCH_TOKENS

    def __init__(self, edition: str, task: str, pilot: str, rows: int, seed: int, runs: Path, kept: Path | None):
        self.e, self.task, self.pilot, self.rows, self.seed = EDITIONS[edition], task, pilot, rows, seed
        self.name = f"{task}_{pilot}_rows{rows}_seed{seed}"
        self.folder = runs / edition / self.name
        self.kept = None if kept is None else kept / f"{self.name}.json"
        found = next((f for f in (self.folder / "cell.json", self.kept) if f is not None and f.is_file()), None)
        self.result = json.loads(found.read_text()) if found else {
            "edition": edition, "task": task, "pilot": pilot, "rows": rows, "seed": seed, "stage_seconds": {}}
        self.shape = PILOTS[pilot]
        self.data = self.tokenized(make_splits(task, rows, self.e["validation"], self.e["test"]))

    def tokenized(self, splits: Splits) -> Splits:
        return splits  # already in the generated vocabulary's ids

    def build(self, shape: dict, copilots: dict) -> tuple[object, list[tuple[str, CopilotModel, float]]]:
        """A fresh Pilot of ``shape`` and, for each of ``copilots`` (name -> (layers, head)), a Copilot made from it
        with its learning rate."""
        pilot = LlamaForCausalLM(pilot_config(**shape))
        return pilot, [(name, CopilotModel.from_pilot(pilot, num_hidden_layers=layers or shape["num_hidden_layers"],
                                                      correction=head), shape["learning_rate"])
                       for name, (layers, head) in copilots.items()]

    def larger_shape(self, parameters: int) -> dict:
        """The (d) control's Pilot: this cell's widened to ``parameters`` trainable parameters."""
        return widened(self.shape, parameters)

    def load_pilot(self, folder: Path):
        """The Pilot saved in a checkpoint ``folder`` of this cell."""
        return LlamaForCausalLM.from_pretrained(folder)

    def run(self) -> None:
        for name, stage in (("joint", self.joint), ("longer", self.longer), ("larger", self.larger)):
            if name in self.result["stage_seconds"]:
                continue
            print(f"-- {self.name}: {name}", flush=True)
            started = time.perf_counter()
            self.result.update(stage())
            self.result["stage_seconds"][name] = time.perf_counter() - started
            for path in (self.folder / "cell.json", self.kept):
                if path is not None:
                    atomic_write_text(path, json.dumps(self.result, indent=1))

    def train(self, folder: Path, shape: dict, steps: int, copilots: dict | None = None) -> tuple[object, dict, dict]:
        """A Pilot of ``shape`` trained ``steps`` steps into ``folder`` (resuming from its newest checkpoint), with
        ``copilots`` (name -> (layers, head)) beside it; the best of ten validation checkpoints, its Trainer summary
        and the Copilots of that checkpoint."""
        set_seed(self.seed)
        pilot, made = self.build(shape, copilots or {})
        callbacks = [CopilotCallback(copilot, name=name, seed=self.seed, learning_rate=learning_rate,
                                     batch_size=self.e["batch_size"]) for name, copilot, learning_rate in made]
        every = max(1, steps // 10)
        args = TrainingArguments(
            output_dir=str(folder), max_steps=steps, per_device_train_batch_size=self.e["batch_size"],
            per_device_eval_batch_size=self.e["eval_batch_size"], learning_rate=shape["learning_rate"],
            lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.01, eval_strategy="steps",
            eval_steps=every, save_strategy="steps", save_steps=every, save_total_limit=2,
            load_best_model_at_end=True, metric_for_best_model="eval_loss", logging_steps=max(1, every // 2),
            report_to=[], disable_tqdm=True, seed=self.seed, data_seed=self.seed, remove_unused_columns=False,
            use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available())
        trainer = Trainer(model=pilot, args=args, data_collator=partial(collate, pad=self.tokens.pad),
                          train_dataset=[encoded(item, self.tokens) for item in self.data.train],
                          eval_dataset=[encoded(item, self.tokens) for item in self.data.validation])
        for callback in callbacks:
            callback.attach(trainer)
        resume = get_last_checkpoint(str(folder)) if folder.is_dir() else None
        output = trainer.train(resume_from_checkpoint=resume)
        best = Path(trainer.state.best_model_checkpoint)
        history = trainer.state.log_history
        evaluations = [entry for entry in history if "eval_loss" in entry]
        best_step = int(best.name.split("-")[1])
        summary = {"steps": steps, "seconds": output.metrics["train_runtime"], "best_step": best_step,
                   "best_epoch": best_step * self.e["batch_size"] / len(self.data.train),
                   "parameters": pilot.num_parameters(only_trainable=True), "shape": shape,
                   "validation_loss": [(entry["step"], entry["eval_loss"]) for entry in evaluations],
                   "copilot_seconds": {c.name: c.seconds for c in callbacks}}
        pilot.eval()
        loaded = {}
        for callback in callbacks:
            name = callback.name
            fits = [entry[f"{name}_fit_ratio"] for entry in history if f"{name}_fit_ratio" in entry]
            summary.setdefault("fit_ratio", {})[name] = statistics.fmean(fits[-3:]) if fits else None
            summary.setdefault("copilot_parameters", {})[name] = callback.copilot.num_parameters(only_trainable=True)
            loaded[name] = CopilotModel.from_pretrained(best / name).to(pilot.device).eval()
        return pilot, summary, loaded

    def test_accuracy(self, pilot, copilot=None, setting=None) -> dict:
        right = answers_right(pilot, self.data.test, self.e["eval_batch_size"], copilot, setting, self.tokens)
        return {"accuracy": statistics.fmean(right), "right": bits(right)}

    # --- stages -----------------------------------------------------------------------------------------------

    def joint(self) -> dict:
        pilot, summary, copilots = self.train(self.folder / "joint", self.shape, self.e["steps"], COPILOTS)
        batch = self.e["eval_batch_size"]
        validation_pilot = statistics.fmean(answers_right(pilot, self.data.validation, batch, tokens=self.tokens))
        arms = {"pilot": self.test_accuracy(pilot)}
        ratios = heldout_ratios(pilot, copilots, self.data.test, batch, self.tokens)
        for name, copilot in copilots.items():
            scores = {setting_name(space, lam): statistics.fmean(answers_right(
                pilot, self.data.validation, batch, copilot, (space, lam), self.tokens)) for space, lam in SETTINGS}
            chosen = max(scores, key=scores.get)
            arm = {"validation": scores, "validation_pilot": validation_pilot, "heldout_ratio": ratios[name],
                   "fit_ratio": summary["fit_ratio"][name]}
            if scores[chosen] > validation_pilot:
                arm["setting"] = chosen
                arm.update(self.test_accuracy(pilot, copilot, parse_setting(chosen)))
            else:  # no setting beats the Pilot alone on validation: the arm is the Pilot alone
                arm.update(setting=None, **arms["pilot"])
            arms[name] = arm
        return {"joint": summary, "arms": arms}

    def longer(self) -> dict:
        joint = self.result["joint"]
        copilot = max(joint["copilot_seconds"][name] for name in PILOT_SIZED)
        share = copilot / max(1e-9, joint["seconds"] - sum(joint["copilot_seconds"].values()))
        steps = round(self.e["steps"] * (1 + share))
        pilot, summary, _ = self.train(self.folder / "longer", self.shape, steps)
        shutil.rmtree(self.folder / "longer")  # only the joint run's checkpoints are read again (transfer)
        return {"arms": {**self.result["arms"], "longer": {**self.test_accuracy(pilot), "share": share}},
                "longer": summary}

    def larger(self) -> dict:
        joint = self.result["joint"]
        full = max(joint["copilot_parameters"][name] for name in PILOT_SIZED)
        shape = self.larger_shape(joint["parameters"] + full)
        pilot, summary, _ = self.train(self.folder / "larger", shape, self.e["steps"])
        shutil.rmtree(self.folder / "larger")
        return {"arms": {**self.result["arms"], "larger": self.test_accuracy(pilot)}, "larger": summary}


def make_cell(edition: str, task: str, pilot: str, rows: int, seed: int, runs: Path, kept: Path | None,
              model: str | None = None) -> Cell:
    """The cell of a from-scratch Pilot, or of a pretrained one (``model`` in its :data:`PILOTS` entry; ``model``
    here overrides that folder)."""
    if "model" not in PILOTS[pilot]:
        return Cell(edition, task, pilot, rows, seed, runs, kept)
    from benchmarks.quality.regime_bridge import BridgeCell  # peft, datasets and SmolLM2: for this Pilot only

    return BridgeCell(edition, task, pilot, rows, seed, runs, kept, model=model)


def transfer(edition: str, task: str, pilot: str, rows: int, runs: Path, kept: Path, source_seed: int = 0,
             target_seed: int = 1, model: str | None = None) -> dict:
    """The paper's transfer claim in one cell of the grid: the Copilots of seed ``source_seed`` (their checkpoint
    and their validation-chosen settings, unchanged) beside the Pilot of seed ``target_seed``, against that Pilot
    alone and its own Copilots, on its test items. Needs both cells' joint checkpoints under ``runs``."""
    source, target = (make_cell(edition, task, pilot, rows, seed, runs, kept, model)
                      for seed in (source_seed, target_seed))
    folders = [cell.folder / "joint" / f"checkpoint-{cell.result.get('joint', {}).get('best_step')}"
               for cell in (source, target)]
    for cell, folder in zip((source, target), folders):
        if not folder.is_dir():
            raise SystemExit(f"--transfer needs {cell.name}'s best joint checkpoint at {folder}: run that cell "
                             f"(with --runs {runs}) on this machine first.")
    batch = source.e["eval_batch_size"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    target_pilot = target.load_pilot(folders[1]).to(device).eval()
    copilots = {name: CopilotModel.from_pretrained(folders[0] / name).to(device).eval() for name in COPILOTS}
    ratios = heldout_ratios(target_pilot, copilots, target.data.test, batch, target.tokens)
    arms = {}
    for name, copilot in copilots.items():
        setting = source.result["arms"][name]["setting"]
        arm = {"setting": setting, "heldout_ratio": ratios[name],
               "own_heldout_ratio": target.result["arms"][name]["heldout_ratio"],
               "own_accuracy": target.result["arms"][name]["accuracy"]}
        if setting is not None:
            arm.update(target.test_accuracy(target_pilot, copilot, parse_setting(setting)))
        arms[name] = arm
    result = {"edition": edition, "task": task, "pilot": pilot, "rows": rows, "source_seed": source_seed,
              "target_seed": target_seed, "pilot_alone": target.result["arms"]["pilot"], "arms": arms}
    atomic_write_text(kept.parent / f"regime_transfer_{edition}" / f"{task}_{pilot}_rows{rows}.json",
                      json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edition", choices=sorted(EDITIONS), default="cpu")
    parser.add_argument("--pilots", help="comma-separated subset of the edition's Pilot sizes")
    parser.add_argument("--tasks", help="comma-separated subset of the edition's tasks")
    parser.add_argument("--rows", help="comma-separated subset of the edition's training rows")
    parser.add_argument("--seeds", help="comma-separated subset of the edition's seeds")
    parser.add_argument("--model", help="the pretrained Pilot's folder for the bridge edition (default: SmolLM2)")
    parser.add_argument("--runs", type=Path, default=Path("runs/regime"), help="working folder (checkpoints)")
    parser.add_argument("--out", type=Path, help="where cells, table and figure go (default: the committed "
                        "benchmarks/quality/results, cells under cells/regime_<edition>)")
    parser.add_argument("--minutes", type=float, help="start no cell after this many minutes")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--transfer", metavar="TASK,PILOT,ROWS",
                        help="apply seed 0's Copilots of that cell unchanged to seed 1's Pilot (both cells run)")
    parser.add_argument("--no-report", action="store_true", help="run cells only (several processes share --out)")
    parser.add_argument("--list", action="store_true", help="print the selected cells' filters, one cell per line "
                        "(to run each as its own process: benchmarks/gpu_regime.sh)")
    parser.add_argument("--threads", type=int, help="torch threads")
    args = parser.parse_args(argv)
    cells = grid(args.edition)
    filters = {}
    for position, (axis, cast) in enumerate((("pilots", str), ("seeds", int), ("tasks", str), ("rows", int))):
        if getattr(args, axis) is not None:
            filters[position] = [cast(v) for v in getattr(args, axis).split(",")]
            known = {cell[position] for cell in cells}
            unknown = [v for v in filters[position] if v not in known]
            if unknown:
                parser.error(f"--{axis} {unknown} are not in the {args.edition} grid ({sorted(known)}): the grid is "
                             "pre-registered; change EDITIONS (and its section in docs/results.md) to run another.")
    cells = [cell for cell in cells if all(cell[p] in values for p, values in filters.items())]
    if args.transfer:
        task, pilot, rows = args.transfer.split(",")
        result = transfer(args.edition, task, pilot, int(rows), args.runs, (args.out or RESULTS) / "cells",
                          model=args.model)
        from benchmarks.quality.regime_report import transfer_page  # it reads this module's design

        print(f"Wrote {transfer_page(result, args.out or RESULTS)}")
        return 0
    if args.list:
        for pilot, seed, task, rows in cells:
            print(f"--pilots {pilot} --seeds {seed} --tasks {task} --rows {rows}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or RESULTS
    kept = out / "cells" / f"regime_{args.edition}"
    command = shlex.join(["python", "-m", "benchmarks.quality.regime", *(argv if argv is not None else sys.argv[1:])])
    started = time.perf_counter()
    if not args.report_only:
        for pilot, seed, task, rows in cells:
            if args.minutes is not None and time.perf_counter() - started > 60 * args.minutes:
                print(f"-- {args.minutes:g} minutes passed: no new cell starts", flush=True)
                break
            make_cell(args.edition, task, pilot, rows, seed, args.runs, kept, args.model).run()
    if args.no_report:
        return 0
    from benchmarks.quality.regime_report import report  # it reads this module's design, so not at the top

    finished = [json.loads(path.read_text()) for path in sorted(kept.glob("*.json"))]
    page = report(args.edition, finished, out, command)
    print(f"Wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
