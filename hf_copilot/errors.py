"""Token errors ℓ = one-hot(label) − p̂, dense or compact.

A dense error is a |V|-vector per token (49k floats for SmolLM2, 152k for Qwen): far too large to log for
128 rounds. The compact form keeps the label id plus the Pilot's top-k probabilities, O(k) numbers per token,
and every operation the Copilot needs (its input projection, its loss) works on it directly without ever
building the dense row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
"""Label value of a position without a target (prompt, padding); its error is the zero vector."""
DEFAULT_TOP_K = 32
"""Pilot probabilities kept per token in compact errors (and candidates a re-ranking Copilot reorders)."""

CPU_CHUNK_BYTES = 4 * 2**20
"""fp32 bytes of logits :meth:`CompactErrors.from_logits` handles at once on CPU: small enough to stay in cache."""
ACCELERATOR_CHUNK_BYTES = 256 * 2**20
"""The same on an accelerator: large enough to keep it busy, small enough to bound the temporary."""


def dense_errors(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Exact errors one-hot(label) − softmax(logits), zero where ``labels == IGNORE_INDEX``."""
    probs = torch.softmax(logits.float(), dim=-1)
    valid = labels != IGNORE_INDEX
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0), logits.shape[-1]).to(probs.dtype)
    return (onehot - probs) * valid.unsqueeze(-1)


