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
             "quality": {"quality", "copilot_variants", "sanity", "error_visibility", "option_likelihood", "paper"}}
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
