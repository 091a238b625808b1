"""Is a rectified decoding really better than the Pilot alone? Paired statistics on the same test items.

Both decodings answer the same items, so the comparison is paired: only the items one of them gets right and the
other wrong carry information. With ``fixed`` items (the Copilot's decoding right, the Pilot's wrong) and
``broken`` ones (the reverse):

- the **test** is the exact two-sided McNemar test, i.e. the sign test on the discordant items: under "no
  difference" each of the ``fixed + broken`` items is equally likely to fall either way, so ``fixed`` is
  Binomial(fixed + broken, 1/2). It is exact at any count, which matters here: a Copilot typically changes a
  handful of answers, far too few for the χ² approximation.
- the **interval** is Newcombe's hybrid score interval for the difference of paired proportions (Newcombe 1998,
  method 10; Statistics in Medicine 17:2635): Wilson score intervals for the two accuracies, combined by "square and
  add" with their estimated correlation. It is closed-form, stays within [−1, 1], is not degenerate when nothing
  changed (0 fixed, 0 broken still leaves an honest width), and is among the intervals Fagerland, Lydersen and
  Laake (2014, Statistics in Medicine 33:2850) recommend for paired proportions, unlike the Wald interval, which
  collapses to zero width exactly when few answers change.

The two are different procedures and can disagree at the margin (the exact test is conservative): the textbook
example of 6 against 16 discordant pairs has p = 0.052 while the interval just excludes 0. :func:`verdict` says
"borderline" then instead of picking a side.

**Pooling over seeds** concatenates the items of every seed, each still paired with the Pilot of its own seed: the
2×2 tables add up (:func:`pooled`). It treats the (seed, item) pairs as independent, which is optimistic when the
seeds share their test items: an item that is hard for one seed's Pilot is hard for the next. The pooled p-value
and interval then describe these runs on these items, not a new training run on new items.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from statistics import NormalDist

ALPHA = 0.05
"""The significance level of every verdict; the intervals are 1 − ALPHA = 95% intervals."""


def sign_test_p_value(fixed: int, broken: int) -> float:
    """Exact two-sided McNemar p-value: twice the smaller binomial tail of Binomial(fixed + broken, 1/2), capped at
    1 (the distribution is symmetric, so this equals the probability of a split at least as uneven)."""
    if fixed < 0 or broken < 0:
        raise ValueError(f"Counts must be >= 0; got fixed={fixed}, broken={broken}.")
    n, smaller = fixed + broken, min(fixed, broken)
    term, tail = 1, 0
    for k in range(smaller + 1):  # C(n, k) built term by term: exact integers, no overflow, no cancellation
        tail += term
        term = term * (n - k) // (k + 1)
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


def wilson_interval(successes: int, total: int, alpha: float = ALPHA) -> tuple[float, float]:
    """The Wilson score interval of a proportion: the proportions the score test at level ``alpha`` accepts."""
    z = NormalDist().inv_cdf(1 - alpha / 2)
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class PairedComparison:
    """The 2×2 table of a rectified decoding against the Pilot alone on the same items.

    ``fixed``: right only with the Copilot; ``broken``: right only without it.
    """

    both_right: int
    fixed: int
    broken: int
    both_wrong: int

    def __post_init__(self):
        if min(self.both_right, self.fixed, self.broken, self.both_wrong) < 0 or self.total == 0:
            raise ValueError(f"A comparison needs non-negative counts and at least one item; got {self}.")

    @classmethod
    def from_outcomes(cls, rectified: Sequence[bool], pilot: Sequence[bool]) -> PairedComparison:
        """From per-item correctness of the two decodings, in the same item order."""
        if len(rectified) != len(pilot):
            raise ValueError(f"Paired outcomes need the same items: {len(rectified)} vs {len(pilot)}.")
        pairs = list(zip(map(bool, rectified), map(bool, pilot)))
        return cls(pairs.count((True, True)), pairs.count((True, False)), pairs.count((False, True)),
                   pairs.count((False, False)))

    @classmethod
    def from_scores(cls, scores: Mapping) -> PairedComparison:
        """From a row's ``correct``, ``total``, ``fixed`` and ``broken``: these four fix the whole table (the Pilot
        got ``correct − fixed + broken`` right), so stored results need no per-item answers."""
        both_right = scores["correct"] - scores["fixed"]
        return cls(both_right, scores["fixed"], scores["broken"],
                   scores["total"] - both_right - scores["fixed"] - scores["broken"])

    @property
    def total(self) -> int:
        return self.both_right + self.fixed + self.broken + self.both_wrong

    @property
    def difference(self) -> float:
        """Accuracy with the Copilot minus accuracy of the Pilot alone (a fraction, not points)."""
        return (self.fixed - self.broken) / self.total

    @property
    def pilot_accuracy(self) -> float:
        """Accuracy of the decoding compared against (the Pilot alone, or any control)."""
        return (self.both_right + self.broken) / self.total

    @property
    def p_value(self) -> float:
        return sign_test_p_value(self.fixed, self.broken)

    def interval(self, alpha: float = ALPHA) -> tuple[float, float]:
        """Newcombe's hybrid score interval for :attr:`difference` (see the module docstring)."""
        n = self.total
        rectified, pilot = self.both_right + self.fixed, self.both_right + self.broken
        p1, p2 = rectified / n, pilot / n
        l1, u1 = wilson_interval(rectified, n, alpha)
        l2, u2 = wilson_interval(pilot, n, alpha)
        margins = rectified * (n - rectified) * pilot * (n - pilot)
        # The correlation of the two accuracies, with Newcombe's continuity correction on positive association.
        cross = self.both_right * self.both_wrong - self.fixed * self.broken
        if margins == 0 or 0 <= cross <= n / 2:
            phi = 0.0
        else:
            phi = (cross - n / 2 if cross > 0 else cross) / math.sqrt(margins)
        below = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
        above = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
        return max(-1.0, self.difference - below), min(1.0, self.difference + above)

    def fields(self) -> dict:
        """What a result row stores: ``p_value``, ``difference`` and the 95% ``interval`` (fractions)."""
        return {"p_value": self.p_value, "difference": self.difference, "interval": self.interval()}


