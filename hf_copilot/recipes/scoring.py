"""Scoring a Pilot with and without its Copilot: generated answers and exact match.

Answers are generated as text and parsed (no log-likelihood shortcut), as in the paper. Every rectified run is
compared item by item with the Pilot alone under the same decoding, so a table can say how many answers the
Copilot fixed and how many it broke, not only the net accuracy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor

from ..generation import CopilotLogitsProcessor, fuse_scores
from .prompts import prepare_tokenizer, prompt_batches
from .significance import PairedComparison
from .tasks import Example, TaskFormat


REFERENCE_FIELDS = {"p_value": None, "difference": 0.0, "interval": None}
"""The comparison fields of a Pilot-alone row: it is what the others are compared with."""


@dataclass(frozen=True)
class Decoding:
    """One way of decoding: the fusion weight λ (0 = the Pilot alone), the fusion space and the beam count (see
    :class:`~hf_copilot.CopilotLogitsProcessor`)."""

    lam: float = 0.0
    space: str = "probs"
    num_beams: int = 1

    @property
    def name(self) -> str:
        search = "greedy" if self.num_beams == 1 else f"beam{self.num_beams}"
        if self.lam == 0:
            return f"pilot {search}"
        return f"{self.space} λ={self.lam:g} {search}"


def _generate_batches(pilot, tokenizer, examples, task_format, *, num_beams: int, batch_size: int,
                      processor=None, progress_name: str | None = None):
    """Yields (indices into ``examples``, decoded continuations) batch by batch; a batch's ``generate()`` has
    finished when it is yielded."""
    device = next(pilot.parameters()).device
    batches = list(prompt_batches(examples, tokenizer, task_format, batch_size, device))
    for chosen, inputs in tqdm(batches, desc=progress_name, disable=progress_name is None, leave=False):
        output = pilot.generate(
            **inputs, max_new_tokens=task_format.max_new_tokens, do_sample=False, num_beams=num_beams,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            logits_processor=[processor] if processor else None,
        )
        yield chosen, tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def generate_answers(pilot, tokenizer, examples: list[Example], task_format: TaskFormat, *, copilot=None,
                     decoding: Decoding = Decoding(), batch_size: int = 16, progress: bool = False) -> list[str]:
    """The decoded continuation of each example's prompt, in the order of ``examples``."""
    prepare_tokenizer(tokenizer)
    if decoding.lam > 0 and copilot is None:
        raise ValueError(f"Decoding {decoding.name!r} fuses a Copilot, but no copilot was given.")
    processor = (CopilotLogitsProcessor(copilot, pilot, lam=decoding.lam, space=decoding.space)
                 if decoding.lam else None)
    answers: list[str] = [""] * len(examples)
    try:
        for chosen, texts in _generate_batches(pilot, tokenizer, examples, task_format, num_beams=decoding.num_beams,
                                               batch_size=batch_size, processor=processor,
                                               progress_name=decoding.name if progress else None):
            for index, text in zip(chosen, texts):
                answers[index] = text
    finally:
        if processor:
            processor.close()
    return answers


