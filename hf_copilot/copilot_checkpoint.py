"""Where a :class:`~hf_copilot.CopilotCallback` keeps its state in the Trainer's checkpoints, and which saved
state a resume can trust: written atomically with a checksum manifest per rank, checked in full before use."""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers.utils import SAFE_WEIGHTS_NAME

from .mistake_log import METADATA_FILE, TENSORS_FILE, MistakeLog
from .safe_io import DamagedFileError, atomic_write, torch_load_checked, verify_manifest, write_manifest

logger = logging.getLogger(__name__)

TRAINING_STATE_NAME = "copilot_training_state_rank{rank}.pt"
STATE_MANIFEST_NAME = "checksums_rank{rank}.json"  # the training state (and, rank 0, the log) a rank wrote
MISTAKE_LOG_NAME = "mistake_log_rank{rank}"
"""Each rank records its own micro-batches, so a checkpoint holds one Mistake Log per rank, like the state.
Written by the callback in ``on_save``: Trainer writes its checkpoints itself, not through accelerate's
``save_state``, so state registered with ``accelerator.register_for_checkpointing`` would never reach them."""


def write_training_state(folder: str, rank: int, updater, mistake_log: MistakeLog | None = None, best=None) -> None:
    """Writes this rank's training state (and its Mistake Log, and the best Copilot kept, when given) into a
    checkpoint's Copilot ``folder``, then the manifest of their checksums, last: a checkpoint whose manifest is
    missing or disagrees with its files was cut short."""
    name = TRAINING_STATE_NAME.format(rank=rank)
    atomic_write(os.path.join(folder, name), lambda path: torch.save(updater.state_dict(), path))
    written = [name]
    if best is not None and (best_file := best.save(folder)):
        written.append(best_file)
    if mistake_log is not None:
        log_name = MISTAKE_LOG_NAME.format(rank=rank)
        mistake_log.save(os.path.join(folder, log_name))
        written += [f"{log_name}/{file}" for file in (TENSORS_FILE, METADATA_FILE)]
    write_manifest(folder, written, STATE_MANIFEST_NAME.format(rank=rank))


def read_training_state(folder: str, rank: int, copilot, updater, log_device) -> MistakeLog | None:
    """Loads the Copilot's weights and this rank's training state from ``folder`` (checked by
    :func:`usable_copilot_state`) into ``copilot`` and ``updater``; returns this rank's Mistake Log, or None when
    the checkpoint was saved without it."""
    # Straight into the existing module: from_pretrained would build a second Copilot, which under DeepSpeed
    # ZeRO-3 is partitioned on load and no longer fits this one's full-size parameters.
    copilot.load_state_dict(load_file(os.path.join(folder, SAFE_WEIGHTS_NAME)))
    # On the CPU: under torchrun args.device reads "cpu:0", which torch.load refuses; the optimizer moves its
    # state to the parameters' device itself, and the sampling generator's state must stay on the CPU.
    training_state = os.path.join(folder, TRAINING_STATE_NAME.format(rank=rank))
    updater.load_state_dict(torch_load_checked(training_state, map_location="cpu", weights_only=False))
    log_folder = os.path.join(folder, MISTAKE_LOG_NAME.format(rank=rank))
    if os.path.isdir(log_folder):
        return MistakeLog.load(log_folder, copilot=copilot, device=log_device)
    logger.warning("Copilot resumed from %s without its Mistake Log (the checkpoint was saved with "
                   "save_mistake_log=False): it goes on from an empty log, so it will differ a little from an "
                   "uninterrupted run. Pass save_mistake_log=True for an exact resume.", folder)
    return None


def usable_copilot_state(checkpoint: Path, name: str, world_size: int, global_step: int) -> str:
    """The Copilot folder ``name`` to resume from: the checkpoint's own when complete and intact, else (with a
    warning) the newest complete one of an earlier checkpoint beside it; raises saying what to do when none is."""
    saved = _saved_ranks(checkpoint / name)
    if saved and len(saved) != world_size:
        raise ValueError(
            f"{checkpoint / name} holds the Copilot state of {len(saved)} process(es), but this run has "
            f"{world_size}: each process resumes its own Mistake Log and sampling state. Resume with "
            f"{len(saved)} process(es), or train a new Copilot beside the resumed Pilot with "
            "CopilotCallback(resume_from=False).")
    problem = _copilot_state_problem(checkpoint / name, world_size)
    if problem is None:
        return str(checkpoint / name)
    older = sorted(((int(match.group(1)), path) for path in checkpoint.parent.glob("checkpoint-*")
                    if (match := re.fullmatch(r"checkpoint-(\d+)", path.name)) and path != checkpoint),
                   reverse=True)
    for step, path in older:
        if step <= global_step and _copilot_state_problem(path / name, world_size) is None:
            warnings.warn(
                f"The Copilot state of {checkpoint} is not usable ({problem}). The Pilot resumes from step "
                f"{global_step}; the Copilot resumes from {path} (step {step}), losing its updates since.",
                RuntimeWarning, stacklevel=3)
            return str(path / name)
    raise DamagedFileError(
        f"Training resumes at step {global_step}, but the Copilot state in {checkpoint / name} is not "
        f"usable ({problem}) and no earlier checkpoint beside it holds a complete one. Resume from a checkpoint "
        "whose copilot/ is complete, pass CopilotCallback(resume_from=<a checkpoint folder with one>), or train "
        "a new Copilot beside the resumed Pilot with CopilotCallback(resume_from=False)."
    )


def _saved_ranks(folder: Path) -> set[int]:
    """The ranks whose training state ``folder`` (a checkpoint's ``copilot``) holds."""
    pattern = re.escape(TRAINING_STATE_NAME).replace(re.escape("{rank}"), r"(\d+)")
    return {int(match.group(1)) for path in folder.glob("*") if (match := re.fullmatch(pattern, path.name))}


def _copilot_state_problem(folder: Path, world_size: int) -> str | None:
    """Why ``folder`` (a checkpoint's ``copilot``) cannot be resumed from, or None when the files of every rank are
    complete and match the checksums saved with them (so that all ranks take the same decision)."""
    if not folder.is_dir():
        return f"{folder} does not exist"
    try:
        verify_manifest(folder)
        for rank in range(world_size):
            verify_manifest(folder, STATE_MANIFEST_NAME.format(rank=rank))
    except DamagedFileError as error:
        return str(error)
    return None
