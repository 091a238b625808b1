"""The regime map's report: the table, the target's tests with Holm's correction and the figure, from the cells
that :mod:`benchmarks.quality.regime` committed (each cell a JSON file with every arm's right answers, item by
item)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from hf_copilot.recipes.significance import PairedComparison, format_p, pooled

from benchmarks.quality.regime import ARMS, COPILOTS, PILOTS, TARGET_GAIN, unbits


def compare(cells: list[dict], arm: str, against: str) -> PairedComparison:
    """``arm`` against ``against`` on the same test items, pooled over ``cells`` (seeds)."""
    return pooled(PairedComparison.from_outcomes(unbits(c["arms"][arm]["right"]), unbits(c["arms"][against]["right"]))
                  for c in cells)


def relative_gain(comparison: PairedComparison) -> float:
    """The difference relative to the accuracy compared against; NaN when that is 0 (no relative gain exists)."""
    return comparison.difference / comparison.pilot_accuracy if comparison.pilot_accuracy else math.nan


def holm(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values (step-down, monotone), in the input order."""
    order = sorted(range(len(p_values)), key=p_values.__getitem__)
    adjusted, running = [1.0] * len(p_values), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def groups(cells: list[dict]) -> dict[tuple, list[dict]]:
    """Finished cells by (task, Pilot, rows), seeds together."""
    grouped: dict[tuple, list[dict]] = {}
    for cell in cells:
        if all(arm in cell.get("arms", {}) for arm in ("pilot", *ARMS)):
            grouped.setdefault((cell["task"], cell["pilot"], cell["rows"]), []).append(cell)
    return dict(sorted(grouped.items(), key=lambda kv: (kv[0][0], list(PILOTS).index(kv[0][1]), kv[0][2])))


def target_tests(grouped: dict) -> list[dict]:
    """Per (group, Copilot arm): its relative gains over (b) and (d), the larger p-value, Holm over all of them; and,
    beside the pre-registered target, its change against its own Pilot alone (a "win" over the controls while it
    changes no answer of its Pilot would be the Pilot's, not the Copilot's)."""
    tests = []
    for key, cells in grouped.items():
        for arm in COPILOTS:
            versus = {control: compare(cells, arm, control) for control in ("longer", "larger")}
            gains = {control: relative_gain(comparison) for control, comparison in versus.items()}
            tests.append({"group": key, "arm": arm, "versus": versus, "gains": gains, "seeds": len(cells),
                          "p": max(c.p_value for c in versus.values()), "own": compare(cells, arm, "pilot")})
    for test, adjusted in zip(tests, holm([t["p"] for t in tests])):
        test["holm_p"] = adjusted
        test["met"] = adjusted < 0.05 and min(test["gains"].values()) >= TARGET_GAIN and test["seeds"] >= 3
    return tests


