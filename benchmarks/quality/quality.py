"""The paper's Table 1 in miniature: does the Copilot make a real Pilot more accurate, against fair controls?

    python -m benchmarks.quality.quality --protocol cpu        # SmolLM2-135M, ARC-Easy + arithmetic x 3 seeds
    python -m benchmarks.quality.quality --protocol cpu --tasks arc_easy,piqa,boolq,basic_arithmetic  # all four
    python -m benchmarks.quality.quality --protocol gpu_short  # 1,500 training rows, 2 epochs: minutes a cell on a GPU
    python -m benchmarks.quality.quality --protocol gpu        # the same at paper-like sizes, for a GPU machine
    python -m benchmarks.quality.quality --protocol cpu --tasks basic_arithmetic --seeds 0          # one cell
    python -m benchmarks.quality.quality --protocol cpu_more_data --tasks basic_arithmetic --joint-only  # replays

For every (task, seed) cell, with the same LoRA Pilot training in every arm:
  joint   the Pilot fine-tuned with CopilotCallback; scored alone and rectified (both fusion spaces, fixed λ values
          chosen before looking at any test item);
  longer  control (b): the Pilot alone, trained for extra steps worth the wall-clock time the Copilot used;
  latest  control (c), the paper's "Latest" ablation: a fresh Copilot trained offline, for as many updates, on a
          Mistake Log of the *final* Pilot only.
Each finished cell is one JSON file under ``--runs``; a rerun skips finished cells and finished stages, so the
protocol resumes where it stopped. The table goes to ``benchmarks/quality/results/quality_<protocol>.md``, and each
finished cell is also copied to ``benchmarks/quality/results/cells/<protocol>/<task>/seed<k>.json``, which
``--report-only`` reads when ``--runs`` does not hold the cell.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from transformers import set_seed

from hf_copilot import CopilotModel, train_copilot
from hf_copilot.recipes.assets import resolve_model
from hf_copilot.recipes.diagnostics import (ErrorRatios, first_error_ranks_of, record_mistake_log,
                                            teacher_forced_records)
from hf_copilot.recipes.scoring import Decoding, evaluate_decodings
from hf_copilot.recipes.significance import describe, pooled_scores
from hf_copilot.recipes.finetune import add_lora, finetune, load_pilot, save_pilot
from hf_copilot.recipes.tasks import TASKS

from benchmarks.quality.protocols import (ALL_TASKS, CELLS, PROTOCOLS, RESULTS, on_accelerator, pretrained,
                                         protocol_data, write_json)


def _scores(rows: list[dict]) -> dict:
    return {row["decoding"]: {k: row[k] for k in ("accuracy", "correct", "total", "fixed", "broken")} for row in rows}


def _train_pilot(model_dir, folder, examples, task_format, p, seed, *, with_copilot: bool, max_steps: int = -1):
    """Fine-tune a fresh LoRA Pilot (and Copilot) into ``folder``; returns the run summary."""
    set_seed(seed)
    pilot, tokenizer = pretrained(model_dir)
    copilot = CopilotModel.from_pilot(pilot, num_hidden_layers=p["copilot_layers"]) if with_copilot else None
    pilot = add_lora(pilot, p["lora_rank"])
    started = time.perf_counter()
    trainer = finetune(pilot, tokenizer, examples, task_format, folder, copilot=copilot, epochs=p["epochs"],
                       max_steps=max_steps, learning_rate=p["learning_rate"], batch_size=p["batch_size"], seed=seed,
                       copilot_options=dict(learning_rate=p["copilot_learning_rate"],
                                            batch_size=p["copilot_batch_size"], save_mistake_log=True))
    seconds = time.perf_counter() - started
    save_pilot(pilot, tokenizer, folder / "pilot")
    copilot_seconds = next((e["copilot_seconds"] for e in reversed(trainer.state.log_history)
                            if "copilot_seconds" in e), 0.0)
    summary = {"seconds": seconds, "steps": trainer.state.global_step, "copilot_seconds": copilot_seconds,
               "train_loss": trainer.state.log_history[-1].get("train_loss")}
    write_json(folder / "run.json", summary)
    return summary


class Stopwatch:
    """Seconds per named stage of a cell (laps of the same name add up), so a table can say where time goes."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now


