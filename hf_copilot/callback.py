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
import warnings
from pathlib import Path

import torch
from transformers import TrainerCallback

from .best_copilot import BestCopilot
from .copilot_checkpoint import read_training_state, usable_copilot_state, write_training_state
from .copilot_metrics import EvaluationMetrics
from .errors import DEFAULT_TOP_K
from .generation import check_lam, check_space
from .mistake_log import MistakeLog
from .pilot import PilotTap
from .safe_io import non_finite_parameters
from .training import CopilotTrainingConfig, CopilotUpdater

logger = logging.getLogger(__name__)

MAX_PENDING_RECORDS = 8  # uncollected records that tell the tap train() was interrupted


class CopilotCallback(TrainerCallback):
    """Records the Pilot's Mistake Log and trains ``copilot`` in place while ``Trainer.train()`` runs.

    Args:
        copilot: the :class:`CopilotModel` to train (e.g. ``CopilotModel.from_pilot(pilot)``).
        log_rounds: Mistake Log capacity in rounds; a round is one Pilot optimizer step with all its micro-batches
            (the paper keeps 128).
        log_max_bytes: byte budget of the log (see :class:`MistakeLog`).
        top_k: Pilot probabilities kept per token in the compact errors.
        log_device: where the log lives (``"cpu"``, pinned when CUDA exists; or the Pilot's device).
        save_dir: where the final Copilot is saved after training (default ``<output_dir>/<name>``).
        save_mistake_log: also write the Mistake Log into each checkpoint (one per rank, ``mistake_log_rank<r>``: an
            exact resume needs it) and rank 0's next to the final Copilot (``mistake_log``).
        resume_from: checkpoint folder to restore the Copilot from when it is not ``<output_dir>/checkpoint-<step>``;
            ``False`` starts a new Copilot beside a resumed Pilot (when no checkpoint holds a usable Copilot state).
        name: the Copilot's folder name (in each checkpoint and under ``output_dir``) and metric prefix. Give each
            Copilot its own name to train several beside one Pilot (e.g. two sizes on one run).
        eval_metrics: measure the Copilot in each evaluation Trainer runs during ``train()`` (``eval_strategy``),
            from the Pilot forwards of that evaluation (no extra Pilot forward), and add
            ``<prefix>_<name>_heldout_ratio``, ``_loss``, ``_pilot_accuracy``, ``_rectified_accuracy``,
            ``_tokens_fixed``, ... to its metrics (see :class:`CopilotMetrics`). On by default; off with ``False``.
        eval_lam / eval_space: the fusion weight and space of the rectified accuracy in those metrics.
        best_metric: the evaluation metric that picks the best Copilot state (see :class:`BestCopilot`); tracked
            only with ``load_best_at_end``.
        load_best_at_end: keep the best-scoring Copilot state (saved in each checkpoint, restored on a resume) and
            end training with it: the Copilot in memory and the one saved under ``output_dir`` are the best, not
            the last. Like Trainer's ``load_best_model_at_end``, for the Copilot.
        **training: fields of :class:`CopilotTrainingConfig` (learning rate, batch size, updates per step, ...).
    """

    def __init__(self, copilot, *, log_rounds: int = 128, log_max_bytes: int | None = None,
                 top_k: int = DEFAULT_TOP_K, log_device: str | torch.device = "cpu", save_dir: str | None = None,
                 save_mistake_log: bool = False, resume_from: str | None | bool = None, name: str = "copilot",
                 eval_metrics: bool = True, eval_lam: float = 1.0, eval_space: str = "probs",
                 best_metric: str = "heldout_ratio", load_best_at_end: bool = False, **training):
        self.copilot = copilot
        self.config = CopilotTrainingConfig(**training)
        for option, value in (("log_rounds", log_rounds), ("log_max_bytes", log_max_bytes), ("top_k", top_k)):
            if value is not None and value < 1:
                raise ValueError(f"CopilotCallback({option}={value!r}): it must be a positive integer.")
        try:
            torch.device(log_device)
        except RuntimeError as error:
            raise ValueError(f"CopilotCallback(log_device={log_device!r}) is not a torch device (e.g. 'cpu' or "
                             f"'cuda:0'): {error}") from None
        log_options = dict(max_rounds=log_rounds, top_k=top_k, device=log_device)
        if log_max_bytes is not None:
            log_options["max_bytes"] = log_max_bytes
        self._log_options = log_options
        self.mistake_log = MistakeLog(**log_options)
        self.save_dir = save_dir
        self.save_mistake_log = save_mistake_log
        self.resume_from = resume_from
        self.name = name
        self.eval_metrics, self.eval_lam = eval_metrics, check_lam(eval_lam)
        self.eval_space = check_space(eval_space, "CopilotCallback(eval_space=...)")
        if load_best_at_end and not eval_metrics:
            raise ValueError("CopilotCallback(load_best_at_end=True) picks the best Copilot by its evaluation metrics: "
                             "keep eval_metrics=True (and give the Trainer an eval_dataset and eval_strategy).")
        self.best = BestCopilot(best_metric, name) if load_best_at_end else None
        self.tap: PilotTap | None = None
        self.evaluation: EvaluationMetrics | None = None  # during a train() that evaluates, with eval_metrics
        self.updater: CopilotUpdater | None = None
        self._losses: list[float] = []  # since the last log entry
        self._zero_losses: list[float] = []  # the all-zero predictor's on the same batches
        self._run_losses = [0.0, 0]  # sum and count over this train()
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
        self._claim_name(state)
        self._release_tap(interrupted=True)
        self.copilot.to(args.device)
        autocast = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        # Updates come after the steps numbered n, 2n, ...: the schedule ends with the last of them.
        total_updates = state.max_steps // self.config.update_every * self.config.updates_per_step
        self.updater = CopilotUpdater(self.copilot, self.config, total_updates, autocast_dtype=autocast)
        self.mistake_log = MistakeLog(**self._log_options)  # a new run never mixes in an earlier run's rounds
        self._losses.clear()
        self._zero_losses.clear()
        if self.best is not None:
            self.best = BestCopilot(self.best.key, self.name)
        self._run_losses = [0.0, 0]
        if state.global_step > 0 and self.resume_from is not False:
            self._resume(args, state)
        # Errors are made compact inside the forward hook, so the logits are not held through the Pilot's backward.
        # Records are popped after every micro-batch: a pile of them means train() stopped without telling us.
        self.tap = PilotTap(model, mode="train", errors_top_k=self.mistake_log.top_k,
                            max_pending=MAX_PENDING_RECORDS).attach()
        if self.eval_metrics and args.eval_strategy != "no":  # its tap attached now, with the training tap
            self.evaluation = EvaluationMetrics(model, self.copilot, lam=self.eval_lam, space=self.eval_space,
                                                top_k=self.mistake_log.top_k)

    def on_substep_end(self, args, state, control, **kwargs):
        self._drain(state)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._drain(state)

    def on_prediction_step(self, args, state, control, **kwargs):
        if self.evaluation is not None:
            started = time.perf_counter()
            self.evaluation.collect()
            self._seconds += time.perf_counter() - started

    def on_predict(self, args, state, control, metrics=None, **kwargs):
        if self.evaluation is not None:  # Trainer.predict() during training: measured only in evaluations
            self.evaluation.discard()

    def on_step_end(self, args, state, control, **kwargs):
        if self.evaluation is not None:
            self.evaluation.discard()  # forwards outside an evaluation (a user's generate(), ...)
        if state.global_step % self.config.update_every or not len(self.mistake_log):
            return
        started = time.perf_counter()
        for _ in range(self.config.updates_per_step):
            loss = self.updater.step(self.mistake_log)
            if math.isfinite(loss):  # a skipped update is counted in copilot_skipped_updates, not averaged in
                self._losses.append(loss)
                self._zero_losses.append(self.updater.last_zero_loss)
                self._run_losses[0] += loss
                self._run_losses[1] += 1
        self._seconds += time.perf_counter() - started

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Beside the Pilot's `loss` entries, and in the run's final summary as Trainer does (`train_loss`, the mean
        # over the run, and the Copilot's total time next to `train_runtime`): a run shorter than logging_steps
        # has no other entry.
        measured = self.evaluation.report(logs, self.name) if logs is not None and self.evaluation else None
        if measured is not None:
            self._report_evaluation(measured, logs, state)
            return
        final = logs is not None and "train_loss" in logs
        if logs is None or self.updater is None or not ("loss" in logs or final):
            return
        stats = self.mistake_log.stats()
        metrics = {
            "learning_rate": self.updater.learning_rate,
            "log_tokens": stats["tokens"],
            "log_bytes": stats["bytes"],
            "log_error_norm": stats["error_rms"],
            "log_dropped_mass": stats["mean_dropped_mass"],
            "seconds": self.seconds,
            "skipped_sequences": stats["skipped_non_finite_sequences"],
            "skipped_records": stats["skipped_oversized_records"],
            "skipped_updates": self.updater.skipped_updates,
        }
        if final and self._run_losses[1]:
            metrics["train_loss"] = self._run_losses[0] / self._run_losses[1]
        elif not final and self._losses:
            metrics["loss"] = sum(self._losses) / len(self._losses)
            if sum(self._zero_losses) > 0:
                metrics["fit_ratio"] = sum(self._losses) / sum(self._zero_losses)
            self._losses.clear()
            self._zero_losses.clear()
        self._add_to_log({f"{self.name}_{key}": value for key, value in metrics.items()}, logs, state)

    def _report_evaluation(self, measured: dict, logs: dict, state) -> None:
        """Adds the Copilot's metrics of the evaluation that just ended to its log entry (hence to what
        ``evaluate()`` returns); keeps the best Copilot state."""
        if not measured:
            warnings.warn("The evaluation had no labelled tokens the Copilot could be measured on (an eval dataset "
                          "without `labels`?), so it reports no Copilot metrics.", RuntimeWarning, stacklevel=2)
            return
        self._add_to_log(measured, logs, state)
        if self.best is not None and self.best.consider(measured, state.global_step, self.copilot):
            logger.info("Best Copilot so far: %s = %.4f at step %d", self.best.key, self.best.value, self.best.step)

    @staticmethod
    def _add_to_log(metrics: dict, logs: dict, state) -> None:
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", self.name)
        self._save(folder, args, state, with_training_state=True)

    def on_train_end(self, args, state, control, **kwargs):
        self._release_tap()
        self.copilot.eval()
        if self.best is not None:
            if self.best.weights is None:
                warnings.warn(f"load_best_at_end: no evaluation of this run reported {self.best.key}, so the Copilot "
                              "ends in its last state. Set eval_strategy (and an eval_dataset with labels), or name "
                              "the evaluation's key in best_metric.", RuntimeWarning, stacklevel=2)
            else:
                self.best.restore(self.copilot)
                logger.info("The Copilot ends in its best state: %s = %.4f at step %d.", self.best.key,
                            self.best.value, self.best.step)
        if self.updater is not None and self.updater.updates == self.updater.skipped_updates:
            stats = self.mistake_log.stats()
            every = self.config.update_every
            advice = (f"update_every={every} is more than the {state.global_step} Pilot steps of this run: lower it "
                      "or train longer." if every > state.global_step else
                      "A Copilot learns from tokens that have a next-token label: check that the labels are not all "
                      "-100, that sequences are longer than one token, and that training runs at least one step.")
            warnings.warn(
                f"The Copilot took no update in this train() ({state.global_step} Pilot steps; its Mistake Log holds "
                f"{stats['labelled_tokens']} labelled tokens, {stats['skipped_non_finite_sequences']} non-finite "
                f"sequences and {stats['skipped_oversized_records']} oversized records were left out, "
                f"{self.updater.skipped_updates} updates skipped). It is saved untrained and leaves the Pilot "
                f"unchanged. {advice}", RuntimeWarning, stacklevel=2)
        self._save(self.save_dir or os.path.join(args.output_dir, self.name), args, state,
                   with_training_state=False)

    def _release_tap(self, interrupted: bool = False) -> None:
        """Detaches the tap and drops its records. At the start of a train() a tap still there means the previous
        train() was interrupted (Trainer calls no callback on an exception)."""
        if self.evaluation is not None:
            self.evaluation.close()
            self.evaluation = None
        if self.tap is None:
            return
        if interrupted:
            logger.warning("CopilotCallback: the previous train() did not finish; its hooks are removed and its "
                           "uncollected records dropped before this run starts.")
        self.tap.detach()
        self.tap.pop_records()
        self._seconds += self.tap.seconds
        self.tap = None

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
        broken = non_finite_parameters(self.copilot.state_dict())
        if broken:  # cannot happen through the guarded updates; never stop the Pilot's run over it
            warnings.warn(f"The Copilot's weights {broken[:3]} hold NaN/inf, so it is not saved to {folder}; the "
                          "Pilot's training goes on. A resume falls back to the newest complete Copilot state.",
                          RuntimeWarning, stacklevel=2)
            return
        if state.is_world_process_zero:
            self.copilot.save_pretrained(folder)
            if self.save_mistake_log and not with_training_state:  # the final Copilot: rank 0's log beside it
                self.mistake_log.save(os.path.join(folder, "mistake_log"))
        if with_training_state:
            write_training_state(folder, args.process_index, self.updater,
                                 self.mistake_log if self.save_mistake_log else None,
                                 self.best if state.is_world_process_zero else None)

    def _resume(self, args, state):
        checkpoint = Path(self.resume_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        # Every rank's files are checked against their checksums, so that all ranks take the same decision.
        folder = usable_copilot_state(checkpoint, self.name, args.world_size, state.global_step)
        log = read_training_state(folder, args.process_index, self.copilot, self.updater, self.mistake_log.device)
        if log is not None:
            self.mistake_log = log
        if self.best is not None:
            self.best.load(folder)
        logger.info("Copilot resumed from %s (%d updates so far)", folder, self.updater.updates)

    def _claim_name(self, state) -> None:
        """Refuses a second callback of the same name in one train(): the two would write the same folders and
        metrics, and one Copilot would be lost. (Trainer hands every callback the same ``state``.)"""
        claimed = vars(state).setdefault("_copilot_callback_names", {})
        if claimed.setdefault(self.name, self) is not self:
            raise ValueError(f"Two CopilotCallbacks on this Trainer are named {self.name!r}: they would save into "
                             f"the same folder and report the same metrics. Give each its own name, e.g. "
                             f"CopilotCallback(copilot, name='copilot_small').")
