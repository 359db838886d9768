"""Deferrable metric watch: fire when a PromQL condition has held for a window.

Runs in the triggerer, so it holds no worker slot while it waits. It serializes only
primitives (the URL, headers, the query and the condition); the HTTP call is the hook
module's blocking ``prom_query`` run in a thread with a timeout.
"""

from __future__ import annotations

import asyncio
import operator
import time
from collections.abc import AsyncIterator
from typing import Any

from llmops_provider.compat import BaseTrigger, TriggerEvent
from llmops_provider.hooks.prometheus import PrometheusError, first_value, prom_query

OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq, "!=": operator.ne}


def check_op(op: str) -> str:
    if op not in OPS:
        raise ValueError(f"op {op!r} is not a comparison; use one of {sorted(OPS)}")
    return op


def condition_met(value: float | None, op: str, threshold: float) -> bool:
    """``value <op> threshold``; no sample is never a match (silence is not a breach)."""
    return value is not None and OPS[op](value, threshold)


class PromQLConditionTrigger(BaseTrigger):
    """Fire once ``<query> <op> <threshold>`` has been true for ``hold_for_s`` seconds.

    :param base_url: Prometheus URL, e.g. ``http://127.0.0.1:9090``
    :param query: PromQL returning one series or a scalar (aggregate it)
    :param op: one of ``> >= < <= == !=``
    :param threshold: the value compared with
    :param hold_for_s: how long the condition must hold without a break (0: first match)
    :param poll_interval_s: seconds between queries
    :param headers: extra HTTP headers (e.g. basic auth from the connection)
    :param timeout_s: per-query HTTP timeout
    :param max_errors: consecutive failed queries before an ``error`` event
    """

    def __init__(self, base_url: str, query: str, op: str, threshold: float, hold_for_s: float = 0.0,
                 poll_interval_s: float = 15.0, headers: dict[str, str] | None = None, timeout_s: float = 10.0,
                 max_errors: int = 5) -> None:
        super().__init__()
        self.base_url = base_url
        self.query = query
        self.op = check_op(op)
        self.threshold = float(threshold)
        self.hold_for_s = float(hold_for_s)
        self.poll_interval_s = float(poll_interval_s)
        self.headers = dict(headers or {})
        self.timeout_s = float(timeout_s)
        self.max_errors = int(max_errors)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "base_url": self.base_url,
                "query": self.query,
                "op": self.op,
                "threshold": self.threshold,
                "hold_for_s": self.hold_for_s,
                "poll_interval_s": self.poll_interval_s,
                "headers": dict(self.headers),
                "timeout_s": self.timeout_s,
                "max_errors": self.max_errors,
            },
        )

    async def _value(self) -> float | None:
        result = await asyncio.to_thread(prom_query, self.base_url, self.query, self.timeout_s, self.headers)
        return first_value(result)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        since: float | None = None  # monotonic time the condition became true
        errors = 0
        while True:
            try:
                value = await self._value()
                errors = 0
            except PrometheusError as exc:
                errors += 1
                self.log.warning("query failed (%d/%d): %s", errors, self.max_errors, exc)
                if errors >= self.max_errors:
                    yield TriggerEvent({"status": "error", "message": str(exc), "query": self.query})
                    return
                await asyncio.sleep(self.poll_interval_s)
                continue
            now = time.monotonic()
            if condition_met(value, self.op, self.threshold):
                since = now if since is None else since
                held = now - since
                self.log.info("%s = %s %s %s (held %.0fs of %.0fs)", self.query, value, self.op, self.threshold,
                              held, self.hold_for_s)
                if held >= self.hold_for_s:
                    yield TriggerEvent({"status": "met", "value": value, "query": self.query, "op": self.op,
                                        "threshold": self.threshold, "held_for_s": held})
                    return
            else:
                if since is not None:
                    self.log.info("%s = %s: condition broke, hold reset", self.query, value)
                since = None
            await asyncio.sleep(self.poll_interval_s)
