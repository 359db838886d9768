"""Production rollback on the local serving backend: real nginx router, real MLflow registry, real drain.

The replicas are stdlib OpenAI-shaped servers (``openai_stub.py``) started the way the serve job
starts vLLM (own session, pid file, state file, from the kept package under
``home()/serving/<recipe>/v<N>/model``), so the backend's start / route / label / retire, the drain
on vLLM's gauges, ``serve.stop`` by pid file, the MLflow alias and tags and the deployment record
are all the real code paths; only vLLM itself is not started (tests/integration/test_serving.py
covers it). Seconds, not minutes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import free_port, wait_http

pytestmark = [pytest.mark.integration]
STUB = Path(__file__).with_name("openai_stub.py")
NAME = "rb-test"


def _job(cmd: list[str], env: dict[str, str]) -> None:
    """The serve job's contract (runtime/serve.py): reuse a healthy replica, else start it from its package."""
    from llmops_provider.runtime import serve
    from llmops_provider.specs.serve import ServeSpec

    spec = ServeSpec.model_validate_json(Path(cmd[cmd.index("--spec") + 1]).read_text())
    state = serve.read_state(spec.instance)
    pid = serve.read_pid(spec.instance)
    if state and pid and serve._alive(pid) and serve.healthy(spec.endpoint):
        result = {**state, "reused": True}
    else:
        model_dir = serve.fetch_model(spec)  # the kept package; no package would mean an MLflow download
        log_path = serve.serving_dir(spec.instance) / "stub.log"
        with open(log_path, "ab") as out:  # detached like vLLM from the serve job: its own session
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(STUB),
                    "--port",
                    str(spec.port),
                    "--model",
                    spec.name,
                    "--text",
                    f"v{spec.model_version}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        threading.Thread(target=proc.wait, daemon=True).start()  # reaped at once when serve.stop kills it
        pid = proc.pid
        serve.pid_file(spec.instance).write_text(str(pid))
        wait_http(f"{spec.endpoint}/health", 30, proc)
        result = {
            "name": spec.name,
            "replica": spec.instance,
            "model_version": spec.model_version,
            "model_dir": str(model_dir),
            "host": spec.host,
            "port": spec.port,
            "endpoint": spec.endpoint,
            "pid": pid,
            "log_path": str(log_path),
        }
        serve.state_file(spec.instance).write_text(json.dumps(result))
        result = {**result, "reused": False}
    Path(cmd[cmd.index("--output") + 1]).write_text(json.dumps(result))


class Recorder:
    """A notifier that keeps what it was called with (any BaseNotifier works the same way)."""

    def __init__(self):
        self.calls = []

    def __call__(self, context):
        self.calls.append(context["rollout"])


@pytest.fixture
def stack(tmp_path, monkeypatch, mlflow_conn):
    from mlflow import MlflowClient

    from llmops_provider import config
    from llmops_provider.routers.local import stop_all
    from llmops_provider.routers.nginx import NginxRouter

    monkeypatch.setenv("AIRFLOW__LLMOPS__HOME", str(tmp_path / "home"))
    recipe = tmp_path / "rb.yaml"
    recipe.write_text(
        textwrap.dedent(f"""\
        name: {NAME}
        data: {{sources: [{{path: "{{home}}/landing/rb"}}]}}
        deployment: {{port: {free_port()}, smoke_prompt: "hello", rollout: {{drain_timeout: 10s}}}}
    """)
    )
    client = MlflowClient(mlflow_conn)
    exp = client.create_experiment(f"rb-{time.time_ns()}")
    model = f"{NAME}"
    try:
        client.create_registered_model(model)
    except Exception:  # noqa: BLE001 - the session's server may know it from an earlier run of this test
        pass
    versions = []
    for _ in range(2):
        run = client.create_run(exp).info.run_id
        mv = client.create_model_version(model, f"runs:/{run}/model", run_id=run)
        for key, value in {"eval_verdict": "passed", "dataset_commit": "c0ffee", "eval_run_id": f"eval-{run}"}.items():
            client.set_model_version_tag(model, mv.version, key, value)
        versions.append(str(mv.version))
        package = config.home() / "serving" / NAME / f"v{mv.version}" / "model"  # the package deploy kept
        package.mkdir(parents=True)
        (package / ".packaged").write_text("")
    yield SimpleNamespace(recipe=str(recipe), client=client, model=model, old=versions[0], new=versions[1])
    NginxRouter(NAME, "127.0.0.1", 0).stop(grace_s=1)  # the test's router: no need for a graceful quit
    stop_all(NAME)


def _operator(stack, recorder, **kwargs):
    from llmops_provider.notifiers import RolloutAlertNotifier
    from llmops_provider.operators.loop import ROLLBACK_MESSAGE, RollbackOperator

    op = RollbackOperator(
        task_id="rollback",
        recipe_path=stack.recipe,
        on_rollback=[recorder, RolloutAlertNotifier(message=ROLLBACK_MESSAGE)],
        **kwargs,
    )
    op.run_job = _job
    return op


