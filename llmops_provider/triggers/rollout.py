"""Deferrable rollout waits: sleep through an analysis window, then read its PromQL values.

Runs in the triggerer, so a canary step of minutes holds no worker slot. Serializes only
primitives (URL, headers, the wait, ``{key: promql}``); the queries are the Prometheus
hook's blocking ``prom_query`` in a thread. With no queries it is a plain timer (the grace
period before the old version is scaled down).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from llmops_provider.compat import BaseTrigger, TriggerEvent
from llmops_provider.hooks.prometheus import PrometheusError, first_value, prom_query


class RolloutWindowTrigger(BaseTrigger):
    """Wait ``wait_s``, then evaluate every query once; the event carries ``{key: value}``.

    :param base_url: Prometheus URL ('' when there are no queries)
    :param queries: ``{key: promql}``, each giving one series or a scalar (``None`` value: no sample)
    :param wait_s: seconds to wait first (the analysis window, or the grace period)
    :param settle_s: extra seconds so the last scrape of the window is in Prometheus
    :param headers: HTTP headers (basic auth from the connection)
    :param timeout_s: per-query HTTP timeout
    :param retries: attempts per query before an ``error`` event (a missing metric is not an error)
    """

    def __init__(
        self,
        base_url: str,
        queries: dict[str, str],
        wait_s: float,
        settle_s: float = 0.0,
        headers: dict[str, str] | None = None,
        timeout_s: float = 30.0,
        retries: int = 5,
    ) -> None:
        super().__init__()
        self.base_url = base_url
        self.queries = dict(queries)
        self.wait_s = float(wait_s)
        self.settle_s = float(settle_s)
        self.headers = dict(headers or {})
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "base_url": self.base_url,
                "queries": dict(self.queries),
                "wait_s": self.wait_s,
                "settle_s": self.settle_s,
                "headers": dict(self.headers),
                "timeout_s": self.timeout_s,
                "retries": self.retries,
            },
        )

    async def _query(self, promql: str) -> float | None:
        for attempt in range(1, self.retries + 1):
            try:
                result = await asyncio.to_thread(prom_query, self.base_url, promql, self.timeout_s, self.headers)
                return first_value(result)
            except PrometheusError as exc:
                if attempt == self.retries:
                    raise
                self.log.warning("query failed (%d/%d): %s", attempt, self.retries, exc)
                await asyncio.sleep(2.0)
        return None  # pragma: no cover - the loop returns or raises

    async def run(self) -> AsyncIterator[TriggerEvent]:
        self.log.info("waiting %.0fs (+%.0fs settle) before %d queries", self.wait_s, self.settle_s, len(self.queries))
        await asyncio.sleep(self.wait_s + self.settle_s)
        values: dict[str, float | None] = {}
        try:
            for key, promql in self.queries.items():
                values[key] = await self._query(promql)
        except PrometheusError as exc:
            yield TriggerEvent({"status": "error", "message": str(exc), "values": values})
            return
        yield TriggerEvent({"status": "ok", "values": values})
