"""The quality room's shared ground: the protocols (data sizes, training and decoding settings), where results go,
and the small helpers every quality script uses. ``quality.py`` runs the protocols; ``copilot_variants.py`` and
``error_visibility.py`` reuse their runs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_copilot.recipes.tasks import TEST_SIZES, load_task
from hf_copilot.safe_io import atomic_write_text

ALL_TASKS = ("arc_easy", "piqa", "boolq", "basic_arithmetic")
CPU_TASKS = ("arc_easy", "basic_arithmetic")
"""The CPU protocol's default tasks: the two on which a CPU-trained 135M Pilot is above chance. PIQA and BoolQ stay
at chance there (docs/results.md) and would add 1.5-2 h per seed; ``--tasks`` still runs them."""
RESULTS = Path(__file__).parent / "results"
"""Where this room's result pages go."""
CELLS = RESULTS / "cells"
"""A copy of every finished cell's result (small JSON, committed), so the table survives the machine that ran it."""
CPU_PROTOCOL = dict(tasks=CPU_TASKS, train_size=400, test_size=200, epochs=1.0, learning_rate=5e-4, batch_size=8,
                    lora_rank=32, copilot_layers=2, copilot_learning_rate=5e-4, copilot_batch_size=8,
                    decodings=[("probs", 0.5), ("probs", 1.0), ("logits", 1.0), ("logits", 3.0)], beams=(1,),
                    eval_batch_size=32)
PROTOCOLS = {
    # Sized for 2 CPU cores, one cell at a time: 1 epoch over 400 examples, greedy; an arithmetic cell takes 7-10
    # minutes, an ARC-Easy cell 20-29 (3 seeds of both: 1.63 h, quality_cpu.md).
    "cpu": CPU_PROTOCOL,
    # The CPU protocol with 4x the training data (still one epoch): does the Copilot transfer once it has more
    # examples per parameter? (About 4x the CPU protocol's training time; arithmetic only, as ARC-Easy has 370
    # training rows in all.)
    "cpu_more_data": {**CPU_PROTOCOL, "tasks": ("basic_arithmetic",), "train_size": 1600},
    # Enough data for Pilots above chance, small enough that every cell finishes in minutes on one GPU (the
    # cells are independent processes: run them side by side, see benchmarks/gpu_session.sh).
    "gpu_short": dict(tasks=ALL_TASKS, train_size=1500, test_size=None, epochs=2.0, learning_rate=2e-4,
                      batch_size=16, lora_rank=32, copilot_layers=2, copilot_learning_rate=5e-4, copilot_batch_size=8,
                      decodings=[("probs", 0.5), ("probs", 1.0), ("logits", 1.0), ("logits", 3.0)], beams=(1,),
                      eval_batch_size=64),
    # Closer to the paper (3 epochs, all training rows, beam 4 too); hours on one GPU.
    "gpu": dict(tasks=ALL_TASKS, train_size=None, test_size=None, epochs=3.0, learning_rate=2e-4, batch_size=16,
                lora_rank=32, copilot_layers=4, copilot_learning_rate=5e-4, copilot_batch_size=16,
                decodings=[("probs", lam) for lam in (0.1, 0.3, 0.5, 0.8, 1.0)]
                + [("logits", lam) for lam in (0.5, 1.0, 3.0)], beams=(1, 4), eval_batch_size=64),
}


def pretrained(model_dir: Path):
    """The untouched base Pilot (float32, as every protocol trains it) and its tokenizer."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), AutoTokenizer.from_pretrained(model_dir)


def on_accelerator(model):
    """Evaluate where the Trainer trained: the GPU when there is one."""
    return model.to("cuda") if torch.cuda.is_available() else model


def write_json(path: Path, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2))


def task_data(task: str, train_size: int | None, test_size: int | None) -> tuple[list, list]:
    """A task's training and test examples (``None``: every training row; the task's own test size).

    The training rows always follow the task's own test set, so a protocol that scores fewer test items trains on
    the same rows as one that scores them all."""
    if test_size is not None and test_size > TEST_SIZES[task]:
        raise ValueError(f"test_size {test_size} is more than {task}'s {TEST_SIZES[task]}: its training rows start "
                         "there, so the test would overlap them.")
    return load_task(task, "train", train_size=train_size), load_task(task, "test", test_size=test_size)


def protocol_data(task: str, protocol: str) -> tuple[list, list]:
    """A task's training and test examples at a protocol's sizes."""
    return task_data(task, PROTOCOLS[protocol]["train_size"], PROTOCOLS[protocol]["test_size"])
