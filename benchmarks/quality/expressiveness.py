"""Can the correction head fit errors at all? Two proofs a correction form must pass before its accuracy is worth
measuring (issue "The Copilot cannot learn by construction").

    python -m benchmarks.quality.expressiveness counting            # (a) frozen random Pilot, counting: minutes
    python -m benchmarks.quality.expressiveness smollm2             # (b) SmolLM2's real errors, a fixed log: ~1 h
                                                                    #     (resumes from --runs)

(a) **Counting.** A random-init Llama Pilot, frozen (learning rate 0), reads counting sequences: every next token is
the current one + 1, fully determined by what the Copilot reads. The Copilot trains jointly through
``CopilotCallback``. Its fit is the last logged ``copilot_loss`` ÷ ``copilot_log_error_norm`` (the all-zero
predictor's loss on the same log): 1 means it learned nothing, 0 a perfect fit.

(b) **SmolLM2, a fixed log.** SmolLM2-135M-Instruct, LoRA-fine-tuned on ARC-Easy training items, then a Mistake Log
of its teacher-forced errors on a few hundred of those items; a fresh Copilot trains offline on that fixed log
(``train_copilot``) at several learning rates. Its fit is the mean loss of the last 50 updates ÷ the log's all-zero
loss. A 64M-parameter Copilot that cannot fit 2.5K tokens cannot learn anything.

Both run every correction form named in ``--corrections`` on the same Pilot and data, and write one page to
``benchmarks/quality/results/expressiveness_<proof>.md``. The settings are fixed here, before any run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, set_seed

from hf_copilot import CopilotCallback, CopilotModel, train_copilot
from hf_copilot.configuration_copilot import CORRECTIONS

from benchmarks.quality.protocols import RESULTS

COUNTING = dict(vocab_size=1024, targets=120, width=32, length=16, rows=512, steps=150, batch_size=8,
                updates_per_step=8, learning_rate=3e-3)
"""(a) as the issue measured it: |V| = 1,024, about 120 distinct targets, d = 32, batch 8, 8 updates per step."""
SMOLLM2 = dict(task="arc_easy", finetune_rows=200, log_rows=360, epochs=1.0, updates=400, batch_size=8,
               learning_rates=(1e-4, 5e-4, 2e-3), last=50)
"""(b): a 1-epoch LoRA Pilot on 200 training items, a log of 360 items (the first 200 included), 400 updates."""
TARGET = {"counting": 0.30, "smollm2": 0.50}
"""The issue's bar for each proof: the fit a sparse-capable correction must reach."""


