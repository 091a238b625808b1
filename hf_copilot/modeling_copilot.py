"""CopilotModel: a small Transformer decoder that reads the Pilot's states and predicts the Pilot's token errors.

Data flow for one forward (T new positions):

    input errors ℓ_<i ──ErrorProjection (|V|→d)──▶ x ──▶ blocks ──▶ norm ──▶ correction head (d→|V|) ──▶ f_i
    Pilot X̃, h̄ ──alignment (d_P→d) + RMSNorm──▶ memory ──(cross-attention K/V)──┘

Decoder-only Pilot: blocks alternate causal self-attention (layers 1, 3, ...) and the paper's modified
cross-attention (layers 2, 4, ...) whose keys/values are ``Concat_seq(X̃, h̄)``. We lay that memory out
interleaved, ``[X̃_0, h̄_0, X̃_1, h̄_1, ...]``: attention is order-invariant, so this is the same operation, and it
makes the causal rule (position i sees Pilot positions ≤ i) the ordinary one. Encoder-decoder Pilot: every block
has self-attention then cross-attention over ``[encoder output X̃ (fully visible) ; h̄ (causal)]``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    eager_attention_forward,
)
from transformers.utils import ModelOutput

from .configuration_copilot import CopilotConfig
from .errors import CompactErrors
from .model_card import write_model_card
from .pilot_shape import (PilotSignature, decoder_layers, gathered_parameters, logits_width, pilot_kind, unwrap_pilot,
                          whole)
from .random_streams import separate_random_stream
from .safe_io import VerifiedCheckpointMixin

logger = logging.getLogger(__name__)


@dataclass
class OwnCorrections:
    """The Copilot's own corrections f = correction_head(states), given by the head's d-wide inputs ``states``.

    In ``generate()`` the Copilot reads its previous correction as its next input error. Passed in this form, the
    error projection of f is ``states @ (W_headᵀ W_in)``, one d×d product (the d×d map is built once per weight
    version), instead of a |V|-wide row times the |V|×d projection: per generated token the Copilot then reads one
    |V|×d matrix instead of two. Only for ``correction="vocabulary"``, whose f is linear in ``states``.
    """

    states: torch.Tensor


Errors = torch.Tensor | CompactErrors | OwnCorrections


@dataclass
class CopilotOutput(ModelOutput):
    """Output of :class:`CopilotModel`.

    Args:
        loss: when ``target_errors`` were given, the RMSE (Eq. 7).
        corrections: the predicted errors ``f^C`` (batch, new positions, |V|), added to the Pilot's prediction;
            ``None`` when the forward was called with ``return_corrections=False``.
        cache: the :class:`CopilotCache` to pass back for incremental decoding.
        last_hidden_state: the final normed states the correction head reads (batch, positions with corrections,
            d): ``OwnCorrections(last_hidden_state)`` is the cheap way to feed the corrections back as input.
    """

    loss: torch.Tensor | None = None
    corrections: torch.Tensor | None = None
    cache: CopilotCache | None = None
    last_hidden_state: torch.Tensor | None = None


class CopilotCache:
    """Keys/values of past positions for incremental decoding, with the method names of transformers'
    ``DynamicCache`` (``update``, ``get_seq_length``, ``reorder_cache``).

    Per layer and attention kind it keeps the keys/values of the *stream* (one entry per past position: the
    Copilot's states for self-attention, the Pilot memory items for cross-attention) and, for an
    encoder-decoder Pilot, the keys/values of the encoder output, computed once.
    """

    def __init__(self):
        self.stream: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.encoder: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.encoder_mask: torch.Tensor | None = None
        self.seq_length = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Past positions held (the same for every layer)."""
        return self.seq_length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, kind: str = "self"):
        """Appends the new positions' keys/values of layer ``layer_idx``'s ``kind`` (``"self"`` or ``"cross"``)
        attention and returns those of all positions so far, as ``DynamicCache.update`` does."""
        if (layer_idx, kind) in self.stream:
            past_key, past_value = self.stream[layer_idx, kind]
            key_states = torch.cat([past_key, key_states], dim=2)
            value_states = torch.cat([past_value, value_states], dim=2)
        self.stream[layer_idx, kind] = (key_states, value_states)
        return key_states, value_states

    def reorder_cache(self, beam_idx: torch.LongTensor):
        """Selects batch rows ``beam_idx`` everywhere (beam search: each beam follows its parent)."""
        self.stream = {k: (key[beam_idx], value[beam_idx]) for k, (key, value) in self.stream.items()}
        self.encoder = {k: (key[beam_idx], value[beam_idx]) for k, (key, value) in self.encoder.items()}
        if self.encoder_mask is not None:
            self.encoder_mask = self.encoder_mask[beam_idx]


