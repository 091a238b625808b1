"""CopilotConfig: the shape of a Copilot and of the Pilot it serves."""

from __future__ import annotations

from transformers import PreTrainedConfig

PILOT_KINDS = ("decoder_only", "encoder_decoder")
CORRECTIONS = ("vocabulary", "logit_residual")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The projections of a Llama-style block that LoRA adapts: the Copilot's blocks (and the Pilot's, in the recipes)."""
PAPER_LORA = {"r": 32, "lora_alpha": 64, "lora_dropout": 0.08}
"""The paper's Copilot adapter (App. E): rank 32, alpha 64, dropout 0.08, on every block projection."""
RETIRED_AT = "f854242"
"""The last commit with the experimental options retired after they measured no gain (docs/results.md)."""
RETIRED_FIELDS = {"rerank_top_k": None, "loss": "rmse", "read_errors": True}
"""Config fields of those options, with the one value a saved config may still carry (None: any value)."""


class CopilotConfig(PreTrainedConfig):
    """Configuration of a :class:`~hf_copilot.CopilotModel`.

    The Copilot is a small pre-norm Transformer decoder (RMSNorm, rotary self-attention, SwiGLU feed-forward: the
    Llama block) that reads the Pilot's states through the paper's modified cross-attention. The defaults are the
    paper's.

    Args:
        vocab_size: the Pilot's output vocabulary (width of the errors the Copilot reads and predicts).
        hidden_size: the Copilot's width ``d_C``.
        pilot_hidden_size: the Pilot's width ``d_P``; a linear alignment maps Pilot states to ``d_C`` when they
            differ.
        pilot_kind: ``"decoder_only"`` (odd layers self-attention, even layers cross-attention over
            ``[X̃ ; h̄]``) or ``"encoder_decoder"`` (self-attention then cross-attention in every layer).
        num_hidden_layers / num_attention_heads / num_key_value_heads / head_dim / intermediate_size: block
            sizes, as in Llama.
        rope_parameters: rotary settings (``{"rope_type": "default", "rope_theta": 10000.0}`` by default). Rotary
            positions are applied inside attention only; nothing is added to the input.
        attention_bias: bias on the query/key/value projections; ``attention_output_bias`` on the output
            projection; ``mlp_bias`` on the feed-forward projections.
        pilot_model_type: the Pilot's ``model_type`` (``check_pilot`` refuses a Pilot of another type).
        pilot_name_or_path / pilot_revision: which Pilot the Copilot was trained with: its Hub id or folder (taken
            from the Pilot by ``from_pilot``) and the revision it was loaded at (transformers does not keep it on
            the model: pass ``from_pilot(pilot, pilot_revision=...)``). Informational; the model card shows them.
        correction: how the correction f is produced. ``"vocabulary"`` (the paper): a linear head d_C → |V|,
            ``f = W h``. Its corrections lie in a d_C-dimensional subspace of the |V|-wide probability space, while
            the errors it must predict are nearly one-hot: with d_C ≪ |V| it can barely move from zero.
            ``"logit_residual"``: the same head gives a logit residual ``g = W h`` and ``f = softmax(z + g) − p̂``
            (z the Pilot's logits, p̂ = softmax(z)), so ``p̂ + λ f = (1 − λ) p̂ + λ softmax(z + g)`` and
            ``‖f − ℓ‖²`` is the Brier score of ``softmax(z + g)``. Like the Pilot's own head, the softmax turns a
            rank-d_C vector into a peaked distribution; f is exactly 0 at g = 0 and ``p̂ + λ f`` a distribution for
            λ ≤ 1. It needs the Pilot's logits at generation time (the processor passes them) and, in training, the
            compact errors of the Mistake Log (docs/model.md, "The logit-residual correction").
        lora: ``None`` (every weight trains) or LoRA settings for the blocks, as in the paper's Copilot: a dict of
            ``r``, ``lora_alpha``, ``lora_dropout`` and optionally ``target_modules`` (default: every attention
            and feed-forward projection). The blocks' own weights are then frozen (they are the pretrained Pilot
            layers ``from_pilot`` copied in) and only the adapters train; everything outside the blocks (error
            projection, alignment, norms, correction head) is new and always trains. The adapters are part of the
            model's state dict, so ``save_pretrained`` / ``from_pretrained`` round-trip them in one folder.
    """

    model_type = "copilot"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 512,
        pilot_hidden_size: int | None = None,
        pilot_kind: str = "decoder_only",
        pilot_model_type: str | None = None,
        pilot_name_or_path: str | None = None,
        pilot_revision: str | None = None,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        intermediate_size: int = 1376,
        hidden_act: str = "silu",
        rms_norm_eps: float = 1e-6,
        max_position_embeddings: int = 4096,
        rope_parameters: dict | None = None,
        attention_bias: bool = False,
        attention_output_bias: bool = False,
        mlp_bias: bool = False,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        correction: str = "vocabulary",
        lora: dict | None = None,
        **kwargs,
    ):
        if pilot_kind not in PILOT_KINDS:
            raise ValueError(f"pilot_kind must be one of {PILOT_KINDS}, got {pilot_kind!r}.")
        if pilot_kind == "decoder_only" and num_hidden_layers < 2:
            raise ValueError(
                "A decoder-only Copilot needs num_hidden_layers >= 2: layer 1 is self-attention and layer 2 is "
                "the first one that reads the Pilot. Pass num_hidden_layers=2 or more."
            )
        if num_hidden_layers < 1:
            raise ValueError(f"A Copilot needs num_hidden_layers >= 1 (each layer reads the Pilot), got "
                             f"{num_hidden_layers}.")
        if hidden_size % num_attention_heads != 0 and head_dim is None:
            raise ValueError(
                f"hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_attention_heads}); "
                "change one of them or pass head_dim explicitly."
            )
        if correction == "rerank":
            raise ValueError(_retired("correction='rerank'") + " Use correction='vocabulary' (the paper's) or "
                             "'logit_residual'.")
        if correction not in CORRECTIONS:
            raise ValueError(f"correction must be one of {CORRECTIONS}, got {correction!r}.")
        for field, kept in RETIRED_FIELDS.items():  # a config saved before they were retired carries them
            if field in kwargs and (value := kwargs.pop(field)) != kept and kept is not None:
                raise ValueError(_retired(f"{field}={value!r}"))
        if lora is not None:
            lora = _lora_settings(lora)
        num_key_value_heads = num_key_value_heads or num_attention_heads
        if num_attention_heads % num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({num_key_value_heads})."
            )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.pilot_hidden_size = pilot_hidden_size or hidden_size
        self.pilot_kind = pilot_kind
        self.pilot_model_type = pilot_model_type
        self.pilot_name_or_path = pilot_name_or_path
        self.pilot_revision = pilot_revision
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.rope_parameters = rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        self.attention_bias = attention_bias
        self.attention_output_bias = attention_output_bias
        self.mlp_bias = mlp_bias
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.correction = correction
        self.lora = lora
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    @property
    def is_decoder_only_pilot(self) -> bool:
        return self.pilot_kind == "decoder_only"

    def attention_kinds(self) -> list[str]:
        """Per layer: ``"self"`` (self-attention), ``"cross"`` (cross-attention) or ``"self+cross"``."""
        if self.is_decoder_only_pilot:
            return ["self" if i % 2 == 0 else "cross" for i in range(self.num_hidden_layers)]
        return ["self+cross"] * self.num_hidden_layers


