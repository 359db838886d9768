"""The resource benchmark's arithmetic on recorded timings (the serving path runs in integration)."""

from __future__ import annotations

import os

import pytest

from llmops_provider.runtime.eval_resources import group_rss_mb, percentile, summarize

pytestmark = pytest.mark.unit


def test_percentile_is_nearest_rank():
    values = [0.5, 0.1, 0.4, 0.2, 0.3]
    assert percentile(values, 50) == 0.3
    assert percentile(values, 95) == 0.5 and percentile(values, 100) == 0.5
    assert percentile(values, 20) == 0.1 and percentile(values, 0) == 0.1
    assert percentile([7.0], 95) == 7.0


def test_summary_by_hand():
    # two requests: first token after 0.1 s and 0.3 s; 11 and 5 tokens, last at 1.1 s and 0.7 s
    records = [{"ttft": 0.1, "tokens": 11, "last": 1.1}, {"ttft": 0.3, "tokens": 5, "last": 0.7}]
    s = summarize(records, wall_s=2.0, peak_rss_mb=512.0)
    assert s["ttft_p50_s"] == 0.1 and s["ttft_p95_s"] == 0.3
    assert s["tpot_mean_s"] == pytest.approx((1.0 / 10 + 0.4 / 4) / 2)  # 0.1 s per token each
    assert s["throughput_tok_s"] == 8.0 and s["peak_rss_mb"] == 512.0 and s["requests"] == 2.0
    with pytest.raises(ValueError, match="no successful request"):
        summarize([], 1.0, 0.0)


def test_group_rss_counts_this_process_group():
    assert group_rss_mb(os.getpgid(0)) > 10  # this interpreter alone holds more than 10 MiB
    assert group_rss_mb(2**22 + 12345) == 0.0  # no such group
