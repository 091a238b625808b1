"""What the base model already knows about each task, scored without generation: a reference, not a metric.

    python -m benchmarks.quality.option_likelihood                      # SmolLM2-135M, the three multiple-choice tasks
    python -m benchmarks.quality.option_likelihood --tasks boolq --test-size 100

The benchmark itself scores generated answers only (as the paper does). This script ranks each test item's options
by the base model's log-likelihood of the option after a plain "Question: ... Answer:" context, the usual zero-shot
shortcut. It tells whether a fine-tuned Pilot near chance in generation format is a protocol problem (the knowledge
is there, generation does not reach it) or a capability limit (the model ranks the options no better than chance
either). Test items only; nothing here chooses anything in the benchmark.
"""

from __future__ import annotations

import argparse
import collections
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_copilot.recipes.assets import resolve_model
from hf_copilot.recipes.tasks import load_task


def context_of(example) -> str:
    passage = f"{example.context}\n" if example.context else ""
    return f"{passage}Question: {example.question}\nAnswer:"


@torch.no_grad()
def option_log_likelihoods(model, tokenizer, example) -> list[tuple[float, int]]:
    """(summed log-likelihood, token count) of each option's text after the example's context."""
    context = tokenizer(context_of(example), add_special_tokens=False)["input_ids"]
    scores = []
    for choice in example.choices:
        option = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([context + option])
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0, len(context) - 1:-1].float(), dim=-1)
        scores.append((float(log_probs.gather(-1, torch.tensor(option)[:, None]).sum()), len(option)))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=lambda t: t.split(","), default=["arc_easy", "piqa", "boolq"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--test-size", type=int, default=200, help="the benchmark's CPU protocol tests 200 items")
    args = parser.parse_args()
    model_dir = resolve_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for task in args.tasks:
        test = load_task(task, "test", test_size=args.test_size)
        summed = per_token = 0
        for example in test:
            scores = option_log_likelihoods(model, tokenizer, example)
            right = example.choices.index(example.answer)
            summed += max(range(len(scores)), key=lambda k: scores[k][0]) == right
            per_token += max(range(len(scores)), key=lambda k: scores[k][0] / scores[k][1]) == right
        majority = collections.Counter(example.answer for example in test).most_common(1)[0][1]
        chance = sum(1 / len(example.choices) for example in test)
        print(json.dumps({"task": task, "items": len(test), "summed_log_likelihood": summed / len(test),
                          "per_token_log_likelihood": per_token / len(test), "chance": chance / len(test),
                          "most_common_answer": majority / len(test)}), flush=True)


if __name__ == "__main__":
    main()
