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
import re
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from accelerate.utils import reduce
from transformers import TrainerCallback
from transformers.utils import SAFE_WEIGHTS_NAME

from .best_copilot import BestCopilot
from .copilot_metrics import CopilotMetrics
from .errors import DEFAULT_TOP_K
from .generation import FUSION_SPACES, check_lam
from .mistake_log import METADATA_FILE, TENSORS_FILE, MistakeLog
from .pilot import PilotTap
from .safe_io import (DamagedFileError, atomic_write, non_finite_parameters, torch_load_checked, verify_manifest,
                      write_manifest)
from .training import CopilotTrainingConfig, CopilotUpdater

logger = logging.getLogger(__name__)

TRAINING_STATE_NAME = "copilot_training_state_rank{rank}.pt"
STATE_MANIFEST_NAME = "checksums_rank{rank}.json"  # the training state (and, rank 0, the log) a rank wrote
MAX_PENDING_RECORDS = 8  # uncollected records that tell the tap train() was interrupted
EVALUATION_RECORDS = 4  # forwards of one evaluation step kept for the metrics (generate() adds unlabelled ones)
MISTAKE_LOG_NAME = "mistake_log_rank{rank}"
"""Each rank records its own micro-batches, so a checkpoint holds one Mistake Log per rank, like the state.
Written by the callback in ``on_save``: Trainer writes its checkpoints itself, not through accelerate's
``save_state``, so state registered with ``accelerator.register_for_checkpointing`` would never reach them."""


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
        self.mistake_log.check_compatible(copilot)  # the options the log was given, before any training
        self.save_dir = save_dir
        self.save_mistake_log = save_mistake_log
        self.resume_from = resume_from
        self.name = name
        if eval_space not in FUSION_SPACES:
            raise ValueError(f"CopilotCallback(eval_space={eval_space!r}): pick one of {FUSION_SPACES}.")
        self.eval_metrics, self.eval_lam, self.eval_space = eval_metrics, check_lam(eval_lam), eval_space
        if load_best_at_end and not eval_metrics:
            raise ValueError("CopilotCallback(load_best_at_end=True) picks the best Copilot by its evaluation metrics: "
                             "keep eval_metrics=True (and give the Trainer an eval_dataset and eval_strategy).")
        self.best = BestCopilot(best_metric, name) if load_best_at_end else None
        self.tap: PilotTap | None = None
        self.evaluation: CopilotMetrics | None = None  # the current evaluation's sums, while eval_metrics measures
        self._evaluation_tap: PilotTap | None = None
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
        # Evaluation forwards (no gradient) are read by a second tap, attached now with the first: hooks are never
        # added mid-run (DeepSpeed ZeRO-3 relies on it). It keeps their logits, for the accuracies.
        if self.eval_metrics and args.eval_strategy != "no":
            self.evaluation = CopilotMetrics(self.copilot, lam=self.eval_lam, space=self.eval_space,
                                             top_k=self.mistake_log.top_k)
            self._evaluation_tap = PilotTap(model, mode="generate", max_records=EVALUATION_RECORDS).attach()

    def on_substep_end(self, args, state, control, **kwargs):
        self._drain(state)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._drain(state)

    def on_prediction_step(self, args, state, control, **kwargs):
        if self._evaluation_tap is None:
            return
        started = time.perf_counter()
        for record in self._evaluation_tap.pop_records():
            self.evaluation.add(record)
        self._seconds += time.perf_counter() - started

    def on_predict(self, args, state, control, metrics=None, **kwargs):
        if self.evaluation is not None:  # Trainer.predict() during training: measured only in evaluations
            self.evaluation.reset()

    def on_step_end(self, args, state, control, **kwargs):
        if self._evaluation_tap is not None:
            self._evaluation_tap.pop_records()  # forwards outside an evaluation (a user's generate(), ...)
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
        if logs is not None and self.evaluation is not None and (prefix := _evaluation_prefix(logs)):
            self._report_evaluation(prefix, logs, state)
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
            if self.copilot.config.loss == "rmse" and sum(self._zero_losses) > 0:
                metrics["fit_ratio"] = sum(self._losses) / sum(self._zero_losses)
            self._losses.clear()
            self._zero_losses.clear()
        self._add_to_log({f"{self.name}_{key}": value for key, value in metrics.items()}, logs, state)

    def _report_evaluation(self, prefix: str, logs: dict, state) -> None:
        """Adds the Copilot's metrics of the evaluation that just ended to its log entry (hence to what
        ``evaluate()`` returns), summed over processes; keeps the best Copilot state."""
        started = time.perf_counter()
        measured = self.evaluation.results(reduce=lambda sums: reduce(sums, reduction="sum"))
        self.evaluation.reset()
        if not measured:
            warnings.warn("The evaluation had no labelled tokens the Copilot could be measured on (an eval dataset "
                          "without `labels`?), so it reports no Copilot metrics.", RuntimeWarning, stacklevel=2)
            return
        metrics = {f"{prefix}_{self.name}_{key}": value for key, value in measured.items()}
        self._add_to_log(metrics, logs, state)
        if self.best is not None and self.best.consider(metrics, state.global_step, self.copilot):
            logger.info("Best Copilot so far: %s = %.4f at step %d", self.best.key, self.best.value, self.best.step)
        self._seconds += time.perf_counter() - started

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
        if self._evaluation_tap is not None:
            self._evaluation_tap.detach()
            self._evaluation_tap.pop_records()
            self._evaluation_tap = None
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
        rank = args.process_index
        written = []
        if state.is_world_process_zero:
            self.copilot.save_pretrained(folder)
            if self.save_mistake_log and not with_training_state:  # the final Copilot: rank 0's log beside it
                self.mistake_log.save(os.path.join(folder, "mistake_log"))
        if with_training_state:
            name = TRAINING_STATE_NAME.format(rank=rank)
            atomic_write(os.path.join(folder, name), lambda path: torch.save(self.updater.state_dict(), path))
            written.append(name)
            if self.best is not None and state.is_world_process_zero and (best_file := self.best.save(folder)):
                written.append(best_file)
            if self.save_mistake_log:
                log_name = MISTAKE_LOG_NAME.format(rank=rank)
                self.mistake_log.save(os.path.join(folder, log_name))
                written += [f"{log_name}/{file}" for file in (TENSORS_FILE, METADATA_FILE)]
            # Written last: a checkpoint whose manifest is missing or disagrees with its files was cut short.
            write_manifest(folder, written, STATE_MANIFEST_NAME.format(rank=rank))

    def _resume(self, args, state):
        folder = self._usable_copilot_state(args, state)  # every rank's files checked against their checksums
        rank = args.process_index
        training_state = os.path.join(folder, TRAINING_STATE_NAME.format(rank=rank))
        # Straight into the existing module: from_pretrained would build a second Copilot, which under DeepSpeed
        # ZeRO-3 is partitioned on load and no longer fits this one's full-size parameters.
        self.copilot.load_state_dict(load_file(os.path.join(folder, SAFE_WEIGHTS_NAME)))
        # On the CPU: under torchrun args.device reads "cpu:0", which torch.load refuses; the optimizer moves its
        # state to the parameters' device itself, and the sampling generator's state must stay on the CPU.
        self.updater.load_state_dict(torch_load_checked(training_state, map_location="cpu", weights_only=False))
        if self.best is not None:
            self.best.load(folder)
        log_folder = os.path.join(folder, MISTAKE_LOG_NAME.format(rank=rank))
        if os.path.isdir(log_folder):
            self.mistake_log = MistakeLog.load(log_folder, copilot=self.copilot, device=self.mistake_log.device)
        else:
            logger.warning("Copilot resumed from %s without its Mistake Log (the checkpoint was saved with "
                           "save_mistake_log=False): it goes on from an empty log, so it will differ a little from an "
                           "uninterrupted run. Pass save_mistake_log=True for an exact resume.", folder)
        logger.info("Copilot resumed from %s (%d updates so far)", folder, self.updater.updates)

    def _claim_name(self, state) -> None:
        """Refuses a second callback of the same name in one train(): the two would write the same folders and
        metrics, and one Copilot would be lost. (Trainer hands every callback the same ``state``.)"""
        claimed = vars(state).setdefault("_copilot_callback_names", {})
        if claimed.setdefault(self.name, self) is not self:
            raise ValueError(f"Two CopilotCallbacks on this Trainer are named {self.name!r}: they would save into "
                             f"the same folder and report the same metrics. Give each its own name, e.g. "
                             f"CopilotCallback(copilot, name='copilot_small').")

    def _usable_copilot_state(self, args, state) -> str:
        """The ``copilot`` folder to resume from: the checkpoint's own when complete and intact, else (with a
        warning) the newest complete one of an earlier checkpoint beside it; raises saying what to do when none is."""
        checkpoint = Path(self.resume_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        saved = _saved_ranks(checkpoint / self.name)
        if saved and len(saved) != args.world_size:
            raise ValueError(
                f"{checkpoint / self.name} holds the Copilot state of {len(saved)} process(es), but this run has "
                f"{args.world_size}: each process resumes its own Mistake Log and sampling state. Resume with "
                f"{len(saved)} process(es), or train a new Copilot beside the resumed Pilot with "
                "CopilotCallback(resume_from=False).")
        problem = _copilot_state_problem(checkpoint / self.name, args.world_size)
        if problem is None:
            return str(checkpoint / self.name)
        older = sorted(((int(match.group(1)), path) for path in checkpoint.parent.glob("checkpoint-*")
                        if (match := re.fullmatch(r"checkpoint-(\d+)", path.name)) and path != checkpoint),
                       reverse=True)
        for step, path in older:
            if step <= state.global_step and _copilot_state_problem(path / self.name, args.world_size) is None:
                warnings.warn(
                    f"The Copilot state of {checkpoint} is not usable ({problem}). The Pilot resumes from step "
                    f"{state.global_step}; the Copilot resumes from {path} (step {step}), losing its updates since.",
                    RuntimeWarning, stacklevel=2)
                return str(path / self.name)
        raise DamagedFileError(
            f"Training resumes at step {state.global_step}, but the Copilot state in {checkpoint / self.name} is not "
            f"usable ({problem}) and no earlier checkpoint beside it holds a complete one. Resume from a checkpoint "
            "whose copilot/ is complete, pass CopilotCallback(resume_from=<a checkpoint folder with one>), or train "
            "a new Copilot beside the resumed Pilot with CopilotCallback(resume_from=False)."
        )


def _evaluation_prefix(logs: dict) -> str | None:
    """The metric prefix of an evaluation's log entry (``eval``, ``eval_<dataset>``), or None for another entry:
    Trainer adds ``<prefix>_runtime`` and ``<prefix>_samples_per_second`` to each evaluation's metrics."""
    for key in logs:
        if key.endswith("_samples_per_second") and not key.startswith("train"):
            prefix = key.removesuffix("_samples_per_second")
            if f"{prefix}_runtime" in logs:
                return prefix
    return None


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
