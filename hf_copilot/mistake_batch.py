"""Mistake Log entries and batches: one record's kept positions packed back to back (:func:`pack_record`), and
sequences drawn from entries, right-padded in the shapes the Copilot takes (:class:`MistakeBatch`)."""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.nn.utils.rnn import pad_sequence

from .errors import DEFAULT_TOP_K, IGNORE_INDEX, CompactErrors
from .pilot_record import PilotRecord


@dataclass
class MistakeBatch:
    """Sequences drawn from the log, right-padded, in the shapes :class:`~hf_copilot.CopilotModel` takes.

    ``pilot_input_states`` is (B, T, d) for a decoder-only Pilot and the encoder output (B, S, d) for an
    encoder-decoder one, whose padding mask is ``pilot_input_mask``. ``steps`` holds the training step each
    sequence was recorded at.
    """

    pilot_input_states: torch.Tensor
    pilot_hidden_states: torch.Tensor
    attention_mask: torch.Tensor
    errors: CompactErrors
    steps: torch.Tensor
    pilot_input_mask: torch.Tensor | None = None

    def copilot_inputs(self) -> dict:
        """Keyword arguments of a teacher-forced Copilot forward that predicts ``errors`` (and returns its loss)."""
        return dict(
            pilot_hidden_states=self.pilot_hidden_states,
            pilot_input_states=self.pilot_input_states,
            input_errors=self.errors.shift_right(),
            attention_mask=self.attention_mask,
            pilot_input_mask=self.pilot_input_mask,
            target_errors=self.errors,
        )

    @classmethod
    def from_record(cls, record: PilotRecord, top_k: int = DEFAULT_TOP_K, device: str | torch.device | None = None,
                    dtype: torch.dtype = torch.float32) -> tuple[MistakeBatch | None, torch.Tensor]:
        """The sequences of one record as a Mistake Log would keep them (one per document, padding and positions
        after the last label left out, non-finite documents dropped), in the record's order, with no log around.

        Returns the batch (None when no sequence is kept) and ``kept``, the (B, T) mask of the record's positions
        it holds: ``x[kept]`` of a record tensor lines up with ``y[batch.attention_mask.bool()]`` of a batch
        tensor, position by position (e.g. the Pilot's logits with the Copilot's corrections).
        """
        packed = pack_record(record, top_k, 0, lambda tensor, _: tensor, None)  # kept as computed
        entry = packed.entry
        if entry is None:
            return None, packed.kept
        batch = cls.of_sequences([(entry, index) for index in range(entry.num_sequences)], record.kind,
                                 device=record.hidden_states.device if device is None else device, dtype=dtype)
        return batch, packed.kept

    @classmethod
    def of_sequences(cls, chosen: list, kind: str, device: str | torch.device,
                     dtype: torch.dtype = torch.float32) -> MistakeBatch:
        """A right-padded batch of the given (entry, sequence index) pairs, states and probabilities cast to
        ``dtype`` on ``device``."""
        device = torch.device(device)
        pieces = {name: [] for name in ("input_states", "hidden_states", "labels", "ids", "probs", "label_probs")}
        for entry, index in chosen:
            start, end = entry.spans[index]
            source_start, source_end = entry.input_spans[index]
            pieces["input_states"].append(entry.input_states[source_start:source_end])
            for name in ("hidden_states", "labels", "ids", "probs"):
                pieces[name].append(getattr(entry, name)[start:end])
            # a format-1 entry does not know the label's probability: 0, as that format represented it
            label_probs = entry.label_probs if entry.label_probs is not None else torch.zeros_like(entry.probs[:, 0])
            pieces["label_probs"].append(label_probs[start:end])

        def padded(name, value, cast):
            moved = [piece.to(device, non_blocking=True).to(cast) for piece in pieces[name]]
            return pad_sequence(moved, batch_first=True, padding_value=value)

        def mask(lengths):  # lengths from the host: no device synchronisation
            return (torch.arange(max(lengths), device=device) < torch.tensor(lengths, device=device)[:, None]).long()

        errors = CompactErrors(
            labels=padded("labels", IGNORE_INDEX, torch.long),
            ids=padded("ids", 0, torch.long),
            probs=padded("probs", 0.0, dtype),
            label_probs=padded("label_probs", 0.0, dtype),
        )
        return cls(
            pilot_input_states=padded("input_states", 0.0, dtype),
            pilot_hidden_states=padded("hidden_states", 0.0, dtype),
            attention_mask=mask([len(piece) for piece in pieces["hidden_states"]]),
            errors=errors,
            steps=torch.tensor([entry.step for entry, _ in chosen], device=device),
            pilot_input_mask=mask([len(piece) for piece in pieces["input_states"]]) if kind == "encoder_decoder" else None,
        )


