"""``hf-copilot train`` / ``eval`` end to end on a user's own model folder and data file."""

import json
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
from conftest import qa_examples, qa_tokenizer, tiny_pilot
from transformers import AutoModelForCausalLM

from hf_copilot import CopilotModel
from hf_copilot.recipes.cli import main
from hf_copilot.recipes.significance import sign_test_p_value
from hf_copilot.recipes.tasks import DEFAULT_FORMAT, load_examples_file

EXPECTED_DECODINGS = ["pilot greedy", "probs λ=0.5 greedy", "probs λ=1 greedy", "logits λ=0.5 greedy",
                      "logits λ=1 greedy"]


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """A save_pretrained model folder (tiny Pilot + tokenizer) and a JSONL file of questions with choices."""
    root = tmp_path_factory.mktemp("user")
    model_dir = root / "my-model"
    tiny_pilot("llama").save_pretrained(model_dir)
    qa_tokenizer().save_pretrained(model_dir)
    data = root / "questions.jsonl"
    rows = [{"question": ex.question, "answer": ex.answer, **({"choices": list(ex.choices)} if ex.choices else {})}
            for ex in qa_examples(8)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return model_dir, data


def train_args(model, data, output, lora_rank):
    return ["train", "--model", str(model), "--data", str(data), "--output", str(output), "--lora-rank",
            str(lora_rank), "--copilot-layers", "2", "--epochs", "1", "--batch-size", "4", "--learning-rate", "1e-3",
            "--copilot-batch-size", "4"]


def eval_args(pilot, copilot, data, output):
    return ["eval", "--model", str(pilot), "--copilot", str(copilot), "--data", str(data), "--output", str(output),
            "--lams", "0.5,1", "--beams", "1", "--batch-size", "4"]


def check_results(eval_dir, data):
    examples = load_examples_file(data)
    results = json.loads((eval_dir / "results.json").read_text())
    assert results["test_examples"] == len(examples) == 8
    assert [row["decoding"] for row in results["rows"]] == EXPECTED_DECODINGS
    for row in results["rows"]:
        assert row["total"] == len(examples)
        assert row["correct"] == sum(DEFAULT_FORMAT.is_correct(a, ex) for a, ex in zip(row["answers"], examples))
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["accuracy"] == row["correct"] / row["total"]
    diagnostic = results["heldout_error_ratio"]
    assert diagnostic["tokens"] > 0 and diagnostic["ratio"] > 0
    assert (eval_dir / "accuracy_vs_lambda.png").stat().st_size > 1000
    assert (eval_dir / "rectification.png").stat().st_size > 1000
    return results


@pytest.mark.slow
def test_train_then_eval_on_a_model_folder_and_a_data_file(user_files, tmp_path, capsys):
    model_dir, data = user_files
    out = tmp_path / "run"
    assert main(train_args(model_dir, data, out, lora_rank=0)) == 0
    assert (out / "pilot" / "config.json").is_file()
    assert (out / "pilot" / "model.safetensors").is_file()
    assert (out / "copilot" / "config.json").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["train_examples"] == 8 and run["data"] == str(data) and run["task"] is None and run["split"] is None
    assert run["options"]["lora_rank"] == 0

    trained = AutoModelForCausalLM.from_pretrained(out / "pilot")
    original = tiny_pilot("llama")
    assert not torch.equal(trained.lm_head.weight, original.lm_head.weight)  # full fine-tuning moved the head
    assert CopilotModel.from_pretrained(out / "copilot").correction_head.weight.abs().sum() > 0

    eval_dir = tmp_path / "eval"
    assert main(eval_args(out / "pilot", out / "copilot", data, eval_dir)) == 0
    check_results(eval_dir, data)
    printed = capsys.readouterr().out
    assert "| pilot greedy |" in printed and "Held-out Copilot RMSE" in printed
    results = json.loads((eval_dir / "results.json").read_text())
    for row in results["rows"][1:]:  # one verdict per rectified decoding, from its own fixed/broken counts
        line = next(line for line in printed.splitlines() if line.startswith(f"- {row['decoding']}: "))
        assert f"(+{row['fixed']}/−{row['broken']}, p = " in line
        expected = "no significant change" if sign_test_p_value(row["fixed"], row["broken"]) >= 0.05 else "significant"
        assert expected in line or "borderline" in line
    assert "rectification.png: logits λ=" in printed and ", step " in printed


@pytest.mark.slow
def test_lora_train_then_eval_from_another_directory(user_files, tmp_path, monkeypatch):
    """The adapter names its base folder; a relative --model must still be found when eval runs elsewhere."""
    model_dir, data = user_files
    monkeypatch.chdir(model_dir.parent)
    out = tmp_path / "lora"
    rerank = ["--copilot-correction", "rerank", "--copilot-loss", "cross_entropy"]  # the re-ranking Copilot too
    assert main(train_args(model_dir.name, data, out, lora_rank=4) + rerank) == 0
    copilot_config = json.loads((out / "copilot" / "config.json").read_text())
    assert (copilot_config["correction"], copilot_config["loss"]) == ("rerank", "cross_entropy")
    assert (out / "pilot" / "adapter_config.json").is_file()
    assert not (out / "pilot" / "model.safetensors").exists()
    monkeypatch.chdir(tmp_path)
    assert main(eval_args(out / "pilot", out / "copilot", data, tmp_path / "eval")) == 0
    check_results(tmp_path / "eval", data)


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
