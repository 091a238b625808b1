"""Figures of an evaluation: the change in accuracy against λ, and the token-level rectification of one answer at
the step that decided it, as in the paper's Figure 4.

Both are drawn so that a reader cannot mistake noise for an effect: the accuracy figure plots the *difference* from
the Pilot alone with its paired 95% interval around a zero line, on an axis that never spans less than ±5 points;
the rectification figure gives the Copilot's correction a panel and a scale of its own, with its values printed.

Needs matplotlib (``pip install 'hf_copilot[real]'``); nothing else in the package imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from transformers import LogitsProcessor  # noqa: E402

from ..generation import CopilotLogitsProcessor, fuse_scores  # noqa: E402
from .prompts import prompt_batches, target_ids  # noqa: E402
from .significance import ALPHA, PairedComparison  # noqa: E402

MIN_HALF_SPAN = 5.0
"""The accuracy figure's y-axis spans at least ±MIN_HALF_SPAN points, so one item of a few hundred looks small."""


@dataclass(frozen=True)
class Rendered:
    """A figure written to ``path``, with the figure itself and what it shows (``facts``) for callers to report."""

    path: Path
    figure: Figure
    facts: dict


def _save(figure: Figure, path: Path, facts: dict) -> Rendered:
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return Rendered(Path(path), figure, facts)


def _search(beams: int) -> str:
    return "greedy" if beams == 1 else f"beam {beams}"


def plot_accuracy_vs_lambda(rows: list[dict], path: Path) -> Rendered:
    """Accuracy minus the Pilot alone's (same beams), in points, against λ: one line per (space, beams), each point
    with its 95% paired interval; filled markers are significant at α = 0.05 (exact McNemar), hollow ones are not.

    The difference, not the accuracy itself, is drawn because the two decodings answer the same items: the paired
    interval of the difference is much narrower than either accuracy's own interval, and it is the one that says
    whether the Copilot changed anything. The Pilot alone is the zero line; when all rows share one Pilot, the right
    axis reads off absolute accuracy. The statistics come from each row's counts (``correct``, ``total``,
    ``fixed``, ``broken``), so stored results redraw as well.

    ``facts``: ``reference`` (beams → the Pilot's accuracy, %) and ``series`` (label → points of λ, Δ, low and
    high in points, and p).
    """
    reference = {r["num_beams"]: r for r in rows if r["lam"] == 0}
    groups = sorted({(r["space"], r["num_beams"]) for r in rows if r["lam"] > 0})
    lams = sorted({r["lam"] for r in rows if r["lam"] > 0})
    dodge = 0.012 * (max(lams) if lams else 1.0)  # side by side, so that intervals at one λ do not hide each other
    figure, axis = plt.subplots(figsize=(7, 4.5))
    label = "Pilot alone: " + ", ".join(f"{_search(b)} {100 * r['accuracy']:.1f}% ({r['correct']}/{r['total']})"
                                        for b, r in sorted(reference.items()))
    axis.axhline(0, color="black", linewidth=1.2, linestyle="--", label=label)
    series, extreme = {}, 0.0
    for number, (space, beams) in enumerate(groups):
        mine = sorted((r for r in rows if r["lam"] > 0 and (r["space"], r["num_beams"]) == (space, beams)),
                      key=lambda r: r["lam"])
        points = []
        for row in mine:
            comparison = PairedComparison.from_scores(row)
            low, high = comparison.interval()
            points.append((row["lam"], 100 * comparison.difference, 100 * low, 100 * high, comparison.p_value))
        name = f"{space}, {_search(beams)}"
        series[name] = points
        xs = [lam + (number - (len(groups) - 1) / 2) * dodge for lam, *_ in points]
        ys = [difference for _, difference, *_ in points]
        errors = [[d - low for _, d, low, _, _ in points], [high - d for _, d, _, high, _ in points]]
        drawn = axis.errorbar(xs, ys, yerr=errors, fmt="-o", capsize=3, markerfacecolor="white", label=name)
        significant = [(x, y) for x, y, point in zip(xs, ys, points) if point[4] < ALPHA]
        if significant:
            axis.plot(*zip(*significant), "o", color=drawn.lines[0].get_color())
        extreme = max([extreme] + [abs(v) for _, _, low, high, _ in points for v in (low, high)])
    half_span = max(MIN_HALF_SPAN, 1.1 * extreme)
    axis.set_ylim(-half_span, half_span)
    if len(reference) == 1:
        (base,) = (100 * r["accuracy"] for r in reference.values())
        right = axis.secondary_yaxis("right", functions=(lambda d: d + base, lambda a: a - base))
        right.set_ylabel("accuracy (%)")
    total = next(iter(reference.values()))["total"] if reference else rows[0]["total"]
    axis.set_title(f"Rectified vs Pilot alone on the same {total} items")
    axis.set_xlabel("λ")
    axis.set_ylabel("accuracy − Pilot alone (points)")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.text(0.01, -0.02, f"Bars: 95% interval of the paired difference (Newcombe). Filled: p < {ALPHA:g}, exact "
                f"McNemar test; hollow: not significant. The axis spans at least ±{MIN_HALF_SPAN:g} points.",
                fontsize=7, va="top")
    facts = {"reference": {b: 100 * r["accuracy"] for b, r in reference.items()}, "series": series}
    return _save(figure, path, facts)


