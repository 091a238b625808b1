"""Synthetic sanity benchmark: a tiny Pilot trained from scratch on two-number addition, in minutes on a CPU.

    python -m benchmarks.quality.sanity                  # default knobs and the cost/quality trade-off table

It runs the real path (``finetune`` with ``CopilotCallback``, ``evaluate_decodings``, ``heldout_error_ratio``) on
a task small enough to repeat, so it is where the joint-training knobs are compared: Copilot updates every n Pilot
steps and the Copilot's batch size. Time ratios are measured in this process against the same Pilot training
without the callback (median of ``--repeats`` runs each). Writes ``benchmarks/quality/results/sanity.md``.
"""

from __future__ import annotations

import argparse
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, set_seed

from hf_copilot import CopilotModel
from hf_copilot.recipes.diagnostics import heldout_error_ratio
from hf_copilot.recipes.scoring import Decoding, evaluate_decodings
from hf_copilot.recipes.finetune import finetune
from hf_copilot.recipes.tasks import DEFAULT_FORMAT, Example

from benchmarks.quality.protocols import RESULTS

LARGEST = 20
TASK_FORMAT = DEFAULT_FORMAT


def addition_examples(count: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    pairs = [(rng.randrange(LARGEST), rng.randrange(LARGEST)) for _ in range(count)]
    return [Example(question=f"Calculate {a} + {b} =", answer=str(a + b)) for a, b in pairs]


def tokenizer() -> PreTrainedTokenizerFast:
    """Whole numbers are single words, so the Pilot must learn each sum (no digit-wise shortcut)."""
    words = ["<pad>", "<unk>", "<s>", "</s>", "###", "Instruction:", "Response:", "Calculate", "+", "="]
    words += [str(n) for n in range(2 * LARGEST)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def pilot(vocab_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return LlamaForCausalLM(config)


def run(train, test, knobs: dict | None, epochs: float, seed: int) -> dict:
    """One Pilot training (with a Copilot when ``knobs`` is not None); returns time and scores."""
    set_seed(seed)
    tok = tokenizer()
    model = pilot(len(tok))
    copilot = CopilotModel.from_pilot(model, num_hidden_layers=2) if knobs is not None else None
    with tempfile.TemporaryDirectory() as output:
        started = time.perf_counter()
        finetune(model, tok, train, TASK_FORMAT, output, copilot=copilot, epochs=epochs, learning_rate=3e-3,
                 batch_size=32, seed=seed, progress=False, copilot_options=knobs)
        seconds = time.perf_counter() - started
    model.eval()
    decodings = [Decoding(), Decoding(1.0, "probs"), Decoding(1.0, "logits")] if copilot else [Decoding()]
    rows = evaluate_decodings(model, tok, test, TASK_FORMAT, decodings, copilot=copilot.eval() if copilot else None,
                              batch_size=64)
    result = {"seconds": seconds, "accuracy": {r["decoding"]: r["accuracy"] for r in rows}}
    if copilot is not None:
        result["heldout_ratio"] = heldout_error_ratio(model, copilot, tok, test, TASK_FORMAT)["ratio"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed … first-seed + repeats - 1")
    parser.add_argument("--epochs", type=float, default=12.0)
    parser.add_argument("--train-size", type=int, default=1500)
    parser.add_argument("--settings", type=lambda t: [name for name in t.split(",") if name], default=None,
                        help="comma-separated setting names to run (default: all; '' for none); the Pilot alone "
                             "always runs")
    parser.add_argument("--output", type=Path, default=RESULTS / "sanity.md")
    args = parser.parse_args()
    train, test = addition_examples(args.train_size, seed=1), addition_examples(200, seed=2)
    settings = {
        "Pilot alone": None,
        "Copilot, default (every step, batch 8)": {},
        "update every 2 steps": {"update_every": 2},
        "update every 4 steps": {"update_every": 4},
        "Copilot batch 4": {"batch_size": 4},
        "Copilot batch 16": {"batch_size": 16},
    }
    unknown = set(args.settings or ()) - set(settings)
    if unknown:
        parser.error(f"unknown settings {sorted(unknown)}; choose from {sorted(settings)}")
    settings = {name: knobs for name, knobs in settings.items()
                if args.settings is None or name in args.settings or knobs is None}
    seeds = range(args.first_seed, args.first_seed + args.repeats)
    results = {name: [run(train, test, knobs, args.epochs, seed) for seed in seeds]
               for name, knobs in settings.items()}
    base_time = statistics.median(r["seconds"] for r in results["Pilot alone"])
    lines = ["| setting | time ÷ Pilot alone (median) | Pilot greedy | probs λ=1 | logits λ=1 | held-out ratio |",
             "|---|---|---|---|---|---|"]
    for name, runs in results.items():
        def mean(key):
            values = [r["accuracy"].get(key) for r in runs]
            return "–" if values[0] is None else f"{100 * statistics.fmean(values):.1f}"
        ratio = statistics.median(r["seconds"] for r in runs) / base_time
        held = "–" if "heldout_ratio" not in runs[0] else f"{statistics.fmean(r['heldout_ratio'] for r in runs):.3f}"
        lines.append(f"| {name} | {ratio:.2f}× | {mean('pilot greedy')} | {mean('probs λ=1 greedy')} | "
                     f"{mean('logits λ=1 greedy')} | {held} |")
    command = shlex.join(["python", "-m", "benchmarks.quality.sanity", *sys.argv[1:]])
    text = (f"# Sanity benchmark: tiny Pilot from scratch on addition\n\n`{command}`, {torch.get_num_threads()} CPU "
            f"threads; {len(train)} training and {len(test)} test sums, {args.epochs:g} epochs; accuracy (%) is the "
            f"mean over seeds {seeds.start}–{seeds.stop - 1}, time the median.\n\n"
            + "\n".join(lines) + "\n")
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
