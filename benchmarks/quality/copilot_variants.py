"""Compare Copilot variants on one real Pilot run, without retraining the Pilot for each.

    python -m benchmarks.quality.copilot_variants --tasks basic_arithmetic --seeds 0 --variants paper,paper_x8
    python -m benchmarks.quality.copilot_variants --tasks arc_easy --seeds 0 --screen   # held-out diagnostic only

The Pilot's training is identical whatever the Copilot does, so each variant replays the Mistake Log that
``benchmarks/quality/quality.py`` saved from the joint run round by round (``MistakeLog.until``), which is exactly what
joint training would have shown it, then is scored like the benchmark: the held-out diagnostic (Copilot RMSE ÷
all-zero RMSE on teacher-forced test items, and on 200 training items) and test accuracy at fixed λ values.
One JSON per (task, seed, variant) under ``--runs``; the table goes to
``benchmarks/quality/results/copilot_variants.md``. The variants built on the retired experimental options
(re-ranking, its cross-entropy loss, a Copilot that reads no errors, the confidence gate) keep their recorded
results and legend here (``--report-only``); they run at commit f854242.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, set_seed

from hf_copilot import CopilotModel, CopilotTrainingConfig, CopilotUpdater, MistakeLog
from hf_copilot.recipes.assets import resolve_model
from hf_copilot.recipes.diagnostics import heldout_error_ratio
from hf_copilot.recipes.scoring import Decoding, evaluate_decodings
from hf_copilot.recipes.finetune import load_pilot
from hf_copilot.recipes.tasks import TASKS

from benchmarks.quality.protocols import CELLS, PROTOCOLS, RESULTS, on_accelerator, protocol_data, write_json


@dataclass(frozen=True)
class Variant:
    """A Copilot to compare: CopilotConfig overrides, CopilotTrainingConfig overrides, what it tests, the ring size
    of the log it learns from (None: the joint run's) and which rounds it keeps (every n-th: 1/n of the data)."""

    config: dict
    training: dict
    about: str
    log_rounds: int | None = None
    log_every: int = 1


VARIANTS = {
    "paper": Variant({}, {}, "the paper's Copilot: |V|-wide linear head, RMSE, one update per Pilot step"),
    "paper_x8": Variant({}, {"updates_per_step": 8},
                        "the paper's Copilot with 8 updates per Pilot step (replaying the log: 8x the training)"),
    "paper_recent8": Variant({}, {}, "the paper's Copilot learning only from the newest 8 rounds (fresh errors)",
                             log_rounds=8),
    "paper_eps4": Variant({}, {"adam_epsilon": 1e-4},
                          "the paper's Copilot with AdamW epsilon 1e-4 (rows with tiny gradients barely move)"),
    "paper_eps5": Variant({}, {"adam_epsilon": 1e-5}, "the paper's Copilot with AdamW epsilon 1e-5"),
    "paper_lr1e4": Variant({}, {"learning_rate": 1e-4}, "the paper's Copilot with a 5x lower learning rate (1e-4)"),
    "paper_b16": Variant({}, {"batch_size": 16},
                         "the paper's Copilot drawing 16 sequences per update (twice the default)"),
    "paper_b32": Variant({}, {"batch_size": 32},
                         "the paper's Copilot drawing 32 sequences per update (4x the default)"),
    "paper_wd1": Variant({}, {"weight_decay": 1.0},
                         "the paper's Copilot with AdamW weight decay 1.0 (pulls weakly supported weights back)"),
}
RETIRED_VARIANTS = {
    "rerank": "residual re-ranking of the Pilot's top-32 candidates",
    "rerank_ce": "re-ranking trained with cross-entropy on the label instead of RMSE",
    "rerank_ce_lr4": "rerank_ce with a 4x higher Copilot learning rate",
    "rerank_ce_x8": "rerank_ce with 8 updates per Pilot step",
    "paper_blind": "the paper's Copilot reading no error sequence (no exposure bias)",
    "rerank_ce_blind": "rerank_ce reading no error sequence",
    "rerank_ce_recent8": "rerank_ce learning only from the newest 8 rounds",
    "rerank_ce_eps4": "rerank_ce with AdamW epsilon 1e-4",
    "rerank_ce_lr1e4": "rerank_ce with a 5x lower learning rate",
    "rerank_ce_b16": "rerank_ce drawing 16 sequences per update",
    "rerank_ce_b32": "rerank_ce drawing 32 sequences per update",
    "rerank_ce_blind_quarter": "rerank_ce_blind learning from every 4th round only (the same Pilot, 1/4 of the data, "
                               "as many updates)",
}
"""Variants of the retired options: their recorded results still tabulate (run at commit f854242)."""
DECODINGS = [Decoding(), Decoding(1.0, "probs"), Decoding(1.0, "logits"), Decoding(3.0, "logits")]


def _finished(folder: Path, variant: str, screened: bool) -> dict | None:
    """The variant's result in ``folder``: the scored run, else (when ``screened`` is enough) the screened one."""
    for name in (f"{variant}.json", f"{variant}.screen.json") if screened else (f"{variant}.json",):
        if (folder / name).is_file():
            return json.loads((folder / name).read_text())
    return None


def run_variant(task: str, seed: int, variant: str, protocol: str, runs: Path, model_dir: Path,
                screen: bool = False) -> dict:
    """Replay, then the held-out diagnostic and (unless ``screen``) test accuracy; cached as one JSON per run.

    A screened variant has no accuracy; a later full run scores it (a ratio above 1 already rules a gain out)."""
    folder = runs / protocol / task / f"seed{seed}" / "variants"
    if (cached := _finished(folder, variant, screen)) is not None:
        return cached
    out = folder / (f"{variant}.screen.json" if screen else f"{variant}.json")
    chosen = VARIANTS[variant]
    p = PROTOCOLS[protocol]
    joint = runs / protocol / task / f"seed{seed}" / "joint"
    log_dir = joint / "copilot" / "mistake_log"
    if not log_dir.is_dir():
        raise FileNotFoundError(f"{log_dir} is missing: train it first with python -m benchmarks.quality.quality "
                                f"--joint-only --protocol {protocol} --tasks {task} --seeds {seed} (or run the whole cell).")
    started = time.perf_counter()
    set_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    copilot = on_accelerator(CopilotModel.from_pilot(base, num_hidden_layers=p["copilot_layers"], **chosen.config))
    del base
    log = MistakeLog.load(log_dir, copilot=copilot)
    steps = sorted(set(log.steps))
    training = dict(learning_rate=p["copilot_learning_rate"], batch_size=p["copilot_batch_size"], seed=seed)
    training.update(chosen.training)
    config = CopilotTrainingConfig(**training)
    updater = CopilotUpdater(copilot, config, total_updates=len(steps) * config.updates_per_step)
    replay_started = time.perf_counter()
    losses = [updater.step(log.until(step, max_rounds=chosen.log_rounds, every=chosen.log_every))
              for step in steps for _ in range(config.updates_per_step)]
    update_seconds = (time.perf_counter() - replay_started) / len(losses)
    copilot.eval()
    pilot, tokenizer = load_pilot(joint / "pilot")
    pilot = on_accelerator(pilot)
    task_format = TASKS[task].format
    train, test = protocol_data(task, protocol)
    rows = [] if screen else evaluate_decodings(pilot, tokenizer, test, task_format, DECODINGS, copilot=copilot,
                                                batch_size=p["eval_batch_size"])
    result = {
        "task": task, "seed": seed, "variant": variant, "copilot_config": chosen.config,
        "log_rounds": chosen.log_rounds, "log_every": chosen.log_every,
        "copilot_training": config.to_dict(), "first_losses": losses[:5], "last_losses": losses[-5:],
        "seconds_per_update": update_seconds, "copilot_parameters": copilot.num_parameters(),
        "heldout": heldout_error_ratio(pilot, copilot, tokenizer, test, task_format),
        "train_items": heldout_error_ratio(pilot, copilot, tokenizer, train[:200], task_format),
        "accuracy": None if screen else {r["decoding"]: {k: r[k] for k in ("accuracy", "fixed", "broken")}
                                         for r in rows},
        "seconds": time.perf_counter() - started,
    }
    write_json(out, result)
    write_json(CELLS / protocol / task / "variants" / f"seed{seed}" / out.name, result)  # the kept copy
    return result


def kept(task: str, seed: int, variant: str, protocol: str, runs: Path) -> dict | None:
    """A finished run's result, scored before screened, from ``runs`` else the committed copies."""
    for folder in (runs / protocol / task / f"seed{seed}" / "variants", CELLS / protocol / task / "variants" / f"seed{seed}"):
        if (result := _finished(folder, variant, screened=True)) is not None:
            return result
    return None


def _row(task, seeds, variant, heldout, train_items, accuracy, fixed, broken) -> str:
    names = list(accuracy) if accuracy is not None else [d.name for d in DECODINGS]
    cells = ["(screened)"] * len(names) if accuracy is None else [
        f"{100 * accuracy[n]:.1f}" + (f" (+{fixed[n]}/−{broken[n]})" if i else "") for i, n in enumerate(names)]
    return (f"| {task} | {seeds} | {variant} | {heldout:.4f} | {train_items:.4f} | " + " | ".join(cells) + " |")


def table(results: list[dict]) -> str:
    """One row per run; for a variant scored on several seeds of a task, a pooled row (mean accuracy and ratios,
    fixed/broken summed over the seeds)."""
    # The decodings every run was scored with (the retired variants' runs also have the gated ones).
    scored_runs = [r["accuracy"] for r in results if r["accuracy"]]
    names = [name for name in (scored_runs[0] if scored_runs else [d.name for d in DECODINGS])
             if all(name in run for run in scored_runs)]
    lines = ["| task | seed | variant | held-out ratio | train-items ratio | " + " | ".join(names) + " |",
             "|---" * (5 + len(names)) + "|"]
    for r in results:
        accuracy = None if r["accuracy"] is None else {n: r["accuracy"][n]["accuracy"] for n in names}
        fixed = None if accuracy is None else {n: r["accuracy"][n]["fixed"] for n in names}
        broken = None if accuracy is None else {n: r["accuracy"][n]["broken"] for n in names}
        lines.append(_row(r["task"], r["seed"], r["variant"], r["heldout"]["ratio"], r["train_items"]["ratio"],
                          accuracy, fixed, broken))
    for task, variant in dict.fromkeys((r["task"], r["variant"]) for r in results):
        scored = [r for r in results if (r["task"], r["variant"]) == (task, variant) and r["accuracy"]]
        if len(scored) > 1:
            lines.append(_row(
                task, "mean of " + ",".join(str(r["seed"]) for r in scored), f"**{variant}**",
                statistics.fmean(r["heldout"]["ratio"] for r in scored),
                statistics.fmean(r["train_items"]["ratio"] for r in scored),
                {n: statistics.fmean(r["accuracy"][n]["accuracy"] for r in scored) for n in names},
                {n: sum(r["accuracy"][n]["fixed"] for r in scored) for n in names},
                {n: sum(r["accuracy"][n]["broken"] for r in scored) for n in names}))
    shown = dict.fromkeys(r["variant"] for r in results)
    legend = "\n".join(f"- `{name}`: " + (VARIANTS[name].about if name in VARIANTS else
                                           f"{RETIRED_VARIANTS[name]} (retired option, run at f854242)")
                        for name in shown)
    return ("# Copilot variants on one Pilot run\n\nAccuracy (%) on the test split; (+fixed/−broken) against the "
            "Pilot alone. Ratios: Copilot RMSE ÷ all-zero RMSE, teacher-forced (below 1 = better than predicting "
            "nothing).\n\n" + "\n".join(lines) + "\n\n" + legend + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=lambda t: t.split(","), default=["basic_arithmetic"])
    parser.add_argument("--seeds", type=lambda t: [int(s) for s in t.split(",")], default=[0])
    parser.add_argument("--variants", type=lambda t: t.split(","), default=None,
                        help="default: every variant (with --report-only, the retired ones' recorded runs too)")
    parser.add_argument("--protocol", default="cpu", choices=sorted(PROTOCOLS))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--runs", type=Path, default=Path("runs/quality"))
    parser.add_argument("--table", type=Path, default=RESULTS / "copilot_variants.md")
    parser.add_argument("--screen", action="store_true",
                        help="held-out diagnostic only, no generation (minutes instead of tens of minutes)")
    parser.add_argument("--report-only", action="store_true",
                        help="tabulate finished runs (from --runs, else the committed copies), run nothing")
    args = parser.parse_args()
    args.variants = args.variants or list(VARIANTS) + (list(RETIRED_VARIANTS) if args.report_only else [])
    if retired := [name for name in args.variants if name in RETIRED_VARIANTS and not args.report_only]:
        parser.error(f"{retired} use retired options: they run at commit f854242; --report-only tabulates their "
                     "recorded runs")
    if args.report_only:
        results = [r for task in args.tasks for seed in args.seeds for variant in args.variants
                   if (r := kept(task, seed, variant, args.protocol, args.runs)) is not None]
        if not results:
            parser.error("no finished variant runs for these tasks, seeds and variants")
        args.table.write_text(table(results))
        print(table(results))
        return
    model_dir = resolve_model(args.model)
    torch.backends.cuda.matmul.allow_tf32 = True  # as benchmarks/quality/quality.py
    results = []
    for task in args.tasks:
        for seed in args.seeds:
            for variant in args.variants:
                print(f"== {task} seed {seed} {variant}", flush=True)
                results.append(run_variant(task, seed, variant, args.protocol, args.runs, model_dir, args.screen))
                print(table(results[-1:]), flush=True)
    args.table.write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
