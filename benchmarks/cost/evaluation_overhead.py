"""Trainer evaluation time with the Copilot's metrics (CopilotCallback(eval_metrics=True)) ÷ without.

Launch (one process alternates the two settings, so they share the machine's state):

    python -m benchmarks.cost.evaluation_overhead --pilot tiny --repeats 5
    python -m benchmarks.cost.evaluation_overhead --pilot smollm2 --repeats 5 --rows 32
    python -m benchmarks.cost.evaluation_overhead --pilot smollm2 --repeats 5 --rows 32 --labelled 0.25

Each run trains one step (learning rate 0) and evaluates twice on the same rows of random tokens, every position
labelled (the worst case: every position is scored): once before the first step (``eval_on_start``, dropped as
warm-up) and once after it. ``--labelled f`` labels only the last fraction f of each row, as fine-tuning data
with its prompts masked is. The time is Trainer's own ``eval_runtime``, which includes the Copilot's work in each
prediction step; the table reports its median over repeats.

r_inf is measured, not estimated: the matmul FLOPs of the Copilot's metrics on one evaluation batch (its
teacher-forced forward and the corrections at the labelled tokens) divided by those of the Pilot's forward.
"""

import argparse
import statistics

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Trainer, TrainingArguments

from hf_copilot import CopilotCallback, CopilotMetrics, CopilotModel, PilotTap

from benchmarks.cost.pilots import PILOTS, SEQUENCE_LENGTH, load_pilot, random_token_rows, stack_rows

SETTINGS = {"without metrics": False, "with metrics": True}


def evaluation_seconds(args, pilot, data, with_metrics: bool) -> float:
    training_args = TrainingArguments(
        output_dir="/tmp/hf_copilot_bench_eval", max_steps=1, per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.batch, learning_rate=0.0, report_to=[], save_strategy="no",
        logging_strategy="no", eval_strategy="steps", eval_steps=1, eval_on_start=True, disable_tqdm=True,
        use_cpu=not torch.cuda.is_available())
    callback = CopilotCallback(CopilotModel.from_pilot(pilot, correction=args.correction), eval_metrics=with_metrics,
                               save_dir="/tmp/hf_copilot_bench_eval/copilot")
    trainer = Trainer(model=pilot, args=training_args, train_dataset=data[:args.batch], eval_dataset=data)
    callback.attach(trainer)
    trainer.train()
    runtimes = [entry["eval_runtime"] for entry in trainer.state.log_history if "eval_runtime" in entry]
    assert with_metrics == any("eval_copilot_heldout_ratio" in entry for entry in trainer.state.log_history)
    return runtimes[-1]


def matmul_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@torch.no_grad()
def r_inf(args, pilot, data) -> float:
    """Copilot metric FLOPs ÷ Pilot forward FLOPs on one evaluation batch."""
    inputs = stack_rows(data[:args.batch], pilot.device)
    metrics = CopilotMetrics(CopilotModel.from_pilot(pilot, correction=args.correction).eval())
    pilot.eval()
    with PilotTap(pilot, mode="generate") as tap:
        pilot_flops = matmul_flops(lambda: pilot(**inputs))
        (record,) = tap.pop_records()
    return matmul_flops(lambda: metrics.add(record)) / pilot_flops


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pilot", choices=PILOTS, default="tiny")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=64, help="evaluation rows")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (default: 128 tiny, 256 smollm2)")
    parser.add_argument("--correction", default="vocabulary", help="the Copilot's correction head")
    parser.add_argument("--labelled", type=float, default=1.0, help="fraction of each row labelled, at its end")
    args = parser.parse_args()
    args.seq = args.seq or SEQUENCE_LENGTH[args.pilot]

    pilot = load_pilot(args.pilot)
    data = random_token_rows(args.rows, args.seq, pilot.config.vocab_size)
    for row in data:  # the prompt: unlabelled
        row["labels"] = row["labels"].clone()
        row["labels"][:round(args.seq * (1 - args.labelled))] = -100
    times = {setting: [] for setting in SETTINGS}
    for _ in range(args.repeats):
        for setting, with_metrics in SETTINGS.items():
            times[setting].append(evaluation_seconds(args, pilot, data, with_metrics))
    r = r_inf(args, pilot, data)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"Pilot {args.pilot}, {args.rows} evaluation rows of {args.seq} tokens ({args.labelled:.0%} labelled), "
          f"batch {args.batch}, "
          f"{args.correction} head, {device}, median of {args.repeats} repeats\n")
    print("| setting | evaluation (s) | ratio | r_inf | 1 + 1.05 r_inf |\n|---|---|---|---|---|")
    base = statistics.median(times["without metrics"])
    for setting in SETTINGS:
        median = statistics.median(times[setting])
        print(f"| {setting} | {median:.3f} | {median / base:.3f}x | {r:.3f} | {1 + 1.05 * r:.3f} |")


if __name__ == "__main__":
    main()