@dataclass
class Entry:
    """One added record: the kept positions of its sequences, packed back to back.

    ``input_states`` has one row per kept position (decoder-only) or per real encoder position (encoder-decoder,
    counted by ``input_lengths``). The lengths are bookkeeping and stay on the CPU.
    """

    step: int
    input_states: torch.Tensor
    hidden_states: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor
    probs: torch.Tensor
    lengths: torch.Tensor
    input_lengths: torch.Tensor | None = None
    label_probs: torch.Tensor | None = None  # None in a log of format 1

    TENSOR_NAMES = ("input_states", "hidden_states", "labels", "ids", "probs", "lengths", "input_lengths",
                    "label_probs")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.TENSOR_NAMES if getattr(self, name) is not None}

    @property
    def nbytes(self) -> int:
        return sum(tensor.nbytes for tensor in self.tensors().values())

    @property
    def num_sequences(self) -> int:
        return len(self.lengths)

    @functools.cached_property
    def error_sums(self) -> tuple[int, float, float]:
        """(labelled tokens, Σ‖ℓ‖², Σ dropped mass), computed once: entries never change, so stats() stays cheap."""
        errors = CompactErrors(self.labels.long(), self.ids.long(), self.probs, self.label_probs)
        valid = errors.valid
        return (int(valid.sum()), float(errors.squared_norm().clamp(min=0)[valid].sum()),
                float(errors.dropped_mass()[valid].sum()))

    @functools.cached_property
    def spans(self) -> list[tuple[int, int]]:
        """(start, end) rows of each sequence's decoder positions."""
        return _spans(self.lengths)

    @functools.cached_property
    def input_spans(self) -> list[tuple[int, int]]:
        """(start, end) rows of each sequence's ``input_states``."""
        return self.spans if self.input_lengths is None else _spans(self.input_lengths)


def _finite_positions(record: PilotRecord, errors: CompactErrors) -> torch.Tensor:
    """Boolean (B, T): whether everything the log would store of each decoder position is finite. Non-finite logits
    show up as NaN probabilities (softmax of inf is NaN); a non-finite encoder output spoils its whole row."""
    finite = torch.isfinite(errors.probs).all(-1) & torch.isfinite(record.hidden_states).all(-1)
    if record.kind == "decoder_only":
        return finite & torch.isfinite(record.input_states).all(-1)
    return finite & torch.isfinite(record.input_states).flatten(1).all(-1)[:, None]


def _spans(lengths: torch.Tensor) -> list[tuple[int, int]]:
    ends = list(itertools.accumulate(lengths.tolist()))
    return list(zip([0] + ends[:-1], ends))


class _Packed(NamedTuple):
    entry: Entry | None  # None when no sequence of the record was kept
    kept: torch.Tensor  # (B, T): the record's positions the entry holds
    poisoned: int  # documents left out for a non-finite value


def pack_record(record: PilotRecord, top_k: int, step: int, store, storage_dtype: torch.dtype | None) -> _Packed:
    """One record's kept positions packed back to back (see :class:`MistakeLog` for what is kept);
    ``store(tensor, dtype)`` puts each stored tensor where it lives, floats as ``storage_dtype``."""
    labels = record.next_token_labels()
    # One logged sequence per document: a row, or each document of a packed row (encoder-decoder: a row).
    segments = record.document_starts().flatten().cumsum(0) - 1
    count = int(segments[-1]) + 1
    position = torch.arange(len(segments), device=segments.device)
    labelled = labels.flatten() != IGNORE_INDEX
    last_label = torch.full((count,), -1, device=segments.device).scatter_reduce(
        0, segments[labelled], position[labelled], "amax")
    keep = record.token_mask().flatten() & (position <= last_label[segments])
    # On the full (batch, positions) grid, then select: indexing the |V|-wide logits first would copy them.
    errors = record.errors(top_k)
    # A document holding any non-finite value the log would store is left out whole.
    poisoned = torch.bincount(segments[keep & ~_finite_positions(record, errors).flatten()], minlength=count) > 0
    keep = (keep & ~poisoned[segments]).view_as(labels)
    # One copy to the host for the lengths and the count of non-finite documents (no extra synchronisation).
    lengths, poisoned = torch.stack([torch.bincount(segments[keep.flatten()], minlength=count),
                                     poisoned.long()]).cpu()
    kept_sequences = lengths > 0
    poisoned = int(poisoned.sum())
    if not kept_sequences.any():
        return _Packed(None, keep, poisoned)
    if record.kind == "encoder_decoder":
        source_mask = (
            record.input_mask.bool() if record.input_mask is not None
            else torch.ones(record.input_states.shape[:2], dtype=torch.bool, device=keep.device)
        ) & keep.any(-1)[:, None]
        input_states, input_lengths = record.input_states[source_mask], source_mask.sum(-1)[kept_sequences]
    else:
        input_states, input_lengths = record.input_states[keep], None
    errors = errors.map(lambda tensor: tensor[keep])
    entry = Entry(
        step=int(step),
        input_states=store(input_states, storage_dtype),
        hidden_states=store(record.hidden_states[keep], storage_dtype),
        labels=store(errors.labels, torch.int32),
        ids=store(errors.ids, torch.int32),
        probs=store(errors.probs, storage_dtype),
        lengths=lengths[kept_sequences],
        input_lengths=None if input_lengths is None else input_lengths.cpu(),
        label_probs=store(errors.label_probs, storage_dtype),
    )
    return _Packed(entry, keep, poisoned)