def train_joint(task: str, seed: int, protocol: str, runs: Path, model_dir: Path) -> Path:
    """The cell's joint run alone (Pilot + Copilot + saved Mistake Log), unless it is already there; its folder."""
    joint = runs / protocol / task / f"seed{seed}" / "joint"
    if not (joint / "run.json").is_file():
        train, _ = protocol_data(task, protocol)
        _train_pilot(model_dir, joint, train, TASKS[task].format, PROTOCOLS[protocol], seed, with_copilot=True)
    return joint


def run_cell(task: str, seed: int, protocol: str, runs: Path, model_dir: Path) -> dict:
    p = PROTOCOLS[protocol]
    cell = runs / protocol / task / f"seed{seed}"
    result_file = cell / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    task_format = TASKS[task].format
    train, test = protocol_data(task, protocol)
    decodings = [Decoding(num_beams=b) for b in p["beams"]] + [
        Decoding(lam, space, b) for b in p["beams"] for space, lam in p["decodings"]]
    started = time.perf_counter()
    watch = Stopwatch()
    result = {"task": task, "seed": seed, "protocol": protocol, "train_examples": len(train), "test_examples": len(test)}

    joint = train_joint(task, seed, protocol, runs, model_dir)
    result["joint_training"] = json.loads((joint / "run.json").read_text())
    watch.lap("joint training")
    pilot, tokenizer = load_pilot(joint / "pilot")
    pilot = on_accelerator(pilot)
    copilot = on_accelerator(CopilotModel.from_pretrained(joint / "copilot").eval())
    result["joint"] = _scores(evaluate_decodings(pilot, tokenizer, test, task_format, decodings, copilot=copilot,
                                                 batch_size=p["eval_batch_size"]))
    watch.lap("joint decoding")
    write_json(cell / "partial.json", result)  # what a run cut short still tells

    # (c) Latest: the same number of Copilot updates, but only on the finished Pilot's errors. The pass that records
    # its log also scores the joint Copilot on the training items.
    set_seed(seed)
    latest = CopilotModel.from_pilot(pilot, num_hidden_layers=p["copilot_layers"])
    on_training_items = ErrorRatios({"joint": copilot})
    log = record_mistake_log(pilot, tokenizer, train, task_format, on_record=on_training_items.add)
    result["joint_train_ratio"] = on_training_items.results()["joint"]
    train_copilot(latest, log, num_updates=result["joint_training"]["steps"], progress=False,
                  learning_rate=p["copilot_learning_rate"], batch_size=p["copilot_batch_size"], seed=seed)
    latest.eval()
    watch.lap("latest training")
    result["latest"] = _scores(evaluate_decodings(pilot, tokenizer, test, task_format,
                                                  [d for d in decodings if d.lam > 0], copilot=latest,
                                                  batch_size=p["eval_batch_size"]))
    watch.lap("latest decoding")
    # One teacher-forced pass over the test items for both held-out ratios and the first-error ranks.
    ratios, result["first_error_ranks"] = ErrorRatios({"joint": copilot, "latest": latest}), []
    for record in teacher_forced_records(pilot, tokenizer, test, task_format):
        ratios.add(record)
        result["first_error_ranks"] += first_error_ranks_of(record)
    heldout = ratios.results()
    result["joint_heldout"], result["latest_heldout"] = heldout["joint"], heldout["latest"]
    watch.lap("diagnostics")
    write_json(cell / "partial.json", result)
    del pilot, copilot, latest, log

    # (b) The Pilot alone, trained longer by the Copilot's share of the joint run's wall-clock time.
    joint_run = result["joint_training"]
    share = joint_run["copilot_seconds"] / max(joint_run["seconds"] - joint_run["copilot_seconds"], 1e-9)
    extra_steps = math.ceil(joint_run["steps"] * (1 + share))
    longer = cell / "longer"
    if not (longer / "run.json").is_file():
        _train_pilot(model_dir, longer, train, task_format, p, seed, with_copilot=False, max_steps=extra_steps)
    result["longer_training"] = json.loads((longer / "run.json").read_text())
    watch.lap("longer training")
    pilot, tokenizer = load_pilot(longer / "pilot")
    pilot = on_accelerator(pilot)
    result["longer"] = _scores(evaluate_decodings(pilot, tokenizer, test, task_format,
                                                  [d for d in decodings if d.lam == 0], batch_size=p["eval_batch_size"]))
    watch.lap("longer decoding")
    result["stage_seconds"] = watch.seconds
    result["seconds"] = time.perf_counter() - started
    write_json(result_file, result)
    write_json(CELLS / protocol / task / f"seed{seed}.json", result)
    return result


