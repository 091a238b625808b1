"""The paper's Copilot at the paper's proportions, against fair controls.

    python -m benchmarks.quality.paper --protocol cpu              # ARC-Easy + arithmetic x 3 seeds (resumable)
    python -m benchmarks.quality.paper --protocol cpu --tasks arc_easy --seeds 0   # one cell
    python -m benchmarks.quality.paper --protocol gpu              # all four tasks, every training row, one GPU
    python -m benchmarks.quality.paper --protocol smoke --model <folder> --runs /tmp/smoke   # minutes, any model
    python -m benchmarks.quality.paper --protocol cpu --report-only

Every Copilot measured before this one was 2 layers, fully trained, behind a 1-epoch Pilot and decoded greedily.
The paper's (App. E) is a pretrained decoder of the Pilot's family at 0.5-1x its size, adapted with LoRA, behind a
3-epoch LoRA Pilot, decoded with beam 4. Per (task, seed) cell, each stage runs once and is kept on disk, so a
stopped run resumes where it stopped (the joint run from its last epoch checkpoint). On a fresh machine, where
``--runs`` is gone, a cell resumes from its committed partial file; the stages after ``copilots`` that need the
final Pilot train it again alone and check that it answers exactly as the recorded one. Every run rewrites the
table from every cell on disk:

  joint     one LoRA Pilot (r=32, alpha 64, dropout 0.05, batch 16, 3 epochs) with two Copilots learning beside it
            from the same trajectory: ``paper`` (every Pilot layer copied, LoRA r=32, alpha 64, dropout 0.08, the
            paper's learning rate, batch 16) and ``small`` (the 2-layer, fully trained default). The Pilot's
            training is the same with and without them (bit for bit since the Copilot's dropout has its own random
            stream, 2026-12-04), so it is also the "Pilot alone" arm.
  screen    the cheap, decisive diagnostic first: each Copilot's held-out ratio (its RMSE / the all-zero
            predictor's, teacher-forced on the test items; below 1 is a prerequisite for any gain) and the same on
            the training items. ``--stages joint,screen`` stops here.
  choose    (protocols with validation items) each Copilot's greedy setting (space, lambda) chosen on validation
            items the Pilot never trained on, or the Pilot alone when no setting beats it there; the table then
            reports that setting's test accuracy as the Copilot's headline row.
  epochs    the Pilot alone after every epoch (greedy), to show where more epochs stop paying.
  copilots  both Copilots on the final Pilot: the greedy lambda grid in both fusion spaces, and beam 4.
  longer    (b) the Pilot alone trained longer by the paper Copilot's share of the joint run's time.
  capacity  (d) the Pilot alone given the paper Copilot's trainable capacity instead: LoRA rank raised until its
            trainable parameter count matches the Copilot's, trained as long as the joint run.
  latest    (c) a fresh paper Copilot trained offline, for as many updates, on the final Pilot's errors only;
            decoded as the joint one, with its held-out ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from pathlib import Path

from transformers import set_seed

from benchmarks.quality.protocols import ALL_TASKS, CELLS, RESULTS, on_accelerator, pretrained, task_data, write_json
from hf_copilot import PAPER_LORA, CopilotCallback, CopilotModel, train_copilot
from hf_copilot.recipes.assets import resolve_model
from hf_copilot.recipes.diagnostics import ErrorRatios, record_mistake_log, teacher_forced_records
from hf_copilot.recipes.finetune import add_lora, finetune, load_pilot, save_pilot
from hf_copilot.recipes.scoring import Decoding, evaluate_decodings
from hf_copilot.recipes.significance import PairedComparison, describe, pooled
from hf_copilot.recipes.tasks import TASKS, load_task

STAGES = ("joint", "screen", "choose", "epochs", "copilots", "longer", "capacity", "latest")
ARITHMETIC = {"basic_arithmetic"}
"""Tasks the paper trains with its arithmetic learning rates (Pilot 2e-4, Copilot 3e-4); the rest are commonsense
(Pilot 3e-4, Copilot 5e-4)."""
PROBS_GRID = [("probs", lam) for lam in (0.1, 0.3, 0.5, 0.8, 1.0)]  # the paper's lambda grid
LOGITS_GRID = [("logits", lam) for lam in (1.0, 3.0)]  # logit space needs a larger lambda to move as much
PAPER = dict(epochs=3.0, batch_size=16, max_length=256, pilot_lora_rank=32, pilot_lora_dropout=0.05,
             copilot_lora=PAPER_LORA, copilot_batch_size=16, small_layers=2, small_learning_rate=5e-4,
             small_batch_size=8, greedy=PROBS_GRID + LOGITS_GRID)
PROTOCOLS = {
    # 2 CPU cores: every ARC-Easy training row, arithmetic cut to 400 rows (not fewer epochs), 200 test items.
    # Beam 4 costs about four greedy passes per setting, so on a CPU it decodes the Pilot and the paper Copilot
    # at lambda = 1 in each space only (the paper's usual lambda); the GPU protocol decodes the whole grid.
    "cpu": dict(PAPER, tasks=("arc_easy", "basic_arithmetic"), train_size={"basic_arithmetic": 400}, test_size=200,
                beam=[("probs", 1.0), ("logits", 1.0)], beam_arms=("paper",), eval_batch_size=32),
    "gpu": dict(PAPER, tasks=ALL_TASKS, train_size={}, test_size=None, beam=PROBS_GRID + LOGITS_GRID,
                beam_arms=("paper", "small", "latest"), eval_batch_size=64),
    # The screen alone (joint run, held-out ratios) at a size one CPU session can finish: arithmetic cut to 160
    # rows (30 steps), the paper's epochs and batch.
    "cpu_screen": dict(PAPER, tasks=("basic_arithmetic",), train_size={"basic_arithmetic": 160}, test_size=200,
                       beam=[("probs", 1.0), ("logits", 1.0)], beam_arms=("paper",), eval_batch_size=32),
    # Issue 29 (c), fixed before its first cell: the cpu protocol with both Copilots' heads as logit residuals,
    # and lambda chosen on validation items. ARC-Easy gives up 70 of its 370 training rows for validation;
    # arithmetic takes its 200 validation items from the rows after its 400 training rows.
    "cpu_residual": dict(PAPER, correction="logit_residual", tasks=("arc_easy", "basic_arithmetic"),
                         train_size={"basic_arithmetic": 400, "arc_easy": 300},
                         validation_size={"basic_arithmetic": 200, "arc_easy": 70}, test_size=200,
                         beam=[("probs", 1.0), ("logits", 1.0)], beam_arms=("paper",), eval_batch_size=32),
    # Every stage on a handful of items, for checking the script end to end before a long run (its results stay
    # under --runs).
    "smoke": dict(PAPER, keep=False, epochs=2.0, batch_size=4, copilot_batch_size=4, small_batch_size=4,
                  tasks=("basic_arithmetic",), train_size={"basic_arithmetic": 24}, test_size=8,
                  greedy=[("probs", 1.0), ("logits", 1.0)], beam=[("probs", 1.0)], beam_arms=("paper",),
                  eval_batch_size=8),
}
PROTOCOLS["smoke_residual"] = dict(PROTOCOLS["smoke"], correction="logit_residual",
                                   validation_size={"basic_arithmetic": 8})
"""cpu_residual's stages, validation included, on a handful of items."""


