"""The Python blocks of the README, docs/model.md and docs/evaluation.md run as written, on a tiny Pilot built
from a config.

A block may use the names a reader already has in hand (``pilot``, ``copilot``, ``args``, ``ds``, ``held_out``,
``inputs``, and in
the model's reference ``batch``, ``ids``, ``h_mean``, ``x_tilde``, ``mask``, ``pilot_logits``,
``next_token_labels``): each block gets them fresh. ``args.output_dir`` holds a finished joint run with its Mistake
Log saved, so blocks that load one find it.
"""

import re
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_copilot import CopilotCallback, CopilotModel

from conftest import VOCAB, WIDTH, tiny_pilot

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCUMENTS = [README, ROOT / "docs" / "model.md", ROOT / "docs" / "evaluation.md"]


def python_blocks(path: Path) -> list[tuple[Path, str]]:
    """Each ```python block (dedented when it sits in a list item), preceded by blank lines so that tracebacks
    name its line in the document."""
    text = path.read_text()
    return [(path, "\n" * text.count("\n", 0, found.start(2)) + textwrap.dedent(found.group(2)))
            for found in re.finditer(r"^( *)```python\n(.*?)^\1```", text, flags=re.M | re.S)]


BLOCKS = [block for document in DOCUMENTS for block in python_blocks(document)]


def counting_rows(count: int = 16, length: int = 12, seed: int = 0) -> list[dict]:
    """Rows that count upwards from a random start: something a tiny Pilot can learn in a few steps."""
    starts = torch.randint(3, 80, (count,), generator=torch.Generator().manual_seed(seed))
    rows = []
    for start in starts.tolist():
        ids = torch.arange(start, start + length)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


def training_args(output_dir: Path) -> TrainingArguments:
    return TrainingArguments(output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A finished joint run whose Copilot folder holds the Mistake Log."""
    folder = tmp_path_factory.mktemp("readme_run")
    pilot = tiny_pilot("llama")
    trainer = Trainer(model=pilot, args=training_args(folder), train_dataset=counting_rows())
    CopilotCallback(CopilotModel.from_pilot(pilot), save_mistake_log=True).attach(trainer)
    trainer.train()
    return folder


def test_the_documents_have_python_blocks():
    assert sum(path == README for path, _ in BLOCKS) >= 5


@pytest.mark.parametrize("document, block", BLOCKS,
                         ids=[f"{path.stem}-block{i}" for i, (path, _) in enumerate(BLOCKS)])
def test_block_runs(document, block, trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write relative paths write here
    torch.manual_seed(0)
    pilot = tiny_pilot("llama")
    prompts = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    ids = torch.randint(3, VOCAB, (2, 6))
    labels = ids.clone()
    labels[:, :2] = -100
    namespace = {
        "pilot": pilot,
        "copilot": CopilotModel.from_pilot(pilot),
        "args": training_args(trained_run),
        "ds": counting_rows(),
        "held_out": counting_rows(8, seed=1),
        "inputs": {"input_ids": prompts, "attention_mask": (prompts != 0).long()},
        "batch": {"input_ids": ids, "labels": ids},
        "ids": ids,
        "h_mean": torch.randn(2, 6, WIDTH),
        "x_tilde": torch.randn(2, 6, WIDTH),
        "mask": torch.ones(2, 6, dtype=torch.long),
        "pilot_logits": torch.randn(2, 6, VOCAB),
        "next_token_labels": labels,
        "__name__": "documentation",
    }
    exec(compile(block, str(document), "exec"), namespace)
