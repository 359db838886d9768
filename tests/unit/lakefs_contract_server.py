"""An in-memory lakeFS that speaks the official OpenAPI contract, for unit tests.

Only the endpoints the lakeFS dataset store uses are implemented. Every request it receives
and every response it sends is validated against ``shared/contracts/lakefs-openapi.yml``
with openapi-core; violations are collected in ``server.violations`` (the test fixture
fails on any). Faults (a status code, or a hang) can be injected per operationId.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from werkzeug.routing import Map, Rule
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

SPEC_NAME = Path("shared") / "contracts" / "lakefs-openapi.yml"
SPEC_PATH = next((p / SPEC_NAME for p in Path(__file__).resolve().parents if (p / SPEC_NAME).is_file()), SPEC_NAME)
API = "/api/v1"


@functools.lru_cache(maxsize=1)
def load_openapi():
    """The parsed contract, once per process (it is ~180 kB of YAML)."""
    import yaml
    from openapi_core import OpenAPI
    from openapi_core.configurations import Config

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with SPEC_PATH.open() as fh:
        spec = yaml.load(fh, Loader=loader)
    # YAML reads `200:` as an int; OpenAPI keys are strings (else every status matches `default`)
    for item in spec["paths"].values():
        for op in item.values():
            if isinstance(op, dict) and "responses" in op:
                op["responses"] = {str(code): resp for code, resp in op["responses"].items()}
    # the spec itself is trusted: skip meta-validation, validate traffic only
    return OpenAPI.from_dict(spec, config=Config(spec_validator_cls=None))


ROUTES = [
    ("/healthcheck", "GET", "healthCheck"),
    ("/repositories", "POST", "createRepository"),
    ("/repositories/<repository>", "GET", "getRepository"),
    ("/repositories/<repository>/branches", "POST", "createBranch"),
    ("/repositories/<repository>/branches/<branch>", "GET", "getBranch"),
    ("/repositories/<repository>/branches/<branch>", "DELETE", "deleteBranch"),
    ("/repositories/<repository>/branches/<branch>/objects", "POST", "uploadObject"),
    ("/repositories/<repository>/branches/<branch>/objects/delete", "POST", "deleteObjects"),
    ("/repositories/<repository>/branches/<branch>/commits", "POST", "commit"),
    ("/repositories/<repository>/refs/<ref>/objects", "GET", "getObject"),
    ("/repositories/<repository>/refs/<ref>/objects/stat", "GET", "statObject"),
    ("/repositories/<repository>/refs/<ref>/objects/ls", "GET", "listObjects"),
    ("/repositories/<repository>/refs/<ref>/commits", "GET", "logCommits"),
    ("/repositories/<repository>/refs/<sourceRef>/merge/<destinationBranch>", "POST", "mergeIntoBranch"),
    ("/repositories/<repository>/refs/<leftRef>/diff/<rightRef>", "GET", "diffRefs"),
    ("/repositories/<repository>/commits/<commitId>", "GET", "getCommit"),
    ("/repositories/<repository>/tags", "POST", "createTag"),
    ("/repositories/<repository>/tags/<tag>", "GET", "getTag"),
]


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Fault:
    """Answer ``status`` (or hang until the server stops) for the next ``times`` calls of ``operation``."""

    operation: str
    status: int | None = None
    message: str = "injected fault"
    hang: bool = False
    times: int = 1


@dataclass
class CommitRec:
    id: str
    parents: list[str]
    message: str
    metadata: dict[str, str]
    tree: dict[str, bytes]
    creation_date: int
    generation: int
    committer: str = "llmops"

    @property
    def meta_range_id(self) -> str:
        digest = hashlib.sha256()
        for path in sorted(self.tree):
            digest.update(path.encode() + b"\0" + hashlib.sha256(self.tree[path]).digest())
        return digest.hexdigest()

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "parents": self.parents,
            "committer": self.committer,
            "message": self.message,
            "creation_date": self.creation_date,
            "meta_range_id": self.meta_range_id,
            "metadata": self.metadata,
            "generation": self.generation,
            "version": 1,
        }


@dataclass
class RepoRec:
    name: str
    storage_namespace: str
    default_branch: str
    created: int
    commits: dict[str, CommitRec] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # name -> head commit id
    staged: dict[str, dict[str, bytes | None]] = field(default_factory=dict)  # branch -> path -> data/tombstone
    tags: dict[str, str] = field(default_factory=dict)


def _paginate(items: list, key, after: str | None, amount: int | None) -> tuple[list, dict]:
    amount = 100 if amount in (None, -1) else amount
    if after:
        items = [i for i in items if key(i) > after]
    page, more = items[:amount], len(items) > amount
    return page, {
        "has_more": more,
        "next_offset": key(page[-1]) if more and page else "",
        "results": len(page),
        "max_per_page": amount,
    }


class LakeFSContractServer:
    """In-memory lakeFS on 127.0.0.1:<random port>; ``url`` is the endpoint for the connection."""

    def __init__(self, access_key: str = "AKIATEST", secret_key: str = "secret") -> None:
        self.openapi = load_openapi()
        self.auth = "Basic " + base64.b64encode(f"{access_key}:{secret_key}".encode()).decode()
        self.repos: dict[str, RepoRec] = {}
        self.faults: list[Fault] = []
        self.calls: list[tuple[str, int]] = []  # (operationId, status) in order
        self.violations: list[str] = []
        self.pre_merge_failure: str | None = None  # a message: the pre-merge hook fails with it
        self._map = Map([Rule(API + path, methods=[method], endpoint=op) for path, method, op in ROUTES])
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._server = make_server("127.0.0.1", 0, self._wsgi, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self) -> LakeFSContractServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # releases hanging handlers
        self._server.shutdown()
        self._server.server_close()

    def count(self, operation: str) -> int:
        return sum(1 for op, _ in self.calls if op == operation)

    # -- test setup ----------------------------------------------------------------------
    def create_repo(self, name: str, default_branch: str = "main") -> RepoRec:
        with self._lock:
            return self._create_repo(name, "mem://" + name, default_branch)

    def _create_repo(self, name: str, namespace: str, default_branch: str) -> RepoRec:
        repo = RepoRec(name, namespace, default_branch, int(time.time()))
        root = self._new_commit(repo, [], "Repository created", {}, {})
        repo.branches[default_branch] = root.id
        repo.staged[default_branch] = {}
        self.repos[name] = repo
        return repo

    # -- model ---------------------------------------------------------------------------
    def _new_commit(self, repo: RepoRec, parents, message, metadata, tree) -> CommitRec:
        generation = 1 + max((repo.commits[p].generation for p in parents), default=0)
        seq = next(self._ids)
        cid = hashlib.sha256(f"{repo.name}/{seq}/{parents}/{message}".encode()).hexdigest()
        rec = CommitRec(cid, list(parents), message, dict(metadata), dict(tree), int(time.time()), generation)
        repo.commits[cid] = rec
        return rec

    def _repo(self, name: str) -> RepoRec:
        if name not in self.repos:
            raise ApiError(404, f"repository not found: {name}")
        return self.repos[name]

    def _commit_of(self, repo: RepoRec, ref: str) -> CommitRec:
        if ref in repo.branches:
            return repo.commits[repo.branches[ref]]
        if ref in repo.tags:
            return repo.commits[repo.tags[ref]]
        if ref in repo.commits:
            return repo.commits[ref]
        matches = [c for c in repo.commits if len(ref) >= 6 and c.startswith(ref)]
        if len(matches) == 1:
            return repo.commits[matches[0]]
        raise ApiError(404, f"not found: ref {ref}")

    def _tree(self, repo: RepoRec, ref: str) -> dict[str, bytes]:
        """A ref's objects; a branch includes its uncommitted (staged) changes, as in lakeFS."""
        tree = dict(self._commit_of(repo, ref).tree)
        for path, data in repo.staged.get(ref, {}).items() if ref in repo.branches else ():
            if data is None:
                tree.pop(path, None)
            else:
                tree[path] = data
        return tree

    def _branch(self, repo: RepoRec, name: str) -> str:
        if name not in repo.branches:
            raise ApiError(404, f"branch not found: {name}")
        return name

    def _ancestors(self, repo: RepoRec, cid: str, first_parent: bool = False) -> list[CommitRec]:
        seen, order, todo = set(), [], [cid]
        while todo:
            cur = todo.pop(0)
            if cur in seen:
                continue
            seen.add(cur)
            rec = repo.commits[cur]
            order.append(rec)
            todo.extend(rec.parents[:1] if first_parent else rec.parents)
        return sorted(order, key=lambda c: (-c.generation, -c.creation_date)) if not first_parent else order

    def _merge_base(self, repo: RepoRec, a: str, b: str) -> CommitRec | None:
        left = {c.id for c in self._ancestors(repo, a)}
        for rec in self._ancestors(repo, b):
            if rec.id in left:
                return rec
        return None

    @staticmethod
    def _stats(path: str, data: bytes) -> dict:
        return {
            "path": path,
            "path_type": "object",
            "physical_address": f"mem://data/{hashlib.md5(data).hexdigest()}",
            "checksum": hashlib.md5(data).hexdigest(),
            "size_bytes": len(data),
            "mtime": int(time.time()),
            "content_type": "application/octet-stream",
            "metadata": {},
        }

    # -- handlers: each returns (status, json body | bytes | str | None) ------------------
    def healthCheck(self, req):
        return 204, None

    def createRepository(self, req, bare: bool = False):
        body = req.get_json()
        if body["name"] in self.repos:
            raise ApiError(409, f"repository already exists: {body['name']}")
        repo = self._create_repo(body["name"], body["storage_namespace"], body.get("default_branch") or "main")
        return 201, self._repo_json(repo)

    def _repo_json(self, repo: RepoRec) -> dict:
        return {
            "id": repo.name,
            "creation_date": repo.created,
            "default_branch": repo.default_branch,
            "storage_namespace": repo.storage_namespace,
            "read_only": False,
        }

    def getRepository(self, req, repository):
        return 200, self._repo_json(self._repo(repository))

    def createBranch(self, req, repository):
        repo, body = self._repo(repository), req.get_json()
        if body["name"] in repo.branches:
            raise ApiError(409, f"branch already exists: {body['name']}")
        source = self._commit_of(repo, body["source"])
        repo.branches[body["name"]] = source.id
        repo.staged[body["name"]] = {}
        return 201, source.id

    def getBranch(self, req, repository, branch):
        repo = self._repo(repository)
        return 200, {"id": branch, "commit_id": repo.branches[self._branch(repo, branch)]}

    def deleteBranch(self, req, repository, branch):
        repo = self._repo(repository)
        self._branch(repo, branch)
        if branch == repo.default_branch:
            raise ApiError(400, "cannot delete the repository's default branch")
        del repo.branches[branch], repo.staged[branch]
        return 204, None

    def uploadObject(self, req, repository, branch):
        repo = self._repo(repository)
        self._branch(repo, branch)
        path = req.args["path"]
        if req.mimetype == "multipart/form-data":
            if "content" not in req.files:
                raise ApiError(400, "multipart upload needs a part named 'content'")
            data = req.files["content"].read()
        else:
            data = req.get_data()
        repo.staged[branch][path] = data
        return 201, self._stats(path, data)

    def deleteObjects(self, req, repository, branch):
        repo = self._repo(repository)
        self._branch(repo, branch)
        for path in req.get_json()["paths"]:
            repo.staged[branch][path] = None
        return 200, {"errors": []}

    def commit(self, req, repository, branch):
        repo, body = self._repo(repository), req.get_json()
        self._branch(repo, branch)
        head = repo.commits[repo.branches[branch]]
        if not repo.staged[branch] and not body.get("allow_empty"):
            raise ApiError(400, "commit: no changes")
        rec = self._new_commit(repo, [head.id], body["message"], body.get("metadata") or {}, self._tree(repo, branch))
        repo.branches[branch], repo.staged[branch] = rec.id, {}
        return 201, rec.to_json()

    def getCommit(self, req, repository, commitId):
        repo = self._repo(repository)
        matches = [c for c in repo.commits if c == commitId or (len(commitId) >= 6 and c.startswith(commitId))]
        if len(matches) != 1:
            raise ApiError(404, f"commit not found: {commitId}")
        return 200, repo.commits[matches[0]].to_json()

    def logCommits(self, req, repository, ref):
        repo = self._repo(repository)
        start = self._commit_of(repo, ref)
        first_parent = _flag(req.args.get("first_parent"))
        chain = self._ancestors(repo, start.id, first_parent)
        after = req.args.get("after")
        if after:  # 'after' is the last id of the previous page, in log order
            ids = [c.id for c in chain]
            chain = chain[ids.index(after) + 1 :] if after in ids else []
        amount = int(req.args.get("amount", 100))
        amount = 100 if amount == -1 else amount
        page, more = chain[:amount], len(chain) > amount
        return 200, {
            "pagination": {
                "has_more": more,
                "next_offset": page[-1].id if more else "",
                "results": len(page),
                "max_per_page": amount,
            },
            "results": [c.to_json() for c in page],
        }

    def mergeIntoBranch(self, req, repository, sourceRef, destinationBranch):
        repo = self._repo(repository)
        body = req.get_json(silent=True) or {}
        self._branch(repo, destinationBranch)
        source = self._commit_of(repo, sourceRef)
        dest = repo.commits[repo.branches[destinationBranch]]
        if repo.staged[destinationBranch]:
            raise ApiError(400, f"branch {destinationBranch} has uncommitted changes")
        base = self._merge_base(repo, source.id, dest.id)
        base_tree = base.tree if base else {}
        merged = dict(dest.tree)
        for path in set(base_tree) | set(source.tree) | set(dest.tree):
            b, s, d = base_tree.get(path), source.tree.get(path), dest.tree.get(path)
            if s == b or s == d:
                continue
            if d != b:
                return 409, {"reference": ""}  # the deprecated conflict body the contract still declares
            if s is None:
                merged.pop(path, None)
            else:
                merged[path] = s
        if merged == dest.tree and not (body.get("allow_empty") or body.get("force")):
            raise ApiError(400, "no changes")
        if self.pre_merge_failure is not None:
            raise ApiError(412, f"pre-merge hook aborted, run id 'r1': {self.pre_merge_failure}")
        message = body.get("message") or f"Merge '{sourceRef}' into '{destinationBranch}'"
        parents = [dest.id] if body.get("squash_merge") else [dest.id, source.id]
        rec = self._new_commit(repo, parents, message, body.get("metadata") or {}, merged)
        repo.branches[destinationBranch] = rec.id
        return 200, {"reference": rec.id}

    def diffRefs(self, req, repository, leftRef, rightRef):
        repo = self._repo(repository)
        left, right = self._commit_of(repo, leftRef), self._commit_of(repo, rightRef)
        if req.args.get("type", "three_dot") == "three_dot":
            base = self._merge_base(repo, left.id, right.id)
            left_tree = base.tree if base else {}
        else:
            left_tree = left.tree
        prefix = req.args.get("prefix", "")
        diffs = []
        for path in sorted(set(left_tree) | set(right.tree)):
            if not path.startswith(prefix):
                continue
            a, b = left_tree.get(path), right.tree.get(path)
            if a == b:
                continue
            kind = "added" if a is None else "removed" if b is None else "changed"
            diffs.append({"type": kind, "path": path, "path_type": "object", "size_bytes": len(b or a or b"")})
        page, pagination = _paginate(
            diffs, lambda d: d["path"], req.args.get("after"), int(req.args.get("amount", 100))
        )
        return 200, {"pagination": pagination, "results": page}

    def listObjects(self, req, repository, ref):
        repo = self._repo(repository)
        tree = self._tree(repo, ref)
        prefix = req.args.get("prefix", "")
        items = [self._stats(p, tree[p]) for p in sorted(tree) if p.startswith(prefix)]
        page, pagination = _paginate(
            items, lambda s: s["path"], req.args.get("after"), int(req.args.get("amount", 100))
        )
        return 200, {"pagination": pagination, "results": page}

    def statObject(self, req, repository, ref):
        repo = self._repo(repository)
        tree, path = self._tree(repo, ref), req.args["path"]
        if path not in tree:
            raise ApiError(404, f"object not found: {path}")
        return 200, self._stats(path, tree[path])

    def getObject(self, req, repository, ref):
        repo = self._repo(repository)
        tree, path = self._tree(repo, ref), req.args["path"]
        if path not in tree:
            raise ApiError(404, f"object not found: {path}")
        return 200, tree[path]

    def createTag(self, req, repository):
        repo, body = self._repo(repository), req.get_json()
        if body["id"] in repo.tags:
            raise ApiError(409, f"tag already exists: {body['id']}")
        target = self._commit_of(repo, body["ref"])
        repo.tags[body["id"]] = target.id
        return 201, {"id": body["id"], "commit_id": target.id}

    def getTag(self, req, repository, tag):
        repo = self._repo(repository)
        if tag not in repo.tags:
            raise ApiError(404, f"tag not found: {tag}")
        return 200, {"id": tag, "commit_id": repo.tags[tag]}

    # -- WSGI ----------------------------------------------------------------------------
    def _wsgi(self, environ, start_response):
        from openapi_core.contrib.werkzeug import (
            WerkzeugOpenAPIRequest,
            WerkzeugOpenAPIResponse,
        )

        req = Request(environ)
        req.get_data()  # buffer the body: both validation and the handler read it
        oreq = WerkzeugOpenAPIRequest(req)
        try:
            self.openapi.validate_request(oreq)
            request_ok = True
        except Exception as exc:  # noqa: BLE001 - every contract breach is reported
            self.violations.append(f"request {req.method} {req.full_path}: {_describe(exc)}")
            request_ok = False
        op, status, body = self._dispatch(req, request_ok)
        resp = self._response(status, body)
        try:
            self.openapi.validate_response(oreq, WerkzeugOpenAPIResponse(resp))
        except Exception as exc:  # noqa: BLE001
            # openapi-core reads an empty body as "no body"; an empty file is a valid binary body
            if not (type(exc).__name__ == "MissingData" and isinstance(body, bytes) and not body):
                self.violations.append(f"response {status} to {req.method} {req.full_path}: {_describe(exc)}")
        self.calls.append((op, status))
        return resp(environ, start_response)

    def _dispatch(self, req, request_ok: bool):
        adapter = self._map.bind_to_environ(req.environ)
        try:
            op, args = adapter.match()
        except Exception:  # noqa: BLE001
            return "unknown", 404, {"message": f"no route for {req.method} {req.path}"}
        if op != "healthCheck" and req.headers.get("Authorization") != self.auth:
            return op, 401, {"message": "error authenticating request"}
        if not request_ok:
            return op, 400, {"message": "request does not match the lakeFS API contract"}
        with self._lock:
            fault = next((f for f in self.faults if f.operation == op and f.times > 0), None)
            if fault is not None:
                fault.times -= 1
        if fault is not None:
            if fault.hang:
                self._stopping.wait(60)
                return op, 503, {"message": "server stopped"}
            return op, fault.status, {"message": fault.message}
        try:
            with self._lock:
                status, body = getattr(self, op)(req, **args)
        except ApiError as exc:
            status, body = exc.status, {"message": exc.message}
        return op, status, body

    @staticmethod
    def _response(status: int, body) -> Response:
        if body is None:
            return Response(status=status)
        if isinstance(body, bytes):
            return Response(
                body,
                status=status,
                mimetype="application/octet-stream",
                headers={"ETag": hashlib.md5(body).hexdigest()},
            )
        if isinstance(body, str):
            return Response(body, status=status, mimetype="text/html")
        return Response(json.dumps(body), status=status, mimetype="application/json")


def _flag(value: str | None) -> bool:
    """A boolean query parameter as lakeFS (Go's strconv.ParseBool) reads it: lakefs-sdk sends 'True'."""
    return (value or "").lower() in ("1", "t", "true")


def _describe(exc: Exception) -> str:
    parts = [f"{type(exc).__name__}: {exc}"]
    for sub in (
        getattr(exc, "schema_errors", None) or getattr(getattr(exc, "__cause__", None), "schema_errors", None) or ()
    ):
        parts.append(f"  - {getattr(sub, 'message', sub)}")
    return "\n".join(parts)
