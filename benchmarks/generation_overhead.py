"""What CopilotLogitsProcessor adds to generate(): wall time with and without it, in one process.

The Pilot is a randomly initialised ~8M-parameter Llama (width 256, 4 layers, vocabulary 8192); the Copilot is
``CopilotModel.from_pilot(pilot, num_hidden_layers=2)`` with a non-zero head, so the fusion really runs. Every
configuration generates exactly the requested number of tokens (min_new_tokens = max_new_tokens). Plain and Copilot
runs alternate so that drift in machine load hits both alike; the table reports medians.

    python benchmarks/generation_overhead.py [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_copilot.generation import CopilotLogitsProcessor
from hf_copilot.modeling_copilot import CopilotModel

PROMPT_LENGTH = 32


def build_models(device: str):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    pilot = LlamaForCausalLM(config).eval().to(device)
    copilot = CopilotModel.from_pilot(pilot, num_hidden_layers=2).eval().to(device)
    with torch.no_grad():
        copilot.correction_head.weight.normal_(std=0.02)
    return pilot, copilot


def timed_generate(pilot, prompt, new_tokens, num_beams, processors) -> float:
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    pilot.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, num_beams=num_beams, do_sample=False, logits_processor=processors)
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    pilot, copilot = build_models(args.device)
    pilot_params = sum(p.numel() for p in pilot.parameters()) / 1e6
    copilot_params = sum(p.numel() for p in copilot.parameters()) / 1e6
    print(f"Pilot {pilot_params:.1f}M parameters, Copilot {copilot_params:.1f}M, device {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} runs\n")
    print("| decoding | batch | new tokens | plain (s) | with Copilot (s) | ratio | extra per step (ms) |")
    print("|---|---|---|---|---|---|---|")
    with CopilotLogitsProcessor(copilot, pilot, lam=1.0) as processor:
        for num_beams in (1, 4):
            for batch in (1, 8):
                generator = torch.Generator().manual_seed(batch)
                prompt = torch.randint(3, pilot.config.vocab_size, (batch, PROMPT_LENGTH), generator=generator)
                prompt = prompt.to(args.device)
                for new_tokens in (64, 256):
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
