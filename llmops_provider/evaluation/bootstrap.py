"""Paired bootstrap comparison of a candidate against the champion on the same documents.

Every per-document score is a pair ``(num, den)``; a metric's value over a set of documents is
``transform(sum(num) / sum(den))``. That one form covers the metrics the gate compares:

- a mean (accuracy, ROUGE-L): ``num`` = the score, ``den`` = 1, identity;
- bits per byte: ``num`` = -loglikelihood / ln 2, ``den`` = bytes, identity;
- perplexity: ``num`` = -loglikelihood, ``den`` = tokens (words, bytes), ``exp``.

The bootstrap resamples DOCUMENTS with replacement (the same indices for both models: paired),
recomputes each model's metric on the resample and takes the difference ``candidate - champion``.
The percentile interval of those differences is the confidence interval. A metric regressed only
when the whole interval lies on the worse side of ``-margin``..``+margin`` (the policy says which
side is worse), so a candidate equal to the champion (all differences 0) never regresses.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import BaseModel

Direction = Literal["higher", "lower"]
Transform = Literal["identity", "exp"]
REGRESSED = "regressed"
IMPROVED = "improved"
NO_CHANGE = "no significant change"

# Differences this small are float noise from re-running the same weights, not an effect.
_EPS = 1e-9

Pair = tuple[float, float]


class Comparison(BaseModel):
    """One metric, candidate vs champion, on ``n`` paired documents."""

    metric: str
    direction: Direction
    candidate: float
    champion: float
    diff: float  # candidate - champion on all documents
    ci_low: float
    ci_high: float
    confidence: float
    margin: float = 0.0
    n: int
    iterations: int
    verdict: Literal["regressed", "improved", "no significant change"]

    @property
    def regressed(self) -> bool:
        return self.verdict == REGRESSED

    def describe(self) -> str:
        pct = f"{self.confidence:.0%}"
        return (
            f"{self.metric}: candidate {self.candidate:.6g} vs champion {self.champion:.6g}, "
            f"diff {self.diff:+.4g} ({pct} CI [{self.ci_low:+.4g}, {self.ci_high:+.4g}], n={self.n}, "
            f"{self.direction} is better) -> {self.verdict}"
        )


def statistic(pairs: Sequence[Pair], transform: Transform = "identity") -> float:
    """``transform(sum(num) / sum(den))``."""
    num = sum(p[0] for p in pairs)
    den = sum(p[1] for p in pairs)
    if den <= 0:
        raise ValueError(f"statistic over {len(pairs)} samples has a non-positive denominator {den}")
    value = num / den
    return math.exp(value) if transform == "exp" else value


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of an already sorted sequence (numpy's default method)."""
    if not sorted_values:
        raise ValueError("quantile of an empty sequence")
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def paired(candidate: Mapping[str, Pair], champion: Mapping[str, Pair], metric: str) -> tuple[list[Pair], list[Pair]]:
    """Align per-document scores by document id; both models must have scored the same documents."""
    if set(candidate) != set(champion):
        only_c = sorted(set(candidate) - set(champion))[:5]
        only_h = sorted(set(champion) - set(candidate))[:5]
        raise ValueError(
            f"{metric}: candidate and champion were not scored on the same documents "
            f"(only candidate: {only_c}, only champion: {only_h}); a paired comparison needs both"
        )
    if not candidate:
        raise ValueError(f"{metric}: no per-document scores to compare")
    ids = sorted(candidate)
    return [tuple(candidate[i]) for i in ids], [tuple(champion[i]) for i in ids]


def judge(direction: Direction, ci_low: float, ci_high: float, margin: float = 0.0) -> str:
    """Regressed only when the whole interval is on the worse side of the margin."""
    if direction == "lower":  # a positive difference (candidate higher) is worse
        if ci_low > margin + _EPS:
            return REGRESSED
        if ci_high < -margin - _EPS:
            return IMPROVED
    else:
        if ci_high < -margin - _EPS:
            return REGRESSED
        if ci_low > margin + _EPS:
            return IMPROVED
    return NO_CHANGE


def compare(
    metric: str,
    candidate: Mapping[str, Pair],
    champion: Mapping[str, Pair],
    *,
    direction: Direction,
    transform: Transform = "identity",
    confidence: float = 0.95,
    iterations: int = 1000,
    seed: int = 0,
    margin: float = 0.0,
) -> Comparison:
    """Paired percentile bootstrap of ``metric(candidate) - metric(champion)``.

    ``candidate``/``champion`` map a document id to its ``(num, den)`` score. Seeded: the same
    inputs give the same interval.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    cand, champ = paired(candidate, champion, metric)
    n = len(cand)
    c_value, h_value = statistic(cand, transform), statistic(champ, transform)
    rng = random.Random(seed)
    diffs = []
    for _ in range(iterations):
        idx = [rng.randrange(n) for _ in range(n)]
        diffs.append(statistic([cand[i] for i in idx], transform) - statistic([champ[i] for i in idx], transform))
    diffs.sort()
    alpha = 1.0 - confidence
    lo, hi = quantile(diffs, alpha / 2), quantile(diffs, 1 - alpha / 2)
    return Comparison(
        metric=metric,
        direction=direction,
        candidate=c_value,
        champion=h_value,
        diff=c_value - h_value,
        ci_low=lo,
        ci_high=hi,
        confidence=confidence,
        margin=margin,
        n=n,
        iterations=iterations,
        verdict=judge(direction, lo, hi, margin),
    )