def learning_rates(task: str) -> tuple[float, float]:
    """(Pilot, Copilot) learning rates of the paper for ``task``."""
    return (2e-4, 3e-4) if task in ARITHMETIC else (3e-4, 5e-4)


def paper_copilot(pilot, correction: str = "vocabulary") -> CopilotModel:
    depth = pilot.config.get_text_config().num_hidden_layers
    return CopilotModel.from_pilot(pilot, num_hidden_layers=depth, lora=PAPER_LORA, correction=correction)


class Cell:
    """One (task, seed) cell: its folder, its result so far, and a stage runner that skips finished stages."""

    def __init__(self, task: str, seed: int, protocol: str, runs: Path, model_dir: Path):
        self.task, self.seed, self.protocol, self.model_dir = task, seed, protocol, model_dir
        self.p = PROTOCOLS[protocol]
        self.folder = runs / protocol / task / f"seed{seed}"
        self.partial = self.folder / "partial.json"
        self.kept = CELLS / f"paper_{protocol}" / task / f"seed{seed}"
        # On a fresh machine (runs/ gone) the committed cell, finished or partial, still holds every finished stage.
        found = next((f for f in (self.partial, self.kept.with_suffix(".json"), self.kept.with_suffix(".partial.json"))
                      if f.is_file()), None)
        self.result = json.loads(found.read_text()) if found else {
            "task": task, "seed": seed, "protocol": protocol, "stage_seconds": {}}
        self.train, self.test = task_data(task, self.p["train_size"].get(task), self.p["test_size"])
        self.validation = validation_items(task, self.p, self.train)
        self.correction = self.p.get("correction", "vocabulary")
        self.stages = stages_of(self.p)
        self.format = TASKS[task].format
        self.pilot_lr, self.copilot_lr = learning_rates(task)

    def stage(self, name: str, run) -> None:
        if name in self.result["stage_seconds"]:
            return
        print(f"-- {self.task} seed {self.seed}: {name}", flush=True)
        started = time.perf_counter()
        self.result.update(run())
        self.result["stage_seconds"][name] = time.perf_counter() - started
        write_json(self.partial, self.result)
        if self.p.get("keep", True):  # what a stopped run has found so far survives the machine
            write_json(self.kept.with_suffix(".partial.json"), self.result)

    def decode(self, pilot, tokenizer, copilot, settings, beams: int, items=None) -> dict:
        """Per decoding (the Pilot alone under these beams first): accuracy, and which items (default: the test
        items) were right, so that arms can be compared item by item and pooled over seeds."""
        items = self.test if items is None else items
        decodings = [Decoding(num_beams=beams)] + [Decoding(lam, space, beams) for space, lam in settings]
        rows = evaluate_decodings(pilot, tokenizer, items, self.format, decodings, copilot=copilot,
                                  batch_size=self.p["eval_batch_size"])
        return {row["decoding"]: {"accuracy": row["accuracy"], "right": [
            self.format.is_correct(text, example) for text, example in zip(row["answers"], items)]}
            for row in rows}

    def train_pilot(self, folder: Path, *, rank: int, max_steps: int = -1, callbacks=()) -> dict:
        """A fresh LoRA Pilot trained into ``folder`` (resuming from its last epoch checkpoint); its run summary."""
        if (folder / "run.json").is_file():
            return json.loads((folder / "run.json").read_text())
        set_seed(self.seed)
        pilot, tokenizer = pretrained(self.model_dir)
        made = [make(pilot) for make in callbacks]  # Copilots copy the pretrained Pilot, before its adapters
        pilot = add_lora(pilot, rank, dropout=self.p["pilot_lora_dropout"])
        started = time.perf_counter()
        trainer = finetune(pilot, tokenizer, self.train, self.format, folder, epochs=self.p["epochs"],
                           max_steps=max_steps, learning_rate=self.pilot_lr, batch_size=self.p["batch_size"],
                           max_length=self.p["max_length"], seed=self.seed, callbacks=made, save_each_epoch=True)
        summary = {"seconds": time.perf_counter() - started, "steps": trainer.state.global_step, "rank": rank,
                   "trainable": sum(p.numel() for p in pilot.parameters() if p.requires_grad),
                   "copilot_seconds": {c.name: c.seconds for c in made},
                   "copilot_trainable": {c.name: c.copilot.num_parameters(only_trainable=True) for c in made},
                   "train_loss": trainer.state.log_history[-1].get("train_loss")}
        save_pilot(pilot, tokenizer, folder / "pilot")
        write_json(folder / "run.json", summary)
        return summary

    def callbacks(self):
        def paper(pilot):
            return CopilotCallback(paper_copilot(pilot, self.correction), name="paper", save_mistake_log=True,
                                   seed=self.seed,
                                   learning_rate=self.copilot_lr, batch_size=self.p["copilot_batch_size"])

        def small(pilot):
            return CopilotCallback(CopilotModel.from_pilot(pilot, num_hidden_layers=self.p["small_layers"],
                                                           correction=self.correction),
                                   name="small", save_mistake_log=True, seed=self.seed,
                                   learning_rate=self.p["small_learning_rate"],
                                   batch_size=self.p["small_batch_size"])
        return paper, small

    # --- stages -----------------------------------------------------------------------------------------------

    def joint(self) -> dict:
        return {"joint": self.train_pilot(self.folder / "joint", rank=self.p["pilot_lora_rank"],
                                          callbacks=self.callbacks())}

    def epochs(self) -> dict:
        """Greedy accuracy of the Pilot after each epoch's checkpoint (the last is the final Pilot)."""
        checkpoints = sorted((self.folder / "joint").glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))
        by_epoch = {}
        for epoch, checkpoint in enumerate(checkpoints, 1):
            pilot, tokenizer = load_pilot(checkpoint)
            by_epoch[str(epoch)] = self.decode(on_accelerator(pilot), tokenizer, None, [], 1)[Decoding().name]
        return {"pilot_by_epoch": by_epoch}

    def copilots(self) -> dict:
        pilot, tokenizer, arms = self.final_pilot_and_copilots()
        out = {name: self.decode(pilot, tokenizer, copilot, self.p["greedy"], 1) for name, copilot in arms.items()}
        for name in self.p["beam_arms"]:
            if name in arms:
                out[name].update(self.decode(pilot, tokenizer, arms[name], self.p["beam"], 4))
        beam = Decoding(num_beams=4).name
        out["pilot_beam"] = next((arm[beam] for arm in out.values() if beam in arm), None) or self.decode(
            pilot, tokenizer, None, [], 4)[beam]
        return {"arms": out}

    def final_pilot_and_copilots(self):
        pilot, tokenizer = self.final_pilot()
        return pilot, tokenizer, {name: on_accelerator(CopilotModel.from_pretrained(self.folder / "joint" / name)
                                                       .eval()) for name in ("paper", "small")}

    def final_pilot(self):
        """The joint run's final Pilot. On a fresh machine it is trained again alone, which gives the same Pilot
        (the Copilots do not touch its training, tests/test_callback.py), and this is checked: its greedy answers
        must be right on exactly the items the recorded final Pilot got right."""
        folder = self.folder / "joint"
        if not (folder / "pilot").is_dir():
            folder = self.folder / "pilot_alone"
            self.train_pilot(folder, rank=self.p["pilot_lora_rank"])
        pilot, tokenizer = load_pilot(folder / "pilot")
        pilot = on_accelerator(pilot)
        if folder.name == "pilot_alone" and not (folder / "checked").is_file():
            recorded = self.result["pilot_by_epoch"][max(self.result["pilot_by_epoch"], key=int)]["right"]
            again = self.decode(pilot, tokenizer, None, [], 1)[Decoding().name]["right"]
            if again != recorded:
                raise RuntimeError(f"the Pilot trained again in {folder} is not the joint run's Pilot "
                                   f"({sum(a != b for a, b in zip(again, recorded))} test items differ); "
                                   "run the cell again from its joint stage (delete its kept partial cell)")
            (folder / "checked").touch()
        return pilot, tokenizer

    def heldout(self, pilot, tokenizer, copilots: dict) -> dict:
        ratios = ErrorRatios(copilots)
        for record in teacher_forced_records(pilot, tokenizer, self.test, self.format):
            ratios.add(record)
        return ratios.results()

    def screen(self) -> dict:
        pilot, tokenizer, joint = self.final_pilot_and_copilots()
        on_training_items = ErrorRatios(joint)
        for record in teacher_forced_records(pilot, tokenizer, self.train, self.format):
            on_training_items.add(record)
        return {"heldout": self.heldout(pilot, tokenizer, joint), "train_items": on_training_items.results()}

    def choose(self) -> dict:
        """Per Copilot, the greedy setting with the best accuracy on the validation items; the Pilot alone (no
        rectification) when none beats it, the smaller lambda on ties."""
        pilot, tokenizer, arms = self.final_pilot_and_copilots()
        chosen = {}
        for name, copilot in arms.items():
            scores = self.decode(pilot, tokenizer, copilot, self.p["greedy"], 1, self.validation)
            chosen[name] = {"decoding": best_setting(scores, self.p["greedy"]),
                            "validation": {d: score["accuracy"] for d, score in scores.items()}}
        return {"chosen": chosen, "validation_items": len(self.validation)}

    def latest(self) -> dict:
        pilot, tokenizer = self.final_pilot()
        set_seed(self.seed)
        latest = paper_copilot(pretrained(self.model_dir)[0], self.correction).to(next(pilot.parameters()).device)
        log = record_mistake_log(pilot, tokenizer, self.train, self.format)
        train_copilot(latest, log, num_updates=self.result["joint"]["steps"], progress=False,
                      learning_rate=self.copilot_lr, batch_size=self.p["copilot_batch_size"], seed=self.seed)
        latest.eval()
        arm = self.decode(pilot, tokenizer, latest, self.p["greedy"], 1)
        if "latest" in self.p["beam_arms"]:
            arm.update(self.decode(pilot, tokenizer, latest, self.p["beam"], 4))
        return {"latest": arm, "latest_heldout": self.heldout(pilot, tokenizer, {"latest": latest})["latest"]}

    def longer(self) -> dict:
        joint = self.result["joint"]
        pilot_seconds = joint["seconds"] - sum(joint["copilot_seconds"].values())
        share = joint["copilot_seconds"]["paper"] / max(pilot_seconds, 1e-9)
        steps = math.ceil(joint["steps"] * (1 + share))
        run = self.train_pilot(self.folder / "longer", rank=self.p["pilot_lora_rank"], max_steps=steps)
        return {"longer": {**run, "share": share, **self.scored(self.folder / "longer")}}

    def capacity(self) -> dict:
        target = self.result["joint"]["copilot_trainable"]["paper"]
        per_rank = lora_parameters_per_rank(self.model_dir)
        rank = max(1, round(target / per_rank))
        run = self.train_pilot(self.folder / "capacity", rank=rank)
        return {"capacity": {**run, "target_trainable": target, **self.scored(self.folder / "capacity")}}

    def scored(self, folder: Path) -> dict:
        pilot, tokenizer = load_pilot(folder / "pilot")
        pilot = on_accelerator(pilot)
        return {"greedy": self.decode(pilot, tokenizer, None, [], 1), "beam": self.decode(pilot, tokenizer, None, [], 4)}

    def run(self, stages=STAGES) -> dict:
        for name in stages:
            if name in self.stages:
                self.stage(name, getattr(self, name))
        if not set(self.stages) <= set(self.result["stage_seconds"]):  # stopped early on purpose (--stages)
            return self.result
        write_json(self.folder / "result.json", self.result)
        if self.p.get("keep", True):
            write_json(self.kept.with_suffix(".json"), self.result)
            self.kept.with_suffix(".partial.json").unlink(missing_ok=True)
        # Checkpoints were for resuming; the final models stay.
        for folder in ("joint", "longer", "capacity", "pilot_alone"):
            for checkpoint in (self.folder / folder).glob("checkpoint-*"):
                shutil.rmtree(checkpoint)
        return self.result


