"""Proof (a) of the issue "The Copilot cannot learn by construction", small enough for every test run: beside a
frozen random Pilot whose next token is fully determined by what the Copilot reads (counting), the paper's
vocabulary head stays near the all-zero loss at d = 32 ≪ |V| = 1,024, and the logit-residual head fits the errors.
The full-size run is ``python -m benchmarks.quality.expressiveness counting``."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def counting(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.quality import expressiveness

    return expressiveness


@pytest.mark.slow
def test_the_logit_residual_fits_what_the_vocabulary_head_cannot(counting, tmp_path):
    short = dict(counting.COUNTING, steps=40)
    vocabulary = counting.counting_fit("vocabulary", short, output_dir=str(tmp_path / "vocabulary"))
    residual = counting.counting_fit("logit_residual", short, output_dir=str(tmp_path / "residual"))
    assert vocabulary["zero_loss"] == pytest.approx(residual["zero_loss"], rel=1e-3)  # the same Pilot and data
    assert vocabulary["fit"] > 0.6  # rank 32 in a 1,024-wide space: near zero is the best it can do
    assert residual["fit"] <= counting.TARGET["counting"]
    assert residual["curve"][-1][1] < residual["curve"][0][1]  # it learned along the run
