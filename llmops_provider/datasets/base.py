"""The dataset store interface: versioned directories of files, committed to branches.

A dataset version is the directory layout of docs/architecture.md (``train.jsonl``,
``validation.jsonl``, ``test.jsonl``, ``quarantine.jsonl``, ``stats.json``). Files and
directories whose name starts with ``_`` or ``.`` are run-local (job provenance, validation
reports, temp files) and are not part of a version - the Hadoop convention Spark follows.
The local backend and lakeFS implement the same interface, so operators never branch on it.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

# lakeFS naming rules, enforced locally too so a recipe that works locally works on lakeFS
_REPO = re.compile(r"^[a-z0-9][a-z0-9-]{2,62}$")
_BRANCH = re.compile(r"^\w[-\w]*$")


class DatasetStoreError(RuntimeError):
    """A dataset store operation failed; the message names the repo/branch/commit and the fix."""


class CommitNotFound(DatasetStoreError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class CommitInfo(BaseModel):
    """One dataset version. ``created`` is False when the commit call found it already there."""

    model_config = ConfigDict(frozen=True)

    commit_id: str
    repo: str
    branch: str
    parent: str | None
    tree_hash: str
    metadata: dict[str, Any]
    created: bool
    created_at: datetime


def validate_repo(repo: str) -> str:
    if not _REPO.match(repo or ""):
        raise DatasetStoreError(
            f"invalid dataset repository name {repo!r} (data.dataset_repo): use 3-63 lowercase letters, "
            "digits and '-', starting with a letter or digit, e.g. 'tiny-corpus'"
        )
    return repo


def validate_branch(branch: str) -> str:
    if not _BRANCH.match(branch or ""):
        raise DatasetStoreError(
            f"invalid branch name {branch!r} (data.branch): use letters, digits, '_' and '-', e.g. 'main'"
        )
    return branch


def validate_tag(tag: str) -> str:
    if not _BRANCH.match(tag or "") or len(tag) > 128:
        raise DatasetStoreError(
            f"invalid tag {tag!r}: use letters, digits, '_' and '-' (at most 128), e.g. 'v1-release'"
        )
    return tag


def is_hidden(rel: Path) -> bool:
    return any(part.startswith(("_", ".")) for part in rel.parts)


def tree_files(root: Path) -> Iterator[tuple[str, Path]]:
    """``(posix relative path, path)`` of the version's files under ``root``, sorted."""
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.is_file() and not is_hidden(rel):
            found.append((rel.as_posix(), path))
    yield from sorted(found)


def tree_hash(root: Path) -> str:
    """sha256 over every file's relative path and content: equal trees, equal hashes."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetStoreError(f"{root} is not a directory; pass the staging directory the prepare task wrote")
    outer = hashlib.sha256()
    count = 0
    for rel, path in tree_files(root):
        inner = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                inner.update(chunk)
        outer.update(f"{rel}\0{inner.hexdigest()}\n".encode())
        count += 1
    if count == 0:
        raise DatasetStoreError(f"{root} has no dataset files to commit (hidden '_'/'.' files do not count)")
    return outer.hexdigest()


class DatasetStore(ABC):
    """Commit staging directories to branches of a repository and read them back."""

    name: str = "abstract"

    @abstractmethod
    def commit(self, repo: str, branch: str, source_dir: str | Path, metadata: dict[str, Any]) -> CommitInfo:
        """Commit the files of ``source_dir`` on ``branch``.

        Idempotent: when the tree equals the branch head's tree, the head is returned with
        ``created=False`` and nothing is written.
        """

    @abstractmethod
    def head(self, repo: str, branch: str) -> CommitInfo | None:
        """The newest commit on ``branch``, or None for a branch without commits."""

    @abstractmethod
    def get(self, repo: str, commit_id: str) -> CommitInfo:
        """One commit by id; raises ``CommitNotFound``."""

    @abstractmethod
    def local_path(self, repo: str, commit_id: str) -> Path:
        """A readable local directory with the commit's files (do not write into it)."""

    @abstractmethod
    def log(self, repo: str, branch: str) -> list[CommitInfo]:
        """The branch's commits, newest first."""

    @abstractmethod
    def diff(self, repo: str, left_ref: str, right_ref: str) -> list[dict[str, Any]]:
        """Dataset files that differ between two versions: ``[{type: added|removed|changed, path, size_bytes}]``."""

    @abstractmethod
    def tag(self, repo: str, commit_id: str, tag: str) -> str:
        """Tag a version (a released dataset); returns the commit id. Re-tagging the same commit is a no-op."""
