"""What CopilotLogitsProcessor adds to generate(): wall time with and without it, in one process.

    python -m benchmarks.cost.generation_overhead --pilot tiny [--repeats 5] [--device cpu]
    python -m benchmarks.cost.generation_overhead --pilot smollm2 --beams 1 4 --batches 1 8 --new-tokens 64 256
    python -m benchmarks.cost.generation_overhead --pilot smollm2 --device cuda --dtype bfloat16    # on a GPU

The Pilots are described in ``benchmarks/cost/pilots.py``. The Copilot is
``CopilotModel.from_pilot(pilot)`` (the default shape) with a non-zero head, so the fusion really runs. Every
configuration generates exactly the requested number of tokens (min_new_tokens = max_new_tokens). Plain and Copilot
runs alternate so that drift in machine load hits both alike; the table reports medians.

r_inf is measured, not estimated: the matmul FLOPs (``torch.utils.flop_counter``) of a Copilot forward over 64
positions divided by those of the Pilot's forward over the same positions.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from hf_copilot.generation import CopilotLogitsProcessor
from hf_copilot.modeling_copilot import CopilotModel

from benchmarks.cost.pilots import PILOTS, load_pilot

PROMPT_LENGTH = 32


def build_models(name: str, device: str, dtype: torch.dtype):
    pilot = load_pilot(name).eval().to(device, dtype)
    copilot = CopilotModel.from_pilot(pilot).eval().to(device, dtype)
    with torch.no_grad():
        copilot.correction_head.weight.normal_(std=0.02)
    return pilot, copilot


def inference_flop_ratio(pilot, copilot, positions: int = 64) -> float:
    """r_inf: Copilot forward FLOPs over Pilot forward FLOPs, for the same positions."""
    device = pilot.device
    ids = torch.randint(3, pilot.config.vocab_size, (1, positions), device=device)
    states = torch.randn(1, positions, pilot.config.hidden_size, device=device, dtype=pilot.dtype)
    with torch.no_grad():
        with FlopCounterMode(display=False) as pilot_count:
            pilot(input_ids=ids)
        with FlopCounterMode(display=False) as copilot_count:
            copilot(pilot_hidden_states=states, pilot_input_states=states)
    return copilot_count.get_total_flops() / pilot_count.get_total_flops()


def timed_generate(pilot, prompt, new_tokens, num_beams, processors) -> float:
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    pilot.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, num_beams=num_beams, do_sample=False, logits_processor=processors,
                   pad_token_id=pilot.config.eos_token_id)
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pilot", choices=PILOTS, default="tiny")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="Pilot and Copilot weights")
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[64, 256])
    args = parser.parse_args()

    pilot, copilot = build_models(args.pilot, args.device, getattr(torch, args.dtype))
    pilot_params = sum(p.numel() for p in pilot.parameters()) / 1e6
    copilot_params = sum(p.numel() for p in copilot.parameters()) / 1e6
    r_inf = inference_flop_ratio(pilot, copilot)
    where = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"Pilot {args.pilot} ({pilot_params:.1f}M parameters), Copilot {copilot_params:.1f}M "
          f"({copilot.config.num_hidden_layers} layers), {args.dtype}, {where}, "
          f"median of {args.repeats} runs; r_inf = {r_inf:.3f}, so the target is <= {1 + 1.1 * r_inf:.3f}\n")
    print("| decoding | batch | new tokens | plain (s) | with Copilot (s) | ratio | extra per step (ms) |")
    print("|---|---|---|---|---|---|---|")
    with CopilotLogitsProcessor(copilot, pilot, lam=1.0) as processor:
        for num_beams in args.beams:
            for batch in args.batches:
                generator = torch.Generator().manual_seed(batch)
                prompt = torch.randint(3, pilot.config.vocab_size, (batch, PROMPT_LENGTH), generator=generator)
                prompt = prompt.to(args.device)
                for new_tokens in args.new_tokens:
                    timed_generate(pilot, prompt, 4, num_beams, [processor])  # warm-up
                    plain, fused = [], []
                    for _ in range(args.repeats):
                        plain.append(timed_generate(pilot, prompt, new_tokens, num_beams, []))
                        fused.append(timed_generate(pilot, prompt, new_tokens, num_beams, [processor]))
                    plain_s, fused_s = statistics.median(plain), statistics.median(fused)
                    decoding = "greedy" if num_beams == 1 else f"beam {num_beams}"
                    print(f"| {decoding} | {batch} | {new_tokens} | {plain_s:.3f} | {fused_s:.3f} | "
                          f"{fused_s / plain_s:.2f} | {1000 * (fused_s - plain_s) / new_tokens:.2f} |", flush=True)


if __name__ == "__main__":
    main()