def _mean_std(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def summarise(results: list[dict], protocol: str, command: str, hours: float) -> str:
    """Markdown: one row per method, mean ± std over seeds per task, the average and its relative change."""
    tasks = [t for t in ALL_TASKS if any(r["task"] == t for r in results)]
    seeds = sorted({r["seed"] for r in results})
    greedy = Decoding().name
    methods = [("Pilot alone", "joint", greedy), ("(b) Pilot trained longer", "longer", greedy)]
    for name in results[0]["joint"]:
        if name != greedy and "greedy" in name:
            methods.append((f"Copilot, {name}", "joint", name))
            methods.append((f"(c) Latest, {name}", "latest", name))
    accuracy = {(m, t): [r[arm][decoding]["accuracy"] for r in results if r["task"] == t]
                for m, arm, decoding in methods for t in tasks}
    base = statistics.fmean(statistics.fmean(accuracy[(methods[0][0], t)]) for t in tasks)
    lines = [f"| method | {' | '.join(tasks)} | average | relative to Pilot alone | paired with the Pilot alone |",
             "|---" * (len(tasks) + 4) + "|"]
    for method, arm, decoding in methods:
        average = statistics.fmean(statistics.fmean(accuracy[(method, t)]) for t in tasks)
        # Rectified arms decode the very Pilot of the "Pilot alone" row, item by item; (b) is another Pilot.
        paired = describe(pooled_scores(r[arm][decoding] for r in results)) if arm != "longer" else "another Pilot"
        lines.append(f"| {method} | " + " | ".join(_mean_std(accuracy[(method, t)]) for t in tasks)
                     + f" | {100 * average:.1f} | {100 * (average - base) / base:+.1f}% | {paired} |")
    ratios = [f"{t}: joint {statistics.fmean(r['joint_heldout']['ratio'] for r in results if r['task'] == t):.4f}, "
              f"latest {statistics.fmean(r['latest_heldout']['ratio'] for r in results if r['task'] == t):.4f}, "
              f"joint on training items {statistics.fmean(r['joint_train_ratio']['ratio'] for r in results if r['task'] == t):.4f}"
              for t in tasks]
    anatomy = ["| task | no teacher-forced error | right token 2nd | 3rd-5th | 6th-32nd | beyond 32nd |",
               "|---|---|---|---|---|---|"]
    for t in tasks:
        ranks = [rank for r in results if r["task"] == t and "first_error_ranks" in r for rank in r["first_error_ranks"]]
        if ranks:
            bins = [sum(rank is None for rank in ranks)] + [
                sum(rank is not None and low <= rank <= high for rank in ranks)
                for low, high in ((1, 1), (2, 4), (5, 31), (32, 10**9))]
            anatomy.append(f"| {t} | " + " | ".join(f"{100 * b / len(ranks):.0f}%" for b in bins) + " |")
    timed = [r for r in results if "stage_seconds" in r]
    stages = list(dict.fromkeys(stage for r in timed for stage in r["stage_seconds"]))
    timing = [f"| task | cells | {' | '.join(stages)} | cell |", "|---" * (len(stages) + 3) + "|"]
    for t in tasks:
        mine = [r for r in timed if r["task"] == t]
        if mine:
            timing.append(f"| {t} | {len(mine)} | " + " | ".join(
                f"{statistics.fmean(r['stage_seconds'].get(stage, 0.0) for r in mine):.0f}" for stage in stages)
                + f" | {statistics.fmean(r['seconds'] for r in mine):.0f} |")
    timing_text = ("\n\nWhere a cell's time goes (mean seconds per cell; training includes the Copilot's updates in "
                   "the joint run):\n\n" + "\n".join(timing) + "\n") if timed else ""
    header = (f"# Quality benchmark, protocol `{protocol}`\n\n`{command}`: {len(results)} cells, seeds {seeds}, "
              f"{hours:.2f} h of compute in total (sum of cell times).\n\nAccuracy (%) of generated, parsed answers on "
              "each task's test split, mean ± std over seeds.\n\n")
    return header + "\n".join(lines) + "\n\nCopilot RMSE ÷ all-zero RMSE, teacher-forced (below 1 = learned " \
        "something that transfers):\n\n" + "\n".join(f"- {line}" for line in ratios) + "\n\nWhere the Pilot " \
        "first goes wrong on each test item, teacher-forced (rank of the right token at the first wrong answer " \
        "position; what re-ranking the Pilot's own candidates could reach):\n\n" + "\n".join(anatomy) + "\n" \
        + timing_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="cpu")
    parser.add_argument("--tasks", type=lambda t: t.split(","), default=None,
                        help="comma-separated (default: the protocol's; cpu: arc_easy,basic_arithmetic)")
    parser.add_argument("--seeds", type=lambda t: [int(s) for s in t.split(",")], default=[0, 1, 2])
    parser.add_argument("--model", default="smollm2-135m", help="Pilot base model folder, or smollm2-135m")
    parser.add_argument("--runs", type=Path, default=Path("runs/quality"), help="where cells and checkpoints go")
    parser.add_argument("--table", type=Path, default=None,
                        help="markdown output (default benchmarks/quality/results/quality_<protocol>.md)")
    parser.add_argument("--report-only", action="store_true",
                        help="tabulate the finished cells (from --runs, else the committed copies), run nothing")
    parser.add_argument("--joint-only", action="store_true",
                        help="train only the cells' joint runs (what benchmarks/quality/copilot_variants.py replays)")
    args = parser.parse_args()
    args.tasks = args.tasks or list(PROTOCOLS[args.protocol]["tasks"])
    if unknown := sorted(set(args.tasks) - set(ALL_TASKS)):
        parser.error(f"unknown task(s) {unknown}; the benchmark's tasks are {list(ALL_TASKS)}")
    if args.joint_only:
        model_dir = resolve_model(args.model)
        for seed in args.seeds:
            for task in args.tasks:
                joint = train_joint(task, seed, args.protocol, args.runs, model_dir)
                print(f"== {task} seed {seed}: joint run in {joint}", flush=True)
        return
    results = []
    if args.report_only:
        for seed in args.seeds:
            for task in args.tasks:
                ran = args.runs / args.protocol / task / f"seed{seed}" / "result.json"
                path = ran if ran.is_file() else CELLS / args.protocol / task / f"seed{seed}.json"
                if path.is_file():
                    results.append(json.loads(path.read_text()))
        if not results:
            parser.error(f"no finished cells under {args.runs / args.protocol} or {CELLS / args.protocol}")
    model_dir = None if args.report_only else resolve_model(args.model)
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 weights, tensor-core matmuls on a GPU; no effect on CPU
    for seed in [] if args.report_only else args.seeds:  # seed-major: a full pass over the tasks gives a first table
        for task in args.tasks:
            print(f"== {task} seed {seed}", flush=True)
            results.append(run_cell(task, seed, args.protocol, args.runs, model_dir))
            print(json.dumps({k: v for k, v in results[-1].items() if k in ("joint", "longer")}, indent=1), flush=True)
    command = "python -m benchmarks.quality.quality --protocol {} --tasks {} --seeds {}".format(
        args.protocol, ",".join(sorted({r["task"] for r in results}, key=ALL_TASKS.index)),
        ",".join(map(str, sorted({r["seed"] for r in results}))))
    table = summarise(results, args.protocol, command, sum(r["seconds"] for r in results) / 3600)
    path = args.table or RESULTS / f"quality_{args.protocol}.md"
    path.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
