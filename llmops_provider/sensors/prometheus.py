"""Wait until a PromQL condition holds: deferred to the triggerer, or poked from a worker."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from llmops_provider.compat import AirflowException, BaseSensorOperator
from llmops_provider.hooks.prometheus import PrometheusHook
from llmops_provider.triggers.prometheus import check_op, condition_met

MAX_ERRORS = 5  # consecutive failed queries before a deferred sensor fails (the watchers never give up)


class PromQLSensor(BaseSensorOperator):
    """Succeeds once ``<query> <op> <threshold>`` has held for ``hold_for_s`` seconds.

    Deferred, it waits on :class:`~llmops_provider.triggers.watchers.PromQLWatchTrigger`, which
    reads the connection in the triggerer (no credential is serialized) and gives up after
    ``MAX_ERRORS`` failed queries in a row. Returns the trigger event
    ``{status: fired, value, query, op, threshold, held_for_s, ...}`` (poke mode: nothing).

    :param query: PromQL returning one series or a scalar (templated)
    :param op: one of ``> >= < <= == !=``
    :param threshold: the value compared with (templated)
    :param hold_for_s: how long the condition must hold without a break; 0 = first match
    :param prometheus_conn_id: Airflow connection of type ``llmops_prometheus``
    :param deferrable: wait in the triggerer (no worker slot); False = poke from the worker
    """

    template_fields: Sequence[str] = ("query", "threshold")

    def __init__(
        self,
        *,
        query: str,
        op: str,
        threshold: float,
        hold_for_s: float = 0.0,
        prometheus_conn_id: str = PrometheusHook.default_conn_name,
        deferrable: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.query = query
        self.op = check_op(op)
        self.threshold = threshold
        self.hold_for_s = hold_for_s
        self.prometheus_conn_id = prometheus_conn_id
        self.deferrable = deferrable
        self._since: float | None = None  # poke mode: when the condition became true

    def execute(self, context) -> Any:
        if not self.deferrable:
            return super().execute(context)
        from llmops_provider.triggers.watchers import PromQLWatchTrigger

        self.defer(
            trigger=PromQLWatchTrigger(
                name=self.task_id,
                query=self.query,
                op=self.op,
                threshold=float(self.threshold),
                hold_for_s=self.hold_for_s,
                poll_interval_s=self.poke_interval,
                prometheus_conn_id=self.prometheus_conn_id,
                max_errors=MAX_ERRORS,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.timeout) if self.timeout else None,
        )

    def execute_complete(self, context, event: dict[str, Any]) -> dict[str, Any]:
        status = (event or {}).get("status")
        if status == "error":
            raise AirflowException(f"PromQL watch of {self.query!r} failed: {event.get('message')}")
        if status != "fired":
            raise AirflowException(f"PromQL watch of {self.query!r}: unexpected trigger event {event!r}")
        self.log.info("condition met: %s = %s %s %s", event["query"], event["value"], event["op"], event["threshold"])
        return event

    def poke(self, context) -> bool:
        value = PrometheusHook(self.prometheus_conn_id).query_scalar(self.query)
        if not condition_met(value, self.op, float(self.threshold)):
            self.log.info("%s = %s: not %s %s", self.query, value, self.op, self.threshold)
            self._since = None
            return False
        now = time.monotonic()
        self._since = now if self._since is None else self._since
        held = now - self._since
        self.log.info(
            "%s = %s %s %s (held %.0fs of %.0fs)", self.query, value, self.op, self.threshold, held, self.hold_for_s
        )
        return held >= self.hold_for_s
