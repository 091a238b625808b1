"""Research diagnostics of a Pilot and its Copilot on teacher-forced examples: the held-out error ratio (is the
Copilot better than predicting nothing on unseen items?), where the Pilot first goes wrong, and a Mistake Log of a
fixed Pilot (the paper's "Latest" ablation)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from ..copilot_metrics import CopilotMetrics
from ..errors import DEFAULT_TOP_K, IGNORE_INDEX
from ..mistake_log import MistakeLog
from ..pilot import PilotTap
from ..pilot_record import PilotRecord
from .prompts import encode_example, prepare_tokenizer
from .tasks import Example, TaskFormat


def teacher_forced_records(pilot, tokenizer, examples: list[Example], task_format: TaskFormat, *,
                           batch_size: int = 16, max_length: int = 256):
    """Yields one :class:`~hf_copilot.PilotRecord` per batch of examples run through the Pilot with their answers
    (prompt masked, no gradient, the Pilot left as it is)."""
    prepare_tokenizer(tokenizer)
    device = next(pilot.parameters()).device
    with torch.no_grad(), PilotTap(pilot, mode="generate") as tap:
        for start in range(0, len(examples), batch_size):
            rows = [encode_example(ex, tokenizer, task_format, max_length) for ex in examples[start:start + batch_size]]
            width = max(len(row["input_ids"]) for row in rows)

            def padded(name, value):
                return torch.tensor([row[name] + [value] * (width - len(row[name])) for row in rows], device=device)

            # Labels are attached to the record rather than passed in: the Pilot's own loss is not needed here.
            pilot(input_ids=padded("input_ids", tokenizer.pad_token_id), attention_mask=padded("attention_mask", 0))
            labels = padded("labels", IGNORE_INDEX)
            for record in tap.pop_records():
                yield replace(record, labels=labels, labels_aligned=False)


def record_mistake_log(pilot, tokenizer, examples: list[Example], task_format: TaskFormat, *,
                       top_k: int = DEFAULT_TOP_K, batch_size: int = 16, max_length: int = 256,
                       max_bytes: int = 2 * 2**30,
                       on_record: Callable[[PilotRecord], None] | None = None) -> MistakeLog:
    """A Mistake Log of a fixed Pilot over all ``examples`` (one round per batch), e.g. to train a Copilot offline
    on a finished checkpoint (the paper's "Latest" ablation). Raises rather than evict when they exceed
    ``max_bytes``. ``on_record`` also sees each teacher-forced record, so that the same Pilot pass can feed other
    statistics (an :class:`ErrorRatios`, say)."""
    log = MistakeLog(max_rounds=max(1, -(-len(examples) // batch_size)), max_bytes=max_bytes, top_k=top_k)
    for step, record in enumerate(teacher_forced_records(pilot, tokenizer, examples, task_format,
                                                         batch_size=batch_size, max_length=max_length)):
        log.add(record, step=step)
        if log.rounds <= step:
            raise ValueError(f"{len(examples)} examples need more than max_bytes={max_bytes} of Mistake Log: raise "
                             "max_bytes or record fewer examples.")
        if on_record is not None:
            on_record(record)
    return log


def first_error_ranks(pilot, tokenizer, examples: list[Example], task_format: TaskFormat, *, batch_size: int = 16,
                      max_length: int = 256) -> list[int | None]:
    """Where the Pilot first goes wrong on each example, teacher-forced: the rank of the right token among the
    Pilot's predictions at the first answer position whose top prediction is wrong (``None``: no such position).

    Rank 1 is a near miss that re-ranking the Pilot's top two could fix; a large rank is an error no re-ranking of
    the Pilot's own candidates can reach.
    """
    return [rank for record in teacher_forced_records(pilot, tokenizer, examples, task_format, batch_size=batch_size,
                                                      max_length=max_length)
            for rank in first_error_ranks_of(record)]


def first_error_ranks_of(record: PilotRecord) -> list[int | None]:
    """:func:`first_error_ranks` of the rows of one teacher-forced record."""
    labels = record.next_token_labels()
    wrong = (record.logits.argmax(-1) != labels) & (labels != IGNORE_INDEX)
    ranks: list[int | None] = []
    for row in range(labels.shape[0]):
        positions = wrong[row].nonzero()
        if len(positions) == 0:
            ranks.append(None)
            continue
        position = int(positions[0])
        scores = record.logits[row, position]
        ranks.append(int((scores > scores[labels[row, position]]).sum()))
    return ranks


class ErrorRatios:
    """:func:`heldout_error_ratio` of several Copilots of one Pilot, accumulated record by record, so that one
    teacher-forced Pilot pass can serve them all (and other statistics: see ``record_mistake_log(on_record=...)``).
    """

    def __init__(self, copilots: dict, *, top_k: int = DEFAULT_TOP_K):
        self.metrics = {name: CopilotMetrics(copilot, top_k=top_k) for name, copilot in copilots.items()}
        for copilot in copilots.values():
            copilot.eval()

    def add(self, record: PilotRecord) -> None:
        for metrics in self.metrics.values():
            metrics.add(record)

    def results(self) -> dict[str, dict]:
        """One result per Copilot name: ``copilot_rmse``, ``zero_rmse``, their ``ratio`` and the ``tokens`` scored
        (:attr:`metrics` holds each Copilot's fuller :class:`~hf_copilot.CopilotMetrics`)."""
        results = {}
        for name, metrics in self.metrics.items():
            measured = metrics.results()
            if not measured:
                raise ValueError("The examples have no answer tokens to score (every target was empty or masked).")
            results[name] = {"copilot_rmse": measured["loss"], "zero_rmse": measured["zero_loss"],
                             "ratio": measured["heldout_ratio"], "tokens": measured["tokens"]}
        return results


def heldout_error_ratios(pilot, copilots: dict, tokenizer, examples: list[Example], task_format: TaskFormat, *,
                         batch_size: int = 16, max_length: int = 256,
                         top_k: int = DEFAULT_TOP_K) -> dict[str, dict]:
    """:func:`heldout_error_ratio` of several Copilots of the same Pilot, from one teacher-forced Pilot pass;
    returns one result per name of ``copilots``."""
    ratios = ErrorRatios(copilots, top_k=top_k)
    for record in teacher_forced_records(pilot, tokenizer, examples, task_format, batch_size=batch_size,
                                         max_length=max_length):
        ratios.add(record)
    return ratios.results()


def heldout_error_ratio(pilot, copilot, tokenizer, examples: list[Example], task_format: TaskFormat, *,
                        batch_size: int = 16, max_length: int = 256, top_k: int = DEFAULT_TOP_K) -> dict:
    """Teacher-forced check on unseen examples: the Copilot's RMSE divided by the all-zero predictor's.

    Below 1 means the Copilot predicts the Pilot's errors on new data better than predicting nothing, the
    prerequisite for any accuracy gain; at or above 1 it has learned nothing that transfers.
    """
    return heldout_error_ratios(pilot, {"copilot": copilot}, tokenizer, examples, task_format, batch_size=batch_size,
                                max_length=max_length, top_k=top_k)["copilot"]
