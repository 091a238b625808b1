"""Trainer step time without the CopilotCallback, with capture only, and with joint training; log bytes per token.

Launch (one process measures all three settings, alternating, so they share the machine's state):

    python benchmarks/training_overhead.py --repeats 5 --steps 12

Each repeat trains a fresh Pilot for `--steps` steps per setting; a step's time is measured from one
`on_step_begin` to the next (so the callback's own work after the Pilot's optimizer step is included), the first
3 steps are warm-up, and the table reports the median over repeats of each run's median step time.
"""

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from hf_copilot import CopilotCallback, CopilotModel

WARMUP_STEPS = 3


class StepTimer(TrainerCallback):
    def __init__(self):
        self.starts = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.starts.append(time.perf_counter())

    def on_train_end(self, args, state, control, **kwargs):
        self.starts.append(time.perf_counter())

    def median_step(self):
        return statistics.median(b - a for a, b in zip(self.starts[WARMUP_STEPS:], self.starts[WARMUP_STEPS + 1:]))


def make_pilot(args):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=2 * args.width,
                                        num_hidden_layers=args.layers, num_attention_heads=4))


def dataset(args):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (args.batch * (args.steps + 1), args.seq), generator=gen)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]


def run(args, setting, data):
    pilot = make_pilot(args)
    timer = StepTimer()
    callbacks = [timer]
    copilot_callback = None
    if setting != "pilot only":
        copilot = CopilotModel.from_pilot(pilot, num_hidden_layers=args.copilot_layers)
        update_every = 10**9 if setting == "capture only" else 1  # capture only: the log fills, no Copilot update
        copilot_callback = CopilotCallback(copilot, batch_size=args.copilot_batch, update_every=update_every)
        callbacks.insert(0, copilot_callback)
    training_args = TrainingArguments(output_dir="/tmp/hf_copilot_bench", max_steps=args.steps,
                                      per_device_train_batch_size=args.batch, learning_rate=1e-4, report_to=[],
                                      save_strategy="no", logging_strategy="no", disable_tqdm=True,
                                      use_cpu=not torch.cuda.is_available())
    Trainer(model=pilot, args=training_args, train_dataset=data, callbacks=callbacks).train()
    return timer.median_step(), copilot_callback


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--copilot_layers", type=int, default=2)
    parser.add_argument("--copilot_batch", type=int, default=8)
    args = parser.parse_args()

    data = dataset(args)
    settings = ["pilot only", "capture only", "joint training"]
    times = {s: [] for s in settings}
    last = {}
    for _ in range(args.repeats):
        for setting in settings:
            seconds, callback = run(args, setting, data)
            times[setting].append(seconds)
            last[setting] = callback
    pilot_params = sum(p.numel() for p in make_pilot(args).parameters())
    copilot_params = sum(p.numel() for p in last["joint training"].copilot.parameters())
    # Training FLOPs ~ 6 x parameters x tokens, for the Pilot step and for one Copilot update.
    r = (copilot_params * args.copilot_batch) / (pilot_params * args.batch)
    base = statistics.median(times["pilot only"])
    print(f"Pilot {pilot_params / 1e6:.1f}M params, Copilot {copilot_params / 1e6:.1f}M params, batch {args.batch} x "
          f"{args.seq} tokens, {torch.get_num_threads()} threads, median of {args.repeats} repeats; "
          f"r = Copilot/Pilot training FLOPs per step ~ {r:.2f}\n")
    print("| setting | step time (s) | ratio |\n|---|---|---|")
    for setting in settings:
        median = statistics.median(times[setting])
        print(f"| {setting} | {median:.3f} | {median / base:.3f}x |")
    stats = last["capture only"].mistake_log.stats()
    print(f"\nMistake Log: {stats['bytes'] / stats['tokens']:.0f} bytes per token "
          f"({stats['tokens']} tokens, {stats['bytes'] / 2**20:.1f} MiB), mean dropped top-k mass "
          f"{stats['mean_dropped_mass']:.3f}")


if __name__ == "__main__":
    main()
