"""Trainer step time without the CopilotCallback, with capture only, and with joint training; log bytes per token.

Launch (one process measures every setting, alternating, so they share the machine's state):

    python -m benchmarks.cost.training_overhead --pilot tiny --repeats 5 --steps 25
    python -m benchmarks.cost.training_overhead --pilot smollm2 --repeats 5 --steps 6 --warmup 2 --settings all
    python -m benchmarks.cost.training_overhead --pilot smollm2 --bf16 --steps 22 --warmup 2    # on a GPU

Each repeat trains the Pilot from the same initial weights for ``--steps`` steps per setting on random tokens (every
position labelled: the worst case for the capture, which skips unlabelled positions). A step's time is measured
from one ``on_step_begin`` to the next, so the callback's work after the Pilot's optimizer step counts; the first
``--warmup`` steps are dropped and the table reports the median over repeats of each run's mean step time (keep
``steps - warmup`` a multiple of 4 for the update-every settings).

r is measured, not estimated: the matmul FLOPs (``torch.utils.flop_counter``) of one Copilot update divided by those
of one Pilot forward + backward, times the updates per Pilot step.
"""

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_copilot import PAPER_LORA, CopilotCallback, CopilotModel

from benchmarks.cost.pilots import PILOTS, SEQUENCE_LENGTH, load_pilot, random_token_rows, stack_rows

SETTINGS = {
    "pilot only": None,
    "capture only": dict(update_every=10**9),  # the log fills, the Copilot never updates
    "joint (defaults)": {},
    "joint, update every 2 steps": dict(update_every=2),
    "joint, update every 4 steps": dict(update_every=4),
    "joint, Copilot batch 4": dict(batch_size=4),
    "joint, logit-residual correction": dict(correction="logit_residual"),
    # The paper's Copilot: every Pilot layer copied, adapted with LoRA (r 32, alpha 64, dropout 0.08).
    "joint, paper Copilot (every layer, LoRA)": dict(num_hidden_layers="all", lora=PAPER_LORA),
}
BASIC = ["pilot only", "capture only", "joint (defaults)"]
COPILOT_FIELDS = ("correction", "num_hidden_layers", "lora")


def now() -> float:
    """Wall time after the GPU has finished what was queued (kernels run asynchronously)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


class StepTimer(TrainerCallback):
    def __init__(self, warmup):
        self.warmup = warmup
        self.starts = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.starts.append(now())

    def on_train_end(self, args, state, control, **kwargs):
        self.starts.append(now())

    def mean_step(self):
        """Mean, not median: with ``update_every=n`` one step in n carries the Copilot update."""
        kept = self.starts[self.warmup:]
        return (kept[-1] - kept[0]) / (len(kept) - 1)


def make_callback(pilot, setting):
    options = dict(SETTINGS[setting])
    copilot_options = {name: options.pop(name) for name in COPILOT_FIELDS if name in options}
    if copilot_options.get("num_hidden_layers") == "all":
        copilot_options["num_hidden_layers"] = pilot.config.num_hidden_layers
    return CopilotCallback(CopilotModel.from_pilot(pilot, **copilot_options), **options)


def run(args, setting, pilot, initial_state, data):
    pilot.load_state_dict(initial_state)
    timer = StepTimer(args.warmup)
    callback = None if SETTINGS[setting] is None else make_callback(pilot, setting)
    training_args = TrainingArguments(output_dir="/tmp/hf_copilot_bench", max_steps=args.steps,
                                      per_device_train_batch_size=args.batch, learning_rate=1e-5, report_to=[],
                                      save_strategy="no", logging_strategy="no", disable_tqdm=True,
                                      bf16=args.bf16, use_cpu=not torch.cuda.is_available())
    Trainer(model=pilot, args=training_args, train_dataset=data,
            callbacks=[timer] + ([callback] if callback else [])).train()
    return timer.mean_step(), callback


def matmul_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def pilot_step_flops(pilot, data, batch) -> int:
    inputs = stack_rows(data[:batch], pilot.device)
    flops = matmul_flops(lambda: pilot(**inputs).loss.backward())
    pilot.zero_grad(set_to_none=True)
    return flops


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pilot", choices=PILOTS, default="tiny")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: 128 tiny, 256 smollm2)")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (Trainer's --bf16), as on a GPU")
    parser.add_argument("--settings", default="basic", help=f"'basic' ({'; '.join(BASIC)}), 'all', or a "
                        "semicolon-separated list of: " + "; ".join(SETTINGS))
    args = parser.parse_args()
    args.seq = args.seq or SEQUENCE_LENGTH[args.pilot]
    settings = (BASIC if args.settings == "basic" else list(SETTINGS) if args.settings == "all"
                else [name.strip() for name in args.settings.split(";")])

    pilot = load_pilot(args.pilot)
    initial_state = {name: tensor.clone() for name, tensor in pilot.state_dict().items()}
    data = random_token_rows(args.batch * (args.steps + 1), args.seq, pilot.config.vocab_size)
    times = {setting: [] for setting in settings}
    callbacks = {}
    for _ in range(args.repeats):
        for setting in settings:
            seconds, callbacks[setting] = run(args, setting, pilot, initial_state, data)
            times[setting].append(seconds)

    pilot_flops = pilot_step_flops(pilot, data, args.batch)
    base = statistics.median(times["pilot only"]) if "pilot only" in times else None
    pilot_params = sum(p.numel() for p in pilot.parameters())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"Pilot {args.pilot} ({pilot_params / 1e6:.1f}M parameters), batch {args.batch} x {args.seq} tokens, "
          f"{'bf16 mixed precision' if args.bf16 else 'fp32'}, {device}, median of {args.repeats} repeats ({args.steps} steps, first "
          f"{args.warmup} dropped)\n")
    print("| setting | Copilot parameters | r | step time (s) | ratio | 1 + 1.1 r |\n|---|---|---|---|---|---|")
    for setting in settings:
        median = statistics.median(times[setting])
        callback = callbacks[setting]
        r, params = 0.0, ""
        if callback is not None:
            config = callback.config
            update_flops = matmul_flops(lambda: callback.updater.step(callback.mistake_log))
            r = update_flops * config.updates_per_step / config.update_every / pilot_flops
            params = f"{sum(p.numel() for p in callback.copilot.parameters()) / 1e6:.1f}M"
        ratio = f"{median / base:.3f}x" if base else ""
        print(f"| {setting} | {params} | {r:.3f} | {median:.3f} | {ratio} | {1 + 1.1 * r:.3f} |")
    if "capture only" in callbacks:
        stats = callbacks["capture only"].mistake_log.stats()
        print(f"\nMistake Log: {stats['bytes'] / stats['tokens']:.0f} bytes per token ({stats['tokens']} tokens, "
              f"{stats['bytes'] / 2**20:.1f} MiB), mean dropped top-k mass {stats['mean_dropped_mass']:.3f}")


if __name__ == "__main__":
    main()