def counting_dataset(config: dict, seed: int) -> Dataset:
    """Rows of consecutive token ids starting anywhere in [4, 4 + targets − length): each next token is the current
    one + 1. Labels are the inputs (the model shifts them), so every position is a target."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(4, 4 + config["targets"] - config["length"], (config["rows"],), generator=generator)
    ids = starts[:, None] + torch.arange(config["length"])
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def counting_fit(correction: str, config: dict = COUNTING, seed: int = 0, output_dir: str | None = None) -> dict:
    """(a) for one correction form: the final loss ÷ all-zero loss of a Copilot beside a frozen random Pilot."""
    set_seed(seed)
    pilot = LlamaForCausalLM(LlamaConfig(
        vocab_size=config["vocab_size"], hidden_size=config["width"], intermediate_size=2 * config["width"],
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2))
    copilot = CopilotModel.from_pilot(pilot, correction=correction)
    callback = CopilotCallback(copilot, learning_rate=config["learning_rate"], lr_scheduler_type="constant",
                               warmup_ratio=0.0, batch_size=config["batch_size"],
                               updates_per_step=config["updates_per_step"], seed=seed)
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=output_dir or scratch, learning_rate=0.0, max_steps=config["steps"],
            per_device_train_batch_size=config["batch_size"], logging_steps=10, save_strategy="no",
            report_to=[], disable_tqdm=True, use_cpu=True, seed=seed)
        trainer = Trainer(model=pilot, args=args, train_dataset=counting_dataset(config, seed))
        callback.attach(trainer)
        started = time.perf_counter()
        trainer.train()
    logged = [entry for entry in trainer.state.log_history if "copilot_loss" in entry]
    last = logged[-1]
    return {"correction": correction, "fit": last["copilot_loss"] / last["copilot_log_error_norm"],
            "loss": last["copilot_loss"], "zero_loss": last["copilot_log_error_norm"],
            "curve": [(entry["step"], entry["copilot_loss"] / entry["copilot_log_error_norm"]) for entry in logged],
            "seconds": time.perf_counter() - started}


def smollm2_log(folder: Path, config: dict = SMOLLM2, seed: int = 0):
    """(b)'s fixed Pilot and log: SmolLM2 LoRA-fine-tuned on the first ``finetune_rows`` training items of the task,
    then its teacher-forced errors on the first ``log_rows`` (the fine-tuning items and some it never saw). Both are
    kept in ``folder``, so that a rerun starts from them."""
    from hf_copilot import MistakeLog
    from hf_copilot.recipes.assets import resolve_model
    from hf_copilot.recipes.diagnostics import record_mistake_log
    from hf_copilot.recipes.finetune import add_lora, finetune, load_pilot, save_pilot
    from hf_copilot.recipes.tasks import TASKS, load_task

    if (folder / "log").is_dir():
        return load_pilot(folder / "pilot")[0].eval(), MistakeLog.load(folder / "log")
    examples = load_task(config["task"], "train", seed=0)[: config["log_rows"]]
    task_format = TASKS[config["task"]].format
    pilot, tokenizer = load_pilot(resolve_model("smollm2-135m"))
    pilot = add_lora(pilot, 32)
    finetune(pilot, tokenizer, examples[: config["finetune_rows"]], task_format, folder / "training",
             epochs=config["epochs"], learning_rate=2e-4, batch_size=8, max_length=256, seed=seed, progress=False)
    save_pilot(pilot, tokenizer, folder / "pilot")
    pilot.eval()
    log = record_mistake_log(pilot, tokenizer, examples, task_format, batch_size=8)
    log.save(folder / "log")
    return pilot, log


def smollm2_fit(pilot, log, correction: str, learning_rate: float, config: dict = SMOLLM2, seed: int = 0) -> dict:
    """(b) for one correction form and learning rate: the last updates' mean loss ÷ the log's all-zero loss."""
    set_seed(seed)
    copilot = CopilotModel.from_pilot(pilot, correction=correction)
    started = time.perf_counter()
    losses = train_copilot(copilot, log, num_updates=config["updates"], learning_rate=learning_rate,
                           batch_size=config["batch_size"], lr_scheduler_type="constant", warmup_ratio=0.0,
                           seed=seed, progress=False)
    zero = log.stats()["error_rms"]
    return {"correction": correction, "learning_rate": learning_rate,
            "fit": statistics.fmean(losses[-config["last"]:]) / zero, "zero_loss": zero,
            "curve": [statistics.fmean(losses[i:i + 50]) / zero for i in range(0, len(losses), 50)],
            "seconds": time.perf_counter() - started}


def write_page(proof: str, rows: list[dict], settings: dict, extra: str = "") -> Path:
    page = RESULTS / f"expressiveness_{proof}.md"
    lines = [f"# Expressiveness proof: {proof}", "",
             f"`{shlex.join(['python', '-m', 'benchmarks.quality.expressiveness', *sys.argv[1:]])}`", "",
             f"Settings: `{json.dumps(settings)}`. Target: fit ≤ {TARGET[proof]} (loss ÷ the all-zero loss).", "",
             extra, "",
             "Seconds are wall time on a shared 2-core machine, for orientation only; what each head costs is "
             "measured in benchmarks/cost (docs/cost.md).", "",
             "| correction | learning rate | fit (loss ÷ all-zero) | meets the target "
             "| curve (every 10 steps / 50 updates) | seconds |", "|---|---|---|---|---|---|"]
    for row in rows:
        curve = " ".join(f"{value:.2f}" for value in
                         ([ratio for _, ratio in row["curve"]] if proof == "counting" else row["curve"]))
        lines.append(f"| {row['correction']} | {row.get('learning_rate', settings.get('learning_rate'))} | "
                     f"{row['fit']:.3g} | {'yes' if row['fit'] <= TARGET[proof] else 'no'} | {curve} | "
                     f"{row['seconds']:.0f} |")
    page.write_text("\n".join(lines) + "\n")
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("proof", choices=sorted(TARGET))
    parser.add_argument("--corrections", default="vocabulary,logit_residual",
                        help=f"comma-separated correction forms among {CORRECTIONS}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=Path, default=Path("runs/expressiveness"),
                        help="where (b) keeps its fine-tuned Pilot, its log and each finished fit, to resume from")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 beside another torch process)")
    args = parser.parse_args(argv)
    corrections = args.corrections.split(",")
    unknown = set(corrections) - set(CORRECTIONS)
    if unknown:
        parser.error(f"unknown correction(s) {sorted(unknown)}; pick among {CORRECTIONS}")
    torch.set_num_threads(args.threads)
    if args.proof == "counting":
        rows = []
        for correction in corrections:
            rows.append(counting_fit(correction, seed=args.seed))
            print(f"{correction}: fit {rows[-1]['fit']:.3f} ({rows[-1]['seconds']:.0f} s)", flush=True)
        page = write_page("counting", rows, COUNTING)
    else:
        folder = args.runs / f"smollm2_seed{args.seed}"
        pilot, log = smollm2_log(folder, seed=args.seed)
        stats = log.stats()
        extra = (f"The fixed log: {stats['sequences']} sequences, {stats['labelled_tokens']} labelled tokens, all-zero "
                 f"loss {stats['error_rms']:.4f}, mean mass outside the top-k and the label "
                 f"{stats['mean_dropped_mass']:.4f}.")
        print(extra, flush=True)
        rows = []
        for correction in corrections:
            for learning_rate in SMOLLM2["learning_rates"]:
                done = folder / f"{correction}_lr{learning_rate:g}.json"  # a rerun keeps finished fits
                if not done.is_file():
                    done.write_text(json.dumps(smollm2_fit(pilot, log, correction, learning_rate, seed=args.seed)))
                rows.append(json.loads(done.read_text()))
                print(f"{correction} lr {learning_rate:g}: fit {rows[-1]['fit']:.3f} ({rows[-1]['seconds']:.0f} s)",
                      flush=True)
        page = write_page("smollm2", rows, SMOLLM2, extra)
    print(f"Wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
