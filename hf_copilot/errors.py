"""Token errors ℓ = one-hot(label) − p̂, dense or compact.

A dense error is a |V|-vector per token (49k floats for SmolLM2, 152k for Qwen): far too large to log for
128 rounds. The compact form keeps the label id, the Pilot's probability of the label and its top-k probabilities,
O(k) numbers per token, and every operation the Copilot needs (its input projection, its loss) works on it
directly without ever building the dense row.
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
    """Errors stored as ``labels`` (..., ) plus the Pilot's top-k ``ids`` / ``probs`` (..., k) and, optionally, the
    Pilot's probability of the label, ``label_probs`` (..., ).

    The represented error is ``(1 − p̂_y·[y ∉ top-k])·one_hot(y) − Σ_j probs[j]·one_hot(ids[j])``: the label's own
    probability counts where the top-k does not hold the label (a Pilot that is wrong with confidence, or a
    random one), and is taken as 0 there when ``label_probs`` is ``None`` (logs of format 1). The rest of the mass
    outside the top-k is dropped (:meth:`dropped_mass` reports how much). Positions with ``labels ==
    IGNORE_INDEX`` carry zero probabilities and represent the zero vector.
    """

    labels: torch.Tensor
    ids: torch.Tensor
    probs: torch.Tensor
    label_probs: torch.Tensor | None = None

    def __post_init__(self):
        if self.ids.shape != self.probs.shape or self.ids.shape[:-1] != self.labels.shape or (
                self.label_probs is not None and self.label_probs.shape != self.labels.shape):
            raise ValueError(
                "CompactErrors needs labels (and label_probs) of shape (...,) and ids/probs of shape (..., k); got "
                f"labels {tuple(self.labels.shape)}, ids {tuple(self.ids.shape)}, probs {tuple(self.probs.shape)}, "
                f"label_probs {None if self.label_probs is None else tuple(self.label_probs.shape)}."
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
        label_log_probs = torch.full((len(flat),), -torch.inf, dtype=torch.float32, device=flat.device)
        flat_labels = labels.reshape(-1).clamp(min=0)
        # Reading which chunks hold labels would break a torch.compile graph (compaction runs inside the Pilot's
        # forward hook): a compiled forward computes every chunk instead.
        needs = [True] * len(chunk_has_labels) if torch.compiler.is_compiling() else chunk_has_labels.tolist()
        for start, needed in zip(range(0, len(flat), rows), needs):
            if needed:
                chunk = slice(start, start + rows)
                chunk_log_probs = flat[chunk].float().log_softmax(-1)
                log_probs[chunk], ids[chunk] = chunk_log_probs.topk(k, dim=-1)
                label_log_probs[chunk] = chunk_log_probs.gather(-1, flat_labels[chunk, None]).squeeze(-1)
        shape = (*logits.shape[:-1], k)
        return cls(labels=labels, ids=ids.view(shape), probs=log_probs.exp().view(shape) * valid.unsqueeze(-1),
                   label_probs=label_log_probs.exp().view(labels.shape) * valid)

    @property
    def top_k(self) -> int:
        return self.ids.shape[-1]

    @property
    def valid(self) -> torch.Tensor:
        """Boolean mask of positions that carry a label."""
        return self.labels != IGNORE_INDEX

    def to(self, device=None, probs_dtype: torch.dtype | None = None) -> CompactErrors:
        """Moves the tensors to ``device``; ``probs_dtype`` casts the probabilities (ids stay integer)."""
        label_probs = None if self.label_probs is None else self.label_probs.to(device=device, dtype=probs_dtype)
        probs = self.probs.to(device=device, dtype=probs_dtype)
        return CompactErrors(self.labels.to(device), self.ids.to(device), probs, label_probs)

    def map(self, fn) -> CompactErrors:
        """Applies ``fn`` (an indexing or reshaping of the leading dims) to every tensor."""
        return CompactErrors(fn(self.labels), fn(self.ids), fn(self.probs),
                             None if self.label_probs is None else fn(self.label_probs))

    def shift_right(self) -> CompactErrors:
        """The sequence shifted one position right along dim 1; the first position becomes the zero error."""
        labels = torch.nn.functional.pad(self.labels[:, :-1], (1, 0), value=IGNORE_INDEX)
        ids = torch.nn.functional.pad(self.ids[:, :-1], (0, 0, 1, 0))
        probs = torch.nn.functional.pad(self.probs[:, :-1], (0, 0, 1, 0))
        label_probs = None if self.label_probs is None else torch.nn.functional.pad(self.label_probs[:, :-1], (1, 0))
        return CompactErrors(labels, ids, probs, label_probs)

    def label_in_top_k(self) -> torch.Tensor:
        """Boolean (...,): whether the label is one of the kept top-k tokens."""
        return (self.ids == self.labels.unsqueeze(-1)).any(-1)

    def label_weight(self) -> torch.Tensor:
        """The error's entry at the label beyond the top-k terms: 1 − p̂_y where the top-k does not hold the label
        (its probability is not among ``probs``), 1 where it does, 0 at unlabelled positions."""
        return self.valid.float() - self.outside_label_mass()

    def to_dense(self, vocab_size: int) -> torch.Tensor:
        """The dense |V| error rows (for tests and small analyses only)."""
        dense = torch.zeros(*self.labels.shape, vocab_size, dtype=torch.float32, device=self.probs.device)
        dense.scatter_add_(-1, self.ids, -self.probs.float())
        onehot = torch.nn.functional.one_hot(self.labels.clamp(min=0), vocab_size).float()
        return dense + onehot * self.label_weight().unsqueeze(-1)

    def project(self, weight: torch.Tensor) -> torch.Tensor:
        """``error @ weight`` for a (|V|, d) matrix: the label's row minus the probability-weighted top-k rows.

        One ``embedding_bag`` (a weighted sum of k + 1 rows per position): neither the (..., k, d) gathered rows nor
        their gradient are ever built, which matters for the backward into a |V|-row matrix.
        """
        ids = torch.cat([self.labels.clamp(min=0).unsqueeze(-1), self.ids], dim=-1)
        weights = torch.cat([self.label_weight().unsqueeze(-1).to(weight.dtype), -self.probs.to(weight.dtype)], dim=-1)
        rows = torch.nn.functional.embedding_bag(ids.reshape(-1, ids.shape[-1]), weight, mode="sum",
                                                 per_sample_weights=weights.reshape(-1, ids.shape[-1]))
        return rows.view(*self.labels.shape, weight.shape[-1])

    def dot(self, dense: torch.Tensor) -> torch.Tensor:
        """Per-position inner product ⟨error, dense⟩ with a dense (..., |V|) tensor."""
        label_term = dense.gather(-1, self.labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * self.label_weight()
        return label_term - (dense.gather(-1, self.ids) * self.probs.to(dense.dtype)).sum(-1)

    def values_at(self, ids: torch.Tensor) -> torch.Tensor:
        """The error's entries at token ``ids`` (..., n), as :meth:`to_dense` would hold them."""
        matches = ids.unsqueeze(-1) == self.ids.unsqueeze(-2)  # (..., n, k)
        probs = (matches * self.probs.float().unsqueeze(-2)).sum(-1)
        return (ids == self.labels.unsqueeze(-1)).float() * self.label_weight().unsqueeze(-1) - probs

    def squared_norm(self) -> torch.Tensor:
        """Per-position ‖error‖²: (label entry)² − 2·(label entry)·p̂_y·[y in top-k] + Σ_top-k p̂_j²."""
        probs = self.probs.float()
        label_prob = (probs * (self.ids == self.labels.unsqueeze(-1))).sum(-1)
        weight = self.label_weight()
        return weight.pow(2) - 2.0 * weight * label_prob + probs.pow(2).sum(-1)

    def outside_label_mass(self) -> torch.Tensor:
        """Per-position p̂_y where the top-k does not hold the label (it is represented beside them), else 0."""
        if self.label_probs is None:
            return torch.zeros_like(self.probs[..., 0], dtype=torch.float32)
        return self.label_probs.float() * ~self.label_in_top_k() * self.valid

    def dropped_mass(self) -> torch.Tensor:
        """Per-position probability mass the compact form does not represent: outside the top-k and the label
        (zero at unlabelled positions)."""
        return (1.0 - self.probs.float().sum(-1) - self.outside_label_mass()).clamp(min=0) * self.valid


def shift_right(errors: torch.Tensor | CompactErrors) -> torch.Tensor | CompactErrors:
    """The Copilot's input sequence: errors moved one position right along dim 1, zero at the first position."""
    if isinstance(errors, CompactErrors):
        return errors.shift_right()
    return torch.nn.functional.pad(errors[:, :-1], (0, 0, 1, 0))
