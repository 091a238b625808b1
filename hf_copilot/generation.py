"""CopilotLogitsProcessor: the Copilot rectifies the Pilot's next-token scores inside an ordinary ``generate()``.

Each time ``generate()`` asks for processed scores, the Pilot has just run one forward; a :class:`PilotTap` captured
its X̃ and h̄ for the new positions. The processor runs the Copilot incrementally on those positions (its own
:class:`CopilotCache` and padding mask), reads the correction ``f`` at the last position and fuses it with the
scores. The Copilot's inputs follow training, where prompt labels are masked: zero error over the prompt, then at
each generated position the Copilot's own previous correction (a stand-in for the unknown true error).

Where the processor runs in transformers 5.24: ``generate()`` places user processors after its built-in ones
(repetition penalty, min-length, bad words, ...) and before the sampling warpers (temperature, top-k, top-p, min-p,
typical, ...) and the final ``LogitNormalization``. So temperature and truncation apply to the fused scores, and
tokens a built-in processor banned (score ``-inf``) stay banned after fusion. Greedy search and sampling pass raw
logits; beam search passes log-probabilities (log-softmax of the logits) of the flattened ``(batch * beams)`` rows.

The processor never sees ``beam_idx``, the cache position or the start of a ``generate()`` call, so it infers them:

* a new call: no state yet, a multi-position Pilot forward (the prompt), a batch size change, ``input_ids`` that do
  not extend the previous call's by exactly one token, or a row whose prefix matches no previous row;
* beam reordering: each row's parent is a previous row equal to ``input_ids[:, :-1]`` (duplicates are harmless:
  the same prefix means the same Copilot state). For an encoder-decoder Pilot, rows only match within the same
  source sequence, since decoder prefixes alone (a start token) do not tell the batch items apart.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from .modeling_copilot import CopilotCache, CopilotModel, OwnCorrections
from .pilot import PilotTap
from .pilot_record import PilotRecord

FUSION_SPACES = ("probs", "logits")

CONTINUOUS_BATCHING = (
    "A CopilotLogitsProcessor is open on this Pilot, but continuous batching (generate_batch, "
    "init_continuous_batching, transformers serve) does not run user logits processors, so the Copilot cannot "
    "rectify these requests. Generate with pilot.generate(..., logits_processor=[processor]), or close() the "
    "processor to generate without the Copilot."
)
"""Continuous batching passes paged-attention arguments (``block_table``, ``logits_indices``) to each forward."""

UNSUPPORTED_DECODING = (
    "Assisted, speculative and prompt-lookup decoding (assistant_model=..., prompt_lookup_num_tokens=...) are not "
    "supported by CopilotLogitsProcessor: they run the processor on a draft model and verify several positions per "
    "Pilot forward, which the Copilot cannot follow. Use greedy search, sampling or beam search."
)


@dataclass
class _DecodingState:
    """What the processor remembers between the steps of one ``generate()`` call (rows = batch * beams)."""

    cache: CopilotCache
    attention_mask: torch.Tensor  # (rows, positions so far): the Copilot's own 2D padding mask
    input_ids: torch.Tensor  # (rows, positions so far) as seen at the last step, to find beam parents
    feedback: torch.Tensor  # (rows, 1, d or |V|): the last correction, the Copilot's input at the next position
    source_groups: torch.Tensor  # (rows,): rows sharing a source sequence (encoder-decoder beam matching)


class CopilotLogitsProcessor(LogitsProcessor):
    """Fuses a Copilot's corrections into the Pilot's scores during ``pilot.generate()``.

    Args:
        copilot: a :class:`CopilotModel` built for ``pilot`` (a Copilot in train mode is switched to eval mode).
        pilot: the Pilot that ``generate()`` runs; hooks are attached to it until :meth:`close`.
        lam: the fusion weight λ in [0, :data:`MAX_LAM`]; ``0`` returns the scores unchanged. Checked again when
            the attribute is set later.
        space: ``"probs"`` (paper Eq. 8: ``softmax(scores) + λ f``, clamped positive, renormalised, returned as log)
            or ``"logits"`` (``scores + λ f``).
        top_analysis: when ``n > 0``, :attr:`analysis` holds one dict per step of the current ``generate()`` call
            with the top-n tokens of the fused scores (``token_ids``) and, for those tokens, the Pilot's scores
            (``pilot_scores``), the Copilot's corrections (``corrections``) and the fused scores (``fused_scores``),
            each (rows, n) on the CPU.

    Usage::

        with CopilotLogitsProcessor(copilot, pilot, lam=1.0) as processor:
            out = pilot.generate(**inputs, logits_processor=[processor])

    One instance can serve many ``generate()`` calls in turn (it resets itself at each new call), not several at
    once. Other Pilot forwards outside training (evaluation, plain calls) are captured too while it is open (the
    last two kept); close it when done.
    """

    supports_continuous_batching = False  # it follows each sequence's Copilot state from one call to the next

    def __init__(self, copilot: CopilotModel, pilot, lam: float = 1.0, space: str = "probs", top_analysis: int = 0):
        copilot.check_pilot(pilot)
        check_space(space)
        if isinstance(top_analysis, bool) or not isinstance(top_analysis, int) or top_analysis < 0:
            raise ValueError(f"top_analysis must be an int >= 0 (0 disables the analysis); got {top_analysis!r}.")
        self.copilot = copilot
        self.lam = lam
        self.space = space
        self.top_analysis = top_analysis
        self.analysis: list[dict[str, torch.Tensor]] = []
        # Two records tell one Pilot forward per step from several; keeping no more bounds what an open processor
        # holds while the Pilot runs other forwards (evaluation) between generate() calls. Training forwards are
        # never recorded in this mode.
        self.tap = PilotTap(pilot, mode="generate", max_records=2).attach()
        self._refusal = self.tap.model.register_forward_pre_hook(_refuse_continuous_batching, with_kwargs=True)
        self._state: _DecodingState | None = None

    @property
    def lam(self) -> float:
        """The fusion weight λ, checked whenever it is set (0 ≤ λ ≤ :data:`MAX_LAM`)."""
        return self._lam

    @lam.setter
    def lam(self, lam: float):
        self._lam = check_lam(lam)

    def close(self) -> None:
        """Removes the hooks from the Pilot and forgets the decoding state."""
        self._refusal.remove()
        self.tap.detach()
        self.tap.pop_records()
        self._state = None

    def __enter__(self) -> CopilotLogitsProcessor:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        corrections = self.step_corrections(input_ids)
        fused = fuse_scores(scores, corrections, self.lam, self.space)
        if self.top_analysis:
            self._analyse(scores, corrections, fused)
        return fused

    @torch.no_grad()
    def step_corrections(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Advances the Copilot over the Pilot forward of this ``generate()`` step and returns its corrections at
        the last position, (rows, |V|): what :meth:`__call__` fuses, for callers that fuse several ways at once."""
        if not self.tap.attached:
            raise RuntimeError("This CopilotLogitsProcessor was closed; create a new one.")
        return self._advance(input_ids, self._this_steps_record(input_ids))

    def _this_steps_record(self, input_ids: torch.Tensor) -> PilotRecord:
        """The Pilot forward behind these scores: exactly one since the last call, or a fresh prompt forward
        (earlier records then come from forwards outside this processor's generate() calls and are dropped)."""
        records = self.tap.pop_records()
        if not records:
            raise RuntimeError("CopilotLogitsProcessor was called without a Pilot forward since its last call. "
                               + UNSUPPORTED_DECODING + " (Or the processor was given to another model's generate().)")
        record = records[-1]
        is_prompt = tuple(record.hidden_states.shape[:2]) == tuple(input_ids.shape)
        if len(records) > 1 and not is_prompt:
            raise RuntimeError(f"CopilotLogitsProcessor saw {len(records)} Pilot forwards since its last call, "
                               "expected one. " + UNSUPPORTED_DECODING)
        return record

    def _advance(self, input_ids: torch.Tensor, record: PilotRecord) -> torch.Tensor:
        """Runs the Copilot on the record's new positions; returns the last position's corrections (rows, |V|)."""
        state = self._state
        parents = None
        if state is not None and input_ids.shape == (state.input_ids.shape[0], state.input_ids.shape[1] + 1):
            parents = self._parents(input_ids, state)
        if parents is not None and record.hidden_states.shape[1] > 1 and record.use_cache is not False:
            parents = None  # a new generate() continuing from a previous output: its prompt is that output
        if parents is not None and record.hidden_states.shape[1] > 1:
            raise RuntimeError(
                "The Pilot re-read the whole sequence for one new token: generate(use_cache=False) is not supported "
                "by CopilotLogitsProcessor (it cannot tell those steps from a new prompt). Generate with "
                "use_cache=True (the default)."
            )
        if parents is None:
            return self._start(input_ids, record)

        if not torch.equal(parents, torch.arange(len(parents), device=parents.device)):
            state.cache.reorder_cache(parents)
            state.attention_mask = state.attention_mask[parents]
            state.feedback = state.feedback[parents]
        state.attention_mask = torch.nn.functional.pad(state.attention_mask, (0, 1), value=1)
        output = self.copilot(
            pilot_hidden_states=record.hidden_states,
            pilot_input_states=record.input_states if record.kind == "decoder_only" else None,
            input_errors=self._as_input_errors(state.feedback),
            attention_mask=state.attention_mask,
            cache=state.cache,
            use_cache=True,
            **self._pilot_distribution(record),
        )
        state.input_ids = input_ids
        state.feedback = self._feedback(output)
        return output.corrections[:, -1]

    def _start(self, input_ids: torch.Tensor, record: PilotRecord) -> torch.Tensor:
        """A new generate() call: the record is the prompt forward; the Copilot reads it with zero input errors."""
        rows, length = input_ids.shape
        if tuple(record.hidden_states.shape[:2]) != (rows, length):
            raise RuntimeError(
                f"CopilotLogitsProcessor expected the Pilot forward of a new generate() call to cover the whole "
                f"decoder sequence {(rows, length)}; it covered {tuple(record.hidden_states.shape[:2])}. "
                + UNSUPPORTED_DECODING + " A generate() that continues from a pre-filled past_key_values is not "
                "supported either."
            )
        if self.copilot.training:
            warnings.warn("CopilotLogitsProcessor: the Copilot was in train mode (its dropout would make every "
                          "generation differ); it is switched to eval mode.", RuntimeWarning, stacklevel=4)
            self.copilot.eval()
        mask = _prompt_mask(record, input_ids)
        output = self.copilot(
            pilot_hidden_states=record.hidden_states,
            pilot_input_states=record.input_states,
            input_errors=None,
            attention_mask=mask,
            pilot_input_mask=record.input_mask if record.kind == "encoder_decoder" else None,
            cache=CopilotCache(),
            use_cache=True,
            corrections_to_keep=1,  # only the last prompt position's correction is used
            **self._pilot_distribution(record),
        )
        self._state = _DecodingState(
            cache=output.cache,
            attention_mask=mask,
            input_ids=input_ids,
            feedback=self._feedback(output),
            source_groups=_source_groups(record),
        )
        self.analysis = []
        return output.corrections[:, -1]

    def _feedback(self, output) -> torch.Tensor:
        """The last correction as the Copilot will read it next: d-wide head inputs when the correction is linear
        in them (see :class:`OwnCorrections`), else the |V|-wide correction itself."""
        if self.copilot.config.correction == "vocabulary":
            return output.last_hidden_state[:, -1:]
        return output.corrections[:, -1:]

    def _as_input_errors(self, feedback: torch.Tensor):
        return OwnCorrections(feedback) if self.copilot.config.correction == "vocabulary" else feedback

    def _pilot_distribution(self, record: PilotRecord) -> dict:
        """What the correction reads of the Pilot's own prediction: for a logit-residual Copilot, its raw logits at
        the positions it computed them for (the last ones; as in training, before any other processor or beam
        search's log-softmax)."""
        return {"pilot_logits": record.logits} if self.copilot.config.correction == "logit_residual" else {}

    @staticmethod
    def _parents(input_ids: torch.Tensor, state: _DecodingState) -> torch.Tensor | None:
        """For each row, a previous row whose sequence is this row's prefix (None when some row has none)."""
        prefixes = input_ids[:, :-1]
        if torch.equal(prefixes, state.input_ids):
            return torch.arange(len(prefixes), device=prefixes.device)
        groups = state.source_groups
        matches = (prefixes[:, None, :] == state.input_ids[None, :, :]).all(-1) & (groups[:, None] == groups[None, :])
        if not matches.any(-1).all():
            return None
        return matches.int().argmax(-1)  # the first matching row

    def _analyse(self, scores: torch.Tensor, corrections: torch.Tensor, fused: torch.Tensor) -> None:
        top = fused.topk(min(self.top_analysis, fused.shape[-1]), dim=-1)
        self.analysis.append({
            "token_ids": top.indices.cpu(),
            "pilot_scores": scores.gather(-1, top.indices).cpu(),
            "corrections": corrections.to(scores.dtype).gather(-1, top.indices).cpu(),
            "fused_scores": top.values.cpu(),
        })


