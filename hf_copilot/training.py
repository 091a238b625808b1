"""The Copilot's own optimisation: one update step shared by joint training (the callback) and offline training."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import get_scheduler
from transformers.trainer_utils import SchedulerType

from .random_streams import separate_random_stream


@dataclass
class CopilotTrainingConfig:
    """How the Copilot learns from the Mistake Log.

    Args:
        learning_rate / weight_decay / adam_betas: AdamW settings (paper: Copilot LR 3e-4 … 5e-4).
        adam_epsilon: AdamW's epsilon; values above the default are experimental. Adam moves every weight with a
            non-zero gradient by about the learning rate, however small the gradient (the |V|-row head gets tiny
            gradients on hundreds of rows per batch); a larger epsilon makes such rows move in proportion to their
            gradient instead.
        lr_scheduler_type / warmup_ratio: schedule over all Copilot updates (paper: cosine with warm-up).
        batch_size: sequences drawn from the log per Copilot update; the Copilot's training cost grows with it (the
            default 8 matches the Trainer's default Pilot batch).
        updates_per_step: Copilot updates after each Pilot optimizer step.
        update_every: run those updates every n-th Pilot step only (cheaper joint training).
        max_grad_norm: gradient clipping of the Copilot (0 disables it).
        seed: seeds the log sampling, so a run is reproducible and a resumed run continues identically.
    """

    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_epsilon: float = 1e-8
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.03
    batch_size: int = 8
    updates_per_step: int = 1
    update_every: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for name in ("batch_size", "updates_per_step", "update_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"CopilotTrainingConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
        for name in ("learning_rate", "adam_epsilon"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CopilotTrainingConfig.{name} must be positive, got {getattr(self, name)}.")
        known = [kind.value for kind in SchedulerType]
        if self.lr_scheduler_type not in known:
            raise ValueError(f"CopilotTrainingConfig.lr_scheduler_type={self.lr_scheduler_type!r} is not a "
                             f"transformers schedule; pick one of {known}.")

    def to_dict(self) -> dict:
        return asdict(self)


class CopilotUpdater:
    """Owns the Copilot's optimizer, schedule and sampling generator, and performs one update on a log batch.

    In a multi-process run every rank draws its own batch and the gradients are averaged before the step, so all
    ranks keep identical Copilot weights (the Copilot is not wrapped by the Trainer's DDP).
    """

    def __init__(self, copilot, config: CopilotTrainingConfig, total_updates: int, autocast_dtype=None):
        self.copilot = copilot
        self.config = config
        self.autocast_dtype = autocast_dtype
        # Only what trains: a LoRA Copilot's frozen block weights need no optimizer state and no all-reduce.
        self.trainable = [p for p in copilot.parameters() if p.requires_grad]
        decay = [p for p in self.trainable if p.dim() >= 2]
        no_decay = [p for p in self.trainable if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.learning_rate,
            betas=config.adam_betas,
            eps=config.adam_epsilon,
            # One kernel per step instead of several passes over every parameter (the |V|×d matrices are large).
            fused=all(p.device.type in ("cpu", "cuda") for p in self.trainable) or None,
        )
        self.scheduler = get_scheduler(
            config.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=math.ceil(config.warmup_ratio * total_updates),
            num_training_steps=max(total_updates, 1),
        )
        self.generator = torch.Generator().manual_seed(config.seed + _rank())
        # fp16 (not bf16) has too few exponent bits for small gradients: scale the loss, as Trainer does for the
        # Pilot. The scaler skips a step whose scaled gradients overflowed, and lowers the scale.
        device = next(copilot.parameters()).device
        self.scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
        self.updates = 0
        self.skipped_updates = 0  # updates skipped for a non-finite loss or gradient
        self.tokens = 0  # real (non-padding) positions the Copilot has trained on, for throughput reports
        self.last_zero_loss = math.nan  # the all-zero predictor's loss on the last update's batch

    def step(self, mistake_log) -> float:
        """Draws a batch from ``mistake_log``, takes one optimizer step, returns the loss (and sets
        :attr:`last_zero_loss`, the all-zero predictor's on the same batch). A step whose loss or gradients are not
        finite leaves the weights and the optimizer's moments as they were (counted in
        :attr:`skipped_updates`, warned once)."""
        device = next(self.copilot.parameters()).device
        batch = mistake_log.sample(self.config.batch_size, generator=self.generator, device=device)
        self.copilot.train()
        autocast = (torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())
        # The Copilot's dropout draws from a stream of its own, keyed to the update: the Pilot's dropout masks stay
        # what they would be without it, and a resumed run draws what the uninterrupted one did.
        seed = ((self.config.seed * 1_000_003 + _rank()) * 1_000_003 + self.updates) % 2**63
        with separate_random_stream(device, seed):
            with autocast:
                loss = self.copilot(**batch.copilot_inputs(), return_corrections=False).loss
            self.scaler.scale(loss).backward()
        self.copilot.eval()  # between updates: a processor may use it mid-training, without dropout
        _average_gradients(self.trainable)
        skipped = self._step_if_finite(loss)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        with torch.no_grad():  # the all-zero predictor's RMSE on the same tokens, the mark the loss must get below
            labelled = batch.errors.valid & batch.attention_mask.bool()
            zero_loss = ((batch.errors.squared_norm().float() * labelled).sum() / labelled.sum().clamp(min=1)).sqrt()
        loss, skipped, self.last_zero_loss, tokens = torch.stack([  # the step's one host copy
            loss.detach().float(), skipped, zero_loss, batch.attention_mask.sum().float()]).tolist()
        self.tokens += int(tokens)
        if skipped:
            self.skipped_updates += 1
            if self.skipped_updates == 1:
                warnings.warn(
                    "A Copilot update met a non-finite loss or gradient (NaN/inf) and was skipped, so the Copilot's "
                    "weights stay finite; skipped updates are counted in copilot_skipped_updates. Many of them "
                    "point at a learning rate too high for the Copilot.", RuntimeWarning, stacklevel=2)
        return loss

    def _step_if_finite(self, loss: torch.Tensor) -> torch.Tensor:
        """Takes the optimizer step unless the gradients hold a NaN/inf; returns 1.0 for a faulty update (skipped)
        or 0.0, on the device.

        The gradient norm that clipping computes anyway tells: a non-finite loss gives non-finite gradients, hence a
        non-finite norm. A fused optimizer takes that flag as a tensor and skips on the device (as under a
        GradScaler), with no host synchronisation; others read it first. Under fp16 the scaler skips the step
        instead, and only a non-finite loss is a fault: overflowing scaled gradients just lower the scale.
        """
        parameters = [p for p in self.trainable if p.grad is not None]
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        found_inf = (~torch.isfinite(norm)).float()
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # skipped when unscale_ found an inf
            self.scaler.update()
            return (~torch.isfinite(loss.detach())).float()
        if getattr(self.optimizer, "_step_supports_amp_scaling", False) and self.optimizer.defaults.get("fused"):
            self.optimizer.found_inf = found_inf
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif not found_inf.item():
            self.optimizer.step()
        return found_inf

    @property
    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "updates": self.updates,
            "skipped_updates": self.skipped_updates,
            "scaler": self.scaler.state_dict(),  # empty unless fp16
        }

    def load_state_dict(self, state: dict):
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self.updates = state["updates"]
        self.skipped_updates = state.get("skipped_updates", 0)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def train_copilot(copilot, mistake_log, num_updates: int, progress: bool = True, **training) -> list[float]:
    """Trains ``copilot`` offline from a (saved and reloaded) Mistake Log with the callback's own update step.

    ``training`` takes the fields of :class:`CopilotTrainingConfig`; the log is sampled exactly as during joint
    training. Returns the loss of every update; the progress bar shows the throughput in tokens per second.
    """
    mistake_log.check_compatible(copilot.config)
    updater = CopilotUpdater(copilot, CopilotTrainingConfig(**training), total_updates=num_updates)
    losses = []
    bar = tqdm(range(num_updates), desc="Copilot updates", disable=not progress)
    started = time.perf_counter()
    for _ in bar:
        losses.append(updater.step(mistake_log))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{updater.learning_rate:.2e}",
                        tokens_per_s=f"{updater.tokens / (time.perf_counter() - started):.0f}")
    return losses


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _average_gradients(parameters):
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(parameters, grads):
        p.grad = flat[offset: offset + g.numel()].view_as(p).to(p.dtype)
        offset += g.numel()
