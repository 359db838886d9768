"""Monitoring logic: source fingerprint, SLO checks, new-data decision, trigger serialization."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmops_provider import monitoring
from llmops_provider.monitoring import evaluate_slos, new_data, source_files, source_fingerprint, vllm_queries
from llmops_provider.recipes import SLOs

pytestmark = pytest.mark.unit


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


class TestSourceFingerprint:
    def test_stable_and_order_independent_of_creation(self, tmp_path):
        a, b = tmp_path / "a", tmp_path / "b"
        _write(a / "x.jsonl", '{"id": 1}\n')
        _write(a / "y.jsonl", '{"id": 2}\n')
        _write(b / "y.jsonl", '{"id": 2}\n')
        _write(b / "x.jsonl", '{"id": 1}\n')
        assert source_fingerprint([a]) == source_fingerprint([b]) == source_fingerprint([str(a)])
        assert len(source_fingerprint([a])) == 64

    def test_changes_on_new_file_edit_and_rename(self, tmp_path):
        src = tmp_path / "landing"
        _write(src / "batch-001.jsonl", '{"id": 1}\n')
        base = source_fingerprint([src])
        _write(src / "batch-002.jsonl", '{"id": 2}\n')
        added = source_fingerprint([src])
        assert added != base
        _write(src / "batch-002.jsonl", '{"id": 3}\n')
        edited = source_fingerprint([src])
        assert edited not in (base, added)
        (src / "batch-002.jsonl").rename(src / "batch-003.jsonl")
        assert source_fingerprint([src]) != edited

    def test_touch_and_ignored_files_do_not_change_it(self, tmp_path):
        src = tmp_path / "landing"
        f = _write(src / "batch-001.jsonl", '{"id": 1}\n')
        base = source_fingerprint([src])
        f.touch()
        _write(src / "notes.txt", "not data")
        _write(src / ".batch-002.jsonl.partial", "copy in progress")
        _write(src / ".tmp" / "x.jsonl", "hidden dir")
        assert source_fingerprint([src]) == base
        assert [name for name, _ in source_files([src])] == ["0/batch-001.jsonl"]

    def test_file_sources_subdirs_and_missing(self, tmp_path):
        src = tmp_path / "landing"
        f = _write(src / "sub" / "b.jsonl", "b\n")
        assert source_fingerprint([src]) != source_fingerprint([f])  # name is part of it
        assert source_fingerprint([tmp_path / "missing"]) == source_fingerprint([])
        assert source_files([tmp_path / "missing"]) == []


class TestSLOs:
    ALL = SLOs(ttft_p95_seconds=5.0, e2e_latency_p95_seconds=30.0, error_rate=0.05, min_generation_tokens_per_s=10.0)

    def test_all_ok(self):
        values = {
            "requests": 12,
            "ttft_p95_seconds": 0.4,
            "e2e_latency_p95_seconds": 3.0,
            "error_rate": 0.0,
            "generation_tokens_per_s": 50.0,
        }
        out = evaluate_slos(values, self.ALL)
        assert out["status"] == "ok"
        assert out["reasons"] == []
        assert out["slos"]["ttft_p95_seconds"] == {"value": 0.4, "limit": 5.0, "ok": True}
        assert out["slos"]["min_generation_tokens_per_s"]["ok"] is True

    def test_breach_max_and_min(self):
        values = {
            "requests": 12,
            "ttft_p95_seconds": 7.5,
            "e2e_latency_p95_seconds": 3.0,
            "error_rate": 0.2,
            "generation_tokens_per_s": 2.0,
        }
        out = evaluate_slos(values, self.ALL)
        assert out["status"] == "breach"
        assert {k for k, v in out["slos"].items() if v["ok"] is False} == {
            "ttft_p95_seconds",
            "error_rate",
            "min_generation_tokens_per_s",
        }
        assert any("ttft_p95_seconds = 7.5 > 5" in r for r in out["reasons"])
        assert any("min_generation_tokens_per_s = 2 < 10" in r for r in out["reasons"])

    def test_boundary_is_ok(self):
        out = evaluate_slos(
            {"requests": 1, "ttft_p95_seconds": 5.0}, SLOs(e2e_latency_p95_seconds=None, error_rate=None)
        )
        assert out["slos"] == {"ttft_p95_seconds": {"value": 5.0, "limit": 5.0, "ok": True}}
        assert out["status"] == "ok"

    def test_none_slo_not_checked(self):
        slos = SLOs(ttft_p95_seconds=None, e2e_latency_p95_seconds=None, error_rate=None)
        out = evaluate_slos({"requests": 5, "ttft_p95_seconds": 999.0, "error_rate": 1.0}, slos)
        assert out == {"status": "ok", "slos": {}, "reasons": []}

    @pytest.mark.parametrize("requests", [None, 0, 0.0, float("nan")])
    def test_no_traffic_is_no_data_never_breach(self, requests):
        values = {"requests": requests, "ttft_p95_seconds": 99.0, "error_rate": 1.0}
        out = evaluate_slos(values, self.ALL)
        assert out["status"] == "no-data"
        assert all(v["ok"] is None and v["value"] is None for v in out["slos"].values())

    def test_missing_series_with_traffic_is_unknown_not_breach(self):
        out = evaluate_slos({"requests": 3, "ttft_p95_seconds": float("nan")}, self.ALL)
        assert out["status"] == "ok"
        assert out["slos"]["ttft_p95_seconds"]["ok"] is None


class TestNewData:
    def test_no_files(self):
        assert new_data("f", False, None)[0] is False

    def test_no_commit_yet_is_left_to_the_data_schedule(self):
        is_new, why = new_data("f", True, None)
        assert is_new is False and "no dataset commit yet" in why

    def test_processed_without_commit_does_not_loop(self):
        # a data run over new-but-duplicate files commits nothing, yet marks the sources processed
        assert new_data("abc", True, {"source_fingerprint": "old"}, processed="abc")[0] is False
        assert new_data("abc", True, {"source_fingerprint": "old"}, processed="older")[0] is True

    def test_compare_with_head(self):
        assert new_data("abc", True, {"source_fingerprint": "abc"})[0] is False
        is_new, why = new_data("abc", True, {"source_fingerprint": "def"})
        assert is_new and "new data" in why

    def test_head_without_fingerprint_does_not_loop(self):
        is_new, why = new_data("abc", True, {"other": 1})
        assert is_new is False and "source_fingerprint" in why


class TestQueries:
    def test_vllm_queries(self):
        q = vllm_queries("tiny-llama", "5m")
        assert q["ttft_p95_seconds"] == (
            "histogram_quantile(0.95, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket"
            '{model_name="tiny-llama"}[5m])))'
        )
        assert 'finished_reason=~"abort|error"' in q["error_rate"]
        assert "vllm:generation_tokens_total" in q["generation_tokens_per_s"]
        assert set(q) == {"requests"} | {key for key, _ in monitoring.SLO_CHECKS.values()}

    @pytest.mark.parametrize("window", ["5 m", "5", "5m; drop", ""])
    def test_bad_window(self, window):
        with pytest.raises(ValueError, match="monitoring.window"):
            vllm_queries("m", window)

    def test_bad_label(self):
        with pytest.raises(ValueError):
            vllm_queries('m"}', "5m")


class TestTrigger:
    def test_sensor_defers_to_the_watch_trigger_with_the_connection_id(self):
        from llmops_provider.compat import TaskDeferred
        from llmops_provider.sensors.prometheus import MAX_ERRORS, PromQLSensor
        from llmops_provider.triggers.watchers import PromQLWatchTrigger

        sensor = PromQLSensor(
            task_id="wait",
            query="vector(1)",
            op=">=",
            threshold=1,
            hold_for_s=30,
            poke_interval=5,
            prometheus_conn_id="prom_x",
        )
        with pytest.raises(TaskDeferred) as deferred:
            sensor.execute({})
        trigger = deferred.value.trigger
        assert isinstance(trigger, PromQLWatchTrigger) and deferred.value.method_name == "execute_complete"
        classpath, kwargs = trigger.serialize()
        assert classpath == "llmops_provider.triggers.watchers.PromQLWatchTrigger"
        assert kwargs["prometheus_conn_id"] == "prom_x" and kwargs["base_url"] is None
        assert (kwargs["hold_for_s"], kwargs["poll_interval_s"], kwargs["max_errors"]) == (30, 5, MAX_ERRORS)
        assert all(v is None or isinstance(v, (str, int, float, bool)) for v in kwargs.values()), kwargs
        assert PromQLWatchTrigger(**json.loads(json.dumps(kwargs))).serialize() == (classpath, kwargs)

    def test_sensor_resumes_on_fired_and_fails_on_error(self):
        from llmops_provider.compat import AirflowException
        from llmops_provider.sensors.prometheus import PromQLSensor

        sensor = PromQLSensor(task_id="wait", query="up", op=">", threshold=0)
        fired = {
            "watcher": "wait",
            "recipe": None,
            "status": "fired",
            "value": 1.0,
            "query": "up",
            "op": ">",
            "threshold": 0.0,
            "held_for_s": 0.0,
            "fired_at": "2026-01-01T00:00:00+00:00",
        }
        assert sensor.execute_complete({}, fired) == fired
        with pytest.raises(AirflowException, match=r"PromQL watch of 'up' failed: Prometheus at .* unreachable"):
            sensor.execute_complete({}, {"status": "error", "message": "Prometheus at x unreachable", "query": "up"})
        with pytest.raises(AirflowException, match="unexpected trigger event"):
            sensor.execute_complete({}, {"status": "met"})

    def test_bad_op_and_max_errors(self):
        from llmops_provider.triggers.watchers import PromQLWatchTrigger

        with pytest.raises(ValueError, match="op"):
            PromQLWatchTrigger(name="x", query="q", op="=>", threshold=1)
        with pytest.raises(ValueError, match="max_errors"):
            PromQLWatchTrigger(name="x", query="q", op=">", threshold=1, max_errors=-1)

    def test_watch_gives_up_after_max_errors_only_when_asked(self):
        import asyncio

        from conftest import free_port

        from llmops_provider.triggers.watchers import PromQLWatchTrigger

        closed = f"http://127.0.0.1:{free_port()}"

        async def first(trigger, timeout):
            gen = trigger.run()
            try:
                return (await asyncio.wait_for(gen.__anext__(), timeout)).payload
            finally:
                await gen.aclose()

        sensor_like = PromQLWatchTrigger(
            name="w", query="up", op=">", threshold=0, poll_interval_s=0.01, base_url=closed, timeout_s=1, max_errors=2
        )
        event = asyncio.run(first(sensor_like, 10))
        assert event["status"] == "error" and "unreachable" in event["message"] and event["query"] == "up"
        watcher = PromQLWatchTrigger(
            name="w", query="up", op=">", threshold=0, poll_interval_s=0.01, base_url=closed, timeout_s=1
        )
        with pytest.raises(asyncio.TimeoutError):  # max_errors=0: polls through the outage
            asyncio.run(first(watcher, 0.5))

    def test_watch_reports_a_missing_connection_when_it_may_give_up(self, monkeypatch):
        import asyncio

        from llmops_provider.triggers.watchers import PromQLWatchTrigger

        monkeypatch.delenv("AIRFLOW_CONN_PROM_MISSING", raising=False)
        trigger = PromQLWatchTrigger(
            name="w", query="up", op=">", threshold=0, prometheus_conn_id="prom_missing", max_errors=1
        )

        async def first():
            async for event in trigger.run():
                return event.payload

        event = asyncio.run(first())
        assert event["status"] == "error" and "'prom_missing'" in event["message"]

    def test_condition_met(self):
        from llmops_provider.triggers.prometheus import condition_met

        assert condition_met(2.0, ">", 1)
        assert not condition_met(None, ">", -1)  # no sample never fires
        assert condition_met(0.0, "==", 0)


class TestMonitorOperator:
    """The operator's decision with Prometheus and the dataset store faked."""

    @pytest.fixture
    def recipe(self, tmp_path, monkeypatch):
        monkeypatch.setenv("AIRFLOW__LLMOPS__HOME", str(tmp_path / "home"))
        _write(tmp_path / "home" / "landing" / "r" / "batch-001.jsonl", '{"id": 1, "text": "x"}\n')
        return _write(
            tmp_path / "r.yaml",
            textwrap.dedent("""\
            name: monitor-test
            data: {sources: [{path: "{home}/landing/r"}]}
            monitoring: {slos: {ttft_p95_seconds: 1.0}}
        """),
        )

    def _run(self, monkeypatch, recipe, values, head_metadata, processed=None, **kwargs):
        from llmops_provider.operators import monitoring as op_mod

        class FakeHook:
            def __init__(self, conn_id):
                assert conn_id == "prometheus_default"

            def query_scalar(self, promql):
                for key, q in vllm_queries("monitor-test", "5m").items():
                    if q == promql:
                        return values.get(key)
                raise AssertionError(promql)

        monkeypatch.setattr("llmops_provider.hooks.prometheus.PrometheusHook", FakeHook)
        op = op_mod.MonitorOperator(task_id="check", recipe_path=str(recipe), **kwargs)
        head = None if head_metadata is None else SimpleNamespace(metadata=head_metadata)

        class FakeStore:
            def head(self, repo, branch):
                assert (repo, branch) == ("corpus", "main")
                return head

        import llmops_provider.datasets as datasets

        monkeypatch.setattr(datasets, "get_store", lambda name=None: FakeStore(), raising=False)
        monkeypatch.setattr(op, "_processed_fingerprint", lambda name: processed)
        return op.execute({"ti": None})

    def test_new_data_requests_retrain(self, monkeypatch, recipe):
        out = self._run(monkeypatch, recipe, {"requests": 0}, {"source_fingerprint": "old"})
        assert out["status"] == "no-data" and out["new_data"] is True and out["retrain"] is True
        assert (
            self._run(monkeypatch, recipe, {}, None)["retrain"] is False
        )  # no commit yet: the data schedule bootstraps
        fp = out["source_fingerprint"]
        assert self._run(monkeypatch, recipe, {}, {"source_fingerprint": "old"}, processed=fp)["retrain"] is False
        assert set(out) >= {"status", "slos", "new_data", "retrain", "reasons"}

    def test_same_data_and_breach_does_not_retrain_by_default(self, monkeypatch, recipe, tmp_path):
        fp = source_fingerprint([tmp_path / "home" / "landing" / "r"])
        out = self._run(monkeypatch, recipe, {"requests": 4, "ttft_p95_seconds": 3.0}, {"source_fingerprint": fp})
        assert out["status"] == "breach" and out["new_data"] is False and out["retrain"] is False
        out = self._run(
            monkeypatch,
            recipe,
            {"requests": 4, "ttft_p95_seconds": 3.0},
            {"source_fingerprint": fp},
            retrain_on_slo_breach=True,
        )
        assert out["retrain"] is True

    def test_unreachable_publishes_then_fails(self, monkeypatch, recipe):
        from llmops_provider.compat import AirflowException
        from llmops_provider.hooks.prometheus import PrometheusError
        from llmops_provider.operators import monitoring as op_mod

        class DownHook:
            def __init__(self, conn_id):
                pass

            def query_scalar(self, promql):
                raise PrometheusError("Prometheus at http://127.0.0.1:9 unreachable")

        import llmops_provider.datasets as datasets

        monkeypatch.setattr("llmops_provider.hooks.prometheus.PrometheusHook", DownHook)
        monkeypatch.setattr(
            datasets,
            "get_store",
            lambda name=None: SimpleNamespace(
                head=lambda r, b: SimpleNamespace(metadata={"source_fingerprint": "old"})
            ),
            raising=False,
        )
        pushed = {}
        ti = SimpleNamespace(xcom_push=lambda key, value: pushed.update({key: value}))
        op = op_mod.MonitorOperator(task_id="check", recipe_path=str(recipe))
        monkeypatch.setattr(op, "_processed_fingerprint", lambda name: None)
        with pytest.raises(AirflowException, match="monitoring unavailable"):
            op.execute({"ti": ti})
        assert pushed["return_value"]["status"] == "unreachable"
        assert pushed["return_value"]["new_data"] is True  # still decided and published