def best_setting(scores: dict, greedy: list) -> str:
    """The decoding with the most items right; on ties the Pilot alone, then the smaller lambda (the gentler
    change)."""
    preference = [Decoding().name] + [Decoding(lam, space).name for space, lam in sorted(greedy, key=lambda s: s[1])]
    return min(scores, key=lambda decoding: (-sum(scores[decoding]["right"]), preference.index(decoding)))


def stages_of(protocol: dict) -> tuple[str, ...]:
    """The stages a protocol runs: ``choose`` only where it has validation items."""
    return tuple(s for s in STAGES if s != "choose" or protocol.get("validation_size"))


def validation_items(task: str, protocol: dict, train: list) -> list:
    """The protocol's validation items for ``task``: the training rows right after those it trains on (never
    trained on, never test items); empty without ``validation_size``."""
    size = protocol.get("validation_size", {}).get(task)
    if not size:
        return []
    rows = load_task(task, "train")
    items = rows[len(train):len(train) + size]
    if len(items) < size or {ex.question for ex in items} & {ex.question for ex in train}:
        raise ValueError(f"{task} has {len(rows)} training rows: not enough for {len(train)} training and {size} "
                         "validation items apart.")
    return items


def lora_parameters_per_rank(model_dir: Path) -> int:
    """Trainable parameters one unit of LoRA rank adds to the Pilot (the count is linear in the rank)."""
    pilot, _ = pretrained(model_dir)
    return sum(p.numel() for p in add_lora(pilot, 1).parameters() if p.requires_grad)


