"""Every benchmark script imports from the repository root and parses its options (``--help``), so a move or a
renamed shared helper breaks a test rather than the next benchmark run."""

import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(f"benchmarks.{path.parent.name}.{path.stem}" for room in ("cost", "quality")
                 for path in (ROOT / "benchmarks" / room).glob("*.py") if "def main(" in path.read_text())


def test_every_script_is_found():
    rooms = {"cost": {"training_overhead", "generation_overhead", "memory", "step_components", "offline_training"},
             "quality": {"quality", "copilot_variants", "sanity", "error_visibility", "option_likelihood", "paper",
                         "expressiveness"}}
    assert {f"benchmarks.{room}.{name}" for room, names in rooms.items() for name in names} <= set(SCRIPTS)


@pytest.mark.parametrize("module", SCRIPTS)
def test_help(module, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT))
    script = importlib.import_module(module)
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as stopped:
        script.main()
    assert stopped.value.code == 0
    assert "usage" in capsys.readouterr().out


def _cell(task, seed, right, *, finished):
    """A paper-protocol cell as the script stores it: every arm right on the items in ``right`` (a list of bools),
    the paper Copilot at lambda 1 right on one more item; a stopped cell lacks its last three stages."""
    scores = {"accuracy": sum(right) / len(right), "right": right}
    fixed = [True] + right[1:]
    arm = {"pilot greedy": scores, "probs λ=1 greedy": {"accuracy": sum(fixed) / len(fixed), "right": fixed}}
    cell = {"task": task, "seed": seed, "protocol": "cpu", "stage_seconds": dict.fromkeys(
                ("joint", "screen", "epochs", "copilots"), 60.0),
            "pilot_by_epoch": {"1": scores, "2": scores}, "arms": {"paper": arm, "small": arm, "pilot_beam": scores},
            "heldout": {"paper": {"ratio": 1.1}, "small": {"ratio": 1.0}},
            "train_items": {"paper": {"ratio": 0.9}, "small": {"ratio": 1.0}}}
    if finished:
        cell["stage_seconds"].update(dict.fromkeys(("longer", "capacity", "latest"), 60.0))
        cell.update(latest=arm, latest_heldout={"ratio": 1.2},
                    longer={"share": 0.5, "greedy": {"pilot greedy": scores}, "beam": {"pilot beam4": scores}},
                    capacity={"rank": 64, "greedy": {"pilot greedy": scores}, "beam": {"pilot beam4": scores}})
    return cell


def test_paper_table_covers_every_cell_on_disk_finished_or_stopped(tmp_path, monkeypatch):
    """A run of one cell tabulates every kept cell (not only its own), the newest copy of each cell wins, and a
    stopped cell adds what it has: an arm it has not reached is pooled over the cells that have it."""
    monkeypatch.syspath_prepend(str(ROOT))
    paper = importlib.import_module("benchmarks.quality.paper")
    monkeypatch.setattr(paper, "CELLS", tmp_path / "cells")
    kept, runs = tmp_path / "cells" / "paper_cpu" / "arc_easy", tmp_path / "runs"
    wrong_first = [False, True, True, False]
    paper.write_json(kept / "seed0.json", _cell("arc_easy", 0, wrong_first, finished=True))
    paper.write_json(kept / "seed1.partial.json", _cell("arc_easy", 1, [True] * 4, finished=False))
    paper.write_json(kept / "seed2.partial.json", _cell("arc_easy", 2, [True] * 4, finished=False))
    newer = _cell("arc_easy", 2, wrong_first, finished=True)  # the run folder's copy of seed 2 has moved on
    paper.write_json(runs / "cpu" / "arc_easy" / "seed2" / "partial.json", newer)

    cells = paper.cells_on_disk(runs, "cpu")
    assert [(c["seed"], "latest" in c) for c in cells] == [(0, True), (1, False), (2, True)]

    table = paper.summarise(cells, "cpu", "command")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    # All three cells: the paper Copilot fixes item 0 in seeds 0 and 2 (seed 1's Pilot already had it right).
    assert "(+2/−0" in rows["+ paper Copilot, probs λ=1 greedy"]
    # Only the two finished cells reached (c): the same two fixes, out of 8 items, not 12.
    latest = rows["(c) Latest paper Copilot, probs λ=1 greedy"]
    assert "(+2/−0" in latest and "| 75.0 |" in latest


def test_a_setting_chosen_on_validation_is_scored_on_the_test_items(monkeypatch):
    """The headline row of a Copilot under a validation protocol is the test score of the setting its validation
    items chose (here the Pilot alone for one arm: no setting beat it there), paired with the Pilot alone."""
    monkeypatch.syspath_prepend(str(ROOT))
    paper = importlib.import_module("benchmarks.quality.paper")
    cell = _cell("arc_easy", 0, [False, True, True, False], finished=True)
    cell["chosen"] = {"paper": {"decoding": "probs λ=1 greedy"}, "small": {"decoding": "pilot greedy"}}
    rows = paper.rows_of(cell)
    assert rows["+ paper Copilot, setting chosen on validation"] == cell["arms"]["paper"]["probs λ=1 greedy"]
    assert rows["+ 2-layer Copilot, setting chosen on validation"] == cell["arms"]["small"]["pilot greedy"]
    assert "choose" in paper.stages_of(paper.PROTOCOLS["cpu_residual"])
    assert "choose" not in paper.stages_of(paper.PROTOCOLS["cpu"])  # its kept cells stay finished


def test_the_best_setting_prefers_the_pilot_then_the_smaller_lambda_on_ties(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    paper = importlib.import_module("benchmarks.quality.paper")
    greedy = [("probs", 0.5), ("probs", 1.0), ("logits", 3.0), ("logits", 1.0)]

    def scores(**right):
        return {name: {"right": [True] * count + [False] * (9 - count)} for name, count in right.items()}
    names = {"pilot": "pilot greedy", "p05": "probs λ=0.5 greedy", "p1": "probs λ=1 greedy",
             "l1": "logits λ=1 greedy", "l3": "logits λ=3 greedy"}
    assert paper.best_setting(scores(**{names["pilot"]: 4, names["p1"]: 5, names["l3"]: 5}), greedy) == names["p1"]
    assert paper.best_setting(scores(**{names["pilot"]: 5, names["p05"]: 5}), greedy) == names["pilot"]
    assert paper.best_setting(scores(**{names["pilot"]: 3, names["l3"]: 6, names["p05"]: 6}), greedy) == names["p05"]
