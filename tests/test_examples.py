"""The scripts in examples/ run as their docstrings say, at a few steps."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *arguments: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name), *arguments], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_build_copilot(tmp_path):
    out = run_example("build_copilot.py", "--output_dir", str(tmp_path / "copilot"), "--num_hidden_layers", "2")
    assert "untrained correction is exactly zero: True" in out


@pytest.mark.slow
def test_train_with_copilot(tmp_path):
    out = run_example("train_with_copilot.py", "--output_dir", str(tmp_path / "joint"), "--max_steps", "20")
    assert "copilot loss" in out and "fit ratio" in out
    assert "step   20: held-out ratio" in out
    assert (tmp_path / "joint" / "copilot" / "model.safetensors").is_file()
