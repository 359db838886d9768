"""PromQL helpers shared by the Prometheus triggers (no trigger is defined here).

``check_op``/``condition_met`` are the condition both the watcher
(:class:`~llmops_provider.triggers.watchers.PromQLWatchTrigger`) and the sensor's poke mode use;
``prometheus_endpoint`` resolves the connection in the triggerer, so a trigger serializes the
connection id, never its credentials.
"""

from __future__ import annotations

import operator

OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq, "!=": operator.ne}


def check_op(op: str) -> str:
    if op not in OPS:
        raise ValueError(f"op {op!r} is not a comparison; use one of {sorted(OPS)}")
    return op


def condition_met(value: float | None, op: str, threshold: float) -> bool:
    """``value <op> threshold``; no sample is never a match (silence is not a breach)."""
    return value is not None and OPS[op](value, threshold)


async def prometheus_endpoint(prometheus_conn_id: str, base_url: str | None = None) -> tuple[str, dict[str, str]]:
    """``(url, headers)`` of the connection, read in a thread (connection access blocks); ``base_url``: no auth."""
    if base_url:
        return base_url, {}
    from asgiref.sync import sync_to_async

    from llmops_provider.hooks.prometheus import PrometheusHook

    def resolve() -> tuple[str, dict[str, str]]:
        hook = PrometheusHook(prometheus_conn_id)
        return hook.base_url(), hook.headers()

    return await sync_to_async(resolve)()