class TestWatchers:
    def test_watch_conditions_from_slos(self):
        slos = SLOs(
            ttft_p95_seconds=1.0,
            e2e_latency_p95_seconds=None,
            error_rate=0.1,
            min_generation_tokens_per_s=5,
            max_queue_length=8,
            max_kv_cache_usage=0.9,
        )
        conds = {c["name"]: c for c in monitoring.watch_conditions("m", slos, "2m")}
        assert set(conds) == {
            "ttft_p95_seconds",
            "error_rate",
            "min_generation_tokens_per_s",
            "max_queue_length",
            "max_kv_cache_usage",
        }
        assert conds["ttft_p95_seconds"] == {
            "name": "ttft_p95_seconds",
            "op": ">",
            "threshold": 1.0,
            "query": vllm_queries("m", "2m")["ttft_p95_seconds"],
        }
        # a lower bound only has a sample while there is traffic: an idle model never fires it
        low = conds["min_generation_tokens_per_s"]
        assert low["op"] == "<" and low["query"].endswith(
            'and on() (sum(increase(vllm:request_success_total{model_name="m"}[2m])) > 0)'
        )
        assert "vllm:num_requests_waiting" in conds["max_queue_length"]["query"]
        assert "vllm:kv_cache_usage_perc" in conds["max_kv_cache_usage"]["query"]

    def test_latch_fires_once_per_incident(self):
        from llmops_provider.triggers.watchers import IncidentLatch

        latch = IncidentLatch(hold_for_s=10, rearm_after_s=100)
        assert [latch.update(True, t) for t in (0, 5)] == [None, None]
        assert latch.update(False, 8) is None  # a break resets the hold
        assert [latch.update(True, t) for t in (9, 15)] == [None, None]
        assert latch.update(True, 19) == 10
        assert [latch.update(True, t) for t in (20, 500, 1000)] == [None] * 3  # persists: silent
        assert latch.update(False, 1001) is None  # cleared after the re-arm delay: armed again
        assert latch.update(True, 1002) is None and latch.update(True, 1012) == 10
        quick = IncidentLatch(hold_for_s=0, rearm_after_s=100)
        assert quick.update(True, 0) == 0 and quick.update(False, 50) is None and quick.update(True, 60) is None

    @pytest.mark.parametrize("cls", ["PromQLWatchTrigger", "FeedbackWatchTrigger"])
    def test_event_triggers_serialize_primitives(self, cls):
        from airflow.triggers.base import BaseEventTrigger

        from llmops_provider.triggers import watchers

        kwargs = (
            {"name": "x", "query": "vector(1)", "op": ">", "threshold": 0}
            if cls == "PromQLWatchTrigger"
            else {"path": "/f", "landed_path": "/l", "min_records": 3}
        )
        trigger = getattr(watchers, cls)(**kwargs)
        assert isinstance(trigger, BaseEventTrigger)
        classpath, kw = trigger.serialize()
        assert classpath == f"llmops_provider.triggers.watchers.{cls}"
        assert json.loads(json.dumps(kw)) == kw
        assert all(v is None or isinstance(v, (str, int, float, bool)) for v in kw.values())
        assert getattr(watchers, cls)(**kw).serialize() == (classpath, kw)

    def test_monitor_dag_watch_asset_serializes_without_secrets(self, tmp_path, monkeypatch):
        from airflow.serialization.serialized_objects import DagSerialization

        from llmops_provider.dag_factory import build_lifecycle_dags

        monkeypatch.setenv(
            "AIRFLOW_CONN_PROMETHEUS_DEFAULT",
            json.dumps({"conn_type": "llmops_prometheus", "host": "prom", "login": "u", "password": "s3cr3t-pw"}),
        )
        recipe = _write(
            tmp_path / "r.yaml",
            textwrap.dedent("""\
            name: watched
            data: {sources: [{path: "{home}/landing/w"}]}
            monitoring: {slos: {error_rate: null}, watchers: {enabled: true, hold_for_s: 60}}
        """),
        )
        dag = build_lifecycle_dags(recipe)["watched_monitor"]
        asset = dag.timetable.asset_condition
        assert asset.uri == "llmops://watched/watch"
        assert [w.name for w in asset.watchers] == [
            "watched-ttft_p95_seconds",
            "watched-e2e_latency_p95_seconds",
            "watched-feedback",
        ]
        assert asset.watchers[0].trigger.hold_for_s == 60
        blob = json.dumps(DagSerialization.to_dict(dag))
        assert "PromQLWatchTrigger" in blob and "s3cr3t" not in blob and "Authorization" not in blob
        assert "watched-feedback" in blob
        # default: no watchers, the cron alone runs the monitor
        plain = _write(tmp_path / "p.yaml", 'name: plain\ndata: {sources: [{path: "/x"}]}\n')
        assert "watch" not in str(build_lifecycle_dags(plain)["plain_monitor"].timetable)


