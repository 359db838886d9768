"""Event triggers for Airflow 3 ``AssetWatcher``s: schedule a DAG when a condition holds.

Unlike a deferrable task's trigger, a watcher's trigger runs for as long as its asset is
watched and may fire many times. Each watcher here fires once per *incident*: after an event
it is disarmed until the condition has cleared and ``rearm_after_s`` has passed, so a breach
that persists for hours produces one asset event, not one per poll. (A triggerer restart
forgets that state; the monitor DAG's retrain gate, persisted in an Airflow Variable, catches
the second event.)

``PromQLWatchTrigger`` is also the trigger ``PromQLSensor`` defers to (with ``max_errors``); the
triggerer stops a deferred task's trigger after its first event, so there the latch plays no part.

Triggers serialize only primitives. Connections are resolved when ``run`` starts, in the
triggerer, never copied into the serialized DAG: no credential lands in the DAG table.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from llmops_provider.compat import BaseEventTrigger, TriggerEvent
from llmops_provider.hooks.prometheus import PrometheusError, first_value, prom_query
from llmops_provider.triggers.prometheus import check_op, condition_met, prometheus_endpoint


class IncidentLatch:
    """Fire once when a condition has held ``hold_for_s``; re-arm after it clears and ``rearm_after_s``.

    Pure state machine (times are monotonic seconds) shared by the watchers.
    """

    def __init__(self, hold_for_s: float, rearm_after_s: float) -> None:
        self.hold_for_s = hold_for_s
        self.rearm_after_s = rearm_after_s
        self.since: float | None = None  # when the condition became true (while armed)
        self.fired_at: float | None = None  # None = armed

    def update(self, met: bool, now: float) -> float | None:
        """Feed one observation; returns the held duration when this observation fires."""
        if self.fired_at is not None:
            if not met and now - self.fired_at >= self.rearm_after_s:
                self.fired_at = None  # cleared after the re-arm delay: the next breach is a new incident
            return None
        if not met:
            self.since = None
            return None
        self.since = now if self.since is None else self.since
        held = now - self.since
        if held >= self.hold_for_s:
            self.fired_at, self.since = now, None
            return held
        return None


def _utcnow() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class PromQLWatchTrigger(BaseEventTrigger):
    """Watch ``<query> <op> <threshold>`` in Prometheus; one event per incident.

    Events: ``{watcher, recipe, status: fired, value, query, op, threshold, held_for_s, fired_at}``;
    with ``max_errors``, ``{watcher, recipe, status: error, message, query}`` after that many
    consecutive failed queries (or when the connection cannot be read), and the trigger ends.

    :param name: the condition's name, e.g. ``e2e_latency_p95_seconds`` (in the event)
    :param query: PromQL returning one series or a scalar
    :param op: one of ``> >= < <= == !=``
    :param threshold: the value compared with
    :param hold_for_s: how long the condition must hold without a break before it fires
    :param poll_interval_s: seconds between queries
    :param rearm_after_s: after firing, the condition must clear and this long pass before the next event
    :param prometheus_conn_id: connection (type ``llmops_prometheus``) resolved in the triggerer
    :param base_url: use this URL instead of the connection (no auth)
    :param recipe: recipe name, carried into the event for the lineage
    :param timeout_s: per-query HTTP timeout
    :param max_errors: consecutive failed queries before an ``error`` event ends the watch;
        0 = never give up (a watcher outlives outages; a sensor should not wait through one forever)
    """

    def __init__(
        self,
        name: str,
        query: str,
        op: str,
        threshold: float,
        hold_for_s: float = 120.0,
        poll_interval_s: float = 30.0,
        rearm_after_s: float = 600.0,
        prometheus_conn_id: str = "prometheus_default",
        base_url: str | None = None,
        recipe: str | None = None,
        timeout_s: float = 10.0,
        max_errors: int = 0,
    ) -> None:
        super().__init__()
        if int(max_errors) < 0:
            raise ValueError(f"max_errors={max_errors!r} must be >= 0 (0 = keep polling through outages)")
        self.name = name
        self.query = query
        self.op = check_op(op)
        self.threshold = float(threshold)
        self.hold_for_s = float(hold_for_s)
        self.poll_interval_s = float(poll_interval_s)
        self.rearm_after_s = float(rearm_after_s)
        self.prometheus_conn_id = prometheus_conn_id
        self.base_url = base_url
        self.recipe = recipe
        self.timeout_s = float(timeout_s)
        self.max_errors = int(max_errors)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "name": self.name,
                "query": self.query,
                "op": self.op,
                "threshold": self.threshold,
                "hold_for_s": self.hold_for_s,
                "poll_interval_s": self.poll_interval_s,
                "rearm_after_s": self.rearm_after_s,
                "prometheus_conn_id": self.prometheus_conn_id,
                "base_url": self.base_url,
                "recipe": self.recipe,
                "timeout_s": self.timeout_s,
                "max_errors": self.max_errors,
            },
        )

    def _error(self, message: str) -> TriggerEvent:
        return TriggerEvent(
            {"watcher": self.name, "recipe": self.recipe, "status": "error", "message": message, "query": self.query}
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        # resolved here, in the triggerer: the credentials never enter the serialized kwargs
        try:
            url, headers = await prometheus_endpoint(self.prometheus_conn_id, self.base_url)
        except Exception as exc:
            if not self.max_errors:
                raise
            yield self._error(f"Prometheus connection {self.prometheus_conn_id!r} could not be read: {exc}")
            return
        latch = IncidentLatch(self.hold_for_s, self.rearm_after_s)
        errors = 0
        while True:
            try:
                result = await asyncio.to_thread(prom_query, url, self.query, self.timeout_s, headers)
                value = first_value(result)
                errors = 0
            except PrometheusError as exc:
                errors += 1
                if self.max_errors and errors >= self.max_errors:
                    self.log.error("watcher %s: %d failed queries in a row, giving up: %s", self.name, errors, exc)
                    yield self._error(str(exc))
                    return
                # without max_errors a watcher outlives outages: log and keep polling (the monitor's cron reports them)
                self.log.warning("watcher %s: query failed (%d/%s): %s", self.name, errors, self.max_errors or "-", exc)
                await asyncio.sleep(self.poll_interval_s)
                continue
            met = condition_met(value, self.op, self.threshold)
            held = latch.update(met, time.monotonic())
            if held is not None:
                self.log.info(
                    "watcher %s fired: %s = %s %s %s for %.0fs",
                    self.name,
                    self.query,
                    value,
                    self.op,
                    self.threshold,
                    held,
                )
                yield TriggerEvent(
                    {
                        "watcher": self.name,
                        "recipe": self.recipe,
                        "status": "fired",
                        "value": value,
                        "query": self.query,
                        "op": self.op,
                        "threshold": self.threshold,
                        "held_for_s": held,
                        "fired_at": _utcnow(),
                    }
                )
            elif met:
                self.log.info(
                    "watcher %s: %s = %s %s %s (holding)", self.name, self.query, value, self.op, self.threshold
                )
            await asyncio.sleep(self.poll_interval_s)


class FeedbackWatchTrigger(BaseEventTrigger):
    """Fire when the feedback store holds at least ``min_records`` curated records not yet landed.

    :param path: the feedback directory (``*.jsonl``)
    :param landed_path: the data source directory curated batches are landed into
    :param min_records: threshold of new curated records
    :param poll_interval_s: seconds between scans
    :param recipe: recipe name, carried into the event
    """

    def __init__(
        self, path: str, landed_path: str, min_records: int, poll_interval_s: float = 300.0, recipe: str | None = None
    ) -> None:
        super().__init__()
        self.path = path
        self.landed_path = landed_path
        self.min_records = int(min_records)
        self.poll_interval_s = float(poll_interval_s)
        self.recipe = recipe

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "path": self.path,
                "landed_path": self.landed_path,
                "min_records": self.min_records,
                "poll_interval_s": self.poll_interval_s,
                "recipe": self.recipe,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from llmops_provider import feedback

        fired_for: str | None = None  # one event per pending batch (its content id)
        while True:
            pending = await asyncio.to_thread(feedback.pending_curated, Path(self.path), Path(self.landed_path))
            batch = feedback.batch_id(pending) if pending else None
            if len(pending) >= self.min_records and batch != fired_for:
                fired_for = batch
                self.log.info("feedback watcher: %d new curated records >= %d", len(pending), self.min_records)
                yield TriggerEvent(
                    {
                        "watcher": "feedback",
                        "recipe": self.recipe,
                        "status": "fired",
                        "value": len(pending),
                        "threshold": self.min_records,
                        "batch": batch,
                        "fired_at": _utcnow(),
                    }
                )
            await asyncio.sleep(self.poll_interval_s)
