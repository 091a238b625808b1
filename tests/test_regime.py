"""The regime map's parts against independent references: generated answers recomputed from their text, greedy
answers against a plain argmax loop, batched held-out ratios against one item at a time, Holm against a worked
example; and the smoke edition end to end, resumed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from benchmarks.quality import regime, regime_report
from benchmarks.quality.generated_tasks import TASKS, VOCABULARY, Item, make_splits, unique_items
from hf_copilot import CopilotModel

REPOSITORY = Path(__file__).resolve().parents[1]


def symbols(ids):
    return [VOCABULARY.symbols[i] for i in ids]


@pytest.mark.parametrize("task", ["arithmetic", "sorting"])
def test_generated_answers_are_exact(task):
    stream = unique_items(task)
    for _ in range(500):
        item = next(stream)
        prompt, answer = symbols(item.prompt), symbols(item.answer)
        assert prompt[0] == "<bos>" and "<eos>" not in prompt + answer
        if task == "arithmetic":
            assert prompt[-1] == "="
            assert int("".join(answer)) == eval("".join(prompt[1:-1]))  # the written sum, read back as Python does
        else:
            words = prompt[2:-1]
            assert prompt[1] == "sort" and prompt[-1] == ":" and 4 <= len(words) <= 7
            assert answer == sorted(words) and len(set(words)) == len(words)


def test_splits_are_disjoint_nested_and_fixed():
    small, large = make_splits("arithmetic", 300, 50, 80), make_splits("arithmetic", 900, 50, 80)
    prompts = [{item.prompt for item in part} for part in (large.train, large.validation, large.test)]
    assert sum(map(len, prompts)) == 900 + 50 + 80  # distinct prompts, and no prompt in two splits
    assert large.train[:300] == small.train and large.test == small.test
    assert make_splits("sorting", 10, 5, 5) == make_splits("sorting", 10, 5, 5)
    assert make_splits("sorting", 10, 5, 5, seed=1).test != make_splits("sorting", 10, 5, 5).test


@pytest.mark.parametrize("edition", sorted(regime.EDITIONS))
def test_every_edition_names_a_runnable_grid(edition):
    """A typo in a registered block would surface only hours into a run: every cell names a known Pilot and task,
    once, and the ten validation checkpoints fall on whole steps with the last at the end."""
    settings, cells = regime.EDITIONS[edition], regime.grid(edition)
    assert cells and len(cells) == len(set(cells))
    for pilot, seed, task, rows in cells:
        assert pilot in regime.PILOTS and task in TASKS and rows > 0 and seed >= 0
    assert settings["steps"] % 10 == 0  # validation every steps / 10: ten checkpoints, the last one at the end
    assert settings["validation"] > 0 and settings["test"] > 0


def test_holm_matches_a_worked_example():
    # sorted: 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04, raised to 0.06 to stay monotone
    assert regime_report.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert regime_report.holm([0.6, 0.5]) == pytest.approx([1.0, 1.0])


def test_the_larger_control_matches_pilot_plus_copilot_parameters():
    shape = regime.PILOTS["xs"]
    target = 2 * regime.parameter_count(regime.pilot_config(**shape))
    wider = regime.widened(shape, target)
    counts = {w: regime.parameter_count(regime.pilot_config(w, shape["num_hidden_layers"]))
              for w in (wider["hidden_size"] - regime.HEAD_WIDTH, wider["hidden_size"] + regime.HEAD_WIDTH)}
    chosen = regime.parameter_count(regime.pilot_config(**wider))
    assert all(abs(chosen - target) <= abs(count - target) for count in counts.values())
    assert wider["num_hidden_layers"] == shape["num_hidden_layers"] and wider["hidden_size"] % regime.HEAD_WIDTH == 0


@pytest.fixture(scope="module")
def tiny_pilot():
    torch.manual_seed(0)
    pilot = LlamaForCausalLM(regime.pilot_config(hidden_size=64, num_hidden_layers=2)).eval()
    with torch.no_grad():  # EOS often on top, so that answers of every length end in time (tied: its logit row)
        pilot.model.embed_tokens.weight[VOCABULARY.eos_token_id] *= 4
    return pilot


def greedy_by_hand(pilot, item: Item, steps: int) -> list[int]:
    """No cache, no padding, no batch: argmax of a full forward, one token at a time."""
    ids = list(item.prompt)
    for _ in range(steps):
        next_id = int(pilot(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(next_id)
        if next_id == VOCABULARY.eos_token_id:
            break
    return ids[len(item.prompt):]


def test_answers_right_agrees_with_a_plain_greedy_loop(tiny_pilot):
    items = make_splits("arithmetic", 0, 0, 12).test + make_splits("sorting", 0, 0, 12).test
    # Each item's answer replaced by what the Pilot writes by hand (right when it stops with EOS in time), or by
    # that output with its first token changed (never right).
    relabelled, expected = [], []
    for index, item in enumerate(items):
        written = greedy_by_hand(tiny_pilot, item, len(item.answer) + 1)
        stops = VOCABULARY.eos_token_id in written
        answer = written[:written.index(VOCABULARY.eos_token_id)] if stops else written[:len(item.answer)]
        if index % 2 and answer:
            answer = [(answer[0] + 1) % len(VOCABULARY), *answer[1:]]
            stops = False
        relabelled.append(Item(item.prompt, tuple(answer)))
        expected.append(stops)
    assert 4 <= sum(expected) <= len(items) - 4  # both outcomes are tested
    assert regime.answers_right(tiny_pilot, relabelled, batch_size=5) == expected


def test_heldout_ratios_do_not_depend_on_batching(tiny_pilot):
    copilots = {"a": CopilotModel.from_pilot(tiny_pilot).eval(),
                "b": CopilotModel.from_pilot(tiny_pilot, correction="logit_residual").eval()}
    items = make_splits("sorting", 0, 0, 9).test
    batched = regime.heldout_ratios(tiny_pilot, copilots, items, batch_size=4)
    one_by_one = regime.heldout_ratios(tiny_pilot, copilots, items, batch_size=1)
    assert batched == pytest.approx(one_by_one, rel=1e-4)
    assert all(0 < ratio < 10 for ratio in batched.values())


@pytest.mark.slow
def test_smoke_edition_end_to_end_resumed_and_transferred(tmp_path):
    argv = ["--edition", "smoke", "--tasks", "arithmetic", "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path / "out"), "--threads", "2"]
    assert regime.main(argv) == 0
    kept = tmp_path / "out" / "cells" / "regime_smoke"
    path = kept / "arithmetic_xs_rows64_seed0.json"
    cell = json.loads(path.read_text())
    test_size = regime.EDITIONS["smoke"]["test"]
    assert set(cell["arms"]) == {"pilot", *regime.ARMS}
    assert all(len(arm["right"]) == test_size for arm in cell["arms"].values())
    for name in regime.COPILOTS:
        arm = cell["arms"][name]
        assert 0 < arm["heldout_ratio"] and 0 < arm["fit_ratio"]
        if arm["setting"] is None:  # no validation gain: the arm answers as the Pilot alone
            assert arm["right"] == cell["arms"]["pilot"]["right"]
    assert cell["larger"]["parameters"] > cell["joint"]["parameters"]
    assert cell["longer"]["steps"] > cell["joint"]["steps"]
    page = (tmp_path / "out" / "regime_smoke.md").read_text()
    assert "| arithmetic | xs | 64 | 2 |" in page and (tmp_path / "out" / "regime_smoke.png").is_file()

    # A finished cell is not run again; a stage removed from it is the only one that runs.
    del cell["stage_seconds"]["larger"], cell["arms"]["larger"]
    path.write_text(json.dumps(cell))
    (tmp_path / "runs" / "smoke" / path.stem / "cell.json").unlink()
    assert regime.main(argv) == 0
    again = json.loads(path.read_text())
    assert set(again["stage_seconds"]) == {"joint", "longer", "larger"}
    assert again["stage_seconds"]["joint"] == cell["stage_seconds"]["joint"]
    assert again["arms"]["larger"]["right"] and again["arms"]["pilot"] == cell["arms"]["pilot"]

    # Transfer from a seed to itself reloads exactly what its cell measured; seed 0 -> 1 writes its page.
    own = json.loads((kept / "arithmetic_xs_rows64_seed1.json").read_text())
    itself = regime.transfer("smoke", "arithmetic", "xs", 64, tmp_path / "runs", tmp_path / "out" / "cells",
                             source_seed=1, target_seed=1)
    for name, arm in itself["arms"].items():
        assert arm["heldout_ratio"] == pytest.approx(own["arms"][name]["heldout_ratio"], rel=1e-5)
        if arm["setting"] is not None:
            assert arm["right"] == own["arms"][name]["right"]
    assert regime.main([*argv, "--transfer", "arithmetic,xs,64"]) == 0
    assert "| small_vocabulary |" in (tmp_path / "out" / "regime_transfer_smoke.md").read_text()


def without_packages(tmp_path, blocked: set[str]) -> dict:
    """An environment whose import path holds every installed package but ``blocked``: as on a machine where
    they were never installed."""
    site = tmp_path / "site"
    site.mkdir()
    for folder in map(Path, sys.path):
        if folder.name != "site-packages" or not folder.is_dir():
            continue
        for entry in folder.iterdir():
            top = entry.name.split("-")[0].split(".")[0].lower()
            if top not in blocked and not (site / entry.name).exists() and entry.suffix != ".pth":
                (site / entry.name).symlink_to(entry)
    return {**os.environ, "PYTHONPATH": f"{REPOSITORY}{os.pathsep}{site}", "PYTHONNOUSERSITE": "1"}


@pytest.mark.slow
def test_the_gpu_edition_runs_with_torch_and_transformers_alone(tmp_path):
    blocked = {"datasets", "peft", "evaluate", "matplotlib", "trl", "deepspeed"}
    env = without_packages(tmp_path, blocked)
    missing = subprocess.run([sys.executable, "-S", "-c", "import importlib.util as u; print(sorted(p for p in "
                              f"{sorted(blocked)} if u.find_spec(p)))"], env=env, capture_output=True, text=True,
                             check=True)
    assert missing.stdout.strip() == "[]"  # the environment really lacks them
    run = subprocess.run([sys.executable, "-S", "-m", "benchmarks.quality.regime", "--edition", "smoke", "--tasks",
                          "sorting", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")],
                         env=env, cwd=REPOSITORY, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "no figure" in run.stdout and (tmp_path / "out" / "regime_smoke.md").is_file()
    assert (tmp_path / "out" / "cells" / "regime_smoke" / "sorting_xs_rows64_seed0.json").is_file()


@pytest.mark.slow
def test_gpu_script_runs_every_cell_side_by_side_at_smoke_size(tmp_path):
    # the script calls python3 from PATH, as on the GPU machine: here that must be the interpreter running the tests
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "EDITION": "smoke", "OUT": str(tmp_path / "out"),
           "RUNS": str(tmp_path / "runs")}
    run = subprocess.run(["bash", str(REPOSITORY / "benchmarks" / "gpu_regime.sh")], env=env, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    cells = sorted(p.name for p in (tmp_path / "out" / "cells" / "regime_smoke").glob("*.json"))
    assert cells == ["arithmetic_xs_rows64_seed0.json", "arithmetic_xs_rows64_seed1.json",
                     "sorting_xs_rows64_seed0.json"]
    page = (tmp_path / "out" / "regime_smoke.md").read_text()
    assert "3 cells on disk, 3 finished" in page and (tmp_path / "out" / "regime_smoke.png").is_file()


@pytest.mark.slow
def test_bridge_edition_adapts_a_pretrained_pilot_with_lora(tmp_path):
    """The bridge's stages on a tiny saved Llama whose tokenizer splits digits and signs, as SmolLM2's does."""
    from tokenizers import pre_tokenizers

    from tests.conftest import tiny_pilot, word_tokenizer

    tokenizer = word_tokenizer(list("0123456789+-="))
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Punctuation()])
    assert tokenizer.tokenize("1234+567=") == list("1234+567=")
    model = tmp_path / "model"
    tiny_pilot("llama").save_pretrained(model)
    tokenizer.save_pretrained(model)
    argv = ["--edition", "bridge_smoke", "--model", str(model), "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path / "out"), "--threads", "2"]
    assert regime.main(argv) == 0
    cell = json.loads((tmp_path / "out" / "cells" / "regime_bridge_smoke" / "arithmetic_smollm2_rows32_seed0.json")
                      .read_text())
    assert set(cell["arms"]) == {"pilot", *regime.ARMS}
    # LoRA Pilots: (d) raises the rank by the Pilot-sized Copilot's trainable parameters, which is LoRA too.
    assert cell["joint"]["shape"]["lora_rank"] == 32 < cell["larger"]["shape"]["lora_rank"]
    full = max(cell["joint"]["copilot_parameters"][name] for name in ("full_vocabulary", "full_residual"))
    assert cell["larger"]["parameters"] == pytest.approx(cell["joint"]["parameters"] + full, rel=0.05)
