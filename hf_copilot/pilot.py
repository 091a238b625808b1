"""Reading a Pilot: :class:`PilotTap` captures its states, logits and labels through forward hooks, the only reader
of a Pilot's forward (:mod:`~hf_copilot.pilot_shape` knows how models are wrapped and where their layers are)."""

from __future__ import annotations

import functools
import inspect
import itertools
import time
import warnings
from collections import deque
from dataclasses import dataclass, replace

import torch
from torch import nn

from .errors import CompactErrors
from .pilot_record import PilotRecord
from .pilot_shape import decoder_layers, logits_width, pilot_kind, unwrap_pilot

LOGIT_SCALES = ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")
"""Config fields by which some models (Cohere, Granite, Falcon-H1, ...) scale the LM head's output."""
HEAD_BLOCK_BYTES = 64 * 2**20
"""fp32 logits the tap builds at once when it has to run the Pilot's LM head itself (TRL's fused head)."""


@dataclass
class _OpenForward:
    """The state of the Pilot forward in flight, filled in by the layer hooks."""

    labels: torch.Tensor | None
    labels_aligned: bool
    attention_mask: torch.Tensor | None
    input_mask: torch.Tensor | None
    position_ids: torch.Tensor | None = None
    cu_seq_lens: torch.Tensor | None = None
    use_cache: bool | None = None
    input_states: torch.Tensor | None = None
    final_states: torch.Tensor | None = None  # the backbone's output, the LM head's input
    hidden_sum: torch.Tensor | None = None
    layers_seen: int = 0
    last_layer: int = -1


TAP_MODES = ("train", "generate")