# --- the table ------------------------------------------------------------------------------------------------


def rows_of(result: dict) -> dict[str, dict]:
    """Every scored (arm, decoding) of one cell, named as the table names them (arms not run yet are absent)."""
    rows = {f"Pilot alone, epoch {epoch}, greedy": score for epoch, score in result["pilot_by_epoch"].items()}
    rows["Pilot alone, final, beam 4"] = result["arms"]["pilot_beam"]
    copilots = [(label, result["arms"][arm]) for arm, label in (("paper", "paper Copilot"), ("small", "2-layer Copilot"))]
    for label, scores in copilots + [("(c) Latest paper Copilot", result.get("latest", {}))]:
        for decoding, score in scores.items():
            if not decoding.startswith("pilot"):
                rows[f"{'+ ' if label[0] != '(' else ''}{label}, {decoding}"] = score
    for arm, label in (("paper", "paper Copilot"), ("small", "2-layer Copilot")):
        if arm in result.get("chosen", {}) and arm in result.get("arms", {}):  # chosen on validation, scored on test
            rows[f"+ {label}, setting chosen on validation"] = result["arms"][arm][result["chosen"][arm]["decoding"]]
    for arm, label in (("longer", "(b) Pilot trained longer"), ("capacity", "(d) Pilot with the Copilot's capacity")):
        if arm in result:
            rows[f"{label}, greedy"] = result[arm]["greedy"][Decoding().name]
            rows[f"{label}, beam 4"] = result[arm]["beam"][Decoding(num_beams=4).name]
    return rows