MAX_LAM = 1e4
"""The largest fusion weight accepted. Corrections are of order 1 and scores of order 10: beyond this the Copilot
alone decides every token, and λ × a correction can overflow half precision."""


def check_lam(lam) -> float:
    """``lam`` as a float, or a ValueError when it is not a usable fusion weight."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or not 0 <= lam <= MAX_LAM:
        raise ValueError(f"lam (the fusion weight λ) must be a finite number in [0, {MAX_LAM:g}]; got {lam!r}.")
    return float(lam)


def check_space(space, option: str = "space") -> str:
    """``space`` when it is a fusion space, or a ValueError naming ``option`` (the argument it came from)."""
    if space not in FUSION_SPACES:
        raise ValueError(f"{option} must be one of {FUSION_SPACES}; got {space!r}.")
    return space


def fuse_scores(scores: torch.Tensor, corrections: torch.Tensor, lam: float, space: str = "probs") -> torch.Tensor:
    """The Pilot's next-token scores rectified by λ × the Copilot's corrections (see
    :class:`CopilotLogitsProcessor` for the two spaces); tokens scored ``-inf`` stay banned.

    Works in place on one fresh (rows, |V|) tensor: with many rows (beam search over a batch) every extra pass and
    allocation over the vocabulary is a visible share of a generated token's cost.
    """
    if lam == 0:
        return scores
    corrections = corrections.to(scores.dtype)
    if space == "logits":
        return torch.add(scores, corrections, alpha=lam)  # a banned token's -inf stays -inf
    probs = torch.softmax(scores, dim=-1)
    probs.add_(corrections, alpha=lam).clamp_(min=torch.finfo(probs.dtype).tiny)
    probs.masked_fill_(scores == float("-inf"), 0.0)  # banned by an earlier processor (min-length, bad words)
    return probs.div_(probs.sum(-1, keepdim=True)).log_()


def fused_choice(scores: torch.Tensor, corrections: torch.Tensor, lam: float, space: str = "probs") -> torch.Tensor:
    """The token :func:`fuse_scores` ranks first in each row, without building its normalised log-probabilities
    (clamping, renormalising and the log are monotone, so they cannot change which token is first): half the passes
    over the vocabulary, which dominate when many positions are scored at once. Tokens scored ``-inf`` stay banned.
    Works in place on ``scores`` when ``space="logits"``."""
    # max(-1).indices, not argmax: the same first maximum, about 3x faster on a CPU (measured on 1024 x 8192).
    if space == "logits":
        return scores.add_(corrections.to(scores.dtype), alpha=lam).max(-1).indices
    fused = torch.softmax(scores, dim=-1).add_(corrections.to(scores.dtype), alpha=lam)
    return fused.masked_fill_(torch.isneginf(scores), float("-inf")).max(-1).indices


def _refuse_continuous_batching(module, args, kwargs):
    if "block_table" in kwargs or "logits_indices" in kwargs:
        raise RuntimeError(CONTINUOUS_BATCHING)


def _prompt_mask(record: PilotRecord, input_ids: torch.Tensor) -> torch.Tensor:
    """The 2D padding mask (rows, prompt length) of the prompt forward, whatever form the Pilot received it in."""
    rows, length = input_ids.shape
    mask = record.attention_mask
    if mask is None:  # generate() drops an all-ones mask; T5 decoders get none
        return torch.ones(rows, length, dtype=torch.long, device=input_ids.device)
    if mask.dim() == 2:
        return mask[:, -length:].long()
    # A 4D mask (static caches): a key is a real token when the prompt's last query may attend to it.
    last_query = mask[:, 0, -1, :length]
    visible = last_query if last_query.dtype == torch.bool else last_query == 0
    return visible.long()


def _source_groups(record: PilotRecord) -> torch.Tensor:
    """Rows with the same source sequence share a group id; a decoder-only Pilot has one source (its prompt is
    part of input_ids, so prefix matching alone keeps the batch items apart)."""
    rows = record.hidden_states.shape[0]
    if record.kind == "decoder_only":
        return torch.zeros(rows, dtype=torch.long, device=record.hidden_states.device)
    source = record.input_states.flatten(1).float()
    if record.input_mask is not None:
        source = torch.cat([source, record.input_mask.float()], dim=-1)
    return torch.unique(source, dim=0, return_inverse=True)[1]
