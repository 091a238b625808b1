"""Memory of joint training: peak with vs without the callback, and growth over a long run.

    python -m benchmarks.cost.memory --pilot tiny --steps 1000
    python -m benchmarks.cost.memory --pilot smollm2 --steps 20 --seq 256
    python -m benchmarks.cost.memory --pilot smollm2 --steps 20 --seq 256 --bf16 --output memory_gpu.md    # on a GPU

Each setting runs in its own fresh process (peak resident memory is per process): the Pilot alone, then the Pilot
with CopilotCallback. Every step records the process's resident memory (and, on CUDA, the allocator's peak); the
report gives the peak ratio and the growth after the Mistake Log has filled (rounds > ``--log-rounds``), which
must be ~0 for a bounded log. Writes ``benchmarks/cost/results/memory_<pilot>.md``.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from benchmarks.cost.pilots import PILOTS, load_pilot, random_token_rows

REPOSITORY = Path(__file__).resolve().parents[2]
"""Each setting's process runs this module from the repository root, as the parent was run."""


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def peak_resident_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


class MemoryTrace(TrainerCallback):
    def __init__(self):
        self.resident = []

    def on_step_end(self, args, state, control, **kwargs):
        self.resident.append(resident_bytes())


def child(args) -> None:
    """One training run; prints a JSON line with the trace."""
    from hf_copilot import CopilotCallback, CopilotModel

    pilot = load_pilot(args.pilot)
    data = random_token_rows(256, args.seq, pilot.config.vocab_size)
    trace = MemoryTrace()
    callbacks = [trace]
    callback = None
    if args.setting == "with callback":
        callback = CopilotCallback(CopilotModel.from_pilot(pilot), log_rounds=args.log_rounds)
        callbacks.insert(0, callback)
    training = TrainingArguments(output_dir="/tmp/hf_copilot_memory", max_steps=args.steps,
                                 per_device_train_batch_size=args.batch, logging_steps=50, save_strategy="no",
                                 report_to=[], disable_tqdm=True, bf16=args.bf16, use_cpu=not torch.cuda.is_available())
    Trainer(model=pilot, args=training, train_dataset=data, callbacks=callbacks).train()
    print(json.dumps({"resident": trace.resident, "peak_resident": peak_resident_bytes(),
                      "cuda_peak": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
                      "log_bytes": callback.mistake_log.bytes if callback else 0}))


def growth_per_1000_steps(resident: list[int], start: int) -> float:
    """Least-squares slope of resident memory over the steps after ``start``, in bytes per 1000 steps."""
    points = list(enumerate(resident))[start:]
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return 1000 * slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--pilot", choices=PILOTS, default="tiny")
    parser.add_argument("--log-rounds", type=int, default=128)
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (Trainer's --bf16), as on a GPU")
    parser.add_argument("--setting", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=None,
                        help="default: benchmarks/cost/results/memory_<pilot>.md")
    args = parser.parse_args()
    if args.setting:
        child(args)
        return
    runs = {}
    for setting in ("Pilot alone", "with callback"):
        command = [sys.executable, "-m", __spec__.name, "--setting", setting] + [
            f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items()
            if name not in ("setting", "output", "bf16")] + (["--bf16"] if args.bf16 else [])
        done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPOSITORY)
        runs[setting] = json.loads(done.stdout.strip().splitlines()[-1])
    plain, joint = runs["Pilot alone"], runs["with callback"]
    start = min(args.log_rounds + 10, args.steps // 2)
    rows = [
        f"| peak resident memory | {plain['peak_resident'] / 2**20:.0f} MiB | {joint['peak_resident'] / 2**20:.0f} MiB "
        f"| {joint['peak_resident'] / plain['peak_resident']:.3f}× |",
        f"| growth after step {start} (per 1000 steps) | {growth_per_1000_steps(plain['resident'], start) / 2**20:+.1f} "
        f"MiB | {growth_per_1000_steps(joint['resident'], start) / 2**20:+.1f} MiB | |",
        f"| Mistake Log at the end | | {joint['log_bytes'] / 2**20:.0f} MiB | |",
    ]
    if plain["cuda_peak"]:
        rows.insert(1, f"| CUDA peak allocated | {plain['cuda_peak'] / 2**20:.0f} MiB | "
                       f"{joint['cuda_peak'] / 2**20:.0f} MiB | {joint['cuda_peak'] / plain['cuda_peak']:.3f}× |")
    text = (f"# Memory of joint training\n\n`python -m benchmarks.cost.memory --pilot {args.pilot} "
            f"--steps {args.steps} --seq {args.seq}{' --bf16' if args.bf16 else ''}`: batch {args.batch}×{args.seq}, "
            f"the default Copilot, log of {args.log_rounds} rounds."
            f"\n\n| | Pilot alone | with callback | ratio |\n|---|---|---|---|\n"
            + "\n".join(rows) + "\n")
    (args.output or Path(__file__).parent / "results" / f"memory_{args.pilot}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