def _retired(option: str) -> str:
    return (f"{option} was an experimental option, retired after it measured no gain (docs/results.md, \"Every "
            f"hypothesis\"); hf_copilot at commit {RETIRED_AT} is the last that has it.")


def _lora_settings(lora) -> dict:
    """LoRA settings as a plain, JSON-serialisable dict (a ``peft.LoraConfig`` is accepted too)."""
    if hasattr(lora, "to_dict") and hasattr(lora, "peft_type"):
        lora = {key: getattr(lora, key) for key in ("r", "lora_alpha", "lora_dropout", "target_modules")}
    if not isinstance(lora, dict):
        raise TypeError(f"lora must be a dict of LoRA settings (r, lora_alpha, lora_dropout, target_modules) or a "
                        f"peft.LoraConfig; got {type(lora).__name__}.")
    unknown = set(lora) - {"r", "lora_alpha", "lora_dropout", "target_modules"}
    if unknown:
        raise ValueError(f"Unknown LoRA setting(s) {sorted(unknown)}: the Copilot takes r, lora_alpha, lora_dropout "
                         "and target_modules.")
    settings = {"r": 32, "lora_alpha": None, "lora_dropout": 0.0, "target_modules": list(LORA_TARGETS), **lora}
    if not isinstance(settings["r"], int) or settings["r"] < 1:
        raise ValueError(f"LoRA rank r must be a positive integer, got {settings['r']!r}.")
    settings["lora_alpha"] = settings["lora_alpha"] or 2 * settings["r"]
    if not 0 <= settings["lora_dropout"] < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), got {settings['lora_dropout']}.")
    settings["target_modules"] = sorted(settings["target_modules"])
    unknown_targets = set(settings["target_modules"]) - set(LORA_TARGETS)
    if unknown_targets or not settings["target_modules"]:
        raise ValueError(f"LoRA target_modules must be a non-empty subset of {LORA_TARGETS}; got "
                         f"{settings['target_modules']}.")
    return settings
