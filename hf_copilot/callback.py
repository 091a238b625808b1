"""CopilotCallback: joint training of the Copilot inside an unmodified ``transformers.Trainer``.

Per Pilot optimizer step (Algorithm 1 of the paper): the Pilot's training forwards are recorded by a
:class:`PilotTap`, turned into compact Mistake Log entries, and after the Pilot's optimizer step the Copilot takes
its own update(s) on a batch drawn from the updated log. The Pilot's computation is never changed: the hooks only
read detached tensors, and the Copilot has its own optimizer.
"""

from __future__ import annotations

import logging
import math
import os
import time

import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.utils import SAFE_WEIGHTS_NAME

from .errors import DEFAULT_TOP_K
from .mistake_log import MistakeLog
from .pilot import PilotTap
from .training import CopilotTrainingConfig, CopilotUpdater

logger = logging.getLogger(__name__)

TRAINING_STATE_NAME = "copilot_training_state_rank{rank}.pt"
MISTAKE_LOG_NAME = "mistake_log_rank{rank}"
"""Each rank records its own micro-batches, so a checkpoint holds one Mistake Log per rank, like the state.
Written by the callback in ``on_save``: Trainer writes its checkpoints itself, not through accelerate's
``save_state``, so state registered with ``accelerator.register_for_checkpointing`` would never reach them."""