def summarise(results: list[dict], protocol: str, command: str) -> str:
    """Markdown: the accuracy table over finished cells, the held-out ratios over every screened cell, and where
    the time went. Cells stopped early contribute what they have."""
    tasks = [t for t in ALL_TASKS if any(r["task"] == t for r in results)]
    seeds = sorted({r["seed"] for r in results})
    hours = sum(sum(r["stage_seconds"].values()) for r in results) / 3600
    correction = PROTOCOLS[protocol].get("correction", "vocabulary")
    text = (f"# The paper's Copilot at the paper's proportions, protocol `{protocol}` (both Copilots' correction: "
            f"`{correction}`)\n\n`{command}`: "
            f"{len(results)} cells, seeds {seeds}, {hours:.2f} h of compute (sum of stage times).\n\n")
    scored = [r for r in results if {"epochs", "copilots"} <= set(r["stage_seconds"])]
    if scored:
        text += accuracy_table(scored) + "\n\n"
    screened = [r for r in results if "heldout" in r]
    if screened:
        text += "Copilot RMSE ÷ all-zero RMSE, teacher-forced (below 1 = better than predicting no error):\n\n"
        text += ratio_table(screened) + "\n\n"
    stages = [s for s in STAGES if any(s in r["stage_seconds"] for r in results)]
    timing = ["| task | cells | " + " | ".join(stages) + " |", "|---" * (len(stages) + 2) + "|"]
    for t in tasks:
        mine = [r for r in results if r["task"] == t]
        timing.append(f"| {t} | {len(mine)} | " + " | ".join(
            f"{statistics.fmean(r['stage_seconds'][s] for r in mine if s in r['stage_seconds']) / 60:.1f}"
            if any(s in r["stage_seconds"] for r in mine) else "–" for s in stages) + " |")
    return text + "Minutes per stage (mean per cell):\n\n" + "\n".join(timing) + "\n"


