"""Task examples as token ids: the one place that knows how a prompt and its answer are tokenised, padded and
batched, shared by fine-tuning, scoring, the diagnostics and the plots."""

from __future__ import annotations

import torch

from ..errors import IGNORE_INDEX
from .tasks import Example, TaskFormat


def encode_example(example: Example, tokenizer, task_format: TaskFormat, max_length: int) -> dict:
    """Token ids of prompt + target + EOS, with the prompt masked out of the labels.

    Over-long prompts lose their beginning (the question and the answer format sit at the end), never the
    target: a truncated target would teach the Pilot to stop early.
    """
    prompt = tokenizer(task_format.prompt(example), add_special_tokens=False)["input_ids"]
    target = target_ids(example, tokenizer, task_format)
    if len(target) >= max_length:
        raise ValueError(f"The target alone is {len(target)} tokens, which leaves no room for the prompt within "
                         f"max_length={max_length}: raise max_length.")
    prompt = prompt[-(max_length - len(target)):]
    ids = prompt + target
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX] * len(prompt) + target}


def target_ids(example: Example, tokenizer, task_format: TaskFormat) -> list[int]:
    """The answer's tokens and EOS: what the Pilot is trained to write after the prompt."""
    return tokenizer(task_format.target(example), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def prepare_tokenizer(tokenizer):
    """The tokenizer with a pad token (EOS when the model has none); refuses one without EOS."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no EOS token: the Pilot could never learn where an answer ends.")
    return tokenizer


def prompt_ids(examples: list[Example], tokenizer, task_format: TaskFormat) -> list[list[int]]:
    """Each example's prompt tokens, cut to its last ``task_format.max_prompt_tokens`` when that is set."""
    limit = task_format.max_prompt_tokens
    prompts = [tokenizer(task_format.prompt(example), add_special_tokens=False)["input_ids"] for example in examples]
    return prompts if limit is None else [prompt[-limit:] for prompt in prompts]


def prompt_batches(examples: list[Example], tokenizer, task_format: TaskFormat, batch_size: int, device):
    """Prompts grouped by length (less padding), yielding (original indices, left-padded inputs on ``device``)."""
    prompts = prompt_ids(examples, tokenizer, task_format)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in chosen)
        ids = [[tokenizer.pad_token_id] * (width - len(prompts[i])) + prompts[i] for i in chosen]
        mask = [[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in chosen]
        yield chosen, {"input_ids": torch.tensor(ids, device=device),
                       "attention_mask": torch.tensor(mask, device=device)}