@dataclass
class CompactErrors:
    """Errors stored as ``labels`` (..., ) plus the Pilot's top-k ``ids`` / ``probs`` (..., k).

    The represented error is ``one_hot(labels) − Σ_j probs[j]·one_hot(ids[j])``. Probability mass outside the
    top-k is dropped (:meth:`dropped_mass` reports how much). Positions with ``labels == IGNORE_INDEX`` carry
    zero probabilities and represent the zero vector.
    """

    labels: torch.Tensor
    ids: torch.Tensor
    probs: torch.Tensor

    def __post_init__(self):
        if self.ids.shape != self.probs.shape or self.ids.shape[:-1] != self.labels.shape:
            raise ValueError(
                "CompactErrors needs labels of shape (...,) and ids/probs of shape (..., k); got labels "
                f"{tuple(self.labels.shape)}, ids {tuple(self.ids.shape)}, probs {tuple(self.probs.shape)}."
            )

    @classmethod
    def from_logits(cls, logits: torch.Tensor, labels: torch.Tensor, top_k: int) -> CompactErrors:
        """Compact errors of ``logits`` against ``labels``, keeping the ``top_k`` most probable tokens.

        The rows go through in chunks of :data:`CPU_CHUNK_BYTES` (:data:`ACCELERATOR_CHUNK_BYTES` off CPU): each chunk's log-softmax stays in cache on CPU
        (faster than a top-k and a logsumexp over all rows) and the temporary stays small on an accelerator.
        Chunks without a labelled position are skipped (in SFT the prompt is often most of the sequence).
        Unlabelled positions get zero probabilities; their ids mean nothing.
        """
        vocab = logits.shape[-1]
        k = min(top_k, vocab)
        flat = logits.reshape(-1, vocab)
        valid = labels != IGNORE_INDEX
        chunk_bytes = CPU_CHUNK_BYTES if flat.device.type == "cpu" else ACCELERATOR_CHUNK_BYTES
        rows = max(1, chunk_bytes // (vocab * 4))
        chunk_has_labels = torch.nn.functional.pad(valid.reshape(-1), (0, -len(flat) % rows)).view(-1, rows).any(-1)
        ids = torch.zeros(len(flat), k, dtype=torch.long, device=flat.device)
        log_probs = torch.full((len(flat), k), -torch.inf, dtype=torch.float32, device=flat.device)
        # Reading which chunks hold labels would break a torch.compile graph (compaction runs inside the Pilot's
        # forward hook): a compiled forward computes every chunk instead.
        needs = [True] * len(chunk_has_labels) if torch.compiler.is_compiling() else chunk_has_labels.tolist()
        for start, needed in zip(range(0, len(flat), rows), needs):
            if needed:
                chunk = slice(start, start + rows)
                log_probs[chunk], ids[chunk] = flat[chunk].float().log_softmax(-1).topk(k, dim=-1)
        shape = (*logits.shape[:-1], k)
        return cls(labels=labels, ids=ids.view(shape), probs=log_probs.exp().view(shape) * valid.unsqueeze(-1))

    @property
    def top_k(self) -> int:
        return self.ids.shape[-1]

    @property
    def valid(self) -> torch.Tensor:
        """Boolean mask of positions that carry a label."""
        return self.labels != IGNORE_INDEX

    def to(self, device=None, probs_dtype: torch.dtype | None = None) -> CompactErrors:
        """Moves the tensors to ``device``; ``probs_dtype`` casts the probabilities (ids stay integer)."""
        return CompactErrors(
            self.labels.to(device), self.ids.to(device), self.probs.to(device=device, dtype=probs_dtype)
        )

    def map(self, fn) -> CompactErrors:
        """Applies ``fn`` (an indexing or reshaping of the leading dims) to all three tensors."""
        return CompactErrors(fn(self.labels), fn(self.ids), fn(self.probs))

    def shift_right(self) -> CompactErrors:
        """The sequence shifted one position right along dim 1; the first position becomes the zero error."""
        labels = torch.nn.functional.pad(self.labels[:, :-1], (1, 0), value=IGNORE_INDEX)
        ids = torch.nn.functional.pad(self.ids[:, :-1], (0, 0, 1, 0))
        probs = torch.nn.functional.pad(self.probs[:, :-1], (0, 0, 1, 0))
        return CompactErrors(labels, ids, probs)

    def to_dense(self, vocab_size: int) -> torch.Tensor:
        """The dense |V| error rows (for tests and small analyses only)."""
        dense = torch.zeros(*self.labels.shape, vocab_size, dtype=torch.float32, device=self.probs.device)
        dense.scatter_add_(-1, self.ids, -self.probs.float())
        onehot = torch.nn.functional.one_hot(self.labels.clamp(min=0), vocab_size).float()
        return dense + onehot * self.valid.unsqueeze(-1)

    def project(self, weight: torch.Tensor) -> torch.Tensor:
        """``error @ weight`` for a (|V|, d) matrix: the label's row minus the probability-weighted top-k rows.

        One ``embedding_bag`` (a weighted sum of k + 1 rows per position): neither the (..., k, d) gathered rows nor
        their gradient are ever built, which matters for the backward into a |V|-row matrix.
        """
        ids = torch.cat([self.labels.clamp(min=0).unsqueeze(-1), self.ids], dim=-1)
        weights = torch.cat([self.valid.unsqueeze(-1).to(weight.dtype), -self.probs.to(weight.dtype)], dim=-1)
        rows = torch.nn.functional.embedding_bag(ids.reshape(-1, ids.shape[-1]), weight, mode="sum",
                                                 per_sample_weights=weights.reshape(-1, ids.shape[-1]))
        return rows.view(*self.labels.shape, weight.shape[-1])

    def dot(self, dense: torch.Tensor) -> torch.Tensor:
        """Per-position inner product ⟨error, dense⟩ with a dense (..., |V|) tensor."""
        label_term = dense.gather(-1, self.labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * self.valid
        return label_term - (dense.gather(-1, self.ids) * self.probs.to(dense.dtype)).sum(-1)

    def values_at(self, ids: torch.Tensor) -> torch.Tensor:
        """The error's entries at token ``ids`` (..., n): 1[id = label] − p̂[id], p̂ being 0 outside the top-k."""
        matches = ids.unsqueeze(-1) == self.ids.unsqueeze(-2)  # (..., n, k)
        probs = (matches * self.probs.float().unsqueeze(-2)).sum(-1)
        return ((ids == self.labels.unsqueeze(-1)) & self.valid.unsqueeze(-1)).float() - probs

    def squared_norm(self) -> torch.Tensor:
        """Per-position ‖error‖² = 1 − 2·p̂[label] + Σ p̂_j² (the label's probability is 0 outside the top-k)."""
        probs = self.probs.float()
        label_prob = (probs * (self.ids == self.labels.unsqueeze(-1))).sum(-1)
        return (1.0 - 2.0 * label_prob) * self.valid + probs.pow(2).sum(-1)

    def dropped_mass(self) -> torch.Tensor:
        """Per-position probability mass outside the kept top-k (zero at unlabelled positions)."""
        return (1.0 - self.probs.float().sum(-1)) * self.valid


def squared_error_norm(prediction: torch.Tensor, target: torch.Tensor | CompactErrors) -> torch.Tensor:
    """Per-position ‖prediction − target‖², computed in fp32 without densifying a compact target."""
    prediction = prediction.float()
    if isinstance(target, CompactErrors):
        return prediction.pow(2).sum(-1) - 2.0 * target.dot(prediction) + target.squared_norm()
    return (prediction - target.float()).pow(2).sum(-1)


def shift_right(errors: torch.Tensor | CompactErrors) -> torch.Tensor | CompactErrors:
    """The Copilot's input sequence: errors moved one position right along dim 1, zero at the first position."""
    if isinstance(errors, CompactErrors):
        return errors.shift_right()
    return torch.nn.functional.pad(errors[:, :-1], (0, 0, 1, 0))
