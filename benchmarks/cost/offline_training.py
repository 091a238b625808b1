"""Offline Copilot training throughput: tokens per second of ``train_copilot`` on a recorded Mistake Log.

    python -m benchmarks.cost.offline_training --pilot smollm2 --updates 12 --repeats 5

The log is recorded once from random token rows (batch x seq, every position labelled) with ``PilotTap``; then
the default Copilot (``CopilotModel.from_pilot(pilot)``, batch 8) is trained ``--updates`` times per repeat from a
fresh copy. The first 2 updates of each repeat are warm-up; the table reports the median throughput.
"""

import argparse
import copy
import statistics
import time

import torch

from hf_copilot import CopilotModel, CopilotTrainingConfig, CopilotUpdater, MistakeLog, PilotTap

from benchmarks.cost.pilots import PILOTS, SEQUENCE_LENGTH, load_pilot, random_token_rows, stack_rows

WARMUP_UPDATES = 2


def record_log(pilot, rows: list[dict], batch: int) -> MistakeLog:
    log = MistakeLog()
    with torch.no_grad(), PilotTap(pilot, mode="generate") as tap:
        for step, start in enumerate(range(0, len(rows), batch)):
            pilot(**stack_rows(rows[start:start + batch]))
            for record in tap.pop_records():
                log.add(record, step=step)
    return log


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pilot", choices=PILOTS, default="tiny")
    parser.add_argument("--updates", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: 128 tiny, 256 smollm2)")
    args = parser.parse_args()
    seq = args.seq or SEQUENCE_LENGTH[args.pilot]

    pilot = load_pilot(args.pilot).eval()
    log = record_log(pilot, random_token_rows(4 * args.batch, seq, pilot.config.vocab_size), args.batch)
    initial = CopilotModel.from_pilot(pilot)
    throughput = []
    for _ in range(args.repeats):
        copilot = copy.deepcopy(initial)
        updater = CopilotUpdater(copilot, CopilotTrainingConfig(), total_updates=args.updates)
        for _ in range(WARMUP_UPDATES):
            updater.step(log)
        tokens, started = updater.tokens, time.perf_counter()
        for _ in range(args.updates - WARMUP_UPDATES):
            updater.step(log)
        throughput.append((updater.tokens - tokens) / (time.perf_counter() - started))
    print(f"Pilot {args.pilot}, default Copilot ({initial.num_parameters() / 1e6:.1f}M parameters, "
          f"{initial.config.num_hidden_layers} layers, batch {CopilotTrainingConfig().batch_size} x {seq}), fp32, "
          f"{torch.get_num_threads()} threads: {statistics.median(throughput):.0f} tokens/s offline "
          f"(median of {args.repeats}; runs {', '.join(f'{t:.0f}' for t in throughput)})")


if __name__ == "__main__":
    main()
