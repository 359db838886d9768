"""The lakeFS dataset store: write-audit-publish through ``lakefs_sdk``.

A commit never writes to the target branch directly. It

1. creates a WAP branch ``wap-<run id>-<hash>`` from the target head (the same name on a
   task retry, so retries neither leak branches nor redo finished work),
2. uploads the version's files under ``prefix`` and deletes files the new version lacks,
3. commits on the WAP branch with the metadata (lakeFS metadata is string -> string: other
   values are JSON-encoded and listed in ``llmops_json_keys`` so they decode exactly),
4. compares the WAP commit with the target head: identical -> the WAP branch is deleted and
   the head returned with ``created=False``,
5. merges into the target branch. lakeFS runs its pre-merge hooks (the audit) here; a hook
   failure (HTTP 412) raises ``DatasetGateFailed`` and keeps the WAP branch for inspection.

Every call passes ``_request_timeout`` (lakefs-sdk has no default) and is retried, with
backoff, only on 5xx answers and connection errors - never on a 4xx. A read timeout is
retried only for requests that are safe to repeat (not commit or merge).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llmops_provider.datasets.base import (
    CommitInfo,
    CommitNotFound,
    DatasetStore,
    DatasetStoreError,
    tree_files,
    tree_hash,
    validate_branch,
    validate_repo,
)

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "dataset/"
RETRY_STATUSES = frozenset({500, 502, 503, 504})
PAGE = 1000

# reserved commit metadata keys (stripped from CommitInfo.metadata)
RESERVED = "llmops_"
TREE_HASH = "llmops_tree_hash"
BRANCH = "llmops_branch"
PARENT = "llmops_parent"
JSON_KEYS = "llmops_json_keys"
WAP_BRANCH = "llmops_wap_branch"
WAP_COMMIT = "llmops_wap_commit"


class DatasetGateFailed(DatasetStoreError):
    """A lakeFS pre-merge hook rejected the version: the target branch is unchanged."""

    def __init__(self, message: str, *, repo: str, branch: str, wap_branch: str, commit_id: str) -> None:
        super().__init__(message)
        self.repo, self.branch, self.wap_branch, self.commit_id = repo, branch, wap_branch, commit_id


class LakeFSCallError(DatasetStoreError):
    """A lakeFS API call failed; ``status`` is the HTTP status (None: no answer)."""

    def __init__(self, message: str, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status, self.body = status, body


# --------------------------------------------------------------------------- helpers


def wap_branch_name(metadata: dict[str, Any], branch: str, digest: str) -> str:
    """``wap-<sanitized run id>-<8 hex>``: stable for one Airflow run and target branch."""
    run_id = str(metadata.get("airflow_run_id") or "")
    key = f"{metadata.get('airflow_dag_id', '')}\0{run_id}\0{branch}" if run_id else f"{branch}\0{digest}"
    safe = re.sub(r"[^A-Za-z0-9_-]+", "-", run_id or "manual").strip("-_")[:40] or "run"
    return f"wap-{safe}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def encode_metadata(metadata: dict[str, Any]) -> dict[str, str]:
    """String values stay readable in the lakeFS UI; everything else is JSON, listed in ``llmops_json_keys``."""
    try:
        metadata = json.loads(json.dumps(metadata, sort_keys=True))
    except TypeError as exc:
        raise DatasetStoreError(f"commit metadata must be JSON-serializable: {exc}") from None
    clash = sorted(k for k in metadata if k.startswith(RESERVED))
    if clash:
        raise DatasetStoreError(f"commit metadata keys {clash} use the reserved prefix {RESERVED!r}; rename them")
    out, encoded = {}, []
    for key, value in metadata.items():
        if isinstance(value, str):
            out[key] = value
        else:
            out[key] = json.dumps(value, sort_keys=True)
            encoded.append(key)
    out[JSON_KEYS] = json.dumps(sorted(encoded))
    return out


def decode_metadata(raw: dict[str, str] | None) -> dict[str, Any]:
    raw = raw or {}
    try:
        encoded = set(json.loads(raw.get(JSON_KEYS, "[]")))
    except ValueError:
        encoded = set()
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key.startswith(RESERVED):
            continue
        try:
            out[key] = json.loads(value) if key in encoded else value
        except ValueError:
            out[key] = value
    return out


def _error_message(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if body:
        try:
            return json.loads(body).get("message") or str(body)
        except (ValueError, AttributeError):
            return str(body)
    return getattr(exc, "reason", None) or str(exc)


def _is_connection_error(exc: BaseException) -> tuple[bool, bool]:
    """``(is a transport error, is retryable for any request)``.

    Connect failures never reached the server: always safe to retry. A read timeout or a
    dropped connection may have been processed: only idempotent requests are repeated.
    """
    import urllib3.exceptions as ue

    if isinstance(exc, ue.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    if isinstance(exc, (ue.ConnectTimeoutError, ue.NewConnectionError, ConnectionRefusedError)):
        return True, True
    if isinstance(exc, (ue.ReadTimeoutError, ue.ProtocolError, ue.HTTPError, TimeoutError, ConnectionError)):
        return True, False
    return False, False


# --------------------------------------------------------------------------- the store


class LakeFSDatasetStore(DatasetStore):
    """Dataset versions as lakeFS commits; see the module docstring for the write path.

    :param client: a ``lakefs_sdk.ApiClient`` (build it with urllib3 retries off: this store retries)
    :param request_timeout: ``(connect, read)`` seconds passed to every call
    :param cache_dir: where ``local_path`` materializes commits (one directory per commit)
    :param prefix: the path prefix of the dataset files inside the repository
    :param retries: extra attempts after a 5xx or connection error
    :param backoff: first retry delay in seconds, doubled per attempt
    :param storage_namespace: when set, a missing repository is created at
        ``<storage_namespace>/<repo>``; when unset a missing repository is an error
    """

    name = "lakefs"

    def __init__(
        self,
        client: Any,
        *,
        request_timeout: tuple[float, float],
        cache_dir: str | Path,
        prefix: str = DEFAULT_PREFIX,
        retries: int = 3,
        backoff: float = 0.5,
        storage_namespace: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if request_timeout is None:
            raise ValueError("request_timeout is required: lakefs-sdk would otherwise wait forever")
        self.client = client
        self.request_timeout = request_timeout
        self.cache_dir = Path(cache_dir)
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.retries = retries
        self.backoff = backoff
        self.storage_namespace = storage_namespace
        self._sleep = sleep
        self._apis: dict[str, Any] = {}

    @classmethod
    def from_hook(
        cls, lakefs_conn_id: str = "lakefs_default", *, cache_dir: str | Path | None = None, **kwargs: Any
    ) -> LakeFSDatasetStore:
        """The store on the Airflow connection ``lakefs_conn_id`` (extra ``storage_namespace`` optional)."""
        import copy

        import lakefs_sdk

        from llmops_provider import config
        from llmops_provider.hooks.lakefs import LakeFSHook

        hook = LakeFSHook(lakefs_conn_id=lakefs_conn_id)
        conn = hook.get_connection(lakefs_conn_id)
        # our own client: urllib3's default Retry(3) would multiply our retries and timeouts
        configuration = copy.copy(hook.get_client().configuration)
        configuration.retries = False
        kwargs.setdefault("storage_namespace", conn.extra_dejson.get("storage_namespace") or None)
        return cls(
            lakefs_sdk.ApiClient(configuration),
            request_timeout=hook.request_timeout,
            cache_dir=cache_dir if cache_dir is not None else config.home() / "lakefs-cache",
            **kwargs,
        )

    # -- calls ---------------------------------------------------------------------------
    def _api(self, name: str):
        if name not in self._apis:
            import lakefs_sdk

            self._apis[name] = getattr(lakefs_sdk, name)(self.client)
        return self._apis[name]

    def _call(self, what: str, api: str, method: str, *args: Any, idempotent: bool = True, **kwargs: Any) -> Any:
        """One API call with a timeout, retried on 5xx/connection errors only."""
        from lakefs_sdk.exceptions import ApiException

        fn = getattr(self._api(api), method)
        attempt = 0
        while True:
            try:
                return fn(*args, _request_timeout=self.request_timeout, **kwargs)
            except ApiException as exc:
                status = exc.status or None
                retry = status in RETRY_STATUSES
                error = LakeFSCallError(
                    f"lakeFS {what} failed: HTTP {status} {_error_message(exc)}", status, exc.body or ""
                )
            except Exception as exc:
                transport, safe = _is_connection_error(exc)
                if not transport:
                    raise
                retry = safe or idempotent
                error = LakeFSCallError(
                    f"lakeFS {what} failed: no answer within {self.request_timeout} s (connect, read) "
                    f"or connection error: {exc}",
                    None,
                )
            if not retry or attempt >= self.retries:
                if attempt:
                    error.args = (f"{error.args[0]} (after {attempt + 1} attempts)",)
                raise error
            delay = self.backoff * (2**attempt)
            attempt += 1
            log.warning("%s; retry %d/%d in %.1f s", error, attempt, self.retries, delay)
            self._sleep(delay)

    def _maybe(self, what: str, api: str, method: str, *args: Any, **kwargs: Any) -> Any | None:
        """Like ``_call`` but a 404 answers None."""
        try:
            return self._call(what, api, method, *args, **kwargs)
        except LakeFSCallError as exc:
            if exc.status == 404:
                return None
            raise

    # -- reads ---------------------------------------------------------------------------
    def _info(
        self, repo: str, commit: Any, *, branch: str = "", created: bool = False, tree: str | None = None
    ) -> CommitInfo:
        meta = commit.metadata or {}
        if TREE_HASH in meta:
            parent = meta.get(PARENT) or None
        else:  # a commit made outside this store
            parent = commit.parents[0] if commit.parents else None
        return CommitInfo(
            commit_id=commit.id,
            repo=repo,
            branch=meta.get(BRANCH) or branch,
            parent=parent,
            tree_hash=meta.get(TREE_HASH) or tree or "",
            metadata=decode_metadata(meta),
            created=created,
            created_at=datetime.fromtimestamp(commit.creation_date, UTC),
        )

    def _get_commit(self, repo: str, commit_id: str):
        return self._maybe(f"get commit {commit_id} of {repo!r}", "CommitsApi", "get_commit", repo, commit_id)

    def _head_commit(self, repo: str, branch: str):
        """The head commit of ``branch`` (None when the repo or branch does not exist)."""
        ref = self._maybe(f"get branch {repo}@{branch}", "BranchesApi", "get_branch", repo, branch)
        return None if ref is None else self._get_commit(repo, ref.commit_id)

    def head(self, repo: str, branch: str) -> CommitInfo | None:
        commit = self._head_commit(validate_repo(repo), validate_branch(branch))
        if commit is None or not commit.parents:  # lakeFS's empty "Repository created" commit
            return None
        return self._info(repo, commit, branch=branch)

    def get(self, repo: str, commit_id: str) -> CommitInfo:
        commit = self._get_commit(validate_repo(repo), commit_id)
        if commit is None:
            raise CommitNotFound(
                f"lakeFS repo {repo!r} has no commit {commit_id!r}; list them with store.log(repo, branch)"
            )
        return self._info(repo, commit)

    def log(self, repo: str, branch: str) -> list[CommitInfo]:
        validate_repo(repo), validate_branch(branch)
        out: list[CommitInfo] = []
        after: str | None = None
        while True:
            page = self._maybe(
                f"log of {repo}@{branch}",
                "RefsApi",
                "log_commits",
                repo,
                branch,
                after=after,
                amount=PAGE,
                first_parent=True,
            )
            if page is None:
                return []
            for commit in page.results:
                if commit.parents:  # not the repository's root commit
                    out.append(self._info(repo, commit, branch=branch))
            if not page.pagination.has_more:
                return out
            after = page.pagination.next_offset

    def _objects(self, repo: str, ref: str) -> Iterator[Any]:
        after = None
        while True:
            page = self._call(
                f"list {repo}@{ref}/{self.prefix}",
                "ObjectsApi",
                "list_objects",
                repo,
                ref,
                prefix=self.prefix,
                after=after,
                amount=PAGE,
            )
            yield from (o for o in page.results if o.path_type == "object")
            if not page.pagination.has_more:
                return
            after = page.pagination.next_offset

    def local_path(self, repo: str, commit_id: str) -> Path:
        """Download the commit's files once into ``cache_dir/<repo>/<commit>`` (read-only, renamed into place)."""
        info = self.get(repo, commit_id)
        final = self.cache_dir / repo / info.commit_id
        if final.is_dir():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{uuid.uuid4().hex}"
        try:
            for obj in self._objects(repo, info.commit_id):
                rel = obj.path[len(self.prefix) :]
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                data = self._call(
                    f"download {repo}@{info.commit_id[:12]}/{obj.path}",
                    "ObjectsApi",
                    "get_object",
                    repo,
                    info.commit_id,
                    obj.path,
                )
                dest.write_bytes(bytes(data))
            if not tmp.is_dir():
                raise DatasetStoreError(f"commit {info.commit_id} of {repo!r} has no files under {self.prefix!r}")
            if info.tree_hash and tree_hash(tmp) != info.tree_hash:
                raise DatasetStoreError(
                    f"download of {repo}@{info.commit_id} does not match its tree hash {info.tree_hash}; retry the task"
                )
            for path in tmp.rglob("*"):
                if path.is_file():
                    path.chmod(0o444)
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():  # another task won the race: theirs is the same commit
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    def diff(self, repo: str, left_ref: str, right_ref: str) -> list[dict[str, Any]]:
        """Dataset files that differ between two refs: ``[{type, path, size_bytes}]`` (paths without prefix)."""
        out, after = [], None
        while True:
            page = self._call(
                f"diff {repo} {left_ref}..{right_ref}",
                "RefsApi",
                "diff_refs",
                repo,
                left_ref,
                right_ref,
                prefix=self.prefix,
                after=after,
                amount=PAGE,
                type="two_dot",
            )
            out += [
                {"type": d.type, "path": d.path[len(self.prefix) :], "size_bytes": d.size_bytes} for d in page.results
            ]
            if not page.pagination.has_more:
                return out
            after = page.pagination.next_offset

    # -- writes --------------------------------------------------------------------------
    def tag(self, repo: str, commit_id: str, tag: str) -> str:
        """Tag ``commit_id``; returns the tagged commit id. Re-tagging the same commit is a no-op."""
        import lakefs_sdk

        try:
            ref = self._call(
                f"tag {repo}@{commit_id} as {tag!r}",
                "TagsApi",
                "create_tag",
                repo,
                lakefs_sdk.TagCreation(id=tag, ref=commit_id),
            )
            return ref.commit_id
        except LakeFSCallError as exc:
            if exc.status != 409:
                raise
        existing = self._call(f"get tag {tag!r} of {repo}", "TagsApi", "get_tag", repo, tag)
        if existing.commit_id != commit_id and not existing.commit_id.startswith(commit_id):
            raise DatasetStoreError(
                f"tag {tag!r} of {repo!r} already points at {existing.commit_id}, not {commit_id}; pick another tag"
            )
        return existing.commit_id

    def _ensure_repo(self, repo: str, branch: str) -> None:
        import lakefs_sdk

        if self._maybe(f"get repository {repo!r}", "RepositoriesApi", "get_repository", repo) is not None:
            return
        if not self.storage_namespace:
            raise DatasetStoreError(
                f"lakeFS repository {repo!r} (data.dataset_repo) does not exist: create it "
                f"(lakectl repo create lakefs://{repo} <storage-namespace>) or set the connection extra "
                "'storage_namespace' (e.g. s3://bucket/lakefs) so the store creates it"
            )
        namespace = f"{self.storage_namespace.rstrip('/')}/{repo}"
        try:
            self._call(
                f"create repository {repo!r}",
                "RepositoriesApi",
                "create_repository",
                lakefs_sdk.RepositoryCreation(name=repo, storage_namespace=namespace, default_branch=branch),
            )
        except LakeFSCallError as exc:
            if exc.status != 409:  # created meanwhile by a parallel task
                raise

    def _create_branch(self, repo: str, name: str, source: str) -> None:
        import lakefs_sdk

        self._call(
            f"create branch {repo}@{name} from {source}",
            "BranchesApi",
            "create_branch",
            repo,
            lakefs_sdk.BranchCreation(name=name, source=source),
        )

    def _delete_branch(self, repo: str, name: str) -> None:
        try:
            self._call(f"delete branch {repo}@{name}", "BranchesApi", "delete_branch", repo, name)
        except LakeFSCallError as exc:
            if exc.status != 404:
                raise

    def _target_head(self, repo: str, branch: str):
        head = self._head_commit(repo, branch)
        if head is not None:
            return head
        default = self._call(f"get repository {repo!r}", "RepositoriesApi", "get_repository", repo).default_branch
        try:
            self._create_branch(repo, branch, default)
        except LakeFSCallError as exc:
            if exc.status != 409:
                raise
        return self._head_commit(repo, branch)

    def _upload(self, repo: str, wap: str, source: Path, digest: str) -> None:
        """Upload the version's files (checking hash and size against ``digest``); delete files the version lacks."""
        import lakefs_sdk

        outer, sent = hashlib.sha256(), set()
        for rel, path in tree_files(source):
            data = path.read_bytes()
            outer.update(f"{rel}\0{hashlib.sha256(data).hexdigest()}\n".encode())
            key = self.prefix + rel
            # lakefs-sdk 1.88 takes a file *path* for multipart content (bytes would be opened as a path)
            stats = self._call(
                f"upload {repo}@{wap}/{key}", "ObjectsApi", "upload_object", repo, wap, key, content=str(path)
            )
            if stats.size_bytes is not None and stats.size_bytes != len(data):
                raise DatasetStoreError(f"{path} changed while it was being committed; rerun the commit task")
            sent.add(key)
        if outer.hexdigest() != digest:
            raise DatasetStoreError(f"{source} changed while it was being committed; rerun the commit task")
        stale = sorted(o.path for o in self._objects(repo, wap) if o.path not in sent)
        for i in range(0, len(stale), PAGE):
            self._call(
                f"delete {len(stale)} stale objects on {repo}@{wap}",
                "ObjectsApi",
                "delete_objects",
                repo,
                wap,
                lakefs_sdk.PathList(paths=stale[i : i + PAGE]),
            )

    def _write_wap(
        self, repo: str, branch: str, wap: str, target: Any, source: Path, digest: str, meta: dict[str, str]
    ):
        """The WAP commit for ``digest`` on top of ``target``: reused when a previous try made it."""
        import lakefs_sdk

        existing = self._head_commit(repo, wap)
        if existing is not None:
            if (existing.metadata or {}).get(TREE_HASH) == digest and existing.parents[:1] == [target.id]:
                log.info("Reusing %s@%s from a previous try (commit %s)", repo, wap, existing.id)
                return existing
            self._delete_branch(repo, wap)  # stale: made from an older head or other data
        self._create_branch(repo, wap, target.id)
        self._upload(repo, wap, source, digest)
        run = decode_metadata(meta).get("airflow_run_id", "manual")
        creation = lakefs_sdk.CommitCreation(
            message=f"llmops: dataset {digest[:12]} for {branch} (run {run})",
            metadata={**meta, TREE_HASH: digest, BRANCH: branch, WAP_BRANCH: wap},
            allow_empty=True,  # identical data still gets a commit: the diff below decides
        )
        return self._call(f"commit on {repo}@{wap}", "CommitsApi", "commit", repo, wap, creation, idempotent=False)

    def commit(self, repo: str, branch: str, source_dir: str | Path, metadata: dict[str, Any]) -> CommitInfo:
        import lakefs_sdk

        validate_repo(repo), validate_branch(branch)
        source = Path(source_dir)
        digest = tree_hash(source)
        meta = encode_metadata(metadata)
        self._ensure_repo(repo, branch)
        target = self._target_head(repo, branch)
        if target.parents and (target.metadata or {}).get(TREE_HASH) == digest:
            return self._info(repo, target, branch=branch)  # created=False, nothing written

        wap = wap_branch_name(metadata, branch, digest)
        staged = self._write_wap(repo, branch, wap, target, source, digest, meta)
        target = self._head_commit(repo, branch)  # re-read: another run may have published meanwhile
        if not self._diff_any(repo, target.id, staged.id):
            self._delete_branch(repo, wap)
            log.info("%s@%s already holds this tree (%s): nothing to publish", repo, branch, digest[:12])
            return self._info(repo, target, branch=branch, tree=digest)

        merge = lakefs_sdk.Merge(
            message=f"llmops: publish dataset {digest[:12]} to {branch}",
            metadata={
                **meta,
                TREE_HASH: digest,
                BRANCH: branch,
                PARENT: target.id if target.parents else "",
                WAP_BRANCH: wap,
                WAP_COMMIT: staged.id,
            },
        )
        try:
            result = self._call(
                f"merge {repo}@{wap} into {branch}",
                "RefsApi",
                "merge_into_branch",
                repo,
                staged.id,
                branch,
                merge,
                idempotent=False,
            )
        except LakeFSCallError as exc:
            if exc.status == 412:
                raise DatasetGateFailed(
                    f"lakeFS pre-merge hook rejected dataset {digest[:12]} for {repo}@{branch}: "
                    f"{_error_message_text(exc)}. {branch} is unchanged; inspect the candidate on branch "
                    f"{wap!r} (commit {staged.id}), fix the data or the hook, then rerun the task",
                    repo=repo,
                    branch=branch,
                    wap_branch=wap,
                    commit_id=staged.id,
                ) from None
            if exc.status == 409:
                raise DatasetStoreError(
                    f"merging {repo}@{wap} into {branch} conflicts with a version published meanwhile; "
                    f"rerun the task to rebase on the new head (the candidate stays on {wap!r})"
                ) from None
            raise
        merged = self._get_commit(repo, result.reference)
        if merged is None:
            raise DatasetStoreError(f"lakeFS merged into {repo}@{branch} but commit {result.reference} is not readable")
        try:
            self._delete_branch(repo, wap)  # published: the WAP commit stays reachable as the merge's parent
        except LakeFSCallError as exc:
            log.warning("Published %s but could not delete %s: %s", result.reference, wap, exc)
        return self._info(repo, merged, branch=branch, created=True)

    def _diff_any(self, repo: str, left: str, right: str) -> bool:
        page = self._call(
            f"diff {repo} {left[:12]}..{right[:12]}",
            "RefsApi",
            "diff_refs",
            repo,
            left,
            right,
            prefix=self.prefix,
            amount=1,
            type="two_dot",
        )
        return bool(page.results)


def _error_message_text(exc: LakeFSCallError) -> str:
    try:
        return json.loads(exc.body).get("message") or str(exc)
    except (ValueError, TypeError, AttributeError):
        return str(exc)
