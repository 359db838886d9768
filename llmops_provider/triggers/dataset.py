"""Wait in the triggerer for a new commit on a dataset branch (local store or lakeFS)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from llmops_provider.compat import BaseTrigger, TriggerEvent


def branch_head(store_name: str | None, repo: str, branch: str) -> str | None:
    """The head commit id of ``repo@branch`` (None: no commit yet). Blocking: run it in a thread."""
    from llmops_provider.datasets import get_store

    info = get_store(store_name).head(repo, branch)
    return info.commit_id if info else None


class DatasetCommitTrigger(BaseTrigger):
    """Fires ``{status: new_commit, commit_id, repo, branch}`` once the branch head differs from ``since``.

    The store is polled every ``poll_interval_s`` seconds in a worker thread (the store
    clients are synchronous); a store error fires ``{status: error, message}``.
    """

    def __init__(self, repo: str, branch: str, since: str | None, poll_interval_s: float = 60.0,
                 store: str | None = None) -> None:  # fmt: skip
        super().__init__()
        self.repo, self.branch, self.since = repo, branch, since
        self.poll_interval_s, self.store = poll_interval_s, store

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"repo": self.repo, "branch": self.branch, "since": self.since,
             "poll_interval_s": self.poll_interval_s, "store": self.store},
        )  # fmt: skip

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while True:
            try:
                head = await asyncio.to_thread(branch_head, self.store, self.repo, self.branch)
            except Exception as exc:  # the store names repo/branch and the fix
                yield TriggerEvent({"status": "error", "message": str(exc), "repo": self.repo, "branch": self.branch})
                return
            if head is not None and head != self.since:
                yield TriggerEvent({"status": "new_commit", "commit_id": head, "repo": self.repo,
                                    "branch": self.branch, "since": self.since})  # fmt: skip
                return
            await asyncio.sleep(self.poll_interval_s)
