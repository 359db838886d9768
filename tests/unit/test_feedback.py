"""Feedback store (validation, quarantine, negative rate, curation, landing) and the retrain gate."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from llmops_provider import feedback
from llmops_provider.monitoring import source_fingerprint

pytestmark = pytest.mark.unit
TS = "2026-11-28T06:00:00+00:00"


def rec(i, rating=None, **kw):
    return {"id": f"r{i}", "ts": TS, "prompt": f"prompt {i}", "output": f"out {i}", "rating": rating, **kw}


def write(path, *records, raw=()):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(raw))


class TestStore:
    def test_malformed_lines_are_quarantined_with_reason(self, tmp_path):
        write(
            tmp_path / "a.jsonl",
            rec(1, 1),
            rec(2, -1),
            raw=[
                "not json\n",
                '{"id": "x", "ts": "' + TS + '", "prompt": "p", "rating": 5}\n',
                "\n",
                '{"id": "y", "ts": "' + TS + '", "prompt": "p"}\n',
                '{"id": "z", "ts": "yesterday", "prompt": "p", "rating": 1}\n',
                '{"id": "w", "ts": "' + TS + '", "prompt": "p", "rating": true}\n',
            ],
        )
        write(tmp_path / ".partial.jsonl", rec(9, 1))
        valid, bad = feedback.read_feedback(tmp_path)
        assert [r["id"] for r in valid] == ["r1", "r2"]
        reasons = [b["reason"] for b in bad]
        assert reasons[0].startswith("invalid JSON")
        assert "`rating` is 5" in reasons[1] and "-1, 0, 1" in reasons[1]
        assert "neither `rating` nor `flag`" in reasons[2]
        assert "`ts`" in reasons[3] and "ISO 8601" in reasons[3]
        assert "`rating` is True" in reasons[4]
        assert [b["line"] for b in bad] == [3, 4, 6, 7, 8]

    def test_negative_rate_over_window(self):
        old = {**rec(0, -1), "ts": "2026-01-01T00:00:00Z"}
        records = [rec(1, 1), rec(2, -1), rec(3, None, flag="unsafe"), rec(4, 0), old]
        since = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
        assert feedback.negative_rate(records, since) == (0.5, 4)
        assert feedback.negative_rate(records) == (0.6, 5)
        assert feedback.negative_rate([], since) == (None, 0)

    def test_curation_uses_corrections_and_good_outputs_only(self):
        records = [rec(1, 1), rec(2, -1), rec(3, -1, correction="right"), rec(4, 1, flag="wrong"), rec(5, 0), rec(1, 1)]
        assert feedback.curate(records) == [
            {"id": "feedback:r1", "text": "prompt 1 out 1", "source": "feedback"},
            {"id": "feedback:r3", "text": "prompt 3 right", "source": "feedback"},
        ]

    def test_land_only_above_threshold_idempotent_and_changes_fingerprint(self, tmp_path):
        store, landing = tmp_path / "fb", tmp_path / "landing"
        write(landing / "batch-001.jsonl", {"id": "a", "text": "t"})
        write(store / "day.jsonl", rec(1, 1), rec(2, 1))
        before = source_fingerprint([landing])
        assert feedback.land(store, landing, 3) == {"landed": 0, "pending": 2, "file": None, "batch": None}
        assert source_fingerprint([landing]) == before
        write(store / "day2.jsonl", rec(3, -1, correction="c"))
        out = feedback.land(store, landing, 3)
        assert out["landed"] == 3 and out["file"].endswith(f"feedback-{out['batch']}.jsonl")
        assert source_fingerprint([landing]) != before
        lines = [json.loads(x) for x in (landing / f"feedback-{out['batch']}.jsonl").read_text().splitlines()]
        assert [x["id"] for x in lines] == ["feedback:r1", "feedback:r2", "feedback:r3"]
        assert feedback.land(store, landing, 3)["landed"] == 0  # already landed
        assert not list(landing.glob(".*"))  # no temporary left behind

    def test_append_validates(self, tmp_path):
        path = feedback.append(tmp_path, {"id": "r1", "prompt": "p", "rating": 1})
        assert feedback.read_feedback(tmp_path)[0][0]["id"] == "r1" and path.parent == tmp_path
        with pytest.raises(ValueError, match="`rating`"):
            feedback.append(tmp_path, {"id": "r2", "prompt": "p", "rating": 3})


class TestRetrainGate:
    def test_one_incident_one_request(self):
        allow, state, why = feedback.retrain_gate({"slo_breach": "breach"}, None, now=1000, cooldown_s=60)
        assert allow and "new incident" in why
        state = json.loads(json.dumps(state))  # persisted as a Variable
        # the breach persists long after the cool-down: still the same incident
        allow, state, why = feedback.retrain_gate({"slo_breach": "breach"}, state, now=99_000, cooldown_s=60)
        assert not allow and "already handled" in why
        # it clears, then comes back: a new incident
        allow, state, _ = feedback.retrain_gate({}, state, now=99_100, cooldown_s=60)
        assert not allow and state["incidents"] == {}
        assert feedback.retrain_gate({"slo_breach": "breach"}, state, now=99_200, cooldown_s=60)[0]

    def test_cooldown_holds_a_new_incident_until_it_ends(self):
        _, state, _ = feedback.retrain_gate({"new_data": "fp1"}, None, now=0, cooldown_s=3600)
        allow, state, why = feedback.retrain_gate({"new_data": "fp2"}, state, now=100, cooldown_s=3600)
        assert not allow and "cool-down" in why and "3500s" in why
        allow, state, _ = feedback.retrain_gate({"new_data": "fp2"}, state, now=3700, cooldown_s=3600)
        assert allow and state["incidents"] == {"new_data": "fp2"}

    def test_monitor_result_adapter(self):
        result = {"retrain": True, "incidents": {"drift": "drift"}, "cooldown_s": 10}
        assert feedback.gate_monitor_result(result, None, 0)[0]
        assert feedback.gate_monitor_result({"retrain": True}, None, 0)[0]  # without incident keys
        assert not feedback.gate_monitor_result({"retrain": False}, None, 0)[0]


class TestPromptVersions:
    def test_render_and_sticky_split(self):
        from llmops_provider import prompts

        assert prompts.render("Q: {{ text }} / {{n}}", text="hi", n="2") == "Q: hi / 2"
        with pytest.raises(KeyError, match="needs \\['text'\\]"):
            prompts.render("Q: {{text}}")
        arms = [prompts.assign(f"user-{i}", 20) for i in range(2000)]
        assert arms == [prompts.assign(f"user-{i}", 20) for i in range(2000)]  # sticky
        assert 300 < arms.count("canary") < 500  # ~20 %
        assert set(prompts.assign(f"u{i}", 0) for i in range(50)) == {"champion"}
        with pytest.raises(ValueError, match="0-100"):
            prompts.assign("u", 101)

    def test_ab_readout_by_prompt_version(self):
        records = [
            rec(1, 1, prompt_version="1"),
            rec(2, -1, prompt_version="1"),
            rec(3, 1, prompt_version="2"),
            rec(4, 1, prompt_version="2"),
        ]
        assert feedback.negative_rate_by(records, "prompt_version") == {
            "1": {"negative_rate": 0.5, "records": 2},
            "2": {"negative_rate": 0.0, "records": 2},
        }
