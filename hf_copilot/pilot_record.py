"""PilotRecord: what one Pilot forward showed the Copilot, and how its labels, padding and document boundaries read."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import IGNORE_INDEX, CompactErrors


@dataclass(frozen=True)
class PilotRecord:
    """What one Pilot forward showed the Copilot, all tensors detached and on the Pilot's device. Frozen: a record
    is built once, with its final fields (``dataclasses.replace`` derives another).

    Nothing is selected or masked here: the hooks keep references (so they stay cheap and shape-static under
    ``torch.compile``); :meth:`next_token_labels`, :meth:`token_mask` and :meth:`errors` do that work later,
    outside the forward. The one exception is a tap given ``errors_top_k``: it turns the logits into compact errors
    right after the forward and drops them (see :class:`PilotTap`).

    Attributes:
        kind: ``"decoder_only"`` or ``"encoder_decoder"``.
        input_states: X̃. Decoder-only: the input of decoder layer 0, i.e. the embedding output (B, T, d).
            Encoder-decoder: the encoder output (B, S, d).
        hidden_states: h̄, the mean over the decoder layers of each position's output state, fp32 (B, T, d).
        logits: the Pilot's logits, the very tensor its loss used (B, T, |V|); in ``generate()`` only the positions
            the model computed logits for (usually the last). ``None`` when the tap kept compact errors instead.
        labels: the labels the Pilot was given (``labels``, or ``shift_labels`` when present), or ``None``.
        labels_aligned: whether ``labels[:, t]`` is already the target of ``logits[:, t]`` (encoder-decoder labels
            and ``shift_labels``); causal-LM ``labels`` are not: ``logits[:, t]`` predicts ``labels[:, t + 1]``.
        attention_mask: padding mask of the decoder positions as the Pilot received it (``attention_mask`` of a
            decoder-only Pilot, ``decoder_attention_mask`` of an encoder-decoder one); may cover cached past
            positions too in ``generate()``.
        input_mask: the encoder padding mask (encoder-decoder only).
        vocab_size: the number of logits per position: the logits' own width, else the config's text ``vocab_size``.
        compact_errors: the errors in compact form, when the tap computed them during the forward.
        position_ids / cu_seq_lens: the ``position_ids`` and ``cu_seq_lens_q`` the Pilot was given, if any: in a
            packed (padding-free) batch they tell where each document starts (see :meth:`document_starts`).
        use_cache: the ``use_cache`` the Pilot was called with (``None`` when not given).
    """

    kind: str
    input_states: torch.Tensor
    hidden_states: torch.Tensor
    logits: torch.Tensor | None
    labels: torch.Tensor | None
    labels_aligned: bool
    attention_mask: torch.Tensor | None
    input_mask: torch.Tensor | None = None
    vocab_size: int | None = None
    compact_errors: CompactErrors | None = None
    position_ids: torch.Tensor | None = None
    cu_seq_lens: torch.Tensor | None = None
    use_cache: bool | None = None

    def __post_init__(self):
        if self.logits is not None:  # the logits' own width wins over the config's
            object.__setattr__(self, "vocab_size", self.logits.shape[-1])

    def next_token_labels(self) -> torch.Tensor:
        """The target of each logits position (B, T): labels shifted left for a causal LM, ``IGNORE_INDEX`` where
        there is none (the last position of a causal LM)."""
        if self.labels is None:
            raise ValueError("This PilotRecord has no labels (it was captured in generate mode), so it has no errors.")
        labels = self.labels if self.labels_aligned else torch.nn.functional.pad(
            self.labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        # The last position of a packed document has no target: the next token belongs to another document.
        document_ends = torch.nn.functional.pad(self.document_starts()[:, 1:], (0, 1), value=False)
        return labels.masked_fill(document_ends, IGNORE_INDEX)

    def document_starts(self) -> torch.Tensor:
        """Boolean (B, T): where each sequence the Mistake Log keeps starts. Every row starts one; a packed row
        (padding-free batches: TRL ``packing=True``, transformers' ``DataCollatorWithFlattening``) starts another
        at each document boundary, read from ``cu_seq_lens_q`` or else from where ``position_ids`` do not continue
        the previous position (the rule transformers itself uses to build the block-diagonal attention mask)."""
        batch, new = self.hidden_states.shape[:2]
        starts = torch.zeros(batch, new, dtype=torch.bool, device=self.hidden_states.device)
        starts[:, 0] = True
        if self.kind != "decoder_only":
            return starts
        if self.cu_seq_lens is not None:  # flash-attention kwargs describe the whole batch flattened
            offsets = self.cu_seq_lens[:-1].to(starts.device).long()
            starts.view(-1)[offsets[offsets < starts.numel()]] = True
        elif self.position_ids is not None and self.position_ids.dim() == 2:
            positions = self.position_ids[:, -new:].to(starts.device).expand(batch, new)
            starts[:, 1:] |= positions[:, 1:] != positions[:, :-1] + 1
        return starts

    def token_mask(self) -> torch.Tensor:
        """Boolean (B, T): which decoder positions of this forward are real tokens (not padding)."""
        batch, new = self.hidden_states.shape[:2]
        if self.attention_mask is None:
            return torch.ones(batch, new, dtype=torch.bool, device=self.hidden_states.device)
        if self.attention_mask.dim() != 2:
            raise ValueError(
                f"PilotTap understands 2D padding masks (batch, positions) only; this forward got an attention mask "
                f"of shape {tuple(self.attention_mask.shape)}. Pass a 2D attention_mask to the Pilot."
            )
        return self.attention_mask[:, -new:].bool()  # in generate() the mask also covers the cached positions

    def errors(self, top_k: int) -> CompactErrors:
        """The Pilot's errors one-hot(label) − softmax(logits) of this forward in compact top-``top_k`` form."""
        if self.compact_errors is not None and self.compact_errors.top_k == min(top_k, self.vocab_size):
            return self.compact_errors
        if self.logits is None:
            raise ValueError(
                f"This PilotRecord kept its errors with top_k={self.compact_errors.top_k} and dropped the logits, so "
                f"it cannot give top_k={top_k}. Create the PilotTap with errors_top_k={top_k}."
            )
        return CompactErrors.from_logits(self.logits, self.next_token_labels(), top_k)
