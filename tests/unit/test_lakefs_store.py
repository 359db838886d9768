"""The lakeFS dataset store (write-audit-publish) against an in-memory lakeFS that enforces the OpenAPI contract.

Every request the store sends and every response the server returns is validated against
``shared/contracts/lakefs-openapi.yml``; the ``lakefs`` fixture fails the test on any violation.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from lakefs_contract_server import Fault, LakeFSContractServer

from llmops_provider.datasets import (
    CommitNotFound,
    DatasetStoreError,
    get_store,
    tree_hash,
)
from llmops_provider.datasets.lakefs import (
    DatasetGateFailed,
    LakeFSCallError,
    LakeFSDatasetStore,
    decode_metadata,
    encode_metadata,
    wap_branch_name,
)

pytestmark = pytest.mark.unit

META = {
    "airflow_dag_id": "tiny-llama_data",
    "airflow_run_id": "manual__2024-05-01T00:00:00+00:00",
    "airflow_try_number": "1",
    "recipe_fingerprint": "abc123",
    "stats": {"kept": 3, "splits": [1, 2]},
    "spark_app_id": "local-1",
    "validation": None,
}


def make_tree(root: Path, train: str = "a", **extra: str | bytes) -> Path:
    files = {
        "train.jsonl": json.dumps({"id": "1", "text": train}) + "\n",
        "validation.jsonl": "",
        "test.jsonl": "",
        "quarantine.jsonl": "",
        "stats.json": "{}",
        **extra,
    }
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return root


@pytest.fixture
def lakefs():
    server = LakeFSContractServer(access_key="AKIATEST", secret_key="s3cr3t").start()
    server.create_repo("corpus")
    yield server
    server.stop()
    assert not server.violations, "lakeFS contract violations:\n" + "\n".join(server.violations)


def connect(monkeypatch, server: LakeFSContractServer, timeout: str = "2,2", **extra) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_LAKEFS_DEFAULT",
        json.dumps(
            {
                "conn_type": "llmops_lakefs",
                "host": server.url,
                "login": "AKIATEST",
                "password": "s3cr3t",
                "extra": {"request_timeout": timeout, **extra},
            }
        ),
    )


@pytest.fixture
def store(lakefs, monkeypatch, tmp_path) -> LakeFSDatasetStore:
    connect(monkeypatch, lakefs)
    return LakeFSDatasetStore.from_hook(cache_dir=tmp_path / "cache", backoff=0.01)


def main_head(server: LakeFSContractServer) -> str:
    return server.repos["corpus"].branches["main"]


# -- write-audit-publish -----------------------------------------------------------------


def test_first_commit_publishes_through_a_wap_branch_with_metadata(store, lakefs, tmp_path):
    src = make_tree(tmp_path / "stage", **{"_job.json": "{}", ".tmp/x": "junk"})
    root = main_head(lakefs)
    assert store.head("corpus", "main") is None, "the repository's empty root commit is not a version"

    info = store.commit("corpus", "main", src, META)

    repo = lakefs.repos["corpus"]
    assert info.created and info.branch == "main" and info.repo == "corpus" and info.parent is None
    assert info.commit_id == repo.branches["main"], "commit_id is the merge commit on the target branch"
    assert info.metadata == META, "nested values round-trip through lakeFS's string metadata"
    assert info.tree_hash == tree_hash(src)
    merge = repo.commits[info.commit_id]
    wap_commit = repo.commits[merge.parents[1]]
    assert merge.parents[0] == root
    assert merge.metadata["stats"] == json.dumps(META["stats"], sort_keys=True)
    assert merge.metadata["airflow_run_id"] == META["airflow_run_id"], "strings stay readable in the UI"
    assert wap_commit.metadata["llmops_tree_hash"] == info.tree_hash
    assert sorted(merge.tree) == [
        f"dataset/{n}" for n in ("quarantine.jsonl", "stats.json", "test.jsonl", "train.jsonl", "validation.jsonl")
    ]
    assert list(repo.branches) == ["main"], "the published WAP branch is deleted"
    ops = [op for op, _ in lakefs.calls]
    assert ops.index("commit") < ops.index("mergeIntoBranch"), "merge only after upload + commit"
    assert ops.index("uploadObject") > ops.index("createBranch")

    assert store.head("corpus", "main") == info.model_copy(update={"created": False})
    assert store.get("corpus", info.commit_id).metadata == META
    assert store.get("corpus", info.commit_id[:12]).commit_id == info.commit_id
    assert [c.commit_id for c in store.log("corpus", "main")] == [info.commit_id]


def test_recommit_of_identical_data_creates_nothing(store, lakefs, tmp_path):
    first = store.commit("corpus", "main", make_tree(tmp_path / "a"), META)
    commits_before = len(lakefs.repos["corpus"].commits)
    lakefs.calls.clear()

    again = store.commit(
        "corpus", "main", make_tree(tmp_path / "b", **{"_job.json": "other"}), {**META, "airflow_run_id": "manual__2"}
    )

    assert again.created is False and again.commit_id == first.commit_id
    assert again.metadata["airflow_run_id"] == META["airflow_run_id"], "the head keeps the run that created it"
    assert len(lakefs.repos["corpus"].commits) == commits_before
    assert not {"createBranch", "uploadObject", "commit", "mergeIntoBranch"} & {op for op, _ in lakefs.calls}
    assert [c.commit_id for c in store.log("corpus", "main")] == [first.commit_id]


def test_identical_tree_under_a_foreign_head_is_detected_by_diff(store, lakefs, tmp_path):
    src = make_tree(tmp_path / "a")
    repo = lakefs.repos["corpus"]  # someone committed the same files with lakectl: no llmops metadata
    foreign = lakefs._new_commit(
        repo, [main_head(lakefs)], "manual upload", {}, {f"dataset/{p.name}": p.read_bytes() for p in src.iterdir()}
    )
    repo.branches["main"] = foreign.id

    info = store.commit("corpus", "main", src, META)

    assert info.created is False and info.commit_id == foreign.id and info.tree_hash == tree_hash(src)
    assert list(repo.branches) == ["main"], "the temporary WAP branch is deleted"
    assert lakefs.count("mergeIntoBranch") == 0 and lakefs.count("diffRefs") == 1


def test_changed_tree_creates_a_child_and_removes_dropped_files(store, lakefs, tmp_path):
    first = store.commit("corpus", "main", make_tree(tmp_path / "a", train="v1", **{"extra.jsonl": "x\n"}), META)
    second = store.commit("corpus", "main", make_tree(tmp_path / "b", train="v2"), {**META, "airflow_run_id": "r2"})

    assert second.created and second.parent == first.commit_id and second.commit_id != first.commit_id
    assert [c.commit_id for c in store.log("corpus", "main")] == [second.commit_id, first.commit_id]
    assert not (store.local_path("corpus", second.commit_id) / "extra.jsonl").exists()
    assert "v1" in (store.local_path("corpus", first.commit_id) / "train.jsonl").read_text()
    changes = {d["path"]: d["type"] for d in store.diff("corpus", first.commit_id, second.commit_id)}
    assert changes == {"extra.jsonl": "removed", "train.jsonl": "changed"}
    assert store.tag("corpus", second.commit_id, "v2") == second.commit_id
    assert store.tag("corpus", second.commit_id, "v2") == second.commit_id, "re-tagging is idempotent"
    with pytest.raises(DatasetStoreError, match="already points at"):
        store.tag("corpus", first.commit_id, "v2")


def test_pre_merge_hook_failure_raises_gate_error_and_keeps_main(store, lakefs, tmp_path):
    first = store.commit("corpus", "main", make_tree(tmp_path / "a", train="v1"), META)
    lakefs.pre_merge_failure = "hook 'schema' failed: column text is empty"
    meta = {**META, "airflow_run_id": "scheduled__7"}

    with pytest.raises(DatasetGateFailed, match="pre-merge hook rejected.*column text is empty") as exc:
        store.commit("corpus", "main", make_tree(tmp_path / "b", train="v2"), meta)

    repo = lakefs.repos["corpus"]
    assert main_head(lakefs) == first.commit_id, "main untouched"
    assert exc.value.wap_branch in repo.branches and exc.value.wap_branch in str(exc.value)
    assert repo.branches[exc.value.wap_branch] == exc.value.commit_id, "the candidate stays for inspection"
    assert b"v2" in repo.commits[exc.value.commit_id].tree["dataset/train.jsonl"]
    assert lakefs.count("mergeIntoBranch") == 2, "a 412 is not retried"

    # the hook is fixed; the task retry reuses the candidate instead of uploading again
    lakefs.pre_merge_failure = None
    lakefs.calls.clear()
    info = store.commit("corpus", "main", make_tree(tmp_path / "b", train="v2"), meta)
    assert info.created and info.parent == first.commit_id
    assert repo.commits[info.commit_id].parents[1] == exc.value.commit_id
    assert lakefs.count("uploadObject") == 0 and lakefs.count("commit") == 0
    assert exc.value.wap_branch not in repo.branches


# -- timeouts and retries ------------------------------------------------------------------


def test_hanging_server_fails_within_the_timeout(lakefs, monkeypatch, tmp_path):
    connect(monkeypatch, lakefs, timeout="0.5,0.5")
    store = LakeFSDatasetStore.from_hook(cache_dir=tmp_path / "cache", retries=1, backoff=0.01)
    lakefs.faults.append(Fault("getBranch", hang=True, times=10))

    started = time.monotonic()
    with pytest.raises(LakeFSCallError, match="no answer within") as exc:
        store.head("corpus", "main")
    assert time.monotonic() - started < 5
    assert exc.value.status is None and lakefs.count("getBranch") == 0  # both hung: none answered
    lakefs.faults.clear()


def test_hanging_merge_is_not_repeated(lakefs, monkeypatch, tmp_path):
    connect(monkeypatch, lakefs, timeout="1,0.5")
    store = LakeFSDatasetStore.from_hook(cache_dir=tmp_path / "cache", retries=3, backoff=0.01)
    root = main_head(lakefs)
    lakefs.faults.append(Fault("mergeIntoBranch", hang=True, times=10))

    started = time.monotonic()
    with pytest.raises(LakeFSCallError, match="merge .* failed: no answer"):
        store.commit("corpus", "main", make_tree(tmp_path / "a"), META)
    assert time.monotonic() - started < 5
    assert lakefs.faults[0].times == 9, "a merge that may have happened is not sent again"
    assert main_head(lakefs) == root
    lakefs.faults.clear()


def test_5xx_is_retried_with_backoff(store, lakefs, tmp_path):
    lakefs.faults += [Fault("uploadObject", status=503, message="slow down"), Fault("mergeIntoBranch", status=500)]

    info = store.commit("corpus", "main", make_tree(tmp_path / "a"), META)

    assert info.created and main_head(lakefs) == info.commit_id
    assert [s for op, s in lakefs.calls if op == "mergeIntoBranch"] == [500, 200]
    assert [s for op, s in lakefs.calls if op == "uploadObject"][:2] == [503, 201]


@pytest.mark.parametrize("status", [400, 404])
def test_4xx_is_not_retried(store, lakefs, status):
    lakefs.faults.append(Fault("getRepository", status=status, times=5))
    with pytest.raises(LakeFSCallError) as exc:
        store._call("get repository", "RepositoriesApi", "get_repository", "corpus")
    assert exc.value.status == status and lakefs.count("getRepository") == 1
    lakefs.faults.clear()


def test_missing_commit_and_repo_are_clear_errors(store, lakefs, tmp_path):
    with pytest.raises(CommitNotFound, match="no commit"):
        store.get("corpus", "0" * 64)
    assert lakefs.count("getCommit") == 1
    assert store.head("corpus", "nope") is None and store.log("corpus", "nope") == []
    with pytest.raises(DatasetStoreError, match="lakectl repo create"):
        store.commit("other-repo", "main", make_tree(tmp_path / "a"), META)


def test_missing_repo_and_branch_are_created_with_a_storage_namespace(lakefs, monkeypatch, tmp_path):
    connect(monkeypatch, lakefs, storage_namespace="local://lakefs")
    store = LakeFSDatasetStore.from_hook(cache_dir=tmp_path / "cache")
    info = store.commit("fresh-repo", "curated", make_tree(tmp_path / "a"), META)
    repo = lakefs.repos["fresh-repo"]
    assert repo.storage_namespace == "local://lakefs/fresh-repo" and repo.default_branch == "curated"
    assert store.head("fresh-repo", "curated").commit_id == info.commit_id
    other = store.commit("fresh-repo", "exp", make_tree(tmp_path / "b", train="z"), META)
    assert other.branch == "exp" and other.parent == info.commit_id


def test_connection_refused_is_retried_then_fails_fast(monkeypatch, tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    monkeypatch.setenv(
        "AIRFLOW_CONN_LAKEFS_DEFAULT",
        json.dumps({"conn_type": "llmops_lakefs", "host": f"http://127.0.0.1:{port}", "login": "k", "password": "s"}),
    )
    sleeps: list[float] = []
    store = LakeFSDatasetStore.from_hook(cache_dir=tmp_path, retries=2, backoff=0.1, sleep=sleeps.append)
    with pytest.raises(LakeFSCallError, match="after 3 attempts"):
        store.head("corpus", "main")
    assert sleeps == [0.1, 0.2]


# -- reading versions back -----------------------------------------------------------------


def test_local_path_downloads_byte_identical_files_once(store, lakefs, tmp_path):
    blob = bytes(range(256)) * 50
    src = make_tree(tmp_path / "a", **{"shards/part-0.bin": blob, "notes.txt": "ünïcode\r\n"})
    info = store.commit("corpus", "main", src, META)

    path = store.local_path("corpus", info.commit_id)

    assert path == tmp_path / "cache" / "corpus" / info.commit_id
    for rel in ("train.jsonl", "shards/part-0.bin", "notes.txt", "stats.json"):
        assert (path / rel).read_bytes() == (src / rel).read_bytes()
    assert tree_hash(path) == info.tree_hash
    assert not (path / "train.jsonl").stat().st_mode & 0o222, "a downloaded version is read-only"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]
    downloads = lakefs.count("getObject")
    assert store.local_path("corpus", info.commit_id[:10]) == path
    assert lakefs.count("getObject") == downloads, "cached: downloaded once"


# -- wiring and helpers ------------------------------------------------------------------------


def test_get_store_builds_the_lakefs_backend_from_the_connection(lakefs, monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW__LLMOPS__HOME", str(tmp_path / "home"))
    connect(monkeypatch, lakefs, timeout="3,7")
    store = get_store("lakefs")
    assert isinstance(store, LakeFSDatasetStore)
    assert store.request_timeout == (3.0, 7.0) and store.cache_dir == (tmp_path / "home").resolve() / "lakefs-cache"
    assert store.client.configuration.retries is False, "urllib3 must not retry under our own retries"
    assert store.head("corpus", "main") is None


def test_metadata_codec_and_wap_branch_names():
    raw = encode_metadata(META)
    assert all(isinstance(v, str) for v in raw.values())
    assert decode_metadata(raw) == META
    assert decode_metadata({"plain": "1"}) == {"plain": "1"}
    with pytest.raises(DatasetStoreError, match="JSON-serializable"):
        encode_metadata({"when": object()})
    with pytest.raises(DatasetStoreError, match="reserved prefix"):
        encode_metadata({"llmops_tree_hash": "x"})

    name = wap_branch_name(META, "main", "d" * 64)
    assert name == wap_branch_name({**META, "airflow_try_number": "2"}, "main", "e" * 64), "stable across retries"
    assert name != wap_branch_name(META, "exp", "d" * 64)
    assert name.startswith("wap-manual__2024-05-01T00-00-00-00-00-")
    import re

    assert re.fullmatch(r"\w[-\w]*", name)


def test_contract_server_rejects_requests_off_the_spec(lakefs):
    import base64
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"{lakefs.url}/api/v1/repositories/corpus/branches",
        data=b'{"name": "x"}',
        method="POST",
        headers={
            "Content-Type": "application/json",
            "Authorization": "Basic " + base64.b64encode(b"AKIATEST:s3cr3t").decode(),
        },
    )
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(request, timeout=5)
    assert exc.value.code == 400
    assert any("source" in v for v in lakefs.violations), lakefs.violations
    lakefs.violations.clear()  # the fixture would fail the test on it: that is the point