class _StepRecorder(LogitsProcessor):
    """Rectifies like :class:`CopilotLogitsProcessor` and keeps every step's full Pilot scores and corrections of
    the first row, so that the figure can show the Pilot's choice even where the Copilot pushed it far down."""

    def __init__(self, processor: CopilotLogitsProcessor):
        self.processor = processor
        self.steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        corrections = self.processor.step_corrections(input_ids)
        fused = fuse_scores(scores, corrections, self.processor.lam, "logits")
        self.steps.append(tuple(t[0].float().cpu() for t in (scores, corrections, fused)))
        return fused


def _deciding_step(tokenizer, lead: str, pilot_choices: list[int], fused_choices: list[int]) -> tuple[int, str]:
    """The first step where the Pilot's argmax and the rectified one differ (until then both decodings share their
    prefix, so it is where they part); failing that, the first token past the target's fixed lead."""
    for step, (mine, theirs) in enumerate(zip(fused_choices, pilot_choices)):
        if mine != theirs:
            return step, "first step where the rectified and the Pilot's decodings differ"
    for step in range(len(fused_choices)):
        written = tokenizer.decode(fused_choices[: step + 1], skip_special_tokens=True).lstrip().lower()
        if not lead.lower().startswith(written):
            return step, "first answer token; the two decodings agree on this example"
    return len(fused_choices) - 1, "last step; the two decodings agree and no answer was written"


OUTCOMES = {"fixed": "fixed: the Copilot turned a wrong answer right",
            "broken": "broken: the Copilot turned a right answer wrong",
            "sideways": "sideways: the answer changed, whether it is right did not",
            "unchanged": "unchanged: both decodings give this answer"}
"""What the rectification did to the shown answer, judged by the task's own scoring of both answers."""


def _outcome(pilot_answer: str, rectified_answer: str, pilot_right: bool, rectified_right: bool) -> str:
    if pilot_answer == rectified_answer:
        return "unchanged"
    if pilot_right != rectified_right:
        return "fixed" if rectified_right else "broken"
    return "sideways"


def _reference_line(tokenizer, reference: int | None, pilot_choice: int, rectified_choice: int) -> str:
    """Which decoding, if any, chose the reference answer's token at the shown step."""
    if reference is None:
        return "the reference answer's tokens left this path before this step"
    token = tokenizer.decode([reference])
    if reference == pilot_choice == rectified_choice:
        return f"both decodings choose the reference's token {token!r}"
    if reference in (pilot_choice, rectified_choice):
        return f"the reference's token {token!r} is the {'Pilot' if reference == pilot_choice else 'rectified'} choice"
    return f"neither choice is the reference's token {token!r}"