class _GreedyScreen(LogitsProcessor):
    """Follows the Pilot's own greedy path and notes, for each rectified greedy decoding, the rows where the fused
    argmax would leave that path before the row's answer ends.

    The Copilot's corrections do not depend on λ or space, and greedy rectification picks the Pilot's token
    wherever the fused argmax agrees with it, so a row that never diverges decodes exactly as the Pilot does: only
    the rows that diverge need a rectified ``generate()`` of their own, and one Pilot pass screens every greedy λ.
    """

    def __init__(self, processor: CopilotLogitsProcessor, decodings: list[Decoding], eos_token_id: int):
        self.processor, self.decodings, self.eos_token_id = processor, decodings, eos_token_id
        self.reset()

    def reset(self) -> None:
        """Forget the last batch: the next call starts a new ``generate()`` (its ``input_ids`` are the prompts)."""
        self.prompt_length: int | None = None
        self.diverged: dict[Decoding, torch.Tensor] = {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
            self.diverged = {d: torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
                             for d in self.decodings}
        corrections = self.processor.step_corrections(input_ids)
        answering = ~(input_ids[:, self.prompt_length:] == self.eos_token_id).any(-1)
        pilot_choice = scores.argmax(-1)
        for decoding in self.decodings:
            fused = fuse_scores(scores, corrections, decoding.lam, decoding.space)
            self.diverged[decoding] |= answering & (fused.argmax(-1) != pilot_choice)
        return scores


@torch.no_grad()
def _screened_greedy(pilot, tokenizer, examples, task_format, decodings, copilot, batch_size, progress):
    """The Pilot's greedy answers and those of each rectified greedy decoding, from one screening pass plus a
    rectified ``generate()`` over only the rows that leave the Pilot's path (see :class:`_GreedyScreen`)."""
    pilot_answers: list[str] = [""] * len(examples)
    diverging: dict[Decoding, list[int]] = {d: [] for d in decodings}
    with CopilotLogitsProcessor(copilot, pilot) as processor:
        screen = _GreedyScreen(processor, decodings, tokenizer.eos_token_id)
        for chosen, texts in _generate_batches(pilot, tokenizer, examples, task_format, num_beams=1,
                                               batch_size=batch_size, processor=screen,
                                               progress_name="pilot greedy, screening" if progress else None):
            for index, text in zip(chosen, texts):
                pilot_answers[index] = text
            for decoding, rows in screen.diverged.items():
                diverging[decoding] += [chosen[row] for row in rows.nonzero().flatten().tolist()]
            screen.reset()
    answers = {Decoding(): pilot_answers}
    for decoding, indices in diverging.items():
        answers[decoding] = list(pilot_answers)
        if indices:
            rectified = generate_answers(pilot, tokenizer, [examples[i] for i in indices], task_format,
                                         copilot=copilot, decoding=decoding, batch_size=batch_size, progress=progress)
            for index, text in zip(indices, rectified):
                answers[decoding][index] = text
    return answers


def evaluate_decodings(pilot, tokenizer, examples: list[Example], task_format: TaskFormat, decodings, *,
                       copilot=None, batch_size: int = 16, progress: bool = False,
                       on_answers: Callable[[dict[Decoding, list[str]]], None] | None = None) -> list[dict]:
    """Accuracy of each decoding, with ``fixed``/``broken`` counted against the Pilot alone at the same beams.

    ``on_answers``, when given, sees the answers of every decoding finished so far each time more finish, so that a
    long evaluation can be written out as it goes.

    Returns one row per decoding: its fields, ``accuracy``, ``correct``, ``total``, ``fixed``, ``broken``, the paired
    comparison with the Pilot alone (``p_value`` of the exact McNemar test, accuracy ``difference`` and its 95%
    ``interval``, as fractions; see :mod:`.significance`) and the generations themselves (``answers``). The Pilot's
    own rows are the reference: difference 0, no p-value or interval.
    """
    decodings = list(decodings)
    if copilot is None and any(d.lam > 0 for d in decodings):
        raise ValueError(f"Decodings {[d.name for d in decodings if d.lam > 0]} fuse a Copilot, but no copilot "
                         "was given.")
    prepare_tokenizer(tokenizer)
    baselines = {Decoding(num_beams=d.num_beams) for d in decodings}
    rectified_greedy = [d for d in dict.fromkeys(decodings) if d.lam > 0 and d.num_beams == 1]
    answers: dict[Decoding, list[str]] = {}
    if rectified_greedy:
        answers.update(_screened_greedy(pilot, tokenizer, examples, task_format, rectified_greedy, copilot,
                                        batch_size, progress))
        if on_answers is not None:
            on_answers(answers)
    for decoding in sorted(baselines, key=lambda d: d.num_beams) + [d for d in decodings if d not in baselines]:
        if decoding not in answers:
            answers[decoding] = generate_answers(pilot, tokenizer, examples, task_format, copilot=copilot,
                                                 decoding=decoding, batch_size=batch_size, progress=progress)
            if on_answers is not None:
                on_answers(answers)
    correct = {d: [task_format.is_correct(text, ex) for text, ex in zip(texts, examples)]
               for d, texts in answers.items()}
    rows = []
    for decoding in decodings:
        mine, base = correct[decoding], correct[Decoding(num_beams=decoding.num_beams)]
        comparison = PairedComparison.from_outcomes(mine, base)
        rows.append({
            **asdict(decoding), "decoding": decoding.name, "accuracy": sum(mine) / len(mine), "correct": sum(mine),
            "total": len(mine), "fixed": comparison.fixed, "broken": comparison.broken,
            **(comparison.fields() if decoding.lam else REFERENCE_FIELDS), "answers": answers[decoding],
        })
    return rows
