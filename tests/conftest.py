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

# Tiny models gain nothing from intra-op parallelism, and on a CPU shared with another job OpenMP's threads wait
# on each other at every op (measured: 8 ms instead of 0.05 ms per small matmul, the new test files 480 s vs 17 s).
torch.set_num_threads(1)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
"""Where the device-sensitive tests run: always the CPU, and the GPU too on a machine that has one."""


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


SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3: pad, bos and eos match tiny_pilot's config


def word_tokenizer(words=None):
    """A whitespace word-level fast tokenizer built locally: the special tokens, then ``words`` from id 4.

    The default vocabulary is "w4" ... "w95", so the ids fit a tiny Pilot's embedding.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(len(SPECIAL_TOKENS), VOCAB)] if words is None else list(dict.fromkeys(words))
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({word: i for i, word in enumerate(words, len(SPECIAL_TOKENS))})
    if len(vocab) > VOCAB:
        raise ValueError(f"{len(vocab)} tokens do not fit the tiny Pilot's {VOCAB} embeddings.")
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


COLOURS = ("red", "blue", "green")


def qa_examples(n: int = 8, start: int = 0):
    """Fabricated questions of varying length: with 2 or 3 choices among COLOURS, or free-form (every 4th)."""
    from hf_copilot.recipes.tasks import Example

    examples = []
    for i in range(start, start + n):
        question = " ".join(f"q{(i + j) % 12}" for j in range(1 + i % 5)) + " ?"
        if i % 4 == 3:
            examples.append(Example(question, COLOURS[i % 3]))
        else:
            choices = COLOURS[: 2 + i % 2]
            examples.append(Example(question, choices[i % len(choices)], choices))
    return examples


def qa_tokenizer(answer_styles=("label",)):
    """A word tokenizer covering every word of qa_examples rendered with DEFAULT_FORMAT (prompts and targets) in each
    of ``answer_styles``."""
    from dataclasses import replace

    from hf_copilot.recipes.tasks import DEFAULT_FORMAT

    words = []
    for task_format in (replace(DEFAULT_FORMAT, answer_style=style) for style in answer_styles):
        for example in qa_examples(12):
            words += (task_format.prompt(example) + " " + task_format.target(example)).split()
    return word_tokenizer(sorted(set(words)))