class CopilotCallback(TrainerCallback):
    """Records the Pilot's Mistake Log and trains ``copilot`` in place while ``Trainer.train()`` runs.

    Args:
        copilot: the :class:`CopilotModel` to train (e.g. ``CopilotModel.from_pilot(pilot)``).
        log_rounds: Mistake Log capacity in training rounds (micro-batches); the paper keeps 128.
        log_max_bytes: byte budget of the log (see :class:`MistakeLog`).
        top_k: Pilot probabilities kept per token in the compact errors.
        log_device: where the log lives (``"cpu"``, pinned when CUDA exists; or the Pilot's device).
        save_dir: where the final Copilot is saved after training (default ``<output_dir>/copilot``).
        save_mistake_log: also write the Mistake Log into each checkpoint (one per rank, ``mistake_log_rank<r>``: an
            exact resume needs it) and rank 0's next to the final Copilot (``mistake_log``).
        resume_from: checkpoint folder to restore the Copilot from when it is not ``<output_dir>/checkpoint-<step>``.
        **training: fields of :class:`CopilotTrainingConfig` (learning rate, batch size, updates per step, ...).
    """

    def __init__(self, copilot, *, log_rounds: int = 128, log_max_bytes: int | None = None,
                 top_k: int = DEFAULT_TOP_K, log_device: str | torch.device = "cpu", save_dir: str | None = None,
                 save_mistake_log: bool = False, resume_from: str | None = None, **training):
        self.copilot = copilot
        self.config = CopilotTrainingConfig(**training)
        log_options = dict(max_rounds=log_rounds, top_k=top_k, device=log_device)
        if log_max_bytes is not None:
            log_options["max_bytes"] = log_max_bytes
        self.mistake_log = MistakeLog(**log_options)
        self.save_dir = save_dir
        self.save_mistake_log = save_mistake_log
        self.resume_from = resume_from
        self.tap: PilotTap | None = None
        self.updater: CopilotUpdater | None = None
        self._losses: list[float] = []
        self._seconds = 0.0  # spent filling the log and updating the Copilot (the tap counts its own hooks' time)

    def attach(self, trainer) -> CopilotCallback:
        """Adds this callback to ``trainer`` ahead of its other callbacks and returns it.

        Trainer calls callbacks in order and hands each the same ``logs`` dict, so only the callbacks after this one
        see the ``copilot_*`` metrics it adds. Passed as ``Trainer(callbacks=[...])`` it runs after the reporters
        Trainer installs itself (TensorBoard, W&B, ...), which then miss those metrics (they still reach
        ``trainer.state.log_history`` and the progress bar). Attached, every reporter sees them in the same entry.
        """
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        return self

    @property
    def seconds(self) -> float:
        """Wall-clock time this process has spent on the Copilot so far: computing errors in the tap's hooks
        (eager forwards; under ``torch.compile`` that time is part of the Pilot's forward), filling the Mistake Log
        and updating the Copilot (``copilot_seconds`` in the Trainer's logs)."""
        return self._seconds + (self.tap.seconds if self.tap is not None else 0.0)

    # --- training loop events -------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise RuntimeError("CopilotCallback needs the Trainer to pass the model to its callbacks.")
        self.copilot.check_pilot(model)
        self.copilot.to(args.device)
        autocast = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        total_updates = math.ceil(state.max_steps / self.config.update_every) * self.config.updates_per_step
        self.updater = CopilotUpdater(self.copilot, self.config, total_updates, autocast_dtype=autocast)
        if state.global_step > 0:
            self._resume(args, state)
        # Errors are made compact inside the forward hook, so the logits are not held through the Pilot's backward.
        self.tap = PilotTap(model, mode="train", errors_top_k=self.mistake_log.top_k).attach()

    def on_substep_end(self, args, state, control, **kwargs):
        self._drain(state)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._drain(state)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.config.update_every or not len(self.mistake_log):
            return
        started = time.perf_counter()
        for _ in range(self.config.updates_per_step):
            self._losses.append(self.updater.step(self.mistake_log))
        self._seconds += time.perf_counter() - started

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self.updater is None or "loss" not in logs:
            return
        stats = self.mistake_log.stats()
        metrics = {
            "copilot_learning_rate": self.updater.learning_rate,
            "copilot_log_tokens": stats["tokens"],
            "copilot_log_bytes": stats["bytes"],
            "copilot_log_error_norm": stats["mean_error_norm"],
            "copilot_log_dropped_mass": stats["mean_dropped_mass"],
            "copilot_seconds": self.seconds,
        }
        if self._losses:
            metrics["copilot_loss"] = sum(self._losses) / len(self._losses)
            self._losses.clear()
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", "copilot")
        self._save(folder, args, state, with_training_state=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.tap is not None:
            self.tap.detach()
            self._seconds += self.tap.seconds
            self.tap = None
        self._save(self.save_dir or os.path.join(args.output_dir, "copilot"), args, state,
                   with_training_state=False)

    # --- helpers --------------------------------------------------------------------------------------------

    def _drain(self, state):
        """Moves the tap's records into the Mistake Log (outside the hooks, so the hooks stay cheap)."""
        if self.tap is None:
            return
        started = time.perf_counter()
        for record in self.tap.pop_records():
            self.mistake_log.add(record, step=state.global_step + 1)
        self._seconds += time.perf_counter() - started

    def _save(self, folder, args, state, with_training_state: bool):
        if state.is_world_process_zero:
            self.copilot.save_pretrained(folder)
            if self.save_mistake_log and not with_training_state:
                self.mistake_log.save(os.path.join(folder, "mistake_log"))
        if with_training_state:
            os.makedirs(folder, exist_ok=True)
            rank = args.process_index
            torch.save(self.updater.state_dict(), os.path.join(folder, TRAINING_STATE_NAME.format(rank=rank)))
            if self.save_mistake_log:
                self.mistake_log.save(os.path.join(folder, MISTAKE_LOG_NAME.format(rank=rank)))

    def _resume(self, args, state):
        folder = self.resume_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        folder = os.path.join(folder, "copilot")
        rank = args.process_index
        training_state = os.path.join(folder, TRAINING_STATE_NAME.format(rank=rank))
        if not os.path.isfile(training_state):
            raise FileNotFoundError(
                f"Training resumes at step {state.global_step}, but {training_state} does not exist, so the Copilot "
                "cannot resume with it. If the checkpoint lives elsewhere, pass CopilotCallback(resume_from=<that "
                "checkpoint folder>); to start the Copilot afresh, train without resume_from_checkpoint. A "
                "checkpoint written by a run with fewer processes cannot resume this one."
            )
        # Straight into the existing module: from_pretrained would build a second Copilot, which under DeepSpeed
        # ZeRO-3 is partitioned on load and no longer fits this one's full-size parameters.
        self.copilot.load_state_dict(load_file(os.path.join(folder, SAFE_WEIGHTS_NAME)))
        # On the CPU: under torchrun args.device reads "cpu:0", which torch.load refuses; the optimizer moves its
        # state to the parameters' device itself, and the sampling generator's state must stay on the CPU.
        self.updater.load_state_dict(torch.load(training_state, map_location="cpu", weights_only=False))
        log_folder = os.path.join(folder, MISTAKE_LOG_NAME.format(rank=rank))
        if os.path.isdir(log_folder):
            self.mistake_log = MistakeLog.load(log_folder, copilot=self.copilot, device=self.mistake_log.device)
        logger.info("Copilot resumed from %s (%d updates so far)", folder, self.updater.updates)
