"""Figures of an evaluation: accuracy against λ, and one token-level rectification as in the paper's Figure 4.

Needs matplotlib (``pip install 'hf_copilot[real]'``); nothing else in the package imports it.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..generation import CopilotLogitsProcessor  # noqa: E402
from .prompts import prompt_batches  # noqa: E402
from .scoring import Decoding  # noqa: E402


def plot_accuracy_vs_lambda(rows: list[dict], path: Path) -> Path:
    """One line per (space, beams); λ=0 is the Pilot alone under the same beams."""
    figure, axis = plt.subplots(figsize=(6, 4))
    baselines = {r["num_beams"]: r["accuracy"] for r in rows if r["lam"] == 0}
    for space, beams in sorted({(r["space"], r["num_beams"]) for r in rows if r["lam"] > 0}):
        points = sorted((r["lam"], r["accuracy"]) for r in rows
                        if r["lam"] > 0 and (r["space"], r["num_beams"]) == (space, beams))
        if beams in baselines:
            points.insert(0, (0.0, baselines[beams]))
        axis.plot(*zip(*[(lam, 100 * acc) for lam, acc in points]), marker="o",
                  label=f"{space}, {'greedy' if beams == 1 else f'beam {beams}'}")
    axis.set_xlabel("λ (0 = Pilot alone)")
    axis.set_ylabel("accuracy (%)")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_rectification(pilot, copilot, tokenizer, examples, task_format, rows, best: dict, path: Path,
                       top: int = 5) -> Path:
    """Pilot logits, Copilot corrections and fused logits of the top tokens at the step that decided one answer.

    ``best`` must be a logit-space row: there the fused score is exactly the sum of the other two, as in the
    paper's figure (probability-space fusion renormalises, so its bars would not add up). The example is the first one the ``best`` decoding fixed (or, failing that, changed); the step shown is the
    one where the Copilot's correction moved the fused ranking the most.
    """
    baseline = next(r for r in rows if r["lam"] == 0 and r["num_beams"] == best["num_beams"])
    changed = [i for i, (a, b) in enumerate(zip(best["answers"], baseline["answers"])) if a != b]
    fixed = [i for i in changed if task_format.is_correct(best["answers"][i], examples[i])]
    index = (fixed or changed or [0])[0]
    if best["space"] != "logits":
        raise ValueError("plot_rectification shows a logit-space fusion; pass a row with space='logits'.")
    decoding = Decoding(best["lam"], best["space"], 1)
    (_, inputs), = prompt_batches([examples[index]], tokenizer, task_format, 1, next(pilot.parameters()).device)
    with CopilotLogitsProcessor(copilot, pilot, lam=decoding.lam, space=decoding.space, top_analysis=top) as processor:
        pilot.generate(**inputs, max_new_tokens=task_format.max_new_tokens, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id, logits_processor=[processor])
        steps = processor.analysis
    step = max(range(len(steps)), key=lambda s: float(steps[s]["corrections"][0].abs().max()))
    chosen = steps[step]
    labels = [repr(tokenizer.decode([int(t)])) for t in chosen["token_ids"][0]]
    series = {"Pilot": chosen["pilot_scores"][0], f"Copilot × λ={decoding.lam:g}": decoding.lam * chosen["corrections"][0],
              "fused": chosen["fused_scores"][0]}
    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(series)
    for offset, (name, values) in enumerate(series.items()):
        axis.bar([i + offset * width for i in range(len(labels))], values.float().tolist(), width, label=name)
    axis.set_xticks([i + width for i in range(len(labels))], labels)
    axis.axhline(0, color="black", linewidth=0.5)
    axis.set_ylabel("logit")
    axis.set_title(f"example {index}, step {step}: {best['answers'][index]!r} (Pilot: {baseline['answers'][index]!r})",
                   fontsize=8)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
