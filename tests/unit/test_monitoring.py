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
        values = {"requests": 12, "ttft_p95_seconds": 0.4, "e2e_latency_p95_seconds": 3.0, "error_rate": 0.0,
                  "generation_tokens_per_s": 50.0}
        out = evaluate_slos(values, self.ALL)
        assert out["status"] == "ok"
        assert out["reasons"] == []
        assert out["slos"]["ttft_p95_seconds"] == {"value": 0.4, "limit": 5.0, "ok": True}
        assert out["slos"]["min_generation_tokens_per_s"]["ok"] is True

    def test_breach_max_and_min(self):
        values = {"requests": 12, "ttft_p95_seconds": 7.5, "e2e_latency_p95_seconds": 3.0, "error_rate": 0.2,
                  "generation_tokens_per_s": 2.0}
        out = evaluate_slos(values, self.ALL)
        assert out["status"] == "breach"
        assert {k for k, v in out["slos"].items() if v["ok"] is False} == {
            "ttft_p95_seconds", "error_rate", "min_generation_tokens_per_s"}
        assert any("ttft_p95_seconds = 7.5 > 5" in r for r in out["reasons"])
        assert any("min_generation_tokens_per_s = 2 < 10" in r for r in out["reasons"])

    def test_boundary_is_ok(self):
        out = evaluate_slos({"requests": 1, "ttft_p95_seconds": 5.0}, SLOs(e2e_latency_p95_seconds=None, error_rate=None))
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
            'histogram_quantile(0.95, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket'
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
    def test_serialize_only_primitives_and_roundtrip(self):
        from llmops_provider.triggers.prometheus import PromQLConditionTrigger

        trigger = PromQLConditionTrigger(base_url="http://127.0.0.1:9090", query="vector(1)", op=">=", threshold=1,
                                         hold_for_s=30, poll_interval_s=5, headers={"Authorization": "Basic x"})
        classpath, kwargs = trigger.serialize()
        assert classpath == "llmops_provider.triggers.prometheus.PromQLConditionTrigger"

        def primitive(v):
            if isinstance(v, dict):
                return all(isinstance(k, str) and primitive(x) for k, x in v.items())
            if isinstance(v, list):
                return all(primitive(x) for x in v)
            return v is None or isinstance(v, (str, int, float, bool))

        assert primitive(kwargs), kwargs
        json.dumps(kwargs)
        again = PromQLConditionTrigger(**kwargs)
        assert again.serialize() == (classpath, kwargs)

    def test_bad_op(self):
        from llmops_provider.triggers.prometheus import PromQLConditionTrigger

        with pytest.raises(ValueError, match="op"):
            PromQLConditionTrigger(base_url="http://x", query="q", op="=>", threshold=1)

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
        return _write(tmp_path / "r.yaml", textwrap.dedent("""\
            name: monitor-test
            data: {sources: [{path: "{home}/landing/r"}]}
            monitoring: {slos: {ttft_p95_seconds: 1.0}}
        """))

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
        assert self._run(monkeypatch, recipe, {}, None)["retrain"] is False  # no commit yet: the data schedule bootstraps
        fp = out["source_fingerprint"]
        assert self._run(monkeypatch, recipe, {}, {"source_fingerprint": "old"}, processed=fp)["retrain"] is False
        assert set(out) >= {"status", "slos", "new_data", "retrain", "reasons"}

    def test_same_data_and_breach_does_not_retrain_by_default(self, monkeypatch, recipe, tmp_path):
        fp = source_fingerprint([tmp_path / "home" / "landing" / "r"])
        out = self._run(monkeypatch, recipe, {"requests": 4, "ttft_p95_seconds": 3.0}, {"source_fingerprint": fp})
        assert out["status"] == "breach" and out["new_data"] is False and out["retrain"] is False
        out = self._run(monkeypatch, recipe, {"requests": 4, "ttft_p95_seconds": 3.0}, {"source_fingerprint": fp},
                        retrain_on_slo_breach=True)
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
        monkeypatch.setattr(datasets, "get_store",
                            lambda name=None: SimpleNamespace(head=lambda r, b: SimpleNamespace(metadata={"source_fingerprint": "old"})),
                            raising=False)
        pushed = {}
        ti = SimpleNamespace(xcom_push=lambda key, value: pushed.update({key: value}))
        op = op_mod.MonitorOperator(task_id="check", recipe_path=str(recipe))
        monkeypatch.setattr(op, "_processed_fingerprint", lambda name: None)
        with pytest.raises(AirflowException, match="monitoring unavailable"):
            op.execute({"ti": ti})
        assert pushed["return_value"]["status"] == "unreachable"
        assert pushed["return_value"]["new_data"] is True  # still decided and published