def _serve_new_champion(stack, op, previous):
    """What a promotion leaves: the new version alone behind the router, the record naming the previous one."""
    from llmops_provider.operators.loop import write_record

    recipe = op._recipe()
    backend = op.backend(recipe)
    replica = backend.start(stack.new, None, {}, 0)
    backend.label(replica, "stable")
    backend.route({replica["id"]: 100}, {replica["id"]: replica})
    stack.client.set_registered_model_alias(stack.model, "champion", stack.new)
    write_record(
        NAME,
        {
            "model_name": stack.model,
            "model_version": stack.new,
            "previous_champion": previous,
            "outcome": "promoted",
            "deployed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "history": [{"step": 0, "weights": {replica["id"]: 100}, "verdict": "pass"}],
        },
    )
    return backend, replica


def _completion(url: str) -> str:
    req = urllib.request.Request(
        f"{url}/v1/completions",
        data=json.dumps({"prompt": "x"}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())["choices"][0]["text"]


def _event_context(evidence: dict, reason: str) -> dict:
    from llmops_provider.compat import Asset

    asset = Asset(uri=f"llmops://{NAME}/rollback", name=f"{NAME}.rollback")
    extra = {"rollback_reason": reason, "evidence": evidence, "model_version": evidence.get("from_version")}
    return {"triggering_asset_events": {asset: [SimpleNamespace(extra=extra)]}}


def test_nothing_to_roll_back_to_is_a_result(stack):
    from llmops_provider.operators.loop import read_record

    recorder = Recorder()
    op = _operator(stack, recorder)
    backend, replica = _serve_new_champion(stack, op, previous=None)
    out = op.execute({})
    assert out["status"] == "nothing-to-roll-back-to" and "no previous champion" in out["why"]
    assert read_record(NAME)["rollbacks"][-1]["verdict"] == "nothing-to-roll-back-to"  # recorded
    assert _completion(backend.endpoint) == f"v{stack.new}"  # traffic untouched
    assert str(stack.client.get_model_version_by_alias(stack.model, "champion").version) == stack.new
    assert recorder.calls == []


def test_regressed_champion_rolls_back_to_the_previous_one(stack):
    from llmops_provider import config
    from llmops_provider.loadgen import LoadGenerator
    from llmops_provider.operators.loop import read_record
    from llmops_provider.runtime import serve

    recorder = Recorder()
    op = _operator(stack, recorder)
    backend, replica = _serve_new_champion(stack, op, previous=stack.old)
    old_id = f"{NAME}-v{stack.old}"
    assert serve.read_pid(old_id) is None  # the previous champion's replica is gone: it must be restarted
    reason = "ttft_p95_seconds 7.2 > 5: v2 was promoted 3 min ago over v1; rolling back to v1"
    context = _event_context({"from_version": stack.new, "to_version": stack.old, "conditions": ["slo_breach"]}, reason)
    load = LoadGenerator(backend.endpoint, NAME, ["p1", "p2"], rate=20, concurrency=4, seed=0).start()
    try:
        out = op.execute(context)
    finally:
        summary = load.stop()

    assert out["status"] == "rolled-back" and out["restarted"] is True
    assert (out["from_version"], out["to_version"]) == (stack.new, stack.old)
    assert summary["errors"] == 0, summary  # users saw no error while traffic moved and v2 drained
    assert _completion(backend.endpoint) == f"v{stack.old}" and out["completion"] == f"v{stack.old}"
    assert serve.read_pid(replica["id"]) is None and not serve.healthy(replica["endpoint"])  # drained, stopped
    assert backend.state()["weights"] == {old_id: 100}
    # the registry: alias back, the demoted version tagged with the evidence
    client, model = stack.client, stack.model
    assert str(client.get_model_version_by_alias(model, "champion").version) == stack.old
    tags = client.get_model_version(model, stack.new).tags
    assert tags["rollout_status"] == "rolled-back"
    evidence = json.loads(tags["rollout_evidence"])
    assert evidence["rolled_back_to"] == stack.old and reason in evidence["reasons"]
    assert client.get_model_version(model, stack.old).tags["endpoint"] == backend.endpoint
    # the deployment record: the restored champion, no previous one (no ping-pong), the rollback in its history
    record = read_record(NAME)
    assert record["outcome"] == "restored" and record["model_version"] == stack.old
    assert record["previous_champion"] is None and record["rolled_back_from"] == stack.new
    assert record["history"][-1]["step"] == "rollback" and record["history"][-1]["weights"] == {
        old_id: 100,
        replica["id"]: 0,
    }
    # the alerts
    assert recorder.calls and recorder.calls[0]["candidate_version"] == stack.new
    assert recorder.calls[0]["reasons"] == [reason]
    alert = json.loads((config.home() / "alerts" / f"{NAME}.jsonl").read_text().splitlines()[-1])
    assert alert["message"].startswith(f"ROLLBACK {NAME} champion v{stack.new} -> v{stack.old} in production")

    # the same incident delivered again (a re-fired event): the champion moved, nothing happens
    again = op.execute(context)
    assert again["status"] == "stale" and _completion(backend.endpoint) == f"v{stack.old}"
    assert len(recorder.calls) == 1
