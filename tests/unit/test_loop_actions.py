"""The feedback loop's next steps: which action for which condition, one gate per action, the DAG wiring."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmops_provider import feedback
from llmops_provider.recipes import FeedbackLoopSpec

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
NOW = 1_800_000_000.0


def _record(version="2", previous="1", outcome="promoted", age_s=600.0):
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(NOW - age_s))
    return {
        "model_name": "m",
        "model_version": version,
        "previous_champion": previous,
        "outcome": outcome,
        "deployed_at": stamp,
        "eval_run_id": "e1",
    }


def _steps(record, slo="ok", probe=None, changed=(), **loop):
    return feedback.next_steps(
        slo_status=slo,
        slo_reasons=["ttft_p95_seconds 7.2 > 5"] if slo == "breach" else [],
        probe=probe,
        record=record,
        eval_inputs_changed=list(changed),
        now=NOW,
        loop=FeedbackLoopSpec(**loop),
    )


LOW_PROBE = {"status": "breach", "rouge_l": 0.04, "limit": 0.2, "n": 20}


class TestWhichAction:
    def test_fresh_champion_breaching_an_slo_is_rolled_back(self):
        out = _steps(_record(age_s=600), slo="breach")
        assert out["rollback"]["incidents"] == {"slo_breach": "v2"}
        assert out["rollback"]["evidence"]["from_version"] == "2" and out["rollback"]["evidence"]["to_version"] == "1"
        assert "ttft_p95_seconds 7.2 > 5" in out["rollback"]["reasons"][0] and "v1" in out["rollback"]["reasons"][0]
        assert out["reevaluate"]["incidents"] == {}  # a rollback in the same check wins

    def test_probe_breach_fresh_rolls_back_old_reevaluates(self):
        assert _steps(_record(age_s=60), probe=LOW_PROBE)["rollback"]["incidents"] == {"probe_breach": "v2"}
        old = _steps(_record(age_s=3 * 86400), probe=LOW_PROBE)
        assert old["rollback"]["incidents"] == {} and "rollback_within_s" in old["rollback"]["reasons"][0]
        assert old["reevaluate"]["incidents"] == {"probe_breach": "v2"}
        assert "ROUGE-L 0.040 < 0.2" in old["reevaluate"]["reasons"][0]

    def test_old_champion_slo_breach_asks_for_nothing_here(self):
        out = _steps(_record(age_s=2 * 86400), slo="breach")
        assert out["rollback"]["incidents"] == {} and out["reevaluate"]["incidents"] == {}
        assert "not a fresh regression" in out["rollback"]["reasons"][0]  # recorded why not

    @pytest.mark.parametrize(
        "record,why",
        [
            (None, "no deployment record"),
            (_record(previous=None), "nothing to roll back to"),
            (_record(outcome="rolled-back"), "not a promotion"),
            (_record(outcome="restored", previous=None), "not a promotion"),  # after a rollback: no ping-pong
        ],
    )
    def test_no_previous_champion_no_rollback(self, record, why):
        out = _steps(record, slo="breach")
        assert out["rollback"]["incidents"] == {} and why in out["rollback"]["reasons"][0]

    def test_new_eval_inputs_reevaluate_the_champion(self):
        out = _steps(_record(age_s=5 * 86400), changed=["held-out split of dataset head abc"])
        assert out["reevaluate"]["incidents"] == {"eval_inputs": "v2:held-out split of dataset head abc"}
        assert out["reevaluate"]["evidence"]["model_version"] == "2"
        assert _steps(_record(), changed=["x"], reevaluate_on_new_eval_inputs=False)["reevaluate"]["incidents"] == {}

    def test_switches_and_window(self):
        assert _steps(_record(), slo="breach", rollback_on_slo_breach=False)["rollback"]["incidents"] == {}
        assert _steps(_record(age_s=7200), slo="breach", rollback_within_s=3600)["rollback"]["incidents"] == {}
        assert _steps(_record(), slo="ok")["rollback"] == {
            "incidents": {},
            "reasons": [],
            "cooldown_s": 3600,
            "evidence": {},
        }


class TestGatePerAction:
    def _result(self, rollback=None, reevaluate=None, retrain=None, cooldown=600):
        return {
            "retrain": bool(retrain),
            "incidents": retrain or {},
            "cooldown_s": cooldown,
            "rollback": bool(rollback),
            "reevaluate": bool(reevaluate),
            "actions": {
                "rollback": {"incidents": rollback or {}, "cooldown_s": cooldown},
                "reevaluate": {"incidents": reevaluate or {}, "cooldown_s": cooldown},
            },
        }

    def test_one_incident_one_run_per_action(self):
        states = {a: None for a in feedback.ACTIONS}

        def gate(result, now):
            allowed = []
            for action in feedback.ACTIONS:
                allow, state, why = feedback.gate_monitor_result(result, states[action], now, action)
                states[action] = json.loads(json.dumps(state))  # as the Variable keeps it
                if allow:
                    allowed.append(action)
            return allowed

        both = self._result(rollback={"slo_breach": "v2"}, retrain={"new_data": "fp1"})
        assert gate(both, 0) == ["retrain", "rollback"]  # independent gates: both go, once each
        assert gate(both, 10) == [] and gate(both, 10_000) == []  # the same incidents persist: nothing more
        # a rollback's next incident (a new version regressing) waits out the rollback cool-down only
        assert gate(self._result(rollback={"slo_breach": "v3"}, reevaluate={"probe_breach": "v3"}), 100) == [
            "reevaluate"
        ]
        assert gate(self._result(rollback={"slo_breach": "v3"}), 700) == ["rollback"]
        assert states["rollback"]["incidents"] == {"slo_breach": "v3"} and states["retrain"]["incidents"] == {}

    def test_cooldown_message_names_the_action_field(self):
        _, state, _ = feedback.incident_gate({"probe_breach": "v2"}, None, 0, 100, "rollback")
        allow, _, why = feedback.incident_gate({"probe_breach": "v3"}, state, 10, 100, "rollback")
        assert not allow and "monitoring.loop.rollback_cooldown_s" in why and "last rollback" in why

    def test_variables_and_uris(self):
        assert feedback.gate_variable("r", "rollback") == "llmops.r.rollback_gate"
        assert feedback.retrain_gate_variable("r") == "llmops.r.retrain_gate"  # unchanged
        assert feedback.action_uri("r", "reevaluate") == "llmops://r/reevaluate"
        with pytest.raises(ValueError, match="unknown loop action"):
            feedback.action_uri("r", "promote")


class TestMonitorDecides:
    """The check task with a deployment record and a probe result: the actions in its XCom."""

    def test_rollback_and_reevaluate_from_the_check(self, tmp_path, monkeypatch):
        from llmops_provider.operators import monitoring as op_mod

        home = tmp_path / "home"
        monkeypatch.setenv("AIRFLOW__LLMOPS__HOME", str(home))
        (home / "landing" / "r").mkdir(parents=True)
        (home / "landing" / "r" / "a.jsonl").write_text('{"id": 1, "text": "x"}\n')
        recipe = tmp_path / "r.yaml"
        recipe.write_text(
            textwrap.dedent("""\
            name: loop-test
            data: {sources: [{path: "{home}/landing/r"}]}
            monitoring: {slos: {ttft_p95_seconds: 1.0}}
        """)
        )
        record = _record(age_s=0)
        record["deployed_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        record.pop("eval_run_id")  # no eval run: the eval-inputs check is skipped (it needs MLflow)
        (home / "deployments").mkdir(parents=True)
        (home / "deployments" / "loop-test.json").write_text(json.dumps(record))

        class Hook:
            def __init__(self, conn_id):
                pass

            def query_scalar(self, promql):
                return 4.0 if "ttft" in promql or "request_success" in promql else None

        import llmops_provider.datasets as datasets

        monkeypatch.setattr("llmops_provider.hooks.prometheus.PrometheusHook", Hook)
        monkeypatch.setattr(
            datasets, "get_store", lambda name=None: SimpleNamespace(head=lambda r, b: None), raising=False
        )
        op = op_mod.MonitorOperator(task_id="check", recipe_path=str(recipe), probe_task_id="probe")
        monkeypatch.setattr(op, "_processed_fingerprint", lambda name: None)
        ti = SimpleNamespace(xcom_pull=lambda task_ids: dict(LOW_PROBE) if task_ids == "probe" else None)
        out = op.execute({"ti": ti})
        assert out["status"] == "breach" and out["rollback"] is True and out["reevaluate"] is False
        assert out["actions"]["rollback"]["incidents"] == {"slo_breach": "v2", "probe_breach": "v2"}
        assert any("rolling back to v1" in r for r in out["reasons"])
        assert feedback.gate_monitor_result(out, None, time.time(), "rollback")[0]
        assert not feedback.gate_monitor_result(out, None, time.time(), "retrain")[0]

        record["deployed_at"] = "2020-01-01T00:00:00+0000"  # an old champion: the probe asks for a re-evaluation
        (home / "deployments" / "loop-test.json").write_text(json.dumps(record))
        out = op.execute({"ti": ti})
        assert out["rollback"] is False and out["reevaluate"] is True
        assert out["actions"]["reevaluate"]["incidents"] == {"probe_breach": "v2"}


class TestDagWiring:
    @pytest.fixture(scope="class")
    def dags(self):
        from llmops_provider.dag_factory import build_lifecycle_dags

        return build_lifecycle_dags(ROOT / "dags" / "recipes" / "tiny-llama.yaml")

    def test_rollback_dag_and_asset_links(self, dags):
        def uris(objs):
            return {getattr(o, "uri", None) for o in objs}

        rollback = dags["tiny-llama_rollback"]
        assert "llmops://tiny-llama/rollback" in str(rollback.timetable.asset_condition)
        assert uris(rollback.get_task("rollback").outlets) == {"llmops://tiny-llama/deployment"}
        monitor = dags["tiny-llama_monitor"]
        assert uris(monitor.get_task("request_rollback").outlets) == {"llmops://tiny-llama/rollback"}
        assert uris(monitor.get_task("request_reevaluate").outlets) == {"llmops://tiny-llama/reevaluate"}
        assert monitor.get_task("request_rollback").upstream_task_ids == {"check", "needs_rollback"}
        assert monitor.get_task("request_retrain").upstream_task_ids == {"check", "needs_retrain"}
        evaluate = dags["tiny-llama_evaluate"]
        condition = str(evaluate.timetable.asset_condition)
        assert "llmops://tiny-llama/model" in condition and "llmops://tiny-llama/reevaluate" in condition
        assert evaluate.get_task("evaluate").upstream_task_ids == {"which_gate"}
        assert evaluate.get_task("reevaluate").upstream_task_ids == {"which_gate"}
        assert uris(evaluate.get_task("reevaluate").outlets) == set()  # re-evaluation approves nothing

    def test_dags_serialize(self, dags):
        from airflow.serialization.serialized_objects import DagSerialization

        for dag_id in ("tiny-llama_rollback", "tiny-llama_evaluate", "tiny-llama_monitor"):
            blob = json.dumps(DagSerialization.to_dict(dags[dag_id]))
            assert dag_id in blob

    @pytest.mark.parametrize(
        "events,chosen",
        [
            ({}, ["evaluate"]),  # by hand
            ({"llmops://tiny-llama/model": 1}, ["evaluate"]),
            ({"llmops://tiny-llama/reevaluate": 1}, ["reevaluate"]),
            ({"llmops://tiny-llama/model": 1, "llmops://tiny-llama/reevaluate": 1}, ["evaluate", "reevaluate"]),
        ],
    )
    def test_which_gate_routes_by_triggering_asset(self, dags, events, chosen):
        from llmops_provider.compat import Asset

        branch = dags["tiny-llama_evaluate"].get_task("which_gate")
        triggering = {Asset(uri=uri, name=uri): [] for uri in events}
        assert branch.python_callable(triggering_asset_events=triggering) == chosen

    def test_probe_runs_before_the_check(self, tmp_path):
        from llmops_provider.dag_factory import build_lifecycle_dags

        recipe = tmp_path / "p.yaml"
        recipe.write_text('name: probed\ndata: {sources: [{path: "/x"}]}\nmonitoring: {probe: {enabled: true}}\n')
        check = build_lifecycle_dags(recipe)["probed_monitor"].get_task("check")
        assert check.upstream_task_ids == {"probe"} and check.trigger_rule == "all_done"
        assert check.probe_task_id == "probe"