class TestProbe:
    def test_items_and_scores(self):
        from llmops_provider import probe

        texts = ["too short", "one two three four five six seven eight", "a b c d e f g h i j"]
        items = probe.probe_items(texts, prompt_words=3, reference_words=4, limit=5)
        assert items == [
            {"prompt": "one two three", "reference": "four five six seven"},
            {"prompt": "a b c", "reference": "d e f g"},
        ]
        assert probe.rouge_l("four five six seven", "four five six seven") == 1.0
        assert probe.rouge_l("x y", "four five") == 0.0 and probe.rouge_l("", "a") == 0.0
        # LCS "four six" (2 of 3 candidate, 2 of 4 reference tokens): F1 = 2*(2/3)*(1/2)/(2/3+1/2)
        assert probe.rouge_l("four x six", "four five six seven") == pytest.approx(4 / 7)
        assert probe.prefix_match("four five x", "four five six seven") == 0.5
        out = probe.score(items, ["four five six seven", "nope"])
        assert out["n"] == 2 and out["rouge_l"] == 0.5 and out["prefix_match"] == 0.5
        with pytest.raises(ValueError):
            probe.score(items, ["only one"])


class TestCost:
    def recipe(self, tmp_path, **training):
        from llmops_provider.recipes import load_recipe

        spec = {
            "name": "c-model",
            "data": {"sources": [{"path": "/x"}]},
            "training": training,
            "monitoring": {"cost": {"gpu_hour_usd": 3.0, "cpu_hour_usd": 0.1, "serving_gpus": 1}},
        }
        return load_recipe(_write(tmp_path / "r.yaml", json.dumps(spec)))

    def test_jobs_priced_per_dag_run_version_and_stage(self, tmp_path):
        from llmops_provider import cost

        gpu = self.recipe(tmp_path, backend="kubeflow", kubernetes={"gpus": 4, "num_nodes": 2})
        runs = [
            {
                "run_id": "t",
                "dag_id": "c-model_train",
                "airflow_run_id": "r1",
                "model_version": "3",
                "start": 0,
                "end": 1800,
            },
            {
                "run_id": "e",
                "dag_id": "c-model_evaluate",
                "airflow_run_id": "r2",
                "model_version": "3",
                "start": 0,
                "end": 3600,
            },
            {"run_id": "x", "dag_id": "c-model_train", "airflow_run_id": "r3", "start": 0, "end": None},  # running
            {"run_id": "y", "dag_id": "c-model_monitor", "start": 0, "end": 10},  # not a job stage
        ]
        out = cost.job_costs(runs, gpu)
        assert out["by_dag_run"]["c-model_train/r1"]["gpu_hours"] == 4.0  # 0.5 h x 8 GPUs
        assert out["by_dag_run"]["c-model_train/r1"]["usd"] == 12.0
        assert out["by_dag_run"]["c-model_evaluate/r2"]["cpu_hours"] == 1.0
        assert out["by_model_version"]["3"] == {"hours": 1.5, "gpu_hours": 4.0, "usd": 12.1, "cpu_hours": 1.0}
        assert set(out["by_stage"]) == {"training", "evaluation"}
        cpu = cost.job_costs(runs[:1], self.recipe(tmp_path, world_size=2))
        assert cpu["by_stage"]["training"] == {"hours": 0.5, "cpu_hours": 1.0, "usd": pytest.approx(0.1)}

    def test_serving_and_daily_record(self, tmp_path):
        import datetime as dt

        from llmops_provider import cost

        recipe = self.recipe(tmp_path)
        serving = cost.serving_costs({"3": 120.0, "4": 60.0}, {"3": 6000.0}, recipe)
        assert serving["3"] == {"hours": 2.0, "gpu_hours": 2.0, "usd": 6.0, "tokens": 6000.0, "tokens_per_usd": 1000.0}
        assert serving["4"]["tokens"] == 0.0 and serving["4"]["usd"] == 3.0
        jobs = cost.job_costs([{"run_id": "e", "dag_id": "c-model_evaluate", "start": 0, "end": 3600}], recipe)
        record = cost.daily_record(dt.date(2026, 11, 28), jobs, serving, recipe)
        assert record["total"] == {"cpu_hours": 1.0, "usd": pytest.approx(9.1), "gpu_hours": 3.0}
        assert record["tokens_served"] == 6000.0 and record["tokens_per_usd"] == pytest.approx(6000 / 9.1)
        assert record["day"] == "2026-11-28" and record["prices"]["gpu_hour_usd"] == 3.0