def ratio_table(results: list[dict]) -> str:
    tasks = [t for t in ALL_TASKS if any(r["task"] == t for r in results)]

    def cell(key, arm, task):
        values = [r[key][arm]["ratio"] for r in results if r["task"] == task and arm in r.get(key, {})]
        return f"{statistics.fmean(values):.4f} ({len(values)})" if values else "–"
    lines = ["| Copilot (cells) | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for arm, label in (("paper", "paper (full depth, LoRA)"), ("small", "2-layer default")):
        lines.append(f"| {label}, held-out | " + " | ".join(cell("heldout", arm, t) for t in tasks) + " |")
        lines.append(f"| {label}, training items | " + " | ".join(cell("train_items", arm, t) for t in tasks) + " |")
    latest = [{**r, "latest": {"latest": r["latest_heldout"]}} for r in results if "latest_heldout" in r]
    if latest:
        lines.append("| (c) Latest paper Copilot, held-out | " + " | ".join(
            (lambda v: f"{statistics.fmean(v):.4f} ({len(v)})" if v else "–")(
                [r["latest"]["latest"]["ratio"] for r in latest if r["task"] == t]) for t in tasks) + " |")
    return "\n".join(lines)


def accuracy_table(results: list[dict]) -> str:
    tasks = [t for t in ALL_TASKS if any(r["task"] == t for r in results)]
    cells = {t: [rows_of(r) for r in results if r["task"] == t] for t in tasks}
    names = list(dict.fromkeys(name for t in tasks for rows in cells[t] for name in rows))
    base_name = f"Pilot alone, epoch {max(int(e) for r in results for e in r['pilot_by_epoch'])}, greedy"

    def mean(name, task):
        values = [rows[name]["accuracy"] for rows in cells[task] if name in rows]
        return statistics.fmean(values) if values else None

    def against_pilot(name):
        """This arm against the final Pilot alone under the same beams, item by item, pooled over every cell."""
        reference = "Pilot alone, final, beam 4" if "beam" in name else base_name
        return describe(pooled(PairedComparison.from_outcomes(rows[name]["right"], rows[reference]["right"])
                               for t in tasks for rows in cells[t] if name in rows))

    base = statistics.fmean(mean(base_name, t) for t in tasks)
    lines = [f"| arm, decoding | {' | '.join(tasks)} | average | relative | vs Pilot alone (final, same beams) |",
             "|---" * (len(tasks) + 4) + "|"]
    for name in names:
        means = [mean(name, t) for t in tasks]
        if None in means:
            continue
        average = statistics.fmean(means)
        relative = f"{100 * (average - base) / base:+.1f}%" if base else "n/a"
        lines.append(f"| {name} | " + " | ".join(f"{100 * m:.1f}" for m in means)
                     + f" | {100 * average:.1f} | {relative} | {against_pilot(name)} |")
    shares = ", ".join(
        f"{t}: {statistics.fmean(r['longer']['share'] for r in results if r['task'] == t and 'longer' in r):.2f}"
        for t in tasks if any("longer" in r and r["task"] == t for r in results))
    ranks = ", ".join(f"{t}: r={next(r['capacity']['rank'] for r in results if r['task'] == t and 'capacity' in r)}"
                      for t in tasks if any("capacity" in r and r["task"] == t for r in results))
    controls = (f"\n\nThe paper Copilot's share of the joint run's time ({shares or 'not run yet'}) sets control "
                f"(b)'s extra steps; control (d)'s LoRA rank ({ranks or 'not run yet'}) matches the paper Copilot's "
                "trainable parameters.")
    return ("Accuracy (%) of generated, parsed answers on each task's test items, mean over seeds; the relative "
            "change of the average against the final Pilot alone (greedy); and, item by item against the final "
            "Pilot alone under the same beams pooled over every cell, the difference with its 95% interval, the "
            "items fixed/broken and the exact McNemar p-value (hf_copilot.recipes.significance).\n\n"
            + "\n".join(lines) + controls)


def cells_on_disk(runs: Path, protocol: str) -> list[dict]:
    """Every cell of ``protocol`` found, finished or stopped, in (seed, task) order; a cell's copy under ``runs``
    wins (it is the newest), then its finished kept copy, then its kept partial one."""
    found = {}
    for path in sorted((CELLS / f"paper_{protocol}").glob("*/seed*.json"), key=lambda f: "partial" not in f.name):
        found[(path.parent.name, int(path.name.split(".")[0].removeprefix("seed")))] = path
    for path in (runs / protocol).glob("*/seed*/partial.json"):
        found[(path.parent.parent.name, int(path.parent.name.removeprefix("seed")))] = path
    order = sorted(found, key=lambda key: (key[1], ALL_TASKS.index(key[0])))
    return [json.loads(found[key].read_text()) for key in order]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="cpu")
    parser.add_argument("--tasks", type=lambda t: t.split(","), default=None)
    parser.add_argument("--seeds", type=lambda t: [int(s) for s in t.split(",")], default=[0, 1, 2])
    parser.add_argument("--model", default="smollm2-135m", help="Pilot base model folder, or smollm2-135m")
    parser.add_argument("--runs", type=Path, default=Path("runs/paper"), help="where cells and checkpoints go")
    parser.add_argument("--stages", type=lambda t: tuple(t.split(",")), default=STAGES,
                        help=f"stages to run (always in this order, after the joint run; default all: "
                             f"{','.join(STAGES)})")
    parser.add_argument("--report-only", action="store_true", help="tabulate the cells found, run nothing")
    args = parser.parse_args()
    args.tasks = args.tasks or list(PROTOCOLS[args.protocol]["tasks"])
    if unknown := sorted(set(args.tasks) - set(ALL_TASKS)):
        parser.error(f"unknown task(s) {unknown}; the tasks are {list(ALL_TASKS)}")
    if unknown := sorted(set(args.stages) - set(STAGES)):
        parser.error(f"unknown stage(s) {unknown}; the stages are {','.join(STAGES)}")
    args.stages = ("joint",) + tuple(s for s in STAGES[1:] if s in args.stages)  # every stage needs the joint run
    if not args.report_only:
        model_dir = resolve_model(args.model)
        for seed in args.seeds:
            for task in args.tasks:
                Cell(task, seed, args.protocol, args.runs, model_dir).run(args.stages)
    results = cells_on_disk(args.runs, args.protocol)  # the table covers every cell, not only this run's
    if not results:
        parser.error(f"no cells of protocol {args.protocol!r} under {args.runs} or {CELLS}")
    command = (f"python -m benchmarks.quality.paper --protocol {args.protocol} --tasks "
               f"{','.join(sorted({r['task'] for r in results}, key=ALL_TASKS.index))} "
               f"--seeds {','.join(map(str, sorted({r['seed'] for r in results})))}")
    table = summarise(results, args.protocol, command)
    keep = PROTOCOLS[args.protocol].get("keep", True)
    (RESULTS if keep else args.runs / args.protocol).joinpath(f"paper_{args.protocol}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