def table(edition: str, cells: list[dict]) -> list[str]:
    grouped = groups(cells)
    lines = ["| task | Pilot | rows | seeds | Pilot alone | " + " | ".join(ARMS) + " | held-out ratio (4 Copilots) "
             "| fit ratio (4 Copilots) | best epoch |", "|" + "---|" * (8 + len(ARMS))]
    for (task, pilot, rows), group in grouped.items():
        base = statistics.fmean(c["arms"]["pilot"]["accuracy"] for c in group)
        row = [task, pilot, f"{rows:,}", str(len(group)), f"{100 * base:.1f}%"]
        for arm in ARMS:
            comparison = compare(group, arm, "pilot")
            low, high = comparison.interval()
            row.append(f"{100 * comparison.difference:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]")
        row.append(" / ".join(f"{statistics.fmean(c['arms'][a]['heldout_ratio'] for c in group):.3f}"
                              for a in COPILOTS))
        row.append(" / ".join(f"{statistics.fmean(c['arms'][a]['fit_ratio'] or math.nan for c in group):.3f}"
                              for a in COPILOTS))
        row.append(", ".join(f"{c['joint']['best_epoch']:.1f}" for c in group))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def figure(grouped: dict, path: Path) -> None:
    """Relative gain over the Pilot alone against training rows: a panel per (task, Pilot), a line per arm, with
    each pooled difference's 95 % interval, relative to the Pilot's accuracy."""
    try:
        import matplotlib
    except ImportError:  # the GPU machine may lack it: `--report-only --out <folder>` draws it anywhere later
        print("matplotlib is not installed: no figure (run --report-only where it is)", flush=True)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({key[:2] for key in grouped}, key=lambda k: (k[0], list(PILOTS).index(k[1])))
    if not panels:
        return
    tasks = sorted({task for task, _ in panels})
    pilots = [p for p in PILOTS if any(p == q for _, q in panels)]
    fig, axes = plt.subplots(len(tasks), len(pilots), figsize=(4.2 * len(pilots), 3.4 * len(tasks)), squeeze=False)
    for (task, pilot), ax in ((p, axes[tasks.index(p[0])][pilots.index(p[1])]) for p in panels):
        keys = [key for key in grouped if key[:2] == (task, pilot)]
        for offset, arm in enumerate(ARMS):
            xs, ys, errors = [], [], [[], []]
            for key in keys:
                comparison = compare(grouped[key], arm, "pilot")
                base = comparison.pilot_accuracy
                if not base:  # no relative gain over a Pilot that is never right (the table has the points)
                    continue
                low, high = comparison.interval()
                xs.append(key[2] * 1.04 ** (offset - 2.5))
                ys.append(100 * relative_gain(comparison))
                errors[0].append(100 * (comparison.difference - low) / base)
                errors[1].append(100 * (high - comparison.difference) / base)
            ax.errorbar(xs, ys, yerr=errors, marker="o", markersize=3, capsize=2, label=arm)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xlim(min(key[2] for key in keys) / 2, max(key[2] for key in keys) * 2)
        ax.set_xscale("log")
        ax.set_title(f"{task}, Pilot {pilot}")
        ax.set_xlabel("training rows")
        ax.set_ylabel("gain over the Pilot alone (% relative)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(edition: str, cells: list[dict], folder: Path, command: str) -> Path:
    grouped = groups(cells)
    tests = target_tests(grouped)
    met = [t for t in tests if t["met"]]
    lines = [f"# Regime map: {edition} edition", "", f"`{command}`", "",
             f"{len(cells)} cells on disk, {sum(len(g) for g in grouped.values())} finished. Accuracy differences in "
             "points against the Pilot alone, pooled over seeds, with 95 % paired intervals. Held-out and fit ratios "
             "are for " + ", ".join(COPILOTS) + " in that order (below 1: better than predicting no error).", "",
             *table(edition, cells), "",
             "## The target: a Copilot above both (b) longer and (d) larger by ≥ 5 % relative, Holm p < 0.05, "
             "3 seeds", "",
             "Each gain carries its own paired p (exact McNemar, two-sided: a clear loss has a small p too). "
             "The target tests the larger of the two, Holm-corrected; it is met only where both gains are ≥ +5 % "
             "and 3 seeds ran.", "",
             "| task | Pilot | rows | Copilot | gain over (b) | gain over (d) | p (larger of two) "
             "| Holm p | met | against its own Pilot alone |", "|---|---|---|---|---|---|---|---|---|---|"]
    for t in tests:
        task, pilot, rows = t["group"]
        gains = [(f"{100 * t['gains'][c]:+.1f}%" if math.isfinite(t["gains"][c]) else "n/a")
                 + f" ({format_p(t['versus'][c].p_value)})" for c in ("longer", "larger")]
        lines.append(f"| {task} | {pilot} | {rows:,} | {t['arm']} | {gains[0]} | {gains[1]} | {format_p(t['p'])} | "
                     f"{format_p(t['holm_p'])} | {'yes' if t['met'] else 'no'} | "
                     f"{100 * t['own'].difference:+.2f} pt, +{t['own'].fixed}/−{t['own'].broken}, "
                     f"{format_p(t['own'].p_value)} |")
    lines += ["", f"Cells meeting the target: {len(met)} of {len(tests)} tests.", "",
              "Chosen settings: off where no setting beat the Pilot alone on the validation items.", "",
              "| cell | stage seconds | best step (joint / longer / larger) | chosen settings |", "|---|---|---|---|"]
    for cell in sorted(cells, key=lambda c: (c["task"], list(PILOTS).index(c["pilot"]), c["rows"], c["seed"])):
        seconds = ", ".join(f"{k} {v:.0f}" for k, v in cell["stage_seconds"].items())
        best = " / ".join(str(cell[s]["best_step"]) if s in cell else "-" for s in ("joint", "longer", "larger"))
        chosen = ", ".join(f"{a}: {cell['arms'][a].get('setting') or 'off'}" for a in COPILOTS
                           if a in cell.get("arms", {}))
        lines.append(f"| {cell['task']} {cell['pilot']} {cell['rows']:,} seed {cell['seed']} | {seconds} | {best} | "
                     f"{chosen} |")
    page = folder / f"regime_{edition}.md"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines) + "\n")
    figure(grouped, folder / f"regime_{edition}.png")
    return page


def transfer_page(result: dict, folder: Path) -> Path:
    """The transfer test's page: seed ``source_seed``'s Copilots on seed ``target_seed``'s Pilot."""
    pilot_right = unbits(result["pilot_alone"]["right"])
    lines = [f"# Transfer: the Copilots of seed {result['source_seed']} on the Pilot of seed {result['target_seed']}",
             "", f"{result['task']}, Pilot {result['pilot']}, {result['rows']:,} rows ({result['edition']} edition). "
             f"Each Copilot keeps its own checkpoint and the setting chosen on validation beside its own Pilot. "
             f"Pilot alone: {100 * result['pilot_alone']['accuracy']:.1f}%.", "",
             "| Copilot | setting | held-out ratio (own Pilot → other Pilot) | accuracy (own Pilot's Copilot) "
             "| accuracy transferred | transferred vs Pilot alone |", "|---|---|---|---|---|---|"]
    for name, arm in result["arms"].items():
        if "right" in arm:
            comparison = PairedComparison.from_outcomes(unbits(arm["right"]), pilot_right)
            low, high = comparison.interval()
            versus = (f"{100 * comparison.difference:+.1f} pt [{100 * low:+.1f}, {100 * high:+.1f}], "
                      f"{format_p(comparison.p_value)}")
            accuracy = f"{100 * arm['accuracy']:.1f}%"
        else:
            versus, accuracy = "no setting chosen: the Pilot alone", "-"
        lines.append(f"| {name} | {arm['setting'] or 'off'} | "
                     f"{arm['own_heldout_ratio']:.3f} → {arm['heldout_ratio']:.3f} | "
                     f"{100 * arm['own_accuracy']:.1f}% | {accuracy} | {versus} |")
    page = folder / f"regime_transfer_{result['edition']}.md"
    page.write_text("\n".join(lines) + "\n")
    return page