class ErrorProjection(nn.Module):
    """The input map |V| → d of the paper, stored as a (|V|, d) matrix.

    Dense errors are multiplied in; compact errors use a row lookup minus a probability-weighted sum of rows, so
    no |V|-wide vector is ever built. ``None`` means "no previous error" and maps to zero.
    """

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))

    def forward(self, errors: Errors) -> torch.Tensor:
        if isinstance(errors, CompactErrors):
            return errors.project(self.weight)
        return errors.to(self.weight.dtype) @ self.weight


class CopilotAttention(nn.Module):
    """Multi-head attention (grouped-query capable) whose keys/values come from a given source.

    Self-attention passes the Copilot's own states as the source; the modified cross-attention passes the Pilot
    memory. The projection names match Llama's, so Pilot layers can be copied in.
    """

    def __init__(self, config: CopilotConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False  # the mask is always explicit
        heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.hidden_size
        self.q_proj = nn.Linear(d, heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(d, kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(d, kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(heads * self.head_dim, d, bias=config.attention_output_bias)

    def project_keys_values(self, source: torch.Tensor, rotary=None) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (*source.shape[:-1], -1, self.head_dim)
        key = self.k_proj(source).view(shape).transpose(1, 2)
        value = self.v_proj(source).view(shape).transpose(1, 2)
        return _apply_rotary(key, rotary), value

    def forward(self, hidden, key, value, mask, rotary=None) -> torch.Tensor:
        shape = (*hidden.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden).view(shape).transpose(1, 2)
        query = _apply_rotary(query, rotary)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output, _ = attention(
            self,
            query,
            key,
            value,
            mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
        )
        return self.o_proj(output.reshape(*hidden.shape[:-1], -1).contiguous())


def _apply_rotary(x: torch.Tensor, rotary: tuple | None) -> torch.Tensor:
    """Rotary position embedding of (B, heads, T, head_dim) states; ``rotary`` is (cos, sin), each (B, T, head_dim)."""
    if rotary is None:
        return x
    cos, sin = (t.unsqueeze(1) for t in rotary)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class CopilotBlock(nn.Module):
    """A pre-norm block: [self-attention] → [cross-attention over the Pilot memory] → feed-forward."""

    def __init__(self, config: CopilotConfig, layer_idx: int, kind: str):
        super().__init__()
        self.layer_idx = layer_idx
        self.kind = kind
        d, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = LlamaRMSNorm(d, eps=eps)
        if kind == "self":
            self.self_attn = CopilotAttention(config, layer_idx)
        elif kind == "cross":
            self.cross_attn = CopilotAttention(config, layer_idx)
        else:
            self.self_attn = CopilotAttention(config, layer_idx)
            self.cross_attention_layernorm = LlamaRMSNorm(d, eps=eps)
            self.cross_attn = CopilotAttention(config, layer_idx)
        self.post_attention_layernorm = LlamaRMSNorm(d, eps=eps)
        self.mlp = LlamaMLP(config)

    def forward(self, hidden, memory: _Memory, cache: CopilotCache | None) -> torch.Tensor:
        normed = self.input_layernorm(hidden)
        if self.kind in ("self", "self+cross"):
            key, value = self.self_attn.project_keys_values(normed, memory.query_rotary)
            if cache is not None:
                key, value = cache.update(key, value, self.layer_idx, "self")
            hidden = hidden + self.self_attn(normed, key, value, memory.self_mask, memory.query_rotary)
            if self.kind == "self+cross":
                normed = self.cross_attention_layernorm(hidden)
        if self.kind in ("cross", "self+cross"):
            key, value = memory.keys_values(self.cross_attn, cache)
            hidden = hidden + self.cross_attn(normed, key, value, memory.cross_mask, memory.cross_query_rotary)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


@dataclass
class _Memory:
    """Everything one forward's blocks share: the Pilot memory items of the new positions, masks, rotary terms."""

    stream: torch.Tensor  # (B, new memory items, d): [X̃_i, h̄_i] pairs, or h̄_i for an encoder-decoder Pilot
    stream_rotary: tuple | None
    encoder: torch.Tensor | None  # (B, S, d) encoder output, only when not cached yet
    self_mask: torch.Tensor
    cross_mask: torch.Tensor
    query_rotary: tuple
    cross_query_rotary: tuple | None

    def keys_values(self, attention: CopilotAttention, cache: CopilotCache | None):
        key, value = attention.project_keys_values(self.stream, self.stream_rotary)
        if cache is not None:
            key, value = cache.update(key, value, attention.layer_idx, "cross")
        if cache is not None and attention.layer_idx in cache.encoder:
            enc_key, enc_value = cache.encoder[attention.layer_idx]
        elif self.encoder is not None:
            enc_key, enc_value = attention.project_keys_values(self.encoder)
            if cache is not None:
                cache.encoder[attention.layer_idx] = (enc_key, enc_value)
        else:
            return key, value
        return torch.cat([enc_key, key], dim=2), torch.cat([enc_value, value], dim=2)


class CopilotPreTrainedModel(VerifiedCheckpointMixin, PreTrainedModel):
    config: CopilotConfig
    config_class = CopilotConfig
    base_model_prefix = "copilot"
    main_input_name = "pilot_hidden_states"
    _no_split_modules = ["CopilotBlock"]
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        if module is getattr(self, "correction_head", None):
            init.zeros_(module.weight)  # an untrained Copilot leaves the Pilot exactly unchanged
        elif isinstance(module, ErrorProjection):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        else:
            super()._init_weights(module)


class _Gram(torch.autograd.Function):
    """WᵀW with the backward of a symmetric product: W(G' + G'ᵀ), one |V|·d² matmul instead of autograd's two."""

    @staticmethod
    def forward(ctx, weight):
        ctx.save_for_backward(weight)
        return weight.T @ weight

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return weight @ (grad + grad.T)


class CopilotModel(CopilotPreTrainedModel):
    """The Copilot of Transformer Copilot (Zou et al., NeurIPS 2025).

    At position i it reads the Pilot's input representation X̃ and layer-mean hidden states h̄ up to i and the
    errors of earlier positions, and predicts the Pilot's error ℓ_i = one-hot(y_i) − p̂_i at i.
    """

    def __init__(self, config: CopilotConfig):
        super().__init__(config)
        self.error_projection = ErrorProjection(config.vocab_size, config.hidden_size)
        self.pilot_alignment = (
            nn.Linear(config.pilot_hidden_size, config.hidden_size, bias=False)
            if config.pilot_hidden_size != config.hidden_size
            else nn.Identity()
        )
        self.memory_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.layers = nn.ModuleList(
            CopilotBlock(config, i, kind) for i, kind in enumerate(config.attention_kinds())
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.correction_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._feedback_cache: tuple[tuple, torch.Tensor] | None = None
        self.post_init()
        if config.lora is not None:
            self._add_lora()  # after post_init, so LoRA's own initialisation (B = 0) is kept

    def _add_lora(self) -> None:
        """Puts ``config.lora`` adapters on the blocks' projections (peft) and freezes the blocks' own weights.

        Everything outside the blocks is new, not pretrained, and stays trainable: the zero-initialised head and
        the error projection must learn in full for the Copilot to correct anything.
        """
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as error:
            raise ImportError("A LoRA Copilot needs peft: pip install peft (or 'hf_copilot[real]').") from error
        inject_adapter_in_model(LoraConfig(**self.config.lora, bias="none"), self)
        self._freeze_adapted_blocks()

    def _freeze_adapted_blocks(self) -> None:
        for name, parameter in self.named_parameters():
            parameter.requires_grad = "lora_" in name or not name.startswith("layers.")

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        if isinstance(model, CopilotModel) and model.config.lora is not None:
            model._freeze_adapted_blocks()  # loading puts fresh, trainable parameters in place
        return model

    def merge_lora(self) -> CopilotModel:
        """Folds the LoRA adapters into the blocks' weights, in place, and returns this Copilot as a plain one.

        The corrections do not change (up to float rounding); inference gets a little cheaper, and the saved
        folder no longer needs peft. All weights become trainable again, as in any Copilot without LoRA.
        """
        if self.config.lora is None:
            return self
        for module in list(self.modules()):
            for name, child in list(module.named_children()):
                if hasattr(child, "base_layer") and hasattr(child, "merge"):
                    child.merge()
                    setattr(module, name, child.get_base_layer())
        self.config.lora = None
        for parameter in self.parameters():
            parameter.requires_grad = True
        self._feedback_cache = None
        return self

    def forward(
        self,
        pilot_hidden_states: torch.Tensor,
        pilot_input_states: torch.Tensor | None = None,
        input_errors: Errors | None = None,
        attention_mask: torch.Tensor | None = None,
        pilot_input_mask: torch.Tensor | None = None,
        target_errors: Errors | None = None,
        pilot_logits: torch.Tensor | None = None,
        cache: CopilotCache | None = None,
        use_cache: bool = False,
        corrections_to_keep: int = 0,
        return_corrections: bool = True,
    ) -> CopilotOutput:
        r"""
        Args:
            pilot_hidden_states: h̄, the mean over the Pilot's decoder layers, (batch, new positions, d_P).
            pilot_input_states: X̃. Decoder-only Pilot: the embedding output of the new positions,
                (batch, new positions, d_P). Encoder-decoder Pilot: the encoder output (batch, source length, d_P),
                needed on the first call only (it is cached).
            input_errors: the error sequence shifted right (see :func:`hf_copilot.errors.shift_right`), dense
                (batch, new positions, |V|), :class:`CompactErrors`, or the Copilot's own earlier corrections as
                :class:`OwnCorrections`; ``None`` means zero input.
            attention_mask: (batch, past + new positions), 1 for real tokens; default all ones.
            pilot_input_mask: encoder padding mask (batch, source length) for an encoder-decoder Pilot.
            target_errors: the true errors ℓ at the new positions; when given, ``loss`` is the RMSE (Eq. 7)
                ``sqrt(Σ_i ‖f_i − ℓ_i‖² / N)`` over the N positions that carry a label and are not padding (a
                dense target row of zeros means "no label", like ``IGNORE_INDEX`` in the compact form).
            pilot_logits: the Pilot's logits z at the positions corrections are computed for (the last
                ``corrections_to_keep`` new positions, or every new one), (batch, ≥ those positions, |V|); the last
                ones are used. Needed by ``correction="logit_residual"`` to return corrections
                ``softmax(z + g) − softmax(z)``; its loss needs only ``target_errors``.
            cache / use_cache: incremental decoding; outputs equal those of one full-sequence forward.
            corrections_to_keep: n > 0 computes corrections for the last n new positions only, like
                ``logits_to_keep`` (generate() needs the last one of a prompt); not with ``target_errors``.
            return_corrections: ``False`` skips building the |V|-wide corrections when only the loss is needed
                (Copilot training): the loss never needs them (see :meth:`squared_errors`), so a training step
                costs O(d² + k·d) per position in its output layer instead of O(|V|·d), and no (batch, positions,
                |V|) tensor is allocated.
        """
        batch, new = self._check_inputs(pilot_hidden_states, pilot_input_states, input_errors, cache)
        cache = CopilotCache() if use_cache and cache is None else cache
        past = cache.get_seq_length() if cache is not None else 0
        attention_mask = _full_mask(attention_mask, batch, past + new, pilot_hidden_states.device)
        hidden = self._error_inputs(input_errors, batch, new, pilot_hidden_states.device)
        memory = self._memory(pilot_hidden_states, pilot_input_states, attention_mask, pilot_input_mask, past, cache)
        for layer in self.layers:
            hidden = layer(hidden, memory, cache)
        if corrections_to_keep:
            if target_errors is not None:
                raise ValueError("corrections_to_keep cannot be combined with target_errors: the loss needs the "
                                 "corrections of every position.")
            hidden = hidden[:, -corrections_to_keep:]
        hidden = self.norm(hidden)
        corrections = self.corrections(hidden, pilot_logits) if return_corrections else None
        if cache is not None:
            cache.seq_length = past + new
        loss = None if target_errors is None else self._loss(hidden, target_errors, attention_mask[:, past:])
        return CopilotOutput(loss=loss, corrections=corrections, cache=cache if use_cache else None,
                             last_hidden_state=hidden)

    def _error_inputs(self, input_errors, batch: int, new: int, device) -> torch.Tensor:
        """The block input of each new position: the projected error sequence (or the Copilot's own fed-back
        corrections), zeros when there is none."""
        dtype = self.correction_head.weight.dtype
        if input_errors is None:
            return torch.zeros(batch, new, self.config.hidden_size, dtype=dtype, device=device)
        if isinstance(input_errors, OwnCorrections):
            return input_errors.states.to(dtype) @ self._feedback_map()
        return self.error_projection(input_errors)

    def _loss(self, hidden: torch.Tensor, target_errors: Errors, attention_mask: torch.Tensor) -> torch.Tensor:
        """The RMSE (Eq. 7) over the new positions that carry a label and are not padding."""
        labelled = attention_mask.bool()
        if isinstance(target_errors, CompactErrors):
            labelled = labelled & target_errors.valid
        else:
            labelled = labelled & (target_errors != 0).any(-1)
        squared = self.squared_errors(hidden, target_errors)
        return ((squared * labelled).sum() / labelled.sum().clamp(min=1)).clamp(min=1e-12).sqrt()

    def _feedback_map(self) -> torch.Tensor:
        """W_headᵀ W_in (d×d): the error projection of the head's output, for :class:`OwnCorrections`.

        Building it costs |V|·d² (a fraction of a second for SmolLM2 on a CPU), so outside autograd it is kept until
        either weight changes (a new tensor, or an in-place update such as an optimizer step).
        """
        if self.config.correction != "vocabulary":
            raise ValueError(f"OwnCorrections need correction='vocabulary' (f linear in the head's input); this "
                             f"Copilot uses correction={self.config.correction!r}: pass its corrections as a dense "
                             "tensor.")
        head, projection = self.correction_head.weight, self.error_projection.weight
        if torch.is_grad_enabled() and (head.requires_grad or projection.requires_grad):
            return head.T @ projection
        key = (head.data_ptr(), head._version, projection.data_ptr(), projection._version)
        if self._feedback_cache is None or self._feedback_cache[0] != key:
            with torch.no_grad():
                self._feedback_cache = (key, (head.float().T @ projection.float()).to(head.dtype))
        return self._feedback_cache[1]

    def squared_errors(self, hidden: torch.Tensor, target: Errors,
                       corrections: torch.Tensor | None = None) -> torch.Tensor:
        """Per-position ‖f − ℓ‖² of the corrections the head makes of ``hidden`` (a forward's
        ``last_hidden_state``) against the true errors ``target``, without building the |V|-wide f. When the
        vocabulary head's ``corrections`` at these positions are at hand anyway, ‖f‖² and ⟨f, ℓ⟩ are read from them.

        Vocabulary head f = W h: ‖f‖² − 2⟨f, ℓ⟩ + ‖ℓ‖², exactly, with ‖f‖² = hᵀ(WᵀW)h through the d×d Gram matrix
        (|V|·d² once per batch instead of |V|·d per position) and ⟨f, ℓ⟩ = ⟨ℓ W, h⟩, a lookup of k + 1 rows of W for
        compact errors. Logit-residual head: the Brier score of softmax(z + g) (see :meth:`_residual_brier`).
        Computed in fp32, outside autocast.
        """
        with torch.autocast(hidden.device.type, enabled=False):
            hidden = hidden.float()
            if self.config.correction == "logit_residual":
                return self._residual_brier(hidden, target)
            if corrections is not None:
                corrections = corrections.float()
                prediction_norm = corrections.pow(2).sum(-1)
                cross = (target.dot(corrections) if isinstance(target, CompactErrors)
                         else (target.float() * corrections).sum(-1))
            else:
                weight = self.correction_head.weight.float()
                prediction_norm = ((hidden @ _Gram.apply(weight)) * hidden).sum(-1)
                target_rows = target.project(weight) if isinstance(target, CompactErrors) else target.float() @ weight
                cross = (target_rows * hidden).sum(-1)
            target_norm = target.squared_norm() if isinstance(target, CompactErrors) else target.float().pow(2).sum(-1)
            return prediction_norm - 2.0 * cross + target_norm

    def corrections(self, hidden: torch.Tensor, pilot_logits: torch.Tensor | None = None) -> torch.Tensor:
        """The corrections f the head makes of ``hidden`` (a forward's ``last_hidden_state``, (batch, positions,
        d)): W h for the vocabulary head; softmax(z + W h) − softmax(z) for the logit residual, which needs
        ``pilot_logits`` z (batch, ≥ positions, |V|)."""
        if self.config.correction == "vocabulary":
            return self.correction_head(hidden)
        return self._residual_corrections(hidden, pilot_logits)

    def _residual_corrections(self, hidden: torch.Tensor, pilot_logits: torch.Tensor | None) -> torch.Tensor:
        """f = softmax(z + g) − softmax(z) with g = W h, at the positions of ``hidden`` (the last ones of
        ``pilot_logits``), in fp32 and returned in the head's dtype."""
        positions = hidden.shape[1]
        if pilot_logits is None:
            raise ValueError("A Copilot with correction='logit_residual' needs pilot_logits (the Pilot's logits at the "
                             "positions it corrects) to return corrections; CopilotLogitsProcessor passes them. For "
                             "its loss alone pass return_corrections=False.")
        if (pilot_logits.dim() != 3 or pilot_logits.shape[0] != hidden.shape[0] or pilot_logits.shape[1] < positions
                or pilot_logits.shape[-1] != self.config.vocab_size):
            raise ValueError(f"pilot_logits must be (batch={hidden.shape[0]}, >= {positions} positions, "
                             f"{self.config.vocab_size}); got {tuple(pilot_logits.shape)}.")
        logits = pilot_logits[:, -positions:].float()
        with torch.autocast(hidden.device.type, enabled=False):
            residual = self.correction_head(hidden).float()
        return (torch.softmax(logits + residual, -1) - torch.softmax(logits, -1)).to(hidden.dtype)

    def _residual_brier(self, hidden: torch.Tensor, target: Errors) -> torch.Tensor:
        """‖f − ℓ‖² of the logit-residual head = ‖softmax(z + g) − one_hot(y)‖² (p̂ cancels), from compact errors.

        The compact errors hold the Pilot's distribution on its top-k tokens and the label, and the rest of its mass
        (the tail). q = softmax(z + g) is computed over those k + 1 tokens plus the tail as one bucket, whose
        residual is taken as 0: ``q_j = p̂_j e^{g_j} / (Σ p̂ e^g + tail)``. The Brier score is then
        ``1 − 2 q_y + Σ q_j²`` over the kept tokens, leaving out the tail's Σ q², as ‖ℓ‖² leaves out Σ p̂² there;
        at g = 0 it equals ‖ℓ‖² exactly. Only the labelled positions are computed (others are 0): g at k + 1 rows
        of W each.
        """
        if not isinstance(target, CompactErrors):
            raise ValueError("A Copilot with correction='logit_residual' scores against CompactErrors (the Pilot's "
                             "top-k distribution and label, as the Mistake Log keeps them), not dense errors.")
        squared = hidden.new_zeros(target.labels.shape)
        valid = target.valid
        errors = target.map(lambda tensor: tensor[valid])
        ids = torch.cat([errors.labels.unsqueeze(-1), errors.ids], dim=-1)  # (N, 1 + k)
        probs = torch.cat([errors.outside_label_mass().unsqueeze(-1), errors.probs.float()], dim=-1)
        residual = torch.einsum("nd,nkd->nk", hidden[valid], self.correction_head.weight[ids].float())
        tiny = torch.finfo(torch.float32).tiny
        kept = torch.where(probs > 0, probs.clamp(min=tiny).log() + residual, -torch.inf)
        tail = errors.dropped_mass().clamp(min=tiny).log().unsqueeze(-1)
        q = torch.softmax(torch.cat([kept, tail], dim=-1), dim=-1)[:, :-1]
        label_q = (q * (ids == errors.labels.unsqueeze(-1))).sum(-1)
        squared[valid] = 1.0 - 2.0 * label_q + q.pow(2).sum(-1)
        return squared

    def _check_inputs(self, hidden_states, input_states, input_errors, cache):
        config = self.config
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != config.pilot_hidden_size:
            raise ValueError(
                f"pilot_hidden_states must be (batch, positions, {config.pilot_hidden_size}) for this Copilot; got "
                f"{tuple(hidden_states.shape)}. Is this Copilot built for this Pilot (pilot_hidden_size)?"
            )
        batch, new, _ = hidden_states.shape
        if config.is_decoder_only_pilot:
            if input_states is None or input_states.shape != hidden_states.shape:
                raise ValueError(
                    "A decoder-only Pilot's pilot_input_states (its embedding output) must have the same shape as "
                    f"pilot_hidden_states {tuple(hidden_states.shape)}; got "
                    f"{None if input_states is None else tuple(input_states.shape)}."
                )
        elif input_states is None and (cache is None or not cache.encoder):
            raise ValueError("An encoder-decoder Pilot's encoder output (pilot_input_states) is required on the "
                             "first call; later calls with the same cache may omit it.")
        elif input_states is not None and (input_states.dim() != 3 or input_states.shape[0] != batch
                                           or input_states.shape[-1] != config.pilot_hidden_size):
            raise ValueError(
                f"pilot_input_states (encoder output) must be (batch={batch}, source length, "
                f"{config.pilot_hidden_size}); got {tuple(input_states.shape)}."
            )
        if input_errors is not None:
            if isinstance(input_errors, CompactErrors):
                lead, width, expected = input_errors.labels.shape, None, None
            elif isinstance(input_errors, OwnCorrections):  # head inputs: the Copilot's width
                states = input_errors.states
                lead, width, expected = states.shape[:-1], states.shape[-1], config.hidden_size
            else:  # dense errors: the Copilot's vocabulary
                lead, width, expected = input_errors.shape[:-1], input_errors.shape[-1], config.vocab_size
            if tuple(lead) != (batch, new):
                raise ValueError(f"input_errors must cover the same (batch, positions) = {(batch, new)} as the "
                                 f"Pilot states; got {tuple(lead)}.")
            if width != expected:
                raise ValueError(f"{type(input_errors).__name__} input_errors must have {expected} entries per "
                                 f"position (dense errors: the vocabulary; OwnCorrections: the Copilot's width); got "
                                 f"{width}.")
        return batch, new

    def _memory(self, hidden_states, input_states, attention_mask, input_mask, past, cache) -> _Memory:
        batch, new, _ = hidden_states.shape
        device = hidden_states.device
        dtype = self.correction_head.weight.dtype
        mask = attention_mask.bool()
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        query_rotary = self.rotary_emb(hidden_states.to(dtype), positions[:, past:])
        query_index = torch.arange(past, past + new, device=device)
        key_index = torch.arange(past + new, device=device)
        # A stream key j is visible to query i when j <= i and j is a real token.
        causal = (key_index[None, None, :] <= query_index[None, :, None]) & mask[:, None, :]
        self_mask = _additive(causal, dtype)

        def aligned(states):
            return self.memory_norm(self.pilot_alignment(states.to(dtype)))

        if self.config.is_decoder_only_pilot:
            pairs = torch.stack([input_states, hidden_states], dim=2).reshape(batch, 2 * new, -1)
            stream = aligned(pairs)
            stream_rotary = tuple(t.repeat_interleave(2, dim=1) for t in query_rotary)
            return _Memory(stream, stream_rotary, None, self_mask, _additive(causal.repeat_interleave(2, -1), dtype),
                           query_rotary, query_rotary)

        encoder = aligned(input_states) if input_states is not None and not (cache and cache.encoder) else None
        if cache is not None and cache.encoder_mask is not None:
            input_mask = cache.encoder_mask
        elif input_mask is None:
            source_length = input_states.shape[1]
            input_mask = torch.ones(batch, source_length, dtype=torch.bool, device=device)
        if cache is not None:
            cache.encoder_mask = input_mask
        visible_source = input_mask.bool()[:, None, :].expand(batch, new, -1)
        cross = torch.cat([visible_source, causal], dim=-1)
        return _Memory(aligned(hidden_states), None, encoder, self_mask, _additive(cross, dtype), query_rotary, None)

    def save_pretrained(self, save_directory, is_main_process: bool = True, **kwargs):
        """Saves the Copilot like any model, with a model card (``README.md``) naming its Pilot and how to load it."""
        super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            write_model_card(save_directory, self.config)

    def check_pilot(self, pilot) -> None:
        """Raises a ValueError naming the mismatch when this Copilot was not built for ``pilot``."""
        model = unwrap_pilot(pilot)
        problems = PilotSignature.of_pilot(model).mismatches(PilotSignature.of_copilot(self), "the Pilot",
                                                             "the Copilot")
        built_for = self.config.pilot_model_type
        if built_for is not None and model.config.model_type != built_for:
            problems.insert(0, f"the Pilot is a {model.config.model_type!r} model but the Copilot was built for a "
                               f"{built_for!r} one")
        if problems:
            raise ValueError(
                "This Copilot does not fit the Pilot: " + "; ".join(problems) + ". Build a matching one with "
                "CopilotModel.from_pilot(pilot) (or load the Copilot trained with this Pilot)."
            )

    @classmethod
    def from_pilot(cls, pilot, num_hidden_layers: int | None = None, **config_overrides) -> CopilotModel:
        """A Copilot shaped for ``pilot``, initialised from it where the shapes fit.

        ``num_hidden_layers`` defaults to 2; the paper's Copilot is a pretrained decoder of the Pilot's family at
        0.5-1x its size, e.g. ``num_hidden_layers=pilot.config.num_hidden_layers`` (every Pilot layer copied)
        with ``lora=PAPER_LORA`` (see :class:`CopilotConfig`).

        Vocabulary, widths, heads, feed-forward size and rotary settings come from the Pilot's config; any
        :class:`CopilotConfig` field can be overridden. Copilot layer i copies every tensor of Pilot decoder
        layer i whose name and shape match (Llama, Qwen2, Mistral: the whole block; cross-attention layers take
        the Pilot layer's attention weights), and the error projection copies the Pilot's input embeddings when
        their shape matches. Everything else (GPT2, T5, a different width) starts fresh. What was copied is logged.
        The Copilot is created on the Pilot's (first) device, in its dtype.
        """
        model = unwrap_pilot(pilot)
        config = cls._config_for(model, num_hidden_layers, config_overrides)
        lora, config.lora = config.lora, None  # copy the Pilot's weights first, then adapt them
        with separate_random_stream(model.device):  # fresh weights leave the Pilot's random numbers alone
            copilot = cls(config).to(model.device, model.dtype)
            copied = copilot._copy_from(model)
            if lora is not None:
                copilot.config.lora = lora
                copilot._add_lora()
        modules = dict.fromkeys(".".join(name.split(".")[:2]) for name in copied)
        logger.info("CopilotModel.from_pilot(%s): copied %d tensors from the Pilot (%s)", type(model).__name__,
                    len(copied), ", ".join(modules) or "nothing fits: all fresh")
        return copilot

    @staticmethod
    def _config_for(model, num_hidden_layers, overrides) -> CopilotConfig:
        text = model.config.get_text_config(decoder=True)
        width = text.hidden_size
        heads = text.num_attention_heads
        derived = dict(
            vocab_size=logits_width(model),
            hidden_size=width,
            pilot_hidden_size=width,
            pilot_kind=pilot_kind(model),
            pilot_model_type=model.config.model_type,
            pilot_name_or_path=model.config.name_or_path or None,
            num_hidden_layers=2 if num_hidden_layers is None else num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or width // heads,
            intermediate_size=(getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None)
                               or getattr(text, "d_ff", None) or 4 * width),
            rms_norm_eps=getattr(text, "rms_norm_eps", 1e-6),
            max_position_embeddings=getattr(text, "max_position_embeddings", 4096),
            attention_bias=getattr(text, "attention_bias", model.config.model_type == "qwen2"),
            attention_output_bias=(model.config.model_type != "qwen2" and getattr(text, "attention_bias", False)),
            mlp_bias=getattr(text, "mlp_bias", False),
        )
        if getattr(text, "rope_parameters", None):
            derived["rope_parameters"] = dict(text.rope_parameters)
        if getattr(text, "hidden_act", None) in ("silu", "gelu", "gelu_pytorch_tanh", "relu"):
            derived["hidden_act"] = text.hidden_act
        unknown = set(overrides) - set(CopilotConfig().to_dict())
        if unknown:
            raise TypeError(f"Unknown CopilotConfig field(s) {sorted(unknown)}.")
        derived.update(overrides)
        if "hidden_size" in overrides and "head_dim" not in overrides:
            derived["head_dim"] = derived["hidden_size"] // derived["num_attention_heads"]
        if "hidden_size" in overrides and "intermediate_size" not in overrides:
            derived["intermediate_size"] = 4 * derived["hidden_size"]
        return CopilotConfig(**derived)

    @torch.no_grad()
    def _copy_from(self, model) -> list[str]:
        copied = []
        pilot_layers = decoder_layers(model)
        for copilot_layer, pilot_layer in zip(self.layers, pilot_layers):
            # A PEFT adapter moves a wrapped weight to `<module>.base_layer.<name>`: the Pilot's own weight is there.
            source = {name.replace(".base_layer", ""): param for name, param in pilot_layer.named_parameters()}
            with gathered_parameters(source.values()):  # DeepSpeed ZeRO-3 partitions them; elsewhere a no-op
                for name, param in copilot_layer.named_parameters():
                    pilot_name = name.replace("cross_attn.", "self_attn.").replace(
                        "cross_attention_layernorm", "input_layernorm")
                    if pilot_name in source and source[pilot_name].shape == param.shape:
                        param.copy_(whole(source[pilot_name]))
                        copied.append(f"layers.{copilot_layer.layer_idx}.{name}")
        embeddings = model.get_input_embeddings()
        with gathered_parameters(embeddings.parameters() if embeddings is not None else ()):
            if embeddings is not None and embeddings.weight.shape == self.error_projection.weight.shape:
                self.error_projection.weight.copy_(whole(embeddings.weight))
                copied.append("error_projection.weight")
        return copied


def _full_mask(attention_mask: torch.Tensor | None, batch: int, positions: int, device) -> torch.Tensor:
    """The (batch, past + new positions) padding mask: all ones when none is given, else checked."""
    if attention_mask is None:
        return torch.ones(batch, positions, dtype=torch.long, device=device)
    if attention_mask.shape != (batch, positions):
        raise ValueError(f"attention_mask must cover past and new positions: expected shape {(batch, positions)}, got "
                         f"{tuple(attention_mask.shape)}.")
    return attention_mask


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean (B, Q, K) visibility → additive (B, 1, Q, K) mask; fully hidden rows stay finite (no NaN)."""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return mask.masked_fill(~visible, torch.finfo(dtype).min)[:, None]
