"""Wait for a new dataset version: a commit on a branch other than the one seen before."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from llmops_provider.compat import AirflowException, BaseSensorOperator
from llmops_provider.triggers.dataset import DatasetCommitTrigger, branch_head


class DatasetCommitSensor(BaseSensorOperator):
    """Succeeds when ``repo@branch`` has a head commit other than ``since_commit``; returns its id.

    :param repo: dataset repository, e.g. the recipe's ``data.dataset_repo`` (templated)
    :param branch: branch to watch (templated)
    :param since_commit: the commit already known; empty = the head when the sensor starts,
        so it waits for the NEXT commit (templated)
    :param store: dataset store backend (``local``/``lakefs``); default ``[llmops] dataset_store``
    :param deferrable: wait in the triggerer (no worker slot); False = poke from the worker
    """

    template_fields: Sequence[str] = ("repo", "branch", "since_commit")

    def __init__(self, *, repo: str, branch: str = "main", since_commit: str | None = None,
                 store: str | None = None, deferrable: bool = True, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(**kwargs)
        self.repo, self.branch, self.since_commit = repo, branch, since_commit
        self.store, self.deferrable = store, deferrable

    def execute(self, context) -> Any:
        if not self.since_commit:
            self.since_commit = branch_head(self.store, self.repo, self.branch)
            self.log.info("Waiting for a commit on %s@%s after %s", self.repo, self.branch, self.since_commit)
        if not self.deferrable:
            super().execute(context)
            return branch_head(self.store, self.repo, self.branch)
        self.defer(
            trigger=DatasetCommitTrigger(
                repo=self.repo,
                branch=self.branch,
                since=self.since_commit,
                poll_interval_s=self.poke_interval,
                store=self.store,
            ),  # fmt: skip
            method_name="execute_complete",
            timeout=timedelta(seconds=self.timeout) if self.timeout else None,
        )

    def execute_complete(self, context, event: dict[str, Any]) -> str:
        if event.get("status") != "new_commit":
            raise AirflowException(f"dataset watch on {self.repo}@{self.branch} failed: {event.get('message', event)}")
        self.log.info("New commit on %s@%s: %s (was %s)", self.repo, self.branch, event["commit_id"], event["since"])
        return event["commit_id"]

    def poke(self, context) -> bool:
        head = branch_head(self.store, self.repo, self.branch)
        return head is not None and head != self.since_commit
