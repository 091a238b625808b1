"""Tiny Pilots and Copilots built from configs: nothing is loaded from the Hub."""

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 96
WIDTH = 64


def tiny_pilot(kind: str = "llama", seed: int = 0, **overrides):
    """A randomly initialised Pilot of the given architecture, small enough for 2 CPU cores."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    common.update(overrides)
    if kind in ("llama", "qwen2", "mistral"):
        config_cls, model_cls = {
            "llama": (LlamaConfig, LlamaForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "mistral": (MistralConfig, MistralForCausalLM),
        }[kind]
        config = config_cls(hidden_size=WIDTH, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=256, **common)
        return model_cls(config).eval()
    if kind == "gpt2":
        config = GPT2Config(n_embd=WIDTH, n_layer=3, n_head=4, n_positions=256, **common)
        return GPT2LMHeadModel(config).eval()
    if kind == "t5":
        config = T5Config(d_model=WIDTH, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                          decoder_start_token_id=0, **common)
        return T5ForConditionalGeneration(config).eval()
    raise ValueError(kind)


@pytest.fixture
def llama_pilot():
    return tiny_pilot("llama")


@pytest.fixture
def t5_pilot():
    return tiny_pilot("t5")