def pooled(comparisons: Iterable[PairedComparison]) -> PairedComparison:
    """Several seeds' comparisons as one: their items concatenated, each paired within its own seed."""
    comparisons = list(comparisons)
    if not comparisons:
        raise ValueError("Nothing to pool.")
    return PairedComparison(*(sum(getattr(c, name) for c in comparisons)
                              for name in ("both_right", "fixed", "broken", "both_wrong")))


def pooled_scores(scores: Iterable[Mapping]) -> PairedComparison:
    """The pooled comparison of stored result rows (one per seed, each with ``correct``, ``total``, ``fixed``,
    ``broken`` against that seed's Pilot alone), e.g. ``[r["joint"][name] for r in results if r["task"] == t]``."""
    return pooled(PairedComparison.from_scores(s) for s in scores)


def format_p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.2f}" if p >= 0.1 else f"p = {p:.3f}"


def format_change(difference: float, interval: Sequence[float]) -> str:
    """A difference and its interval in accuracy points, e.g. ``+0.3 pt [−0.5, +1.5]``."""
    low, high = interval
    return f"{100 * difference:+.1f} pt [{100 * low:+.1f}, {100 * high:+.1f}]".replace("-", "−")


def describe(comparison: PairedComparison, alpha: float = ALPHA) -> str:
    """The difference in points with its 1 − alpha interval, the counts and the p-value, e.g.
    ``Δ = +0.3 pt [−0.5, +1.5] (+1/−0, p = 1.00)``: one table cell."""
    return (f"Δ = {format_change(comparison.difference, comparison.interval(alpha))} "
            f"(+{comparison.fixed}/−{comparison.broken}, {format_p(comparison.p_value)})")


def verdict(comparison: PairedComparison, alpha: float = ALPHA) -> str:
    """One line a reader can act on: a significant gain or loss, no significant change, or borderline (the test
    and the interval disagree)."""
    significant = comparison.p_value < alpha
    low, high = comparison.interval(alpha)
    excludes_zero = low > 0 or high < 0
    if significant and not excludes_zero:
        judgement = f"borderline at α = {alpha:g} (p < {alpha:g}, but the {1 - alpha:.0%} interval includes 0)"
    elif excludes_zero and not significant:
        judgement = f"borderline at α = {alpha:g} (the {1 - alpha:.0%} interval excludes 0, but p ≥ {alpha:g})"
    elif not significant:
        judgement = f"no significant change at α = {alpha:g}"
    else:
        judgement = f"significant {'gain' if comparison.difference > 0 else 'loss'} at α = {alpha:g}"
    return f"{judgement}, {describe(comparison, alpha)}"
