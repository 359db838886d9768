"""Deferrable rollout waits: sleep through an analysis window, then read its PromQL values.

Runs in the triggerer, so a canary step of minutes holds no worker slot. Serializes only
primitives (the connection id, the wait, ``{key: promql}``): the connection, and so its
credentials, is read in the triggerer when the queries run. The queries are the Prometheus
hook's blocking ``prom_query`` in a thread. With no queries it is a plain timer (the grace
period before the old version is scaled down, the A/B duration) and reads no connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from llmops_provider.compat import BaseTrigger, TriggerEvent
from llmops_provider.hooks.prometheus import PrometheusError, first_value, prom_query
from llmops_provider.triggers.prometheus import prometheus_endpoint


class RolloutWindowTrigger(BaseTrigger):
    """Wait ``wait_s``, then evaluate every query once; the event carries ``{key: value}``.

    :param queries: ``{key: promql}``, each giving one series or a scalar (``None`` value: no sample);
        empty: a plain timer
    :param wait_s: seconds to wait first (the analysis window, or the grace period)
    :param settle_s: extra seconds so the last scrape of the window is in Prometheus
    :param prometheus_conn_id: connection (type ``llmops_prometheus``) resolved in the triggerer
    :param base_url: use this URL instead of the connection (no auth)
    :param timeout_s: per-query HTTP timeout
    :param retries: attempts per query before an ``error`` event (a missing metric is not an error)

    Events: ``{status: ok, values: {key: value}}`` or ``{status: error, message, values}``.
    """

    def __init__(
        self,
        queries: dict[str, str],
        wait_s: float,
        settle_s: float = 0.0,
        prometheus_conn_id: str = "prometheus_default",
        base_url: str | None = None,
        timeout_s: float = 30.0,
        retries: int = 5,
    ) -> None:
        super().__init__()
        self.queries = dict(queries)
        self.wait_s = float(wait_s)
        self.settle_s = float(settle_s)
        self.prometheus_conn_id = prometheus_conn_id
        self.base_url = base_url
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "queries": dict(self.queries),
                "wait_s": self.wait_s,
                "settle_s": self.settle_s,
                "prometheus_conn_id": self.prometheus_conn_id,
                "base_url": self.base_url,
                "timeout_s": self.timeout_s,
                "retries": self.retries,
            },
        )

    async def _query(self, url: str, headers: dict[str, str], promql: str) -> float | None:
        for attempt in range(1, self.retries + 1):
            try:
                result = await asyncio.to_thread(prom_query, url, promql, self.timeout_s, headers)
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
        if not self.queries:
            yield TriggerEvent({"status": "ok", "values": values})
            return
        try:
            url, headers = await prometheus_endpoint(self.prometheus_conn_id, self.base_url)
        except Exception as exc:  # a missing or broken connection: an error event, the step fails closed
            message = f"Prometheus connection {self.prometheus_conn_id!r} could not be read: {exc}"
            yield TriggerEvent({"status": "error", "message": message, "values": values})
            return
        try:
            for key, promql in self.queries.items():
                values[key] = await self._query(url, headers, promql)
        except PrometheusError as exc:
            yield TriggerEvent({"status": "error", "message": str(exc), "values": values})
            return
        yield TriggerEvent({"status": "ok", "values": values})
