"""Scoring a Pilot with and without its Copilot: generated answers, exact match, and the held-out diagnostic.

Answers are generated as text and parsed (no log-likelihood shortcut), as in the paper. Every rectified run is
compared item by item with the Pilot alone under the same decoding, so a table can say how many answers the
Copilot fixed and how many it broke, not only the net accuracy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor

from .errors import squared_error_norm
from .finetune import encode_example, prepare_tokenizer
from .generation import CopilotLogitsProcessor, fuse_scores
from .mistake_log import IGNORE_INDEX, MistakeLog
from .pilot import PilotRecord, PilotTap
from .tasks import Example, TaskFormat


@dataclass(frozen=True)
class Decoding:
    """One way of decoding: the fusion weight λ (0 = the Pilot alone), the fusion space, the beam count and the
    confidence gate (see :class:`~hf_copilot.CopilotLogitsProcessor`)."""

    lam: float = 0.0
    space: str = "probs"
    num_beams: int = 1
    gate: float | None = None

    @property
    def name(self) -> str:
        search = "greedy" if self.num_beams == 1 else f"beam{self.num_beams}"
        if self.lam == 0:
            return f"pilot {search}"
        gate = "" if self.gate is None else f" gate<{self.gate:g}"
        return f"{self.space} λ={self.lam:g}{gate} {search}"


def _batches(examples: list[Example], tokenizer, task_format: TaskFormat, batch_size: int, device):
    """Prompts grouped by length (less padding), yielding (original indices, left-padded inputs on ``device``)."""
    prompts = [tokenizer(task_format.prompt(example), add_special_tokens=False)["input_ids"] for example in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in chosen)
        ids = [[tokenizer.pad_token_id] * (width - len(prompts[i])) + prompts[i] for i in chosen]
        mask = [[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in chosen]
        yield chosen, {"input_ids": torch.tensor(ids, device=device),
                       "attention_mask": torch.tensor(mask, device=device)}


def _generate_batches(pilot, tokenizer, examples, task_format, *, num_beams: int, batch_size: int,
                      processor=None, progress_name: str | None = None):
    """Yields (indices into ``examples``, decoded continuations) batch by batch; a batch's ``generate()`` has
    finished when it is yielded."""
    device = next(pilot.parameters()).device
    batches = list(_batches(examples, tokenizer, task_format, batch_size, device))
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
    processor = (CopilotLogitsProcessor(copilot, pilot, lam=decoding.lam, space=decoding.space, gate=decoding.gate)
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

    The Copilot's corrections do not depend on λ, space or gate, and greedy rectification picks the Pilot's token
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
            fused = fuse_scores(scores, corrections, decoding.lam, decoding.space, decoding.gate)
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
                       copilot=None, batch_size: int = 16, progress: bool = False) -> list[dict]:
    """Accuracy of each decoding, with ``fixed``/``broken`` counted against the Pilot alone at the same beams.

    Returns one row per decoding: its fields, ``accuracy``, ``correct``, ``total``, ``fixed``, ``broken`` and the
    generations themselves (``answers``).
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
    for decoding in sorted(baselines, key=lambda d: d.num_beams) + [d for d in decodings if d not in baselines]:
        if decoding not in answers:
            answers[decoding] = generate_answers(pilot, tokenizer, examples, task_format, copilot=copilot,
                                                 decoding=decoding, batch_size=batch_size, progress=progress)
    correct = {d: [task_format.is_correct(text, ex) for text, ex in zip(texts, examples)]
               for d, texts in answers.items()}
    rows = []
    for decoding in decodings:
        mine, base = correct[decoding], correct[Decoding(num_beams=decoding.num_beams)]
        rows.append({
            **asdict(decoding), "decoding": decoding.name, "accuracy": sum(mine) / len(mine), "correct": sum(mine),
            "total": len(mine), "fixed": sum(m and not b for m, b in zip(mine, base)),
            "broken": sum(b and not m for m, b in zip(mine, base)), "answers": answers[decoding],
        })
    return rows


def teacher_forced_records(pilot, tokenizer, examples: list[Example], task_format: TaskFormat, *,
                           batch_size: int = 16, max_length: int = 256):
    """Yields one :class:`~hf_copilot.PilotRecord` per batch of examples run through the Pilot with their answers
    (prompt masked, no gradient, the Pilot left as it is)."""
    prepare_tokenizer(tokenizer)
    device = next(pilot.parameters()).device
    with torch.no_grad(), PilotTap(pilot, mode="generate") as tap:
        for start in range(0, len(examples), batch_size):
            rows = [encode_example(ex, tokenizer, task_format, max_length) for ex in examples[start:start + batch_size]]
            width = max(len(row["input_ids"]) for row in rows)

            def padded(name, value):
                return torch.tensor([row[name] + [value] * (width - len(row[name])) for row in rows], device=device)

            # Labels are attached to the record rather than passed in: the Pilot's own loss is not needed here.
            pilot(input_ids=padded("input_ids", tokenizer.pad_token_id), attention_mask=padded("attention_mask", 0))
            labels = padded("labels", IGNORE_INDEX)
            for record in tap.pop_records():
                yield replace(record, labels=labels, labels_aligned=False)


