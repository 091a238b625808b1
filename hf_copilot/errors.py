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

        Only reads ``logits`` (top-k and log-normaliser): no |V|-wide probability tensor is written.
        """
        top_logits, top_ids = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
        top_probs = (top_logits.float() - torch.logsumexp(logits.float(), dim=-1, keepdim=True)).exp()
        valid = (labels != IGNORE_INDEX).unsqueeze(-1)
        return cls(labels=labels, ids=top_ids, probs=top_probs * valid)

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
        """``error @ weight`` for a (|V|, d) matrix: one row lookup minus a probability-weighted sum of k rows."""
        label_rows = weight[self.labels.clamp(min=0)] * self.valid.unsqueeze(-1).to(weight.dtype)
        topk_rows = weight[self.ids]  # (..., k, d)
        return label_rows - torch.einsum("...k,...kd->...d", self.probs.to(weight.dtype), topk_rows)

    def dot(self, dense: torch.Tensor) -> torch.Tensor:
        """Per-position inner product ⟨error, dense⟩ with a dense (..., |V|) tensor."""
        label_term = dense.gather(-1, self.labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * self.valid
        return label_term - (dense.gather(-1, self.ids) * self.probs.to(dense.dtype)).sum(-1)

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
