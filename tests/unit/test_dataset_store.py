"""The local dataset store (content-addressed, idempotent, atomic) and the lakeFS hook's contract."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from llmops_provider.datasets import (
    CommitNotFound,
    DatasetStoreError,
    DatasetStoreNotAvailable,
    get_store,
    tree_hash,
)
from llmops_provider.datasets.local import LocalDatasetStore

pytestmark = pytest.mark.unit

META = {
    "airflow_dag_id": "tiny-llama_data",
    "airflow_run_id": "manual__1",
    "airflow_try_number": "1",
    "recipe_fingerprint": "abc123",
    "stats": {"kept": 3},
    "spark_app_id": "local-1",
}


def make_tree(root: Path, train: str = "a", **extra: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    files = {
        "train.jsonl": json.dumps({"id": "1", "text": train}) + "\n",
        "validation.jsonl": "",
        "test.jsonl": "",
        "quarantine.jsonl": "",
        "stats.json": "{}",
        **extra,
    }
    for name, text in files.items():
        (root / name).write_text(text)
    return root


@pytest.fixture
def store(tmp_path) -> LocalDatasetStore:
    return LocalDatasetStore(tmp_path / "datasets")


def test_commit_stores_files_metadata_and_moves_head(store, tmp_path):
    src = make_tree(tmp_path / "stage", **{"_job.json": '{"spark_app_id": "local-1"}'})
    assert store.head("corpus", "main") is None

    info = store.commit("corpus", "main", src, META)

    assert info.created and info.parent is None and info.branch == "main" and info.repo == "corpus"
    assert info.metadata == META
    assert info.tree_hash == tree_hash(src)
    assert store.head("corpus", "main").commit_id == info.commit_id
    assert store.get("corpus", info.commit_id).metadata["spark_app_id"] == "local-1"
    path = store.local_path("corpus", info.commit_id)
    assert sorted(p.name for p in path.iterdir()) == [
        "quarantine.jsonl",
        "stats.json",
        "test.jsonl",
        "train.jsonl",
        "validation.jsonl",
    ]  # '_' files are run-local
    assert (path / "train.jsonl").read_text() == (src / "train.jsonl").read_text()
    assert not (path / "train.jsonl").stat().st_mode & 0o222, "a committed version is read-only"


def test_recommit_of_identical_tree_returns_head_unchanged(store, tmp_path):
    first = store.commit("corpus", "main", make_tree(tmp_path / "a"), META)
    # another run: same data, different provenance files and metadata
    again = store.commit(
        "corpus", "main", make_tree(tmp_path / "b", **{"_job.json": "other"}), {**META, "airflow_run_id": "manual__2"}
    )

    assert again.created is False
    assert again.commit_id == first.commit_id
    assert again.metadata["airflow_run_id"] == "manual__1", "the head keeps the run that created it"
    assert [c.commit_id for c in store.log("corpus", "main")] == [first.commit_id]


def test_changed_tree_creates_child_commit_and_keeps_old_version(store, tmp_path):
    first = store.commit("corpus", "main", make_tree(tmp_path / "a", train="v1"), META)
    second = store.commit("corpus", "main", make_tree(tmp_path / "b", train="v2"), META)

    assert second.created and second.parent == first.commit_id and second.commit_id != first.commit_id
    assert [c.commit_id for c in store.log("corpus", "main")] == [second.commit_id, first.commit_id]
    assert "v1" in (store.local_path("corpus", first.commit_id) / "train.jsonl").read_text()
    assert "v2" in (store.local_path("corpus", second.commit_id) / "train.jsonl").read_text()
    assert store.get("corpus", second.commit_id[:10]).commit_id == second.commit_id  # unique prefix
    with pytest.raises(CommitNotFound, match="no commit"):
        store.get("corpus", "0" * 64)


def test_branches_are_independent_and_share_equal_trees(store, tmp_path):
    src = make_tree(tmp_path / "a")
    main = store.commit("corpus", "main", src, META)
    exp = store.commit("corpus", "experiment", src, META)

    assert exp.created and exp.branch == "experiment" and exp.tree_hash == main.tree_hash
    assert store.local_path("corpus", exp.commit_id) == store.local_path("corpus", main.commit_id)
    assert store.head("corpus", "main").commit_id == main.commit_id


def test_failed_commit_leaves_no_partial_version(store, tmp_path, monkeypatch):
    first = store.commit("corpus", "main", make_tree(tmp_path / "a", train="v1"), META)
    src = make_tree(tmp_path / "b", train="v2")
    calls = []

    def crash_midway(src_path, dst_path, *a, **k):
        calls.append(src_path)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_copy(src_path, dst_path, *a, **k)

    real_copy = shutil.copyfile
    monkeypatch.setattr(shutil, "copyfile", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        store.commit("corpus", "main", src, META)
    monkeypatch.undo()

    repo = store.root / "corpus"
    assert store.head("corpus", "main").commit_id == first.commit_id
    assert sorted(p.name for p in (repo / "trees").iterdir()) == [first.tree_hash], "no temp dir, no partial tree"
    assert len(list((repo / "commits").iterdir())) == 1
    # and the same commit succeeds afterwards
    assert store.commit("corpus", "main", src, META).parent == first.commit_id


def test_unserializable_metadata_is_rejected_before_writing(store, tmp_path):
    with pytest.raises(DatasetStoreError, match="JSON-serializable"):
        store.commit("corpus", "main", make_tree(tmp_path / "a"), {"when": object()})
    assert store.head("corpus", "main") is None


def test_concurrent_commits_serialize_into_one_chain(store, tmp_path):
    sources = [make_tree(tmp_path / f"s{i}", train=f"doc {i}") for i in range(6)]
    results, errors = [], []

    def worker(src):
        try:
            results.append(store.commit("corpus", "main", src, META))
        except Exception as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert not errors
    chain = store.log("corpus", "main")
    assert len(chain) == 6 and {c.commit_id for c in chain} == {r.commit_id for r in results}
    assert chain[-1].parent is None


@pytest.mark.parametrize(
    ("repo", "branch", "match"), [("Bad_Repo", "main", "dataset_repo"), ("corpus", "a/b", "data.branch")]
)
def test_invalid_names_name_the_recipe_field(store, tmp_path, repo, branch, match):
    with pytest.raises(DatasetStoreError, match=match):
        store.commit(repo, branch, make_tree(tmp_path / "a"), META)


def test_empty_or_missing_source_is_an_error(store, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "_job.json").write_text("{}")
    with pytest.raises(DatasetStoreError, match="no dataset files"):
        store.commit("corpus", "main", tmp_path / "empty", META)
    with pytest.raises(DatasetStoreError, match="not a directory"):
        store.commit("corpus", "main", tmp_path / "nope", META)


def test_get_store_follows_config(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW__LLMOPS__HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AIRFLOW__LLMOPS__DATASET_STORE", "local")
    store = get_store()
    assert isinstance(store, LocalDatasetStore) and store.root == (tmp_path / "home" / "datasets").resolve()

    with pytest.raises(DatasetStoreNotAvailable, match="dataset_store = local") as exc:
        get_store("lakefs")
    assert isinstance(exc.value, NotImplementedError)
    with pytest.raises(DatasetStoreError, match="unknown"):
        get_store("s3")


# -- lakeFS hook: the connection contract, against a real (silent) socket ---------------


def test_lakefs_hook_builds_client_from_connection(monkeypatch):
    from llmops_provider.hooks.lakefs import DEFAULT_TIMEOUT, LakeFSHook

    monkeypatch.setenv(
        "AIRFLOW_CONN_LAKEFS_DEFAULT",
        json.dumps(
            {"conn_type": "llmops_lakefs", "host": "https://lakefs.example.com", "login": "AKIA", "password": "s3cr3t"}
        ),
    )
    hook = LakeFSHook()
    assert hook.endpoint() == "https://lakefs.example.com/api/v1"
    assert hook.request_timeout == DEFAULT_TIMEOUT
    client = hook.get_client()
    assert client.configuration.host == "https://lakefs.example.com/api/v1"
    assert client.configuration.username == "AKIA" and client.configuration.password == "s3cr3t"
    behaviour = LakeFSHook.get_ui_field_behaviour()
    assert behaviour["relabeling"] == {
        "host": "Endpoint URL",
        "login": "Access key ID",
        "password": "Secret access key",
    }
    assert isinstance(LakeFSHook.get_connection_form_widgets(), dict)


def test_lakefs_test_connection_times_out_instead_of_hanging(monkeypatch):
    from llmops_provider.hooks.lakefs import LakeFSHook

    silent = socket.socket()  # accepts TCP connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:
        port = silent.getsockname()[1]
        monkeypatch.setenv(
            "AIRFLOW_CONN_LAKEFS_DEFAULT",
            json.dumps(
                {
                    "conn_type": "llmops_lakefs",
                    "host": f"http://127.0.0.1:{port}",
                    "login": "k",
                    "password": "s",
                    "extra": {"request_timeout": "1,1"},
                }
            ),
        )
        hook = LakeFSHook()
        assert hook.request_timeout == (1.0, 1.0)
        started = time.monotonic()
        ok, message = hook.test_connection()
        assert not ok and "not reachable" in message
        assert time.monotonic() - started < 10
    finally:
        silent.close()
