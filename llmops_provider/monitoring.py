"""Monitoring logic with no I/O: source fingerprints, the PromQL for vLLM series, SLO checks.

Pure functions so the monitor operator, the data stage (which records the fingerprint in the
dataset commit metadata) and the tests share one definition of "new data" and "breach".
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# SOURCE_FINGERPRINT: the commit-metadata key the data stage writes and the monitor compares against
from llmops_provider.lineage import SOURCE_FINGERPRINT
from llmops_provider.recipes import SLOs

# SLO field -> (PromQL key, direction): "max" means the value must stay <= limit
SLO_CHECKS: dict[str, tuple[str, str]] = {
    "ttft_p95_seconds": ("ttft_p95_seconds", "max"),
    "e2e_latency_p95_seconds": ("e2e_latency_p95_seconds", "max"),
    "error_rate": ("error_rate", "max"),
    "min_generation_tokens_per_s": ("generation_tokens_per_s", "min"),
    "max_queue_length": ("queue_length", "max"),
    "max_kv_cache_usage": ("kv_cache_usage", "max"),
    "max_gpu_utilization": ("gpu_utilization", "max"),
}

# vLLM finishes every request with one of stop, length, abort, error, repetition
# (vllm.v1.engine.FinishReason); abort and error are failures seen by the client.
ERROR_REASONS = "abort|error"

_WINDOW = re.compile(r"^[0-9]+(ms|s|m|h|d|w|y)$")


def source_files(paths: Iterable[str | Path]) -> list[tuple[str, Path]]:
    """The ``*.jsonl`` files of the sources as (name, path), in fingerprint order.

    A directory contributes its ``*.jsonl`` files (recursively, named relative to it); a file
    contributes itself. Hidden files (``.x.jsonl``, partial copies) are skipped.
    """
    found: list[tuple[str, Path]] = []
    for index, raw in enumerate(paths):
        root = Path(raw)
        if root.is_file():
            candidates = [(root.name, root)]
        elif root.is_dir():
            candidates = [(p.relative_to(root).as_posix(), p) for p in root.rglob("*.jsonl") if p.is_file()]
        else:
            candidates = []
        for name, path in sorted(candidates):
            if any(part.startswith(".") for part in Path(name).parts):
                continue
            found.append((f"{index}/{name}", path))
    return found


def source_fingerprint(paths: Iterable[str | Path]) -> str:
    """sha256 over the sorted names and contents of the sources' ``*.jsonl`` files.

    Renaming, adding, removing or editing a file changes it; touching one does not.
    """
    return fingerprint_files(source_files(paths))


def fingerprint_files(files: Iterable[tuple[str, Path]]) -> str:
    """The fingerprint of an explicit ``source_files`` listing (what a data run actually read)."""
    digest = hashlib.sha256()
    for name, path in files:
        content = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                content.update(block)
        digest.update(name.encode() + b"\0" + content.hexdigest().encode() + b"\n")
    return digest.hexdigest()


def vllm_queries(model_name: str, window: str) -> dict[str, str]:
    """PromQL for the served model's SLO series over ``window`` (a PromQL duration)."""
    if not _WINDOW.match(window):
        raise ValueError(f"monitoring.window {window!r} is not a PromQL duration; use e.g. '5m' or '30s'")
    if '"' in model_name or "\\" in model_name:
        raise ValueError(f"model name {model_name!r} cannot be used as a PromQL label value")
    sel = f'model_name="{model_name}"'

    def p95(metric: str) -> str:
        return f"histogram_quantile(0.95, sum by (le) (rate({metric}_bucket{{{sel}}}[{window}])))"

    finished = f"sum(rate(vllm:request_success_total{{{sel}}}[{window}]))"
    failed = f'sum(rate(vllm:request_success_total{{{sel},finished_reason=~"{ERROR_REASONS}"}}[{window}]))'
    return {
        "requests": f"sum(increase(vllm:request_success_total{{{sel}}}[{window}]))",
        "ttft_p95_seconds": p95("vllm:time_to_first_token_seconds"),
        "e2e_latency_p95_seconds": p95("vllm:e2e_request_latency_seconds"),
        # `or vector(0)`: no failure series yet means no failures, not "unknown"
        "error_rate": f"({failed} or vector(0)) / {finished}",
        "generation_tokens_per_s": f"sum(rate(vllm:generation_tokens_total{{{sel}}}[{window}]))",
        "queue_length": f"max(max_over_time(vllm:num_requests_waiting{{{sel}}}[{window}]))",
        "kv_cache_usage": f"max(max_over_time(vllm:kv_cache_usage_perc{{{sel}}}[{window}]))",
        # DCGM's exporter labels by GPU, not by model: the mean over every GPU it reports
        "gpu_utilization": f"avg(avg_over_time(DCGM_FI_DEV_GPU_UTIL[{window}]))",
    }