def record_mistake_log(pilot, tokenizer, examples: list[Example], task_format: TaskFormat, *, top_k: int = 32,
                       batch_size: int = 16, max_length: int = 256, max_bytes: int = 2 * 2**30,
                       on_record: Callable[[PilotRecord], None] | None = None) -> MistakeLog:
    """A Mistake Log of a fixed Pilot over all ``examples`` (one round per batch), e.g. to train a Copilot offline
    on a finished checkpoint (the paper's "Latest" ablation). Raises rather than evict when they exceed
    ``max_bytes``. ``on_record`` also sees each teacher-forced record, so that the same Pilot pass can feed other
    statistics (an :class:`ErrorRatios`, say)."""
    log = MistakeLog(max_rounds=max(1, -(-len(examples) // batch_size)), max_bytes=max_bytes, top_k=top_k)
    for step, record in enumerate(teacher_forced_records(pilot, tokenizer, examples, task_format,
                                                         batch_size=batch_size, max_length=max_length)):
        log.add(record, step=step)
        if log.rounds <= step:
            raise ValueError(f"{len(examples)} examples need more than max_bytes={max_bytes} of Mistake Log: raise "
                             "max_bytes or record fewer examples.")
        if on_record is not None:
            on_record(record)
    return log


def first_error_ranks(pilot, tokenizer, examples: list[Example], task_format: TaskFormat, *, batch_size: int = 16,
                      max_length: int = 256) -> list[int | None]:
    """Where the Pilot first goes wrong on each example, teacher-forced: the rank of the right token among the
    Pilot's predictions at the first answer position whose top prediction is wrong (``None``: no such position).

    Rank 1 is a near miss that re-ranking the Pilot's top two could fix; a large rank is an error no re-ranking of
    the Pilot's own candidates can reach.
    """
    return [rank for record in teacher_forced_records(pilot, tokenizer, examples, task_format, batch_size=batch_size,
                                                      max_length=max_length)
            for rank in first_error_ranks_of(record)]


def first_error_ranks_of(record: PilotRecord) -> list[int | None]:
    """:func:`first_error_ranks` of the rows of one teacher-forced record."""
    labels = record.next_token_labels()
    wrong = (record.logits.argmax(-1) != labels) & (labels != IGNORE_INDEX)
    ranks: list[int | None] = []
    for row in range(labels.shape[0]):
        positions = wrong[row].nonzero()
        if len(positions) == 0:
            ranks.append(None)
            continue
        position = int(positions[0])
        scores = record.logits[row, position]
        ranks.append(int((scores > scores[labels[row, position]]).sum()))
    return ranks


class ErrorRatios:
    """:func:`heldout_error_ratio` of several Copilots of one Pilot, accumulated record by record, so that one
    teacher-forced Pilot pass can serve them all (and other statistics: see ``record_mistake_log(on_record=...)``).
    """

    def __init__(self, copilots: dict, *, top_k: int = 32):
        self.copilots, self.top_k = copilots, top_k
        self.totals = {name: [0.0, 0.0, 0] for name in copilots}  # squared error, squared norm, tokens
        for copilot in copilots.values():
            copilot.eval()

    @torch.no_grad()
    def add(self, record: PilotRecord) -> None:
        batches = {}  # the record's errors, compacted once per device the Copilots sit on
        for name, copilot in self.copilots.items():
            device = next(copilot.parameters()).device
            if device not in batches:
                log = MistakeLog(max_rounds=1, top_k=self.top_k, storage_dtype=torch.float32, device=device)
                log.add(record, step=0)
                batches[device] = log.sample(record.labels.shape[0], device=device)
            batch = batches[device]
            valid = batch.errors.valid & batch.attention_mask.bool()
            corrections = copilot(**batch.copilot_inputs()).corrections
            self.totals[name][0] += float(squared_error_norm(corrections, batch.errors)[valid].sum())
            self.totals[name][1] += float(batch.errors.squared_norm()[valid].sum())
            self.totals[name][2] += int(valid.sum())

    def results(self) -> dict[str, dict]:
        """One result per Copilot name: ``copilot_rmse``, ``zero_rmse``, their ``ratio`` and the ``tokens`` scored."""
        results = {}
        for name, (squared_error, squared_norm, tokens) in self.totals.items():
            if tokens == 0:
                raise ValueError("The examples have no answer tokens to score (every target was empty or masked).")
            results[name] = {"copilot_rmse": (squared_error / tokens) ** 0.5,
                             "zero_rmse": (squared_norm / tokens) ** 0.5,
                             "ratio": (squared_error / squared_norm) ** 0.5, "tokens": tokens}
        return results


def heldout_error_ratios(pilot, copilots: dict, tokenizer, examples: list[Example], task_format: TaskFormat, *,
                         batch_size: int = 16, max_length: int = 256, top_k: int = 32) -> dict[str, dict]:
    """:func:`heldout_error_ratio` of several Copilots of the same Pilot, from one teacher-forced Pilot pass;
    returns one result per name of ``copilots``."""
    ratios = ErrorRatios(copilots, top_k=top_k)
    for record in teacher_forced_records(pilot, tokenizer, examples, task_format, batch_size=batch_size,
                                         max_length=max_length):
        ratios.add(record)
    return ratios.results()


def heldout_error_ratio(pilot, copilot, tokenizer, examples: list[Example], task_format: TaskFormat, *,
                        batch_size: int = 16, max_length: int = 256, top_k: int = 32) -> dict:
    """Teacher-forced check on unseen examples: the Copilot's RMSE divided by the all-zero predictor's.

    Below 1 means the Copilot predicts the Pilot's errors on new data better than predicting nothing, the
    prerequisite for any accuracy gain; at or above 1 it has learned nothing that transfers.
    """
    return heldout_error_ratios(pilot, {"copilot": copilot}, tokenizer, examples, task_format, batch_size=batch_size,
                                max_length=max_length, top_k=top_k)["copilot"]
