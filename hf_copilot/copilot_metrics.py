"""CopilotMetrics: how a Copilot does on Pilot forwards it did not train on, measured from forwards that ran anyway
(a Trainer's evaluation, a recipe's teacher-forced pass), so that a user learns early whether it can help."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from accelerate.utils import reduce

from .errors import ACCELERATOR_CHUNK_BYTES, DEFAULT_TOP_K
from .generation import check_lam, check_space, fused_choice
from .mistake_batch import MistakeBatch
from .pilot import PilotTap
from .pilot_record import PilotRecord

CPU_BLOCK_BYTES = 16 * 2**20
"""fp32 logits scored at once on a CPU (see :meth:`CopilotMetrics.add`)."""
EVALUATION_RECORDS = 4  # forwards of one evaluation step kept (generate() adds unlabelled ones)
SUMS = ("squared_error", "zero_squared_error", "tokens", "pilot_right", "rectified_right", "fixed", "broken")


class CopilotMetrics:
    """Teacher-forced measures of ``copilot``, summed record by record over the labelled tokens of each
    :class:`~hf_copilot.PilotRecord` (the positions a Mistake Log would keep; each document of a packed row apart).

    :meth:`results` gives:

    - ``heldout_ratio``: √(Σ‖f − ℓ‖² / Σ‖ℓ‖²), the Copilot's RMSE over the all-zero predictor's. Below 1 it
      predicts these errors better than predicting nothing, the prerequisite for any gain; at or above 1 no λ helps.
    - ``loss`` and ``zero_loss``: the RMSE of Eq. 7 over these tokens, of the Copilot and of the all-zero predictor.
    - ``pilot_accuracy`` and ``rectified_accuracy``: the share of tokens whose label is the top token of the Pilot's
      logits, and of the fused scores at ``lam`` and ``space`` (as :class:`~hf_copilot.CopilotLogitsProcessor`
      fuses them); ``tokens_fixed`` / ``tokens_broken``: tokens the rectification turned right / wrong; ``tokens``.

    Teacher-forced: the Pilot reads the reference prefix and the Copilot reads the Pilot's true errors on it, as in
    training. In ``generate()`` the Copilot reads its own earlier corrections instead, so decoded accuracy can
    differ; ``hf-copilot eval`` measures that. The errors are compacted to ``top_k`` probabilities as in the log;
    the accuracies use the full logits. Sums stay on the Copilot's device until :meth:`results`.
    """

    def __init__(self, copilot, *, lam: float = 1.0, space: str = "probs", top_k: int = DEFAULT_TOP_K):
        self.copilot, self.lam, self.space, self.top_k = copilot, check_lam(lam), check_space(space), top_k
        self.reset()

    def reset(self) -> None:
        device = next(self.copilot.parameters()).device
        self.sums = torch.zeros(len(SUMS), dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, record: PilotRecord) -> None:
        """Adds the labelled tokens of ``record`` (a forward with labels and its logits; others add nothing)."""
        if record.labels is None or record.logits is None:
            return
        copilot = self.copilot
        device = self.sums.device
        batch, kept = MistakeBatch.from_record(record, self.top_k, device=device)
        if batch is None:
            return
        hidden = copilot(**dict(batch.copilot_inputs(), target_errors=None), return_corrections=False).last_hidden_state
        valid = batch.errors.valid & batch.attention_mask.bool()
        # The record's positions that hold these labelled tokens, in the same order as `valid` picks them.
        scored = kept.clone()
        scored[kept] = valid[batch.attention_mask.bool()].to(kept.device)
        positions = scored.flatten().nonzero().squeeze(-1)
        flat_logits = record.logits.reshape(-1, record.logits.shape[-1])
        errors = batch.errors.map(lambda tensor: tensor[valid])  # (N, ...): the scored tokens
        hidden = hidden[valid]
        pilot_right = errors.ids[:, 0] == errors.labels  # the Pilot's top token, first of its kept top k
        rectified_right = torch.empty_like(pilot_right)
        squared_error = hidden.new_zeros((), dtype=torch.float64)
        # A block of positions at a time, so that the |V|-wide temporaries stay small. Measured on SmolLM2, 2048
        # positions, 2 CPU cores: 1.18 s per batch in 16 MiB blocks, 1.35 s in 64-512 MiB, 1.59 s in 4 MiB (there
        # the |V| x d head is streamed from memory once per block of 21 rows).
        chunk_bytes = CPU_BLOCK_BYTES if device.type == "cpu" else ACCELERATOR_CHUNK_BYTES
        rows = max(1, chunk_bytes // (4 * flat_logits.shape[-1]))
        for start in range(0, len(positions), rows):
            block = slice(start, start + rows)
            logits = flat_logits[positions[block]].to(device).float()
            corrections = copilot.corrections(hidden[None, block], logits[None])
            squared_error += copilot.squared_errors(hidden[None, block], errors.map(lambda tensor: tensor[None, block]),
                                                    corrections=corrections).double().sum()
            rectified_right[block] = fused_choice(logits, corrections[0], self.lam, self.space) == errors.labels[block]
        self.sums += torch.stack([
            squared_error,
            errors.squared_norm().double().sum(),
            torch.tensor(float(len(positions)), dtype=torch.float64, device=device),
            pilot_right.sum().double(),
            rectified_right.sum().double(),
            (rectified_right & ~pilot_right).sum().double(),
            (pilot_right & ~rectified_right).sum().double(),
        ])

    def results(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """The measures so far (empty when no labelled token was added); ``reduce`` sums the totals over
        processes first (e.g. ``accelerate.utils.reduce(..., reduction="sum")``)."""
        sums = self.sums if reduce is None else reduce(self.sums.clone())
        squared_error, zero_squared_error, tokens, pilot_right, rectified_right, fixed, broken = sums.tolist()
        if tokens == 0:
            return {}
        return {
            "heldout_ratio": math.sqrt(squared_error / zero_squared_error) if zero_squared_error > 0 else math.nan,
            "loss": math.sqrt(squared_error / tokens),
            "zero_loss": math.sqrt(zero_squared_error / tokens),
            "pilot_accuracy": pilot_right / tokens,
            "rectified_accuracy": rectified_right / tokens,
            "tokens_fixed": int(fixed),
            "tokens_broken": int(broken),
            "tokens": int(tokens),
        }


class EvaluationMetrics:
    """:class:`CopilotMetrics` over the evaluations Trainer runs during ``train()``, from the evaluation's own Pilot
    forwards: a no-gradient :class:`~hf_copilot.PilotTap` keeps their records (logits included, for the
    accuracies) until :meth:`collect` scores them, and :meth:`report` turns an evaluation's sums into metrics.

    Attach it with the training tap, at the start of training: hooks are never added mid-run (DeepSpeed ZeRO-3
    relies on it).
    """

    def __init__(self, pilot, copilot, *, lam: float, space: str, top_k: int):
        self.metrics = CopilotMetrics(copilot, lam=lam, space=space, top_k=top_k)
        self.tap = PilotTap(pilot, mode="generate", max_records=EVALUATION_RECORDS).attach()

    def collect(self) -> None:
        """Scores the records of the prediction step that just ran."""
        for record in self.tap.pop_records():
            self.metrics.add(record)

    def discard(self) -> None:
        """Drops the records of forwards outside an evaluation (a user's ``generate()``) and any sums no evaluation
        entry reported (a ``Trainer.predict()`` logs none)."""
        self.tap.pop_records()
        self.metrics.reset()

    def report(self, logs: dict, name: str) -> dict | None:
        """For an evaluation's log entry (``logs``): the metrics of that evaluation, summed over processes, keyed
        ``<prefix>_<name>_<metric>`` with its prefix (``eval``, ``eval_<dataset>``); None for any other entry.
        Starts the next evaluation's sums."""
        prefix = _evaluation_prefix(logs)
        if prefix is None:
            return None
        measured = self.metrics.results(reduce=lambda sums: reduce(sums, reduction="sum"))
        self.metrics.reset()
        return {f"{prefix}_{name}_{key}": value for key, value in measured.items()}

    def close(self) -> None:
        self.tap.detach()
        self.tap.pop_records()


def _evaluation_prefix(logs: dict) -> str | None:
    """The metric prefix of an evaluation's log entry, or None for another entry: Trainer adds
    ``<prefix>_runtime`` and ``<prefix>_samples_per_second`` to each evaluation's metrics."""
    for key in logs:
        if key.endswith("_samples_per_second") and not key.startswith("train"):
            prefix = key.removesuffix("_samples_per_second")
            if f"{prefix}_runtime" in logs:
                return prefix
    return None