def watch_conditions(model_name: str, slos: SLOs, window: str) -> list[dict[str, Any]]:
    """One PromQL condition per SLO that is set: ``{name, query, op, threshold}``, true while breached.

    Silence never fires: an idle model's quantiles are NaN (no sample), and a lower bound
    (throughput) only has a sample while the model had requests in the window.
    """
    queries = vllm_queries(model_name, window)
    out = []
    for field, (key, direction) in SLO_CHECKS.items():
        limit = getattr(slos, field)
        if limit is None:
            continue
        query = queries[key]
        if direction == "min":
            query = f"({query}) and on() ({queries['requests']} > 0)"
        out.append(
            {
                "name": field,
                "query": query,
                "op": ">" if direction == "max" else "<",
                "threshold": float(limit),
            }
        )
    return out


def _number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


def evaluate_slos(values: dict[str, float | None], slos: SLOs) -> dict[str, Any]:
    """Compare measured values with the SLOs.

    ``values`` holds the keys of :func:`vllm_queries` (``None`` = no sample). An SLO set to
    ``None`` is not checked. No traffic in the window gives status ``no-data``: silence is
    never a breach. Returns ``{status, slos: {name: {value, limit, ok}}, reasons}``.
    """
    requests = _number(values.get("requests"))
    has_traffic = bool(requests and requests > 0)
    checked: dict[str, dict[str, Any]] = {}
    reasons: list[str] = []
    for field, (key, direction) in SLO_CHECKS.items():
        limit = getattr(slos, field)
        if limit is None:
            continue
        value = _number(values.get(key)) if has_traffic else None
        ok: bool | None
        if value is None:
            ok = None
        elif direction == "max":
            ok = value <= limit
        else:
            ok = value >= limit
        checked[field] = {"value": value, "limit": limit, "ok": ok}
        if ok is False:
            relation = ">" if direction == "max" else "<"
            reasons.append(f"SLO breach: {field} = {value:.4g} {relation} {limit:g}")
    if not has_traffic:
        status = "no-data"
        reasons.append("no requests in the window: SLOs not evaluated")
    elif any(c["ok"] is False for c in checked.values()):
        status = "breach"
    else:
        status = "ok"
    return {"status": status, "slos": checked, "reasons": reasons}


def new_data(
    current_fingerprint: str, has_files: bool, head_metadata: dict[str, Any] | None, processed: str | None = None
) -> tuple[bool, str]:
    """Is there source data no data run has processed yet? Returns (new, reason).

    ``processed`` is the fingerprint the last data run recorded (even when it made no commit
    because nothing changed); ``head_metadata`` is the dataset head's commit metadata.
    """
    if not has_files:
        return False, "no source files"
    if head_metadata is None:
        # bootstrapping is the data DAG's own schedule; the monitor only reacts to change
        return False, "no dataset commit yet: the data DAG's schedule creates the first one"
    if processed == current_fingerprint:
        return False, "no new data since the last data run"
    recorded = head_metadata.get(SOURCE_FINGERPRINT)
    if not recorded:
        # an older commit without a fingerprint: unknown, so do not loop retraining on it
        return False, f"last dataset commit has no {SOURCE_FINGERPRINT}; cannot tell if data is new"
    if recorded != current_fingerprint:
        return True, f"new data: source fingerprint {current_fingerprint[:12]} != committed {str(recorded)[:12]}"
    return False, "no new data since the last dataset commit"
