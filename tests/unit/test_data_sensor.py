"""The deferrable sensor that waits for a new dataset commit on a branch (local store)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from llmops_provider.compat import TaskDeferred
from llmops_provider.datasets import get_store
from llmops_provider.sensors.dataset import DatasetCommitSensor
from llmops_provider.triggers.dataset import DatasetCommitTrigger

pytestmark = pytest.mark.unit


def _tree(root: Path, text: str) -> Path:
    root.mkdir(parents=True)
    (root / "train.jsonl").write_text(json.dumps({"id": "1", "text": text}) + "\n")
    return root


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW__LLMOPS__HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AIRFLOW__LLMOPS__DATASET_STORE", "local")
    return get_store()


def test_trigger_fires_on_the_next_commit_only(store, tmp_path):
    first = store.commit("corpus", "main", _tree(tmp_path / "a", "v1"), {})
    trigger = DatasetCommitTrigger(repo="corpus", branch="main", since=first.commit_id, poll_interval_s=0.05)
    path, kwargs = trigger.serialize()
    assert path == "llmops_provider.triggers.dataset.DatasetCommitTrigger" and DatasetCommitTrigger(**kwargs)

    async def scenario():
        events = trigger.run()
        waiting = asyncio.ensure_future(events.__anext__())
        await asyncio.sleep(0.3)
        assert not waiting.done(), "fired although the head did not move"
        second = await asyncio.to_thread(store.commit, "corpus", "main", _tree(tmp_path / "b", "v2"), {})
        event = await asyncio.wait_for(waiting, 10)
        return second, event.payload

    second, payload = asyncio.run(scenario())
    assert payload == {"status": "new_commit", "commit_id": second.commit_id, "repo": "corpus", "branch": "main",
                       "since": first.commit_id}  # fmt: skip


def test_trigger_reports_store_errors():
    async def first_event():
        trigger = DatasetCommitTrigger(repo="Bad Name!", branch="main", since=None, poll_interval_s=0.01)
        return (await trigger.run().__anext__()).payload

    payload = asyncio.run(first_event())
    assert payload["status"] == "error" and "data.dataset_repo" in payload["message"]


def test_sensor_defers_from_the_current_head_and_pokes(store, tmp_path):
    first = store.commit("corpus", "main", _tree(tmp_path / "a", "v1"), {})
    sensor = DatasetCommitSensor(task_id="wait", repo="corpus", branch="main", poke_interval=5)
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute({})
    assert deferred.value.trigger.since == first.commit_id and deferred.value.trigger.poll_interval_s == 5

    assert sensor.poke({}) is False
    second = store.commit("corpus", "main", _tree(tmp_path / "b", "v2"), {})
    assert sensor.poke({}) is True
    assert sensor.execute_complete({}, {"status": "new_commit", "commit_id": second.commit_id,
                                        "since": first.commit_id}) == second.commit_id  # fmt: skip
    with pytest.raises(Exception, match="dataset watch on corpus@main failed: boom"):
        sensor.execute_complete({}, {"status": "error", "message": "boom"})
