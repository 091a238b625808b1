"""What a Pilot looks like from outside: the model inside its wrappers, its kind, its decoder blocks and its
logits width. Shared by the Pilot reader (:mod:`hf_copilot.pilot`) and by ``CopilotModel.from_pilot`` /
``check_pilot``, so the model never imports the reader."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel


def unwrap_pilot(model: nn.Module) -> PreTrainedModel:
    """The underlying ``PreTrainedModel`` inside DDP / DeepSpeed (``.module``), ``torch.compile``
    (``._orig_mod``) and PEFT (``.get_base_model()``) wrappers.

    Not ``accelerate.utils.extract_model_from_parallel``: it leaves PEFT's wrapper in place, and wherever DeepSpeed
    is installed it imports it to check for its engine (0.8 s and an accelerator warning on this CPU machine, in
    every process that reads a Pilot, DeepSpeed in use or not). Looking for the wrappers' attributes needs neither.
    """
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module) and not isinstance(
            model, PreTrainedModel
        ):
            model = model.module
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"Expected a transformers PreTrainedModel as the Pilot (optionally wrapped by DDP, DeepSpeed, "
            f"torch.compile or PEFT); got {type(model).__name__}."
        )
    return model


def pilot_kind(model: PreTrainedModel) -> str:
    """``"encoder_decoder"`` or ``"decoder_only"``; any other model cannot be a Pilot."""
    if getattr(model.config, "is_encoder_decoder", False):
        return "encoder_decoder"
    if model.can_generate():
        return "decoder_only"
    raise ValueError(
        f"{type(model).__name__} cannot be a Pilot: the Copilot rectifies next-token predictions, so the Pilot must "
        "be a generative language model (a *ForCausalLM or an encoder-decoder *ForConditionalGeneration)."
    )


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The ``ModuleList`` of the Pilot's decoder blocks (Llama ``model.layers``, GPT2 ``transformer.h``, T5
    ``decoder.block``, ...), found from the block class the model itself declares."""
    block_names = set()
    hidden_source = getattr(model, "_can_record_outputs", None) or {}
    hidden_cls = hidden_source.get("hidden_states") if isinstance(hidden_source, dict) else None
    hidden_cls = getattr(hidden_cls, "target_class", hidden_cls)  # unwrap an OutputRecorder
    if hidden_cls is not None:
        block_names.add(hidden_cls if isinstance(hidden_cls, str) else getattr(hidden_cls, "__name__", ""))
    block_names.update(getattr(model, "_no_split_modules", None) or [])
    decoder = model.get_decoder()
    for module in decoder.modules():
        # Along the class hierarchy: FSDP2's fully_shard swaps a block's class for a subclass (FSDPLlamaDecoderLayer).
        if isinstance(module, nn.ModuleList) and len(module) and any(
                cls.__name__ in block_names for cls in type(module[0]).__mro__):
            return module
    raise ValueError(
        f"Could not find the decoder layers of {type(model).__name__}: expected a ModuleList of "
        f"{sorted(block_names) or 'declared blocks'} under model.get_decoder(). Please open an issue naming "
        "the model class."
    )


def logits_width(model: PreTrainedModel) -> int:
    """Number of logits the Pilot emits per token: its text config's ``vocab_size``.

    Not the output embedding's row count: under DeepSpeed ZeRO-3 a partitioned weight's shape reads ``[0]``. The
    models' own losses read the logits with this width too (a head of another width cannot train).
    """
    return model.config.get_text_config().vocab_size


def gathered_parameters(parameters):
    """A context in which ``parameters`` hold their full values: DeepSpeed ZeRO-3 partitions a model's parameters
    across ranks (each reads an empty tensor) and ``deepspeed.zero.GatheredParameters`` gathers them for reading.
    Any other parameter is already whole, and the context does nothing."""
    parameters = list(parameters)
    if not any(hasattr(parameter, "ds_id") for parameter in parameters):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(parameters, modifier_rank=None)


def whole(parameter: torch.Tensor) -> torch.Tensor:
    """``parameter``'s full value. FSDP2 (``fully_shard``) holds each rank's shard in a ``DTensor``, whose
    ``full_tensor()`` gathers the shards: a collective, so every rank must ask for the same parameters in the same
    order (each rank builds its own Copilot, so they do)."""
    return parameter.full_tensor() if isinstance(parameter, DTensor) else parameter


@dataclass(frozen=True)
class PilotSignature:
    """What a Copilot and a Mistake Log must share with the Pilot they serve: its kind, the logits it emits per
    token and its width. One value, so that every "does this fit" check asks the same question."""

    kind: str
    vocab_size: int
    hidden_size: int

    @classmethod
    def of_pilot(cls, model: nn.Module) -> PilotSignature:
        model = unwrap_pilot(model)
        return cls(pilot_kind(model), logits_width(model), model.config.get_text_config().hidden_size)

    @classmethod
    def of_copilot(cls, copilot) -> PilotSignature:
        """The signature of the Pilot a Copilot (or its config) was built for."""
        config = getattr(copilot, "config", copilot)
        return cls(config.pilot_kind, config.vocab_size, config.pilot_hidden_size)

    def mismatches(self, expected: PilotSignature, subject: str, expecting: str) -> list[str]:
        """One phrase per field where ``subject`` (this signature's holder, e.g. "the Pilot") differs from what
        ``expecting`` (e.g. "the Copilot") expects."""
        phrases = (("kind", "{} is {}"), ("vocab_size", "{} emits {} logits per token"), ("hidden_size", "{} has width {}"))
        return [f"{template.format(subject, getattr(self, name))} where {expecting} expects {getattr(expected, name)}"
                for name, template in phrases if getattr(self, name) != getattr(expected, name)]