def plot_rectification(pilot, copilot, tokenizer, examples, task_format, rows, best: dict, path: Path,
                       top: int = 5) -> Rendered:
    """One answer decoded with ``best`` (a greedy logit-space row), at the step that decided it.

    The example is the first one ``best`` fixed (else the first it changed, else the first). The step is the first
    where the rectified and the Pilot's greedy decodings differ, else the first answer token. Upper panel: for the
    fused top tokens (and the Pilot's own choice, and the reference answer's token), the Pilot's next-token
    probability and the rectified one, so each decoding's choice is its highest bar. Lower panel: λ × the Copilot's
    correction on its own scale (logit units), values printed: a correction of 0.01 next to logits of 30 is visible
    only there. Only logit-space rows are shown, where the rectified distribution is exactly softmax(Pilot logits
    + λ × correction), so the two panels explain each other (probability-space fusion clamps and renormalises).

    Whether the step helped is marked too: the reference answer's token at that step (its tick and a title line;
    none once the tokens written so far have left the reference's), and the suptitle says whether each answer is
    right by the task's scoring, so that a fix, a break or a sideways step reads at a glance.

    ``facts``: ``example``, ``step``, ``why``, ``token_ids`` and ``tokens`` (the candidates, decoded), ``pilot``
    and ``fused`` (probabilities, %), ``correction`` (λ × correction), ``pilot_choice`` and ``rectified_choice``
    (decoded), ``reference_token_id`` and ``reference_token`` (None off the reference's path), ``reference`` (which
    decoding chose it, in words), ``pilot_correct``, ``rectified_correct`` and ``outcome`` (a key of
    :data:`OUTCOMES`).
    """
    if best["space"] != "logits" or best["num_beams"] != 1:
        raise ValueError("plot_rectification follows one greedy logit-space decoding; pass a row with "
                         "space='logits' and num_beams=1.")
    baseline = next(r for r in rows if r["lam"] == 0 and r["num_beams"] == 1)
    changed = [i for i, (a, b) in enumerate(zip(best["answers"], baseline["answers"])) if a != b]
    fixed = [i for i in changed if task_format.is_correct(best["answers"][i], examples[i])]
    index = (fixed or changed or [0])[0]
    (_, inputs), = prompt_batches([examples[index]], tokenizer, task_format, 1, next(pilot.parameters()).device)
    with CopilotLogitsProcessor(copilot, pilot, lam=best["lam"], space="logits") as processor:
        recorder = _StepRecorder(processor)
        pilot.generate(**inputs, max_new_tokens=task_format.max_new_tokens, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id, logits_processor=[recorder])
    lam = best["lam"]
    pilot_choices = [int(scores.argmax()) for scores, _, _ in recorder.steps]
    fused_choices = [int(fused.argmax()) for _, _, fused in recorder.steps]
    step, why = _deciding_step(tokenizer, task_format.lead(examples[index]), pilot_choices, fused_choices)
    scores, corrections, fused = recorder.steps[step]
    # The reference's token where both decodings still follow the reference's own tokens (the answer as trained).
    reference_ids = target_ids(examples[index], tokenizer, task_format)
    on_path = step < len(reference_ids) and fused_choices[:step] == reference_ids[:step]
    reference = reference_ids[step] if on_path else None
    candidates = fused.topk(min(top, len(fused))).indices.tolist()
    for shown in (pilot_choices[step], reference):
        if shown is not None and shown not in candidates:
            candidates.append(shown)
    pilot_probs, fused_probs = torch.softmax(scores, -1), torch.softmax(fused, -1)
    values = {"pilot": [100 * float(pilot_probs[t]) for t in candidates],
              "correction": [lam * float(corrections[t]) for t in candidates],
              "fused": [100 * float(fused_probs[t]) for t in candidates]}
    tokens = [tokenizer.decode([t]) for t in candidates]
    ticks = [(repr(token) if token else f"id {t}") + ("\n(Pilot)" if t == pilot_choices[step] else "")
             + ("\n(rectified)" if t == fused_choices[step] else "") + ("\n(reference)" if t == reference else "")
             for token, t in zip(tokens, candidates)]
    answers = {"pilot": baseline["answers"][index], "rectified": best["answers"][index]}
    right = {name: task_format.is_correct(answer, examples[index]) for name, answer in answers.items()}
    marks = {name: "right" if correct else "wrong" for name, correct in right.items()}
    outcome = _outcome(answers["pilot"], answers["rectified"], right["pilot"], right["rectified"])
    said = _reference_line(tokenizer, reference, pilot_choices[step], fused_choices[step])

    # constrained: the three-line suptitle and the two-line title each keep their own room
    figure, (upper, lower) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, height_ratios=(3, 2),
                                          layout="constrained")
    positions = list(range(len(candidates)))
    for shift, (key, name) in zip((-0.2, 0.2), (("pilot", "Pilot alone"), ("fused", f"rectified (λ = {lam:g})"))):
        bars = upper.bar([p + shift for p in positions], values[key], 0.4, label=name)
        upper.bar_label(bars, fmt="%.3g", fontsize=7)
    upper.set_ylabel("probability (%)")
    upper.margins(y=0.15)
    upper.legend(fontsize=8)
    bars = lower.bar(positions, values["correction"], 0.5, color="tab:green")
    lower.bar_label(bars, fmt="%+.3g", fontsize=7)
    lower.axhline(0, color="black", linewidth=0.6)
    lower.set_ylabel("λ × correction (logits)")
    lower.margins(y=0.25)
    lower.set_xticks(positions, ticks, fontsize=8)
    upper.set_title(f"example {index}, step {step}: {why}\n{said}", fontsize=9)
    figure.suptitle(f"{OUTCOMES[outcome]}\nrectified ({best['decoding']}): {answers['rectified'][:60]!r} "
                    f"({marks['rectified']})\nPilot alone: {answers['pilot'][:60]!r} ({marks['pilot']})", fontsize=8)
    facts = {"example": index, "step": step, "why": why, "token_ids": candidates, "tokens": tokens, **values,
             "pilot_choice": tokenizer.decode([pilot_choices[step]]),
             "rectified_choice": tokenizer.decode([fused_choices[step]]), "reference_token_id": reference,
             "reference_token": None if reference is None else tokenizer.decode([reference]), "reference": said,
             "pilot_correct": right["pilot"], "rectified_correct": right["rectified"], "outcome": outcome}
    return _save(figure, path, facts)
