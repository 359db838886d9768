"""Deferrable wait for a Kubeflow TrainJob: fire when it is Complete, Failed or out of time.

Runs in the triggerer, so a multi-node training job holds no worker slot. It serializes only
primitives (name, namespace, connection id, poll interval, an absolute deadline, so a
triggerer restart does not extend it); each status read is the backend's blocking
``get`` run in a thread. The operator reads the result and cleans up after it resumes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from llmops_provider.compat import BaseTrigger, TriggerEvent


class TrainJobTrigger(BaseTrigger):
    """Poll a TrainJob's ``status.conditions`` until it is terminal or ``deadline`` passes.

    :param name: TrainJob name
    :param namespace: its namespace
    :param kubernetes_conn_id: Airflow Kubernetes connection
    :param deadline: epoch seconds after which a ``timeout`` event fires
    :param poll_interval_s: seconds between status reads
    :param max_errors: consecutive failed reads (other than 404) before an ``error`` event

    Events: ``{status: success|failed|timeout|error, phase, message, name, namespace}``.
    """

    def __init__(
        self,
        name: str,
        namespace: str,
        deadline: float,
        kubernetes_conn_id: str | None = "kubernetes_default",
        poll_interval_s: float = 30.0,
        max_errors: int = 5,
    ) -> None:
        super().__init__()
        self.name = name
        self.namespace = namespace
        self.deadline = float(deadline)
        self.kubernetes_conn_id = kubernetes_conn_id
        self.poll_interval_s = float(poll_interval_s)
        self.max_errors = int(max_errors)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "name": self.name,
                "namespace": self.namespace,
                "deadline": self.deadline,
                "kubernetes_conn_id": self.kubernetes_conn_id,
                "poll_interval_s": self.poll_interval_s,
                "max_errors": self.max_errors,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from llmops_provider.backends import trainjob

        api, _core = await asyncio.to_thread(trainjob.kube_clients, self.kubernetes_conn_id)
        backend = trainjob.TrainJobBackend(api, self.namespace, log=self.log)
        errors = 0
        last = None
        while True:
            try:
                phase, message = await asyncio.to_thread(backend.status, self.name)
                errors = 0
            except Exception as exc:  # noqa: BLE001 - ApiException or a network error
                if getattr(exc, "status", None) == 404:
                    yield TriggerEvent(
                        trainjob.result_event(
                            self.name, self.namespace, "Missing", "the TrainJob was deleted while waiting"
                        )
                    )
                    return
                errors += 1
                self.log.warning(
                    "reading TrainJob %s/%s failed (%d/%d): %s", self.namespace, self.name, errors, self.max_errors, exc
                )
                if errors >= self.max_errors:
                    yield TriggerEvent(trainjob.result_event(self.name, self.namespace, "Unknown", str(exc)))
                    return
                await asyncio.sleep(self.poll_interval_s)
                continue
            if (phase, message) != last:
                self.log.info("TrainJob %s/%s: %s %s", self.namespace, self.name, phase, message)
                last = (phase, message)
            if phase in trainjob.TERMINAL:
                yield TriggerEvent(trainjob.result_event(self.name, self.namespace, phase, message))
                return
            if time.time() >= self.deadline:
                yield TriggerEvent(
                    trainjob.result_event(self.name, self.namespace, "Timeout", f"still {phase} at the deadline")
                )
                return
            await asyncio.sleep(self.poll_interval_s)
