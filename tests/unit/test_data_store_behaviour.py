"""One behavioural suite, two dataset-store backends: the local store and lakeFS (contract server).

Every test runs against both; the lakeFS one validates each request and response against
``shared/contracts/lakefs-openapi.yml``. Includes a commit killed midway (SIGKILL, so no
cleanup code runs) that must leave the target branch untouched.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from pathlib import Path

import pytest
from lakefs_contract_server import LakeFSContractServer

from llmops_provider.datasets import CommitNotFound, DatasetStoreError, tree_hash

pytestmark = pytest.mark.unit

META = {"airflow_dag_id": "tiny-llama_data", "airflow_run_id": "manual__1", "airflow_try_number": "1",
        "recipe_fingerprint": "abc123", "stats": {"kept": 3, "steps": [{"step": "parse", "in": 4}]},
        "spark_app_id": "local-1"}  # fmt: skip


def make_tree(root: Path, train: str = "a", **extra: str) -> Path:
    files = {
        "train.jsonl": json.dumps({"id": "1", "text": train}) + "\n",
        "validation.jsonl": "v\n",
        "test.jsonl": "t\n",
        "quarantine.jsonl": "",
        "excluded.jsonl": "",
        "stats.json": "{}",
        **extra,
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def _lakefs_store(server: LakeFSContractServer, cache: Path):
    from llmops_provider.datasets.lakefs import LakeFSDatasetStore

    os.environ["AIRFLOW_CONN_LAKEFS_DEFAULT"] = json.dumps({
        "conn_type": "llmops_lakefs", "host": server.url, "login": "AKIATEST", "password": "s3cr3t",
        "extra": {"request_timeout": "2,2"}})  # fmt: skip
    return LakeFSDatasetStore.from_hook(cache_dir=cache, backoff=0.01)


@pytest.fixture(params=["local", "lakefs"])
def backend(request, tmp_path, monkeypatch):
    """``(store, make)``: the store and a factory that rebuilds it (e.g. in a forked child)."""
    monkeypatch.delenv("AIRFLOW_CONN_LAKEFS_DEFAULT", raising=False)
    if request.param == "local":
        from llmops_provider.datasets.local import LocalDatasetStore

        def make():
            return LocalDatasetStore(tmp_path / "datasets")

        yield make(), make
        return
    server = LakeFSContractServer(access_key="AKIATEST", secret_key="s3cr3t").start()
    server.create_repo("corpus")

    def make():
        return _lakefs_store(server, tmp_path / "cache")

    monkeypatch.setenv("AIRFLOW_CONN_LAKEFS_DEFAULT", "")  # restored after the test; _lakefs_store sets it
    try:
        yield make(), make
    finally:
        server.stop()
    assert not server.violations, "lakeFS contract violations:\n" + "\n".join(server.violations)


def test_commit_then_read_back_files_and_metadata(backend, tmp_path):
    store, _ = backend
    src = make_tree(tmp_path / "stage", **{"_job.json": "{}", "packed/manifest.json": "{}"})
    assert store.head("corpus", "main") is None
    info = store.commit("corpus", "main", src, META)
    assert info.created and info.branch == "main" and info.tree_hash == tree_hash(src)
    assert store.head("corpus", "main").commit_id == info.commit_id
    assert store.get("corpus", info.commit_id).metadata == META
    version = store.local_path("corpus", info.commit_id)
    assert tree_hash(version) == tree_hash(src) and (version / "packed" / "manifest.json").is_file()
    assert not (version / "_job.json").exists(), "run-local files are not part of a version"
    with pytest.raises(CommitNotFound):
        store.get("corpus", "0" * 64)


def test_same_content_is_the_same_version(backend, tmp_path):
    """Determinism end to end: equal trees hash equal, and re-committing creates nothing."""
    store, _ = backend
    first = store.commit("corpus", "main", make_tree(tmp_path / "a"), META)
    again = store.commit("corpus", "main", make_tree(tmp_path / "b", **{"_job.json": "other"}),
                         {**META, "airflow_run_id": "manual__2"})  # fmt: skip
    assert again.created is False and again.commit_id == first.commit_id
    assert [c.commit_id for c in store.log("corpus", "main")] == [first.commit_id]


def test_new_content_is_a_child_with_a_diff_and_a_tag(backend, tmp_path):
    store, _ = backend
    first = store.commit("corpus", "main", make_tree(tmp_path / "a", train="v1", **{"extra.jsonl": "x\n"}), META)
    second = store.commit("corpus", "main", make_tree(tmp_path / "b", train="v2"), {**META, "airflow_run_id": "r2"})
    assert second.created and second.parent == first.commit_id
    assert [c.commit_id for c in store.log("corpus", "main")] == [second.commit_id, first.commit_id]
    assert "v1" in (store.local_path("corpus", first.commit_id) / "train.jsonl").read_text()
    changes = {d["path"]: d["type"] for d in store.diff("corpus", first.commit_id, second.commit_id)}
    assert changes == {"extra.jsonl": "removed", "train.jsonl": "changed"}
    assert store.tag("corpus", second.commit_id, "release-1") == second.commit_id
    assert store.tag("corpus", second.commit_id, "release-1") == second.commit_id, "re-tagging is a no-op"
    with pytest.raises(DatasetStoreError, match="already points at"):
        store.tag("corpus", first.commit_id, "release-1")


def _commit_and_die(make, src: str, kill_on: int) -> None:
    """In a forked child: commit, and SIGKILL ourselves while the ``kill_on``-th file is written."""
    import shutil

    store = make()
    calls = {"n": 0}

    def maybe_die():
        calls["n"] += 1
        if calls["n"] == kill_on:
            os.kill(os.getpid(), signal.SIGKILL)

    if store.name == "local":
        real = shutil.copyfile

        def copy(a, b, *args, **kwargs):
            maybe_die()
            return real(a, b, *args, **kwargs)

        shutil.copyfile = copy
    else:
        real_call = store._call

        def call(what, api, method, *args, **kwargs):
            if method == "upload_object":
                maybe_die()
            return real_call(what, api, method, *args, **kwargs)

        store._call = call
    store.commit("corpus", "main", Path(src), {**META, "airflow_run_id": "killed__1"})


def test_a_commit_killed_midway_leaves_the_branch_untouched(backend, tmp_path):
    store, make = backend
    first = store.commit("corpus", "main", make_tree(tmp_path / "a", train="v1"), META)
    src = make_tree(tmp_path / "b", train="v2")

    child = multiprocessing.get_context("fork").Process(target=_commit_and_die, args=(make, str(src), 3))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL, "the child must have died inside the commit"

    head = store.head("corpus", "main")
    assert head.commit_id == first.commit_id, "main moved although the commit never finished"
    assert "v1" in (store.local_path("corpus", head.commit_id) / "train.jsonl").read_text()
    assert [c.commit_id for c in store.log("corpus", "main")] == [first.commit_id]
    # the retry of the task finishes the job
    retry = store.commit("corpus", "main", src, {**META, "airflow_run_id": "killed__1"})
    assert retry.created and retry.parent == first.commit_id
    assert "v2" in (store.local_path("corpus", retry.commit_id) / "train.jsonl").read_text()
