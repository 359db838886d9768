"""The embedded dataset store: content-addressed commits under ``[llmops] home``/datasets.

Layout of one repository::

    <root>/<repo>/
        trees/<tree_hash>/...     the files of a version, read-only, shared by equal trees
        commits/<commit_id>.json  tree_hash, parent, branch, metadata, created_at
        refs/<branch>             the head commit id of the branch
        .lock                     serializes writers (tasks of parallel DAG runs)

Every write lands in a temporary name first and is renamed into place, so a crashed task
leaves at most an orphaned temp directory, never a half-written version or a dangling ref.
"""

from __future__ import annotations

import contextlib
import fcntl
import filecmp
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
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
    validate_tag,
)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _json_safe(metadata: dict[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(metadata, sort_keys=True))
    except TypeError as exc:
        raise DatasetStoreError(f"commit metadata must be JSON-serializable: {exc}") from None


class LocalDatasetStore(DatasetStore):
    name = "local"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # -- paths ---------------------------------------------------------------------------
    def _repo_dir(self, repo: str) -> Path:
        return self.root / validate_repo(repo)

    @contextlib.contextmanager
    def _locked(self, repo: str) -> Iterator[Path]:
        repo_dir = self._repo_dir(repo)
        for sub in ("trees", "commits", "refs"):
            (repo_dir / sub).mkdir(parents=True, exist_ok=True)
        with (repo_dir / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield repo_dir
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # -- reads ---------------------------------------------------------------------------
    def _load(self, repo: str, commit_id: str) -> CommitInfo:
        path = self._repo_dir(repo) / "commits" / f"{commit_id}.json"
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            raise CommitNotFound(f"dataset repo {repo!r} has no commit {commit_id!r}") from None
        return CommitInfo(**record, created=False)

    def _resolve(self, repo: str, commit_id: str) -> str:
        """Full id from a full id or a unique prefix of at least 7 characters (as git allows)."""
        commits = self._repo_dir(repo) / "commits"
        if (commits / f"{commit_id}.json").exists():
            return commit_id
        if len(commit_id) >= 7 and all(c in "0123456789abcdef" for c in commit_id):
            matches = [p.stem for p in commits.glob(f"{commit_id}*.json")]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise CommitNotFound(f"commit prefix {commit_id!r} is ambiguous in {repo!r}; give more characters")
        raise CommitNotFound(
            f"dataset repo {repo!r} has no commit {commit_id!r}; list them with store.log(repo, branch)"
        )

    def get(self, repo: str, commit_id: str) -> CommitInfo:
        return self._load(repo, self._resolve(repo, commit_id))

    def head(self, repo: str, branch: str) -> CommitInfo | None:
        ref = self._repo_dir(repo) / "refs" / validate_branch(branch)
        try:
            commit_id = ref.read_text().strip()
        except FileNotFoundError:
            return None
        return self._load(repo, commit_id)

    def log(self, repo: str, branch: str) -> list[CommitInfo]:
        out: list[CommitInfo] = []
        info = self.head(repo, branch)
        while info is not None:
            out.append(info)
            info = self._load(repo, info.parent) if info.parent else None
        return out

    def local_path(self, repo: str, commit_id: str) -> Path:
        info = self.get(repo, commit_id)
        path = self._repo_dir(repo) / "trees" / info.tree_hash
        if not path.is_dir():
            raise DatasetStoreError(f"commit {info.commit_id} of {repo!r} points at missing tree {path}")
        return path

    def diff(self, repo: str, left_ref: str, right_ref: str) -> list[dict[str, Any]]:
        """Dataset files that differ between two commits: ``[{type, path, size_bytes}]``, sorted by path."""
        left = dict(tree_files(self.local_path(repo, left_ref)))
        right = dict(tree_files(self.local_path(repo, right_ref)))
        out = []
        for rel in sorted(left.keys() | right.keys()):
            if rel not in right:
                out.append({"type": "removed", "path": rel, "size_bytes": left[rel].stat().st_size})
            elif rel not in left:
                out.append({"type": "added", "path": rel, "size_bytes": right[rel].stat().st_size})
            elif not filecmp.cmp(left[rel], right[rel], shallow=False):
                out.append({"type": "changed", "path": rel, "size_bytes": right[rel].stat().st_size})
        return out

    def tag(self, repo: str, commit_id: str, tag: str) -> str:
        """Tag ``commit_id`` (e.g. a released dataset); re-tagging the same commit is a no-op."""
        validate_tag(tag)
        full = self._resolve(repo, commit_id)
        with self._locked(repo) as repo_dir:
            path = repo_dir / "tags" / tag
            path.parent.mkdir(exist_ok=True)
            if path.is_file():
                existing = path.read_text().strip()
                if existing != full:
                    raise DatasetStoreError(
                        f"tag {tag!r} of {repo!r} already points at {existing}, not {full}; pick another tag"
                    )
                return existing
            _atomic_write(path, full + "\n")
        return full

    def tags(self, repo: str) -> dict[str, str]:
        """``{tag: commit_id}`` of the repository."""
        folder = self._repo_dir(repo) / "tags"
        return {p.name: p.read_text().strip() for p in sorted(folder.glob("*"))} if folder.is_dir() else {}

    # -- writes --------------------------------------------------------------------------
    def _store_tree(self, repo_dir: Path, source: Path, expected: str) -> None:
        final = repo_dir / "trees" / expected
        if final.is_dir():  # the same content committed before (any branch): share it
            return
        tmp = repo_dir / "trees" / f".tmp-{uuid.uuid4().hex}"
        try:
            for rel, path in tree_files(source):
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest)
            # hash what was copied, not what was read before: a staging dir that changed
            # under us must not be stored under the wrong hash
            if tree_hash(tmp) != expected:
                raise DatasetStoreError(f"{source} changed while it was being committed; rerun the commit task")
            for path in tmp.rglob("*"):
                if path.is_file():
                    path.chmod(0o444)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def commit(self, repo: str, branch: str, source_dir: str | Path, metadata: dict[str, Any]) -> CommitInfo:
        validate_branch(branch)
        source = Path(source_dir)
        digest = tree_hash(source)
        metadata = _json_safe(metadata)
        with self._locked(repo) as repo_dir:
            head = self.head(repo, branch)
            if head is not None and head.tree_hash == digest:
                return head  # created=False: re-running on unchanged data adds no version
            self._store_tree(repo_dir, source, digest)
            parent = head.commit_id if head else None
            # the branch is part of the identity: the first commits of two branches may share tree,
            # parent (none) and metadata, yet each records where it was made
            key = json.dumps(
                {"tree_hash": digest, "parent": parent, "branch": branch, "metadata": metadata}, sort_keys=True
            )
            commit_id = hashlib.sha256(key.encode()).hexdigest()
            record_path = repo_dir / "commits" / f"{commit_id}.json"
            if record_path.exists():  # identical tree, parent, branch and metadata: the very same commit
                record = json.loads(record_path.read_text())
            else:
                record = {
                    "commit_id": commit_id,
                    "repo": repo,
                    "branch": branch,
                    "parent": parent,
                    "tree_hash": digest,
                    "metadata": metadata,
                    "created_at": datetime.now(UTC).isoformat(),
                }
                _atomic_write(record_path, json.dumps(record, indent=2, sort_keys=True) + "\n")
            # the ref moves last: until then readers see the previous head, never a partial commit
            _atomic_write(repo_dir / "refs" / branch, commit_id + "\n")
        return CommitInfo(**record, created=True)
