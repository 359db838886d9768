"""The whole lifecycle through Airflow's real scheduler: the README's demo, on scratch state.

Starts the local stack (api-server, scheduler, dag-processor, triggerer, MLflow, Prometheus) under a
temporary LLMOPS_HOME, runs deploy/local/demo.py (data -> train -> evaluate -> deploy -> monitor ->
new data -> retrain -> ... -> champion), checks the summary and the lineage in MLflow, runs the demo
again to prove it is idempotent, then stops everything and checks that nothing is left running.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
PORTS = {
    "AIRFLOW_PORT": 18080,
    "MLFLOW_PORT": 15000,
    "PROMETHEUS_PORT": 19090,
    "STATSD_PORT": 19125,
    "STATSD_EXPORTER_PORT": 19102,
}
VLLM_PORT = 8011  # from dags/recipes/tiny-llama.yaml


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _run(cmd, env, timeout):
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, timeout=timeout, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    print(proc.stdout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-6000:]}"
    return proc.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.fixture
def stack(tmp_path):
    for name, port in [*PORTS.items(), ("VLLM_PORT", VLLM_PORT)]:
        if not _port_free(port):
            pytest.fail(f"port {port} ({name}) is busy: stop the running demo (`make stop`) before the e2e tier")
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW__", "AIRFLOW_CONN_"))}
    env.update({k: str(v) for k, v in PORTS.items()})
    env["LLMOPS_HOME"] = str(home)
    env["VLLM_PORT"] = str(VLLM_PORT)
    try:
        # the same steps as `make demo`: land the first batch, start the stack, run the demo
        _run(["bash", "-c", "source deploy/local/env.sh && python deploy/local/demo.py --land-only"], env, timeout=60)
        _run(["bash", "deploy/local/stack.sh", "start"], env, timeout=600)
        yield env, home
    finally:
        pids = [int(p.read_text()) for p in (home / "run").glob("*.pid") if p.read_text().strip()]
        subprocess.run(["bash", "deploy/local/stack.sh", "stop"], cwd=ROOT, env=env, timeout=300)
        assert not [p for p in pids if _alive(p)], "stack.sh stop left processes running"


def _registry(env, name: str) -> dict:
    """All versions of ``name`` and the one with alias ``champion``, from the stack's MLflow server."""
    code = (
        "import json; from mlflow import MlflowClient;"
        f"c = MlflowClient('http://127.0.0.1:{PORTS['MLFLOW_PORT']}');"
        f"vs = c.search_model_versions(\"name='{name}'\");"
        f"ch = c.get_model_version_by_alias('{name}', 'champion');"
        "print(json.dumps(dict(versions=sorted(v.version for v in vs), champion=dict(v=ch.version, tags=ch.tags))))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_demo_runs_the_whole_lifecycle_and_is_idempotent(stack):
    env, home = stack
    _run(["bash", "-c", "source deploy/local/env.sh && python deploy/local/demo.py"], env, timeout=2400)
    summary = json.loads((home / "demo-summary.json").read_text())
    deploy = summary["deploy"]
    assert deploy["alias"] == "champion"
    assert deploy["endpoint"].startswith("http://127.0.0.1:")
    assert deploy["completion"].strip(), "the served champion returned no text"

    registry = _registry(env, deploy["model_name"])
    champion = registry["champion"]
    assert champion["v"] == str(deploy["model_version"])
    # lineage: the champion was trained on the dataset commit the (retrain) data run made
    assert champion["tags"]["dataset_commit"] == deploy["dataset_commit"] == summary["data"]["dataset_commit"]
    assert champion["tags"]["mlflow_run_id"] == summary["train"]["mlflow_run_id"]
    assert len(registry["versions"]) == 2  # the first champion, then the retrained one
    assert (home / "datasets").exists()
    # the demo's seeded traffic reached the champion and Prometheus saw it through vLLM's own series
    assert summary["traffic"]["sent"] > 0 and summary["traffic"]["errors"] == 0
    assert summary["monitor"]["status"] == "ok", summary["monitor"]
    assert summary["monitor"]["retrain"] is False  # quiet system after the retrain: nothing scheduled
    # the feedback loop ran: new data -> monitor -> retrain asset -> a new champion on the new commit
    assert summary["feedback"]["retrain_data_run"]
    assert summary["data"]["created"] is True

    # same inputs again: no new dataset commit, no new model version, same champion
    _run(["bash", "-c", "source deploy/local/env.sh && python deploy/local/demo.py"], env, timeout=1800)
    again = json.loads((home / "demo-summary.json").read_text())
    assert again["deploy"]["model_version"] == deploy["model_version"]
    assert again["deploy"]["dataset_commit"] == deploy["dataset_commit"]
    assert _registry(env, deploy["model_name"]) == registry