class PilotTap:
    """Reads a Pilot through forward hooks: X̃, h̄, logits and labels of each recorded forward.

    ``mode="train"`` records only real training forwards (``module.training and torch.is_grad_enabled()``), so
    evaluation, ``generate()`` and ``no_grad`` forwards pass by unrecorded; a training forward without labels
    raises (the errors could not be computed). ``mode="generate"`` records all the others (``generate()``,
    evaluation, ``no_grad`` forwards), for the Copilot at inference time, so a processor left open while the Pilot
    trains holds none of the training forwards' logits. ``mode`` is a plain attribute: change it without
    re-attaching (hooks are added once per run and never mid-run, which DeepSpeed ZeRO-3 relies on).

    Records hold references to the forward's tensors (its logits included) until :meth:`pop_records` hands them
    over: pop them every step, or bound them with ``max_records`` (the newest ones are kept). Under
    ``torch.compile`` the hooks are compiled with the forward, without graph breaks; popping after every forward
    also keeps them from recompiling (the list's length is part of what the compiled hook checks).

    With ``errors_top_k=k`` a recorded forward that has labels keeps its compact top-k errors instead of its
    logits, computed in the hook right after the forward: the |V|-wide logits (B·T·|V|·4 bytes, 400 MB for SmolLM2
    at 8×256) are then free before the backward runs, instead of being held through it. Joint training
    (:class:`~hf_copilot.CopilotCallback`) uses this. A forward that returns no logits (TRL's fused LM head) is
    read through its LM head's input instead (see :meth:`_errors_from_head`); a packed row keeps its
    ``position_ids`` so that the Mistake Log can split it into its documents.

    With ``max_pending=n`` a forward that finds ``n`` records not yet popped drops them all and detaches the tap
    (with a warning): whoever popped them has stopped, and the records would otherwise pile up for good.

    Only forwards of the top-level model are recorded: a decoder layer running outside one (an
    activation-checkpoint recompute during backward, a direct call) is ignored, and a layer that runs twice
    within one forward counts once.

    Usage::

        pilot.train()  # from_pretrained returns a model in eval mode, whose forwards mode="train" passes by
        with PilotTap(pilot) as tap:
            loss = pilot(**batch).loss
            (record,) = tap.pop_records()
    """

    def __init__(self, pilot: nn.Module, mode: str = "train", errors_top_k: int | None = None,
                 max_pending: int | None = None, max_records: int | None = None):
        if errors_top_k is not None and errors_top_k < 1:
            raise ValueError(f"errors_top_k must be a positive number of probabilities to keep, or None; got "
                             f"{errors_top_k}.")
        self.model = unwrap_pilot(pilot)
        self.kind = pilot_kind(self.model)
        self.layers = decoder_layers(self.model)
        self.mode = mode
        self.errors_top_k = errors_top_k
        self.max_pending = max_pending
        self.seconds = 0.0  # wall-clock time the hooks spent computing errors, so far (eager forwards only)
        if max_records is not None and max_records < 1:
            raise ValueError(f"max_records must be a positive number of records to keep, or None; got {max_records}.")
        self.records: deque[PilotRecord] = deque(maxlen=max_records)
        self._handles = []
        self._open: _OpenForward | None = None
        parameters = inspect.signature(self.model.forward).parameters.values()
        self._positional_names = [
            p.name for p in itertools.takewhile(
                lambda p: p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD), parameters)
        ]

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str):
        if mode not in TAP_MODES:
            raise ValueError(f"PilotTap mode must be one of {TAP_MODES}, got {mode!r}.")
        self._mode = mode

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> PilotTap:
        """Registers the hooks (once: attaching an attached tap does nothing)."""
        if self._handles:
            return self
        self._handles.append(self.model.register_forward_pre_hook(self._before_pilot, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._after_pilot, with_kwargs=True))
        if self.kind == "decoder_only":
            self._handles.append(self.layers[0].register_forward_pre_hook(self._before_first_layer, with_kwargs=True))
            if self.model.base_model is not self.model:
                self._handles.append(self.model.base_model.register_forward_hook(self._after_backbone))
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(functools.partial(self._after_layer, index)))
        return self

    def detach(self) -> None:
        """Removes the hooks; recorded data stays in :attr:`records`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._open = None

    def __enter__(self) -> PilotTap:
        return self.attach()

    def __exit__(self, *exc_info) -> None:
        self.detach()

    def pop_records(self) -> list[PilotRecord]:
        """The records captured since the last call, oldest first."""
        records, self.records = list(self.records), deque(maxlen=self.records.maxlen)
        return records

    def _before_pilot(self, module, args, kwargs):
        self._open = None
        if (self.mode == "train") != (module.training and torch.is_grad_enabled()):
            return
        inputs = dict(zip(self._positional_names, args), **kwargs)
        labels, aligned = inputs.get("shift_labels"), True
        if labels is None:
            labels, aligned = inputs.get("labels"), self.kind == "encoder_decoder"
        if labels is None and self.mode == "train":
            raise RuntimeError(
                "PilotTap saw a training forward of the Pilot without `labels`, so it cannot compute the Pilot's "
                "errors for the Copilot. Trainer removes `labels` from the model inputs when `compute_loss_func` is "
                "set or `label_smoothing_factor` > 0: drop `compute_loss_func` / set `label_smoothing_factor=0`, or "
                "otherwise make sure the Pilot receives `labels` (or `shift_labels`). If this forward is not a "
                "training step of the Pilot, run it under torch.no_grad() or in eval mode."
            )
        if self.kind == "encoder_decoder":
            attention_mask, input_mask = inputs.get("decoder_attention_mask"), inputs.get("attention_mask")
        else:
            attention_mask, input_mask = inputs.get("attention_mask"), None
        self._open = _OpenForward(labels, aligned, attention_mask, input_mask, inputs.get("position_ids"),
                                  inputs.get("cu_seq_lens_q"), use_cache=inputs.get("use_cache"))

    def _before_first_layer(self, module, args, kwargs):
        forward = self._open
        if forward is not None and forward.input_states is None:
            forward.input_states = args[0] if args else kwargs["hidden_states"]

    def _after_backbone(self, module, args, output):
        if self._open is not None:
            self._open.final_states = getattr(output, "last_hidden_state", None)

    def _after_layer(self, index, module, args, output):
        forward = self._open
        if forward is None or index <= forward.last_layer:
            return
        hidden = (output[0] if isinstance(output, tuple) else output).detach().float()
        # A running sum (never in place: the layer output is the next layer's input), not a list of all layers.
        forward.hidden_sum = hidden if forward.hidden_sum is None else forward.hidden_sum + hidden
        forward.layers_seen += 1
        forward.last_layer = index

    def _after_pilot(self, module, args, kwargs, output):
        forward, self._open = self._open, None
        if forward is None:
            return
        record = self._record(module, forward, output)
        compact = self.errors_top_k is not None and record.labels is not None
        if compact or record.logits is None:
            # Timed in eager mode only: a clock read would break a torch.compile graph (there the time counts as
            # the Pilot's forward).
            timed = not torch.compiler.is_compiling()
            started = time.perf_counter() if timed else 0.0
            if compact:
                record = self._compacted(module, forward, record)
            else:  # TRL's fused head, and no compaction asked for: the logits themselves, from the head's input
                record = replace(record, logits=self._head_logits(module)(forward.final_states.detach()))
            if timed:
                self.seconds += time.perf_counter() - started
        if self.max_pending is not None and len(self.records) >= self.max_pending:
            self._abandon()
            return
        self.records.append(record)

    def _record(self, module, forward: _OpenForward, output) -> PilotRecord:
        """The record of the forward that just ended, as the Pilot returned it (its logits, when it returned any)."""
        logits = getattr(output, "logits", None)
        if logits is None and forward.final_states is None:
            raise RuntimeError(
                f"PilotTap needs the Pilot's logits or the final hidden states its LM head reads; "
                f"{type(module).__name__} returned {type(output).__name__} without logits and its backbone did not "
                "return `last_hidden_state`. Do not pass return_dict=False to the Pilot."
            )
        if self.kind == "encoder_decoder":
            # The output carries the encoder states this forward used, also when generate() passed
            # `encoder_outputs` in (already expanded for beams), where the encoder itself ran outside this forward.
            forward.input_states = getattr(output, "encoder_last_hidden_state", None)
        if forward.input_states is None or forward.hidden_sum is None:
            raise RuntimeError(
                f"PilotTap could not read the input representation or the decoder layers of "
                f"{type(module).__name__} during this forward. Please open an issue naming the model class."
            )
        return PilotRecord(
            kind=self.kind,
            input_states=forward.input_states.detach(),
            hidden_states=forward.hidden_sum / forward.layers_seen,
            logits=None if logits is None else logits.detach(),
            labels=forward.labels,
            labels_aligned=forward.labels_aligned,
            attention_mask=forward.attention_mask,
            input_mask=forward.input_mask,
            vocab_size=logits_width(module),
            position_ids=forward.position_ids,
            use_cache=forward.use_cache,
            cu_seq_lens=forward.cu_seq_lens,
        )

    def _compacted(self, module, forward: _OpenForward, record: PilotRecord) -> PilotRecord:
        """``record`` with compact top-k errors in place of its logits (from the LM head's input when the forward
        returned none), so that the |V|-wide logits are free before the backward."""
        if record.logits is not None:
            errors = record.errors(self.errors_top_k)  # from detached logits: no graph is built
        else:
            errors = self._errors_from_head(module, forward.final_states.detach(), record)
        return replace(record, logits=None, compact_errors=errors)

    def _abandon(self) -> None:
        """Nobody collects the records any more (the loop that popped them stopped, e.g. an interrupted
        ``Trainer.train()``): drop them and detach, so the Pilot no longer pays for a tap that feeds nothing."""
        warnings.warn(
            f"PilotTap: {len(self.records)} records were never collected with pop_records() (did the training loop "
            "that collects them stop, e.g. an interrupted Trainer.train()?). The tap drops them and detaches from "
            "the Pilot; a new train() attaches a fresh one.", RuntimeWarning, stacklevel=2)
        self.records.clear()
        self.detach()

    @torch.no_grad()
    def _errors_from_head(self, module, states, record: PilotRecord) -> CompactErrors:
        """The compact errors of a forward that returned no logits, from its LM head's input.

        TRL's trainers (SFTTrainer, DPO, GRPO, ...) patch the Pilot's forward with a fused LM head
        (``trl.trainer.utils.add_fused_lm_head``) that returns per-token log-probabilities of the labels only, and
        TRL offers no switch to turn it off; forcing the plain head would change how the Pilot is trained. So the
        tap reads the backbone's output and runs the LM head once more, without gradient, over blocks of
        positions, turning each block's logits into compact errors at once: the |V|-wide logits never exist
        whole, which is what the fused head is for. The cost is one forward through the head, 2·d·|V| FLOPs per
        token and no backward: for SmolLM2-135M (d = 576, |V| = 49,152) 57 MFLOPs against about 6 × 135M = 810
        MFLOPs for the training step itself, about 7%.
        """
        logits_of = self._head_logits(module)
        labels = record.next_token_labels()
        flat_states, flat_labels = states.reshape(-1, states.shape[-1]), labels.reshape(-1)
        block = max(1, HEAD_BLOCK_BYTES // (4 * record.vocab_size))
        pieces = [CompactErrors.from_logits(logits_of(flat_states[i:i + block]), flat_labels[i:i + block],
                                            self.errors_top_k) for i in range(0, len(flat_labels), block)]
        ids, probs = (torch.cat([getattr(piece, name) for piece in pieces]).view(*labels.shape, -1)
                      for name in ("ids", "probs"))
        return CompactErrors(labels, ids, probs, torch.cat([piece.label_probs for piece in pieces]).view(labels.shape))

    @staticmethod
    def _head_logits(module):
        """The Pilot's logits as a function of its LM head's input (fp32, soft-capped as the model caps them);
        refuses a model that scales its logits in a way this does not reproduce."""
        text_config = module.config.get_text_config()
        scaled = [name for name in LOGIT_SCALES if getattr(text_config, name, None) not in (None, 1, 1.0)]
        if scaled:
            raise RuntimeError(
                f"{type(module).__name__} returned no logits (TRL's fused LM head), and it scales its logits after "
                f"the LM head ({', '.join(scaled)}) in a way PilotTap does not reproduce, so it cannot compute the "
                "Pilot's errors from the head's input. Train this Pilot with transformers' Trainer."
            )
        head = module.get_output_embeddings()
        softcap = getattr(text_config, "final_logit_softcapping", None)

        @torch.no_grad()
        def logits_of(block):
            logits = head(block).float()
            return torch.tanh(logits / softcap) * softcap if softcap else logits

        return logits_of
