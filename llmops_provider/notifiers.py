"""Alerts from the rollout: Airflow notifiers (``BaseNotifier``) the deploy operator calls on a rollback.

Any notifier works (Slack, SMTP, PagerDuty providers' notifiers): pass it as the deploy
operator's ``on_rollback``. The context it gets has a ``rollout`` key with the evidence
(model, versions, failed step, weights, reasons). The default logs it and appends it to
``home()/alerts/<recipe>.jsonl`` so the local stack has a record to look at.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from llmops_provider import config

try:  # Airflow >= 3.0 task SDK (compat.py is the place for this once it needs more than one name)
    from airflow.sdk import BaseNotifier
except ImportError:  # pragma: no cover
    from airflow.notifications.basenotifier import BaseNotifier

DEFAULT_MESSAGE = (
    "ROLLBACK {{ rollout.model_name }} v{{ rollout.candidate_version }} -> v{{ rollout.stable_version }} "
    "at step {{ rollout.step }} ({{ rollout.weights }}): {{ rollout.reasons | join('; ') }}"
)


class RolloutAlertNotifier(BaseNotifier):
    """Log a rollout alert at ERROR level and append it to ``home()/alerts/<recipe>.jsonl``.

    :param message: Jinja template rendered with the task context plus ``rollout``. (templated)
    """

    template_fields = ("message",)

    def __init__(self, message: str = DEFAULT_MESSAGE, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.message = message

    def notify(self, context) -> None:
        rollout = dict(context.get("rollout") or {})
        logging.getLogger("llmops.alerts").error("%s", self.message)
        path = config.home() / "alerts" / f"{rollout.get('recipe', 'unknown')}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:
            fh.write(json.dumps({"message": self.message, **rollout}, default=str) + "\n")
