"""Where a joint training step's time goes, part by part, outside the Trainer: the floor the overhead ratios sit on.

    python -m benchmarks.cost.step_components --pilot tiny --repeats 5
    python -m benchmarks.cost.step_components --pilot smollm2 --repeats 5 --iterations 3

A plain loop (no Trainer, no callback) times, on random tokens with every position labelled:
  Pilot step            forward + backward + (fused) AdamW step of the Pilot alone, as Trainer does it;
  error compaction      CompactErrors.from_logits on that step's logits (what the tap's hook adds);
  log_softmax           one log-softmax over the same logits: the least any error one-hot - softmax must cost;
  Mistake Log add       packing one record, its errors already compacted as the callback's tap does, into the log;
  Copilot update        one CopilotUpdater.step (sample + forward + backward + clipping + fused AdamW), and its
                        forward + backward alone;
  Pilot step + Copilot update, interleaved
                        the two in turn (do the two models' working sets slow each other down?).
Each part is the median over ``--iterations`` calls; the table gives the median over ``--repeats`` repeats, and
the capture and joint ratios these parts add up to (compare training_overhead.py, which measures them in Trainer).
"""

import argparse
import dataclasses
import statistics
import time

import torch

from hf_copilot import CopilotModel
from hf_copilot.errors import CompactErrors
from hf_copilot.mistake_log import MistakeLog
from hf_copilot.pilot import PilotTap
from hf_copilot.training import CopilotTrainingConfig, CopilotUpdater

from benchmarks.cost.pilots import PILOTS, SEQUENCE_LENGTH, load_pilot, random_token_rows, stack_rows


def median_ms(fn, iterations: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iterations):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pilot", choices=PILOTS, default="tiny")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=9)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--log-rounds", type=int, default=16, help="rounds recorded before the Copilot is timed")
    args = parser.parse_args()
    seq = SEQUENCE_LENGTH[args.pilot]

    pilot = load_pilot(args.pilot).train()
    rows = random_token_rows(args.batch * args.log_rounds, seq, pilot.config.vocab_size)
    batch = stack_rows(rows[:args.batch])
    copilot = CopilotModel.from_pilot(pilot)
    log = MistakeLog(max_rounds=128, top_k=32)
    with PilotTap(pilot, errors_top_k=32) as tap:
        for round_ in range(args.log_rounds):
            pilot(**stack_rows(rows[args.batch * round_:args.batch * (round_ + 1)])).loss.backward()
            pilot.zero_grad(set_to_none=True)
            for record in tap.pop_records():
                log.add(record, step=round_)
    with torch.no_grad(), PilotTap(pilot, mode="generate") as tap:
        pilot(**batch)
        (record,) = tap.pop_records()
    labels = record.next_token_labels()
    compacted = dataclasses.replace(record, logits=None, compact_errors=record.errors(32))  # as the callback's tap
    optimizer = torch.optim.AdamW(pilot.parameters(), lr=1e-6, fused=True)  # Trainer's default optimizer
    updater = CopilotUpdater(copilot, CopilotTrainingConfig(), total_updates=10**6)
    sample = log.sample(args.batch, generator=torch.Generator().manual_seed(0))
    scratch = MistakeLog(max_rounds=4, top_k=32)

    def pilot_step():
        pilot(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def copilot_forward_backward():
        copilot(**sample.copilot_inputs(), return_corrections=False).loss.backward()
        copilot.zero_grad(set_to_none=True)

    def interleaved():
        pilot_step()
        updater.step(log)

    parts = {
        "Pilot step": pilot_step,
        "error compaction": lambda: CompactErrors.from_logits(record.logits, labels, 32),
        "log_softmax": lambda: record.logits.log_softmax(-1),
        "Mistake Log add": lambda: scratch.add(compacted, step=0),
        "Copilot update": lambda: updater.step(log),
        "Copilot forward + backward": copilot_forward_backward,
        "Pilot step + Copilot update, interleaved": interleaved,
    }
    times = {name: [] for name in parts}
    for _ in range(args.repeats):
        for name, fn in parts.items():
            times[name].append(median_ms(fn, args.iterations))
    ms = {name: statistics.median(values) for name, values in times.items()}

    pilot_params = sum(p.numel() for p in pilot.parameters())
    copilot_params = sum(p.numel() for p in copilot.parameters())
    print(f"Pilot {args.pilot} ({pilot_params / 1e6:.1f}M parameters, |V| = {record.logits.shape[-1]}), Copilot "
          f"{copilot_params / 1e6:.1f}M; batch {args.batch} x {seq} tokens, fp32, CPU, {torch.get_num_threads()} "
          f"threads; median of {args.repeats} repeats of the median of {args.iterations} calls\n")
    print("| part | ms | ÷ Pilot step |\n|---|---|---|")
    for name, value in ms.items():
        print(f"| {name} | {value:.1f} | {value / ms['Pilot step']:.3f} |")
    capture = (ms["error compaction"] + ms["Mistake Log add"]) / ms["Pilot step"]
    joint = ms["Pilot step + Copilot update, interleaved"] / ms["Pilot step"] + capture
    print(f"\nCapture adds up to {1 + capture:.3f}x; joint training to {joint:.3f}x (interleaved step + capture).")


if __name__ == "__main__":
    main()
