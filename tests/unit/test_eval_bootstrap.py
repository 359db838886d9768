"""The paired bootstrap against cases small enough to compute by hand."""

from __future__ import annotations

import math

import pytest

from llmops_provider.evaluation.bootstrap import IMPROVED, NO_CHANGE, REGRESSED, compare, judge, quantile, statistic
from llmops_provider.recipes import RegressionPolicy
from llmops_provider.specs.evaluate import regression_failures

pytestmark = pytest.mark.unit


def means(values: dict[str, float]) -> dict[str, tuple[float, float]]:
    return {k: (v, 1.0) for k, v in values.items()}


def test_statistic_is_transform_of_ratio_of_sums():
    # bits per byte: (-ll/ln2, bytes) pairs -> (10 + 6) / (5 + 3) = 2.0
    assert statistic([(10.0, 5.0), (6.0, 3.0)]) == 2.0
    # perplexity: exp((2 + 4) / (1 + 1)) = e^3
    assert statistic([(2.0, 1.0), (4.0, 1.0)], "exp") == pytest.approx(math.exp(3))
    with pytest.raises(ValueError, match="denominator"):
        statistic([(1.0, 0.0)])


def test_quantile_interpolates_linearly():
    assert quantile([0.0, 1.0, 2.0, 3.0], 0.5) == 1.5
    assert quantile([0.0, 10.0], 0.25) == 2.5
    assert quantile([7.0], 0.975) == 7.0


def test_identical_scores_are_no_regression():
    scores = means({"a": 0.5, "b": 0.2, "c": 0.9})
    for direction in ("higher", "lower"):
        c = compare("acc", scores, dict(scores), direction=direction, iterations=200)
        assert (c.diff, c.ci_low, c.ci_high) == (0.0, 0.0, 0.0)
        assert c.verdict == NO_CHANGE and not c.regressed


def test_constant_shift_gives_a_degenerate_interval_at_the_shift():
    # every document is 0.25 worse: every resample differs by exactly -0.25
    champ = means({"a": 0.75, "b": 0.5, "c": 1.0, "d": 0.25})
    cand = means({k: v[0] - 0.25 for k, v in champ.items()})
    c = compare("acc", cand, champ, direction="higher", iterations=300)
    assert c.diff == pytest.approx(-0.25)
    assert c.ci_low == pytest.approx(-0.25) and c.ci_high == pytest.approx(-0.25)
    assert c.verdict == REGRESSED
    # the same numbers when lower is better: an improvement
    assert compare("loss", cand, champ, direction="lower", iterations=300).verdict == IMPROVED
    # a tolerated worsening of 0.3 absorbs it
    assert compare("acc", cand, champ, direction="higher", iterations=300, margin=0.3).verdict == NO_CHANGE


def test_two_documents_interval_contains_zero():
    # per-document differences {0, 1}: resampled means are 0 (p=1/4), 0.5 (1/2), 1 (1/4),
    # so the 95% percentile interval is [0, 1]: it contains zero -> not significant.
    cand, champ = means({"a": 1.0, "b": 1.0}), means({"a": 1.0, "b": 0.0})
    c = compare("acc", cand, champ, direction="lower", iterations=4000, seed=7)
    assert c.diff == 0.5
    assert (c.ci_low, c.ci_high) == (0.0, 1.0)
    assert c.verdict == NO_CHANGE


def test_three_documents_exact_percentiles():
    # differences {0, 0, 3}: the resampled mean is k with k ~ Binomial(3, 1/3):
    # P(0)=8/27, P(1)=12/27, P(2)=6/27, P(3)=1/27. P(<=2) = 26/27 = 0.963:
    # the 97.5% point is 3 (95% interval [0, 3]); the 95% point is 2 (90% interval [0, 2]).
    cand, champ = means({"a": 0.0, "b": 0.0, "c": 3.0}), means({"a": 0.0, "b": 0.0, "c": 0.0})
    c95 = compare("x", cand, champ, direction="lower", iterations=5000, confidence=0.95)
    c90 = compare("x", cand, champ, direction="lower", iterations=5000, confidence=0.90)
    assert (c95.ci_low, c95.ci_high) == (0.0, 3.0)
    assert (c90.ci_low, c90.ci_high) == (0.0, 2.0)
    assert c95.diff == 1.0 and c95.verdict == NO_CHANGE


def test_ratio_metric_is_resampled_as_a_ratio():
    # bits per byte of the candidate is 2 on every document, the champion's 1: diff exactly +1
    cand = {"a": (20.0, 10.0), "b": (6.0, 3.0), "c": (2.0, 1.0)}
    champ = {"a": (10.0, 10.0), "b": (3.0, 3.0), "c": (1.0, 1.0)}
    c = compare("bits_per_byte", cand, champ, direction="lower", iterations=300)
    assert (c.candidate, c.champion) == (2.0, 1.0)
    assert c.ci_low == pytest.approx(1.0) and c.ci_high == pytest.approx(1.0)
    assert c.regressed and "bits_per_byte" in c.describe() and "regressed" in c.describe()


def test_seeded_and_deterministic():
    cand = means({str(i): (i * 7 % 5) / 5 for i in range(30)})
    champ = means({str(i): (i * 3 % 5) / 5 for i in range(30)})
    a = compare("acc", cand, champ, direction="higher", seed=3)
    assert a == compare("acc", cand, champ, direction="higher", seed=3)
    assert a.ci_low <= a.diff <= a.ci_high


def test_documents_must_pair():
    with pytest.raises(ValueError, match="same documents"):
        compare("acc", means({"a": 1.0}), means({"b": 1.0}), direction="higher")
    with pytest.raises(ValueError, match="no per-document"):
        compare("acc", {}, {}, direction="higher")


@pytest.mark.parametrize(
    "direction,lo,hi,expected",
    [
        ("lower", 0.1, 0.3, REGRESSED),
        ("lower", -0.3, -0.1, IMPROVED),
        ("lower", -0.1, 0.1, NO_CHANGE),
        ("higher", -0.3, -0.1, REGRESSED),
        ("higher", 0.1, 0.3, IMPROVED),
        ("higher", 0.0, 0.2, NO_CHANGE),  # touching zero is not excluding it
    ],
)
def test_judge_needs_the_interval_to_exclude_zero(direction, lo, hi, expected):
    assert judge(direction, lo, hi) == expected


def test_regression_failures_fail_closed_on_missing_comparisons():
    policy = RegressionPolicy(metrics={"bits_per_byte": "lower", "rouge_l": "higher"})
    champ = means({"a": 0.5, "b": 0.5})
    worse = compare("rouge_l", means({"a": 0.1, "b": 0.2}), champ, direction="higher", iterations=200)
    failures = regression_failures([worse], policy, baseline_present=True)
    assert {f.metric for f in failures} == {"rouge_l", "bits_per_byte"}
    assert any("no paired comparison" in f.reason for f in failures)
    assert regression_failures([worse], policy, baseline_present=False) == []  # first model: thresholds only
    assert regression_failures([worse], RegressionPolicy(enabled=False), baseline_present=True) == []
