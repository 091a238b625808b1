"""MistakeLog: the paper's Mistake Log, a bounded buffer of the Pilot's most recent training rounds.

The Copilot learns from (X̃, h̄, ℓ) of the Pilot's own recent forwards. Dense errors are |V| floats per token
(many GB for 128 rounds), so the log keeps, per token, X̃ and h̄ in low precision plus the compact error form of
:class:`~hf_copilot.errors.CompactErrors` (label id and the Pilot's top-k ids/probabilities): O(d + k) numbers.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import uuid
import warnings
from collections import deque
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import DEFAULT_TOP_K
from .mistake_batch import Entry, MistakeBatch, pack_record
from .pilot_record import PilotRecord
from .pilot_shape import PilotSignature
from .safe_io import DamagedFileError, atomic_write_text, fsync_file, sha256_of, staging_folder

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
"""Format 2 added each token's ``label_probs``; a format-1 log loads with them unknown (see CompactErrors)."""
TENSORS_FILE = "mistake_log.safetensors"
METADATA_FILE = "mistake_log.json"


class MistakeLog:
    """Ring buffer of the Pilot's most recent training rounds, in compact form.

    Per added :class:`~hf_copilot.PilotRecord` (one entry) it keeps, for each sequence (each document of a
    packed row: :meth:`~hf_copilot.PilotRecord.document_starts`), the real positions
    (attention mask 1) up to the sequence's last labelled position: positions after it carry no error and, the
    decoder being causal, do not influence earlier ones. Sequences without any label are not stored, nor sequences
    holding a non-finite value, and a record larger than ``max_bytes`` is left out whole: both are counted in
    :attr:`skipped` (warned once), never raised, so the Copilot's log never stops the Pilot's training.

    Bytes, with d the Pilot's width, k = ``top_k`` (at most |V|) and s the size of ``storage_dtype`` (2 for bf16):

    - decoder-only: ``2·d·s + 4 + s + k·(4 + s)`` per stored position (X̃ and h̄ at s bytes, the label as int32
      and its probability at s bytes, k int32 ids and k probabilities at s bytes), plus 8 per sequence (its int64
      length);
    - encoder-decoder: ``d·s + 4 + s + k·(4 + s)`` per stored decoder position, plus ``d·s`` per real encoder
      position (the encoder output is X̃), plus 16 per sequence (two lengths).

    For example SmolLM2-135M (d = 576) with the defaults stores 2,502 bytes per token, so the default budget of
    512 MiB holds about 215k tokens (128 rounds of 8 sequences of 210 tokens).

    The log holds at most ``max_rounds`` rounds (a round is a run of consecutive entries added with the same
    ``step``: gradient accumulation adds several) and at most ``max_bytes`` bytes; the oldest entries go first. It
    lives in CPU memory (pinned when CUDA is available, for fast copies to the GPU) unless ``device`` names
    another device, e.g. the Pilot's.
    """

    def __init__(
        self,
        max_rounds: int = 128,
        max_bytes: int = 512 * 2**20,
        top_k: int = DEFAULT_TOP_K,
        storage_dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device = "cpu",
    ):
        if max_rounds < 1 or max_bytes < 1 or top_k < 1:
            raise ValueError(
                f"max_rounds, max_bytes and top_k must be positive; got {max_rounds}, {max_bytes}, {top_k}."
            )
        self.max_rounds = max_rounds
        self.max_bytes = max_bytes
        self.top_k = top_k
        self.storage_dtype = storage_dtype
        self.device = torch.device(device)
        self.pin_memory = self.device.type == "cpu" and torch.cuda.is_available()
        self.signature: PilotSignature | None = None  # of the Pilot whose errors the log holds, once it holds some
        self.bytes = 0
        self._entries: deque[Entry] = deque()
        # What add() left out: sequences with non-finite values, records larger than max_bytes.
        self.skipped = {"non_finite_sequences": 0, "oversized_records": 0}
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def steps(self) -> list[int]:
        """The step of each entry, oldest first."""
        return [entry.step for entry in self._entries]

    @property
    def rounds(self) -> int:
        steps = self.steps
        return sum(1 for i, step in enumerate(steps) if i == 0 or step != steps[i - 1])

    def add(self, record: PilotRecord, step: int) -> None:
        """Stores the compact errors and states of ``record`` (a training forward with labels) as recorded at
        ``step``, then evicts the oldest entries until the log is within ``max_rounds`` and ``max_bytes``."""
        signature = PilotSignature(record.kind, record.vocab_size, record.hidden_states.shape[-1])
        if self.signature is not None and signature != self.signature:
            raise ValueError("This Mistake Log holds another Pilot's errors: " + "; ".join(signature.mismatches(
                self.signature, "the new record's Pilot", "the log")) + ". Use one log per Pilot.")
        packed = pack_record(record, self.top_k, step, self._store, self.storage_dtype)
        if packed.poisoned:
            self._skip("non_finite_sequences", packed.poisoned, (
                "A Pilot forward gave non-finite logits or states (NaN/inf) for {count} sequence(s) so far; they are "
                "left out of the Mistake Log so that they cannot poison the Copilot (copilot_skipped_sequences in "
                "the logs). The Pilot's own training is not changed."))
        entry = packed.entry
        if entry is None:
            return
        if entry.nbytes > self.max_bytes:
            self._skip("oversized_records", 1, (
                f"A Pilot forward needed {entry.nbytes} bytes of Mistake Log, more than max_bytes={self.max_bytes}; "
                "{count} such forward(s) were left out of the log so far (copilot_skipped_records in the logs) and "
                "the Pilot's training goes on. Raise max_bytes (see the MistakeLog docstring for the bytes per "
                "token) or lower top_k to keep them."))
            return
        self.signature = signature
        self._entries.append(entry)
        self.bytes += entry.nbytes
        while len(self._entries) > 1 and (self.rounds > self.max_rounds or self.bytes > self.max_bytes):
            self.bytes -= self._entries.popleft().nbytes

    def _skip(self, reason: str, count: int, message: str) -> None:
        """Counts what :meth:`add` left out (``skipped``) and warns the first time it happens in this log."""
        self.skipped[reason] += count
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(message.format(count=self.skipped[reason]), RuntimeWarning, stacklevel=3)

    def _store(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        tensor = tensor.to(dtype)  # cast where the record lives, so fewer bytes cross to the log
        if self.pin_memory:
            return torch.empty(tensor.shape, dtype=dtype, pin_memory=True).copy_(tensor)
        return tensor.to(self.device)

    def until(self, step: int, max_rounds: int | None = None, every: int = 1) -> MistakeLog:
        """The log as it stood after round ``step``: a view sharing this log's tensors.

        Replaying a saved log round by round (``for step in sorted(set(log.steps)): updater.step(log.until(step))``)
        trains a Copilot offline exactly as joint training did, so Copilot variants can be compared on one Pilot
        run. ``max_rounds`` keeps only the newest rounds of that view: the log a joint run with a smaller ring
        (``CopilotCallback(log_rounds=...)``) would have held. ``every=n`` keeps the first round and every n-th
        after it: the same Pilot's errors on 1/n of the data, to tell how much the Copilot gains from more data.
        """
        max_rounds = self.max_rounds if max_rounds is None else max_rounds
        if max_rounds < 1 or every < 1:
            raise ValueError(f"max_rounds and every must be positive, got {max_rounds} and {every}.")
        view = MistakeLog(max_rounds, self.max_bytes, self.top_k, self.storage_dtype, self.device)
        view.signature = self.signature
        entries = [entry for entry in self._entries if entry.step <= step]
        if not entries:
            raise ValueError(f"The Mistake Log has no round at or before step {step} (its steps: {self.steps[:5]}...).")
        kept_steps = set(sorted({entry.step for entry in entries})[::every][-max_rounds:])
        view._entries = deque(entry for entry in entries if entry.step in kept_steps)
        view.bytes = sum(entry.nbytes for entry in view._entries)
        return view

    def sample(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> MistakeBatch:
        """Up to ``batch_size`` distinct sequences drawn uniformly from the log, one of them always from the newest
        round (Algorithm 1 draws from the log just updated). States and probabilities are cast to ``dtype`` and
        everything is moved to ``device`` (default: the log's)."""
        if not self._entries:
            raise ValueError("The Mistake Log is empty: add() a training record before sampling from it.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        device = self.device if device is None else torch.device(device)
        table = [(entry, index) for entry in self._entries for index in range(entry.num_sequences)]
        newest_step = self._entries[-1].step
        newest_round = sum(
            entry.num_sequences for entry in
            itertools.takewhile(lambda entry: entry.step == newest_step, reversed(self._entries))
        )
        first = len(table) - newest_round + int(torch.randint(newest_round, (1,), generator=generator))
        others = torch.randperm(len(table) - 1, generator=generator)[: batch_size - 1].tolist()
        chosen = [table[first]] + [table[j + (j >= first)] for j in others]

        return MistakeBatch.of_sequences(chosen, self.signature.kind, device, dtype)

    def stats(self) -> dict:
        """Size of the log and how large the errors in it are.

        ``error_rms`` is the root mean square of ‖ℓ‖ over labelled tokens: the RMSE loss of the all-zero predictor,
        the mark a Copilot's loss must get below. ``mean_dropped_mass`` is the mean probability mass outside the
        stored top-k (what the compact form loses). Both are NaN for an empty log.
        """
        labelled, squared_sum, dropped_sum = (sum(column) for column in zip((0, 0.0, 0.0), *(
            entry.error_sums for entry in self._entries)))
        return {
            "entries": len(self._entries),
            "rounds": self.rounds,
            "sequences": sum(entry.num_sequences for entry in self._entries),
            "tokens": sum(len(entry.labels) for entry in self._entries),
            "labelled_tokens": labelled,
            "bytes": self.bytes,
            "error_rms": math.sqrt(squared_sum / labelled) if labelled else float("nan"),
            "mean_dropped_mass": dropped_sum / labelled if labelled else float("nan"),
            "skipped_non_finite_sequences": self.skipped["non_finite_sequences"],
            "skipped_oversized_records": self.skipped["oversized_records"],
        }

    def check_compatible(self, copilot) -> None:
        """Raises a ValueError naming the mismatch when this log was not recorded from a Pilot that ``copilot``
        (a :class:`~hf_copilot.CopilotModel` or its config) serves."""
        config = getattr(copilot, "config", copilot)
        if self.signature is None:  # an empty log fits any other Copilot
            return
        problems = self.signature.mismatches(PilotSignature.of_copilot(config), "the log's Pilot", "the Copilot")
        if problems:
            raise ValueError(
                "This Mistake Log does not fit the Copilot: " + "; ".join(problems) + ". It was recorded from "
                "another Pilot: record a new log with the Pilot this Copilot serves, or use the Copilot built for "
                "the log's Pilot."
            )

    def save(self, directory: str | os.PathLike) -> None:
        """Writes the log to ``directory`` (safetensors + JSON metadata holding the tensors' SHA-256). The files are
        written and synced elsewhere first and moved into place, so an interrupted save never leaves a half-written
        log there (at worst the previous log, or none)."""
        directory = Path(directory)
        retired = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex}")
        with staging_folder(directory) as staging:
            tensors = {
                f"{i}.{name}": tensor.to("cpu").contiguous()
                for i, entry in enumerate(self._entries) for name, tensor in entry.tensors().items()
            }
            save_file(tensors, staging / TENSORS_FILE)
            fsync_file(staging / TENSORS_FILE)
            metadata = {
                "format_version": FORMAT_VERSION,
                **{field: getattr(self.signature, field, None) for field in ("kind", "vocab_size", "hidden_size")},
                "top_k": self.top_k,
                "storage_dtype": str(self.storage_dtype).removeprefix("torch."),
                "max_rounds": self.max_rounds,
                "max_bytes": self.max_bytes,
                "steps": self.steps,
                "tensors_sha256": sha256_of(staging / TENSORS_FILE),
            }
            atomic_write_text(staging / METADATA_FILE, json.dumps(metadata, indent=2))
            if directory.exists():
                os.rename(directory, retired)  # kept until the new log is in place
            os.rename(staging, directory)
        shutil.rmtree(retired, ignore_errors=True)

    @classmethod
    def load(cls, directory: str | os.PathLike, copilot=None, device: str | torch.device = "cpu") -> MistakeLog:
        """Reads a log written by :meth:`save`, checking its tensors against the SHA-256 saved with them; with
        ``copilot`` given, first checks that it fits (:meth:`check_compatible`). A damaged, edited or incomplete log
        raises :class:`~hf_copilot.safe_io.DamagedFileError` naming the file."""
        directory = Path(directory)
        metadata_path = directory / METADATA_FILE
        if not metadata_path.is_file():
            raise FileNotFoundError(f"{directory} holds no Mistake Log ({METADATA_FILE} is missing); write one with "
                                    "MistakeLog.save(directory).")
        metadata = _read_metadata(metadata_path)
        log = cls(max_rounds=metadata["max_rounds"], max_bytes=metadata["max_bytes"], top_k=metadata["top_k"],
                  storage_dtype=getattr(torch, metadata["storage_dtype"]), device=device)
        if metadata["kind"] is not None:
            log.signature = PilotSignature(metadata["kind"], metadata["vocab_size"], metadata["hidden_size"])
        if copilot is not None:
            log.check_compatible(copilot)
        tensors_path = directory / TENSORS_FILE
        if not tensors_path.is_file():
            raise DamagedFileError(f"{tensors_path} is missing: {directory} holds only half a Mistake Log.")
        if sha256_of(tensors_path) != metadata["tensors_sha256"]:
            raise DamagedFileError(f"{tensors_path} is damaged: its SHA-256 differs from the one saved in "
                                   f"{metadata_path}. Record the log again (or resume from an older checkpoint).")
        tensors = load_file(tensors_path)
        for i, step in enumerate(metadata["steps"]):
            stored = {name: tensors.get(f"{i}.{name}") for name in Entry.TENSOR_NAMES}
            missing = [name for name in ("input_states", "hidden_states", "labels", "ids", "probs", "lengths")
                       if stored[name] is None]
            if missing:
                raise DamagedFileError(f"{tensors_path} has no {missing} for entry {i} listed in {metadata_path}.")
            bookkeeping = {name: stored.pop(name) for name in ("lengths", "input_lengths")}
            entry = Entry(step, **{name: None if t is None else log._store(t, t.dtype) for name, t in stored.items()},
                           **bookkeeping)
            log._entries.append(entry)
            log.bytes += entry.nbytes
        return log


_METADATA_TYPES = {"kind": (str, type(None)), "vocab_size": (int, type(None)), "hidden_size": (int, type(None)),
                   "top_k": int, "storage_dtype": str, "max_rounds": int, "max_bytes": int, "steps": list,
                   "tensors_sha256": str}


def _read_metadata(path: Path) -> dict:
    """The log's metadata, with every field present and of the type :meth:`MistakeLog.save` writes."""
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise DamagedFileError(f"{path} is not valid JSON ({error}); record the log again.") from None
    if not isinstance(metadata, dict):
        raise DamagedFileError(f"{path} holds a {type(metadata).__name__}, not the log's metadata object.")
    if metadata.get("format_version") not in READABLE_FORMATS:
        raise ValueError(f"{path.parent} holds a Mistake Log of format {metadata.get('format_version')}; this "
                         f"version of hf_copilot reads formats {READABLE_FORMATS}. Record the log again.")
    problems = [f"{key!r} is missing" if key not in metadata else f"{key!r} is {metadata[key]!r}"
                for key, types in _METADATA_TYPES.items()
                if key not in metadata or not isinstance(metadata[key], types) or isinstance(metadata[key], bool)]
    if not problems:
        if metadata["kind"] not in (None, "decoder_only", "encoder_decoder"):
            problems.append(f"'kind' is {metadata['kind']!r}")
        if not isinstance(getattr(torch, metadata["storage_dtype"], None), torch.dtype):
            problems.append(f"'storage_dtype' is {metadata['storage_dtype']!r}")
        if not all(isinstance(step, int) and not isinstance(step, bool) for step in metadata["steps"]):
            problems.append("'steps' holds something other than step numbers")
        if min(metadata["top_k"], metadata["max_rounds"], metadata["max_bytes"]) < 1:
            problems.append("top_k, max_rounds and max_bytes must be positive")
    if problems:
        raise DamagedFileError(f"{path} was edited or damaged: " + "; ".join(problems) + ". Record the log again.")
    return metadata
