"""The eval gate's decision logic and the operators' resolution rules (no engines started)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from llmops_provider.recipes import Threshold
from llmops_provider.specs.evaluate import (
    MERGED_ARTIFACT_PATH,
    EvalJobSpec,
    EvalResult,
    apply_thresholds,
    verdict_of,
)

pytestmark = pytest.mark.unit


def T(**kw) -> Threshold:
    return Threshold(**kw)


def test_within_bounds_passes():
    failures = apply_thresholds(
        {"perplexity": 500.0, "acc": 0.7}, {"perplexity": T(max=1000), "acc": T(min=0.5, max=1)}
    )
    assert failures == []
    assert verdict_of(failures) == "passed"


def test_max_exceeded_fails_and_names_metric():
    failures = apply_thresholds({"perplexity": 1500.0}, {"perplexity": T(max=1000)})
    assert [f.metric for f in failures] == ["perplexity"]
    assert "> max 1000" in failures[0].reason
    assert verdict_of(failures) == "failed"


def test_below_min_fails():
    failures = apply_thresholds({"acc": 0.2}, {"acc": T(min=0.5)})
    assert failures[0].metric == "acc" and "< min 0.5" in failures[0].reason


def test_bounds_are_inclusive():
    assert apply_thresholds({"x": 1.0}, {"x": T(min=1.0, max=1.0)}) == []


def test_missing_metric_fails_closed():
    failures = apply_thresholds({"perplexity": 10.0}, {"perplexity": T(max=1000), "rouge1": T(min=0.1)})
    assert [f.metric for f in failures] == ["rouge1"]
    assert "missing" in failures[0].reason and failures[0].value is None


@pytest.mark.parametrize("bad", [math.nan, math.inf, "n/a", None])
def test_non_numeric_or_non_finite_fails(bad):
    failures = apply_thresholds({"perplexity": bad}, {"perplexity": T(max=1e12)})
    assert len(failures) == 1 and failures[0].metric == "perplexity"


def test_no_thresholds_never_passes():
    assert verdict_of(apply_thresholds({"perplexity": 1.0}, {})) == "failed"


def test_every_failure_is_reported():
    failures = apply_thresholds({"a": 5.0, "b": 5.0}, {"a": T(max=1), "b": T(min=10), "c": T(max=1)})
    assert sorted(f.metric for f in failures) == ["a", "b", "c"]


def test_threshold_needs_a_bound():
    with pytest.raises(ValueError, match="min` or `max"):
        Threshold()


def test_spec_roundtrip_and_defaults(tmp_path):
    spec = EvalJobSpec(
        recipe="r-1",
        model_name="r-1",
        model_version="3",
        mlflow_run_id="abc",
        dataset_dir=str(tmp_path),
        thresholds={"perplexity": T(max=10)},
        output_dir=str(tmp_path / "out"),
    )
    again = EvalJobSpec.model_validate_json(spec.model_dump_json())
    assert again == spec
    assert again.artifact_path == MERGED_ARTIFACT_PATH == "model/merged"
    assert again.experiment == "r-1-eval"
    with pytest.raises(ValueError):
        EvalJobSpec(**{**spec.model_dump(), "thresholds": {}})


def test_result_shape_matches_the_xcom_contract():
    result = EvalResult(
        model_name="m",
        model_version="1",
        eval_run_id="e",
        verdict="passed",
        metrics={"perplexity": 2.0},
        thresholds={"perplexity": {"min": None, "max": 10.0}},
        report_path="/r.json",
    )
    dumped = result.model_dump(mode="json")
    for key in (
        "model_name",
        "model_version",
        "eval_run_id",
        "verdict",
        "metrics",
        "thresholds",
        "report_path",
        "failures",
    ):
        assert key in dumped


# --- operator-side resolution (Airflow imported, nothing started) --------------------------------


def test_triggering_extra_picks_newest_event_of_the_right_asset():
    from llmops_provider.compat import Asset
    from llmops_provider.operators.evaluation import triggering_extra

    events = {
        Asset("llmops://r-1/dataset"): [SimpleNamespace(extra={"model_version": "9"})],
        Asset("llmops://r-1/model"): [
            SimpleNamespace(extra={"model_version": "1"}),
            SimpleNamespace(extra={"model_version": "2"}),
        ],
    }
    assert triggering_extra({"triggering_asset_events": events}, "llmops://r-1/model") == {"model_version": "2"}
    assert triggering_extra({}, "llmops://r-1/model") == {}


def test_outlet_extra_only_on_declared_outlet():
    import logging

    from airflow.sdk.execution_time.context import OutletEventAccessors

    from llmops_provider.compat import Asset
    from llmops_provider.operators.evaluation import emit_outlet_extra

    approved = Asset("llmops://r-1/approved")
    accessors = OutletEventAccessors()
    ctx = {"outlet_events": accessors}
    assert emit_outlet_extra(ctx, [approved], approved.uri, {"model_version": "4"}, logging.getLogger())
    assert accessors[approved].extra == {"model_version": "4"}
    assert not emit_outlet_extra(ctx, [], approved.uri, {"model_version": "5"}, logging.getLogger())


def test_version_parameter_validation():
    from llmops_provider.compat import AirflowFailException
    from llmops_provider.operators.evaluation import version_from

    assert version_from(None, "v") is None and version_from("", "v") is None and version_from("None", "v") is None
    assert version_from(3, "v") == "3"
    with pytest.raises(AirflowFailException, match="model_version"):
        version_from("latest", "model_version")


def test_deploy_refuses_a_version_that_did_not_pass(tmp_path, monkeypatch):
    from llmops_provider.compat import AirflowFailException
    from llmops_provider.operators import deployment

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r-one\ndata:\n  sources: [{path: /x}]\n")
    client = SimpleNamespace(
        get_model_version=lambda n, v: SimpleNamespace(version=v, run_id="run", tags={"eval_verdict": "failed"})
    )
    monkeypatch.setattr("llmops_provider.hooks.mlflow.MLflowHook.get_client", lambda self: client)
    op = deployment.VLLMDeployOperator(task_id="deploy", recipe_path=str(recipe), model_version="2")
    with pytest.raises(AirflowFailException, match="refusing to deploy r-one v2"):
        op.execute({})


def test_operator_modules_import_light():
    import subprocess
    import sys

    code = (
        "import sys, llmops_provider.operators.evaluation, llmops_provider.operators.deployment\n"
        "import llmops_provider.hooks.vllm\n"
        "heavy = [m for m in ('torch', 'mlflow', 'lm_eval', 'vllm', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the HTML report, the recipe policy, the approval DAG ------------------------------------


def _report_body() -> dict:
    from llmops_provider.evaluation.bootstrap import compare

    champ = {"a": (0.5, 1.0), "b": (0.5, 1.0), "c": (0.25, 1.0)}
    worse = compare(
        "rouge_l", {"a": (0.1, 1.0), "b": (0.2, 1.0), "c": (0.0, 1.0)}, champ, direction="higher", iterations=200
    )
    same = compare("bits_per_byte", {"a": (4.0, 1.0)}, {"a": (4.0, 1.0)}, direction="lower", iterations=200)
    return {
        "model_name": "m<x>",
        "model_version": "7",
        "verdict": "failed",
        "baseline_version": "6",
        "baseline_alias": "champion",
        "dataset_repo": "corpus",
        "dataset_commit": "abc",
        "n_docs": 3,
        "metrics": {
            "perplexity": 420.0,
            "rouge_l": worse.candidate,
            "bits_per_byte": 4.0,
            "safety.refusal_rate": 0.0,
            "safety.weapons.refusal_rate": 0.0,
            "safety.weapons.unsafe_rate": 0.5,
        },
        "baseline_metrics": {"rouge_l": worse.champion, "bits_per_byte": 4.0},
        "thresholds": {"perplexity": {"min": None, "max": 1000.0}, "cloze_acc": {"min": 0.3, "max": None}},
        "comparisons": [worse.model_dump(), same.model_dump()],
        "failures": [
            {"metric": "cloze_acc", "value": None, "reason": "metric 'cloze_acc' missing from the results"},
            {"metric": "rouge_l", "value": worse.candidate, "reason": "regression vs champion: " + worse.describe()},
        ],
        "safety": {"prompt_set": "llmops-redteam", "version": "1.0", "rows": [{}, {}]},
    }


def test_html_report_shows_every_metric_interval_threshold_and_verdict():
    from html.parser import HTMLParser

    from llmops_provider.evaluation.report import render_html

    body = _report_body()
    text = render_html(body)

    class Rows(HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows, self.cell, self.tags = {}, None, []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            if tag == "tr" and dict(attrs).get("data-metric"):
                self.cell = self.rows.setdefault(dict(attrs)["data-metric"], [])
            elif tag == "td" and self.cell is not None:
                self.cell.append("")

        def handle_endtag(self, tag):
            if tag == "tr":
                self.cell = None

        def handle_data(self, data):
            if self.cell:
                self.cell[-1] += data

    parser = Rows()
    parser.feed(text)
    rows = parser.rows
    # every reported, thresholded or compared metric has a row
    assert set(rows) == set(body["metrics"]) | set(body["thresholds"]) | {"rouge_l", "bits_per_byte"}
    metric, value, champion, diff, interval, comparison, threshold, verdict = rows["rouge_l"]
    assert verdict == "FAIL" and comparison.startswith("regressed") and interval.startswith("[-")
    assert rows["bits_per_byte"][4] == "[+0, +0]" and rows["bits_per_byte"][5].startswith("no significant change")
    assert rows["perplexity"][6] == "≤ 1000" and rows["perplexity"][7] == "pass"
    assert rows["cloze_acc"][1] == "MISSING" and rows["cloze_acc"][6] == "≥ 0.3" and rows["cloze_acc"][7] == "FAIL"
    assert rows["safety.refusal_rate"][7] == "report only"
    assert "<script" not in text and "http" not in text.replace("http://www.w3.org/2000/svg", "")  # self-contained
    assert text.count("<svg") == 3  # intervals, thresholds, safety
    assert "m&lt;x&gt;" in text and 'id="verdict">FAILED' in text


def test_evaluation_policy_defaults_and_validation(tmp_path):
    from llmops_provider.recipes import RecipeError, load_recipe

    base = "name: r-one\ndata:\n  sources: [{path: /x}]\n"
    path = tmp_path / "r.yaml"
    path.write_text(base)
    ev = load_recipe(path).evaluation
    assert ev.tasks == ["perplexity", "cloze", "generation"] and ev.approved_alias == "candidate-approved"
    assert ev.regression.enabled and ev.regression.baseline_alias == "champion"
    assert ev.regression.metrics == {"bits_per_byte": "lower", "cloze_acc": "higher", "rouge_l": "higher"}
    assert ev.safety.enabled and not ev.resources.enabled and not ev.human_approval.required
    path.write_text(base + "evaluation:\n  tasks: [perplexity]\n")
    with pytest.raises(RecipeError, match="cloze_acc"):
        load_recipe(path)
    path.write_text(base + "evaluation:\n  regression: {margins: {rouge_l: 0.1, acc: 0.1}}\n")
    with pytest.raises(RecipeError, match="margins"):
        load_recipe(path)


def test_human_approval_puts_a_person_between_gate_and_promotion(tmp_path):
    from llmops_provider.dag_factory import build_lifecycle_dags

    path = tmp_path / "r.yaml"
    path.write_text("name: r-one\ndata:\n  sources: [{path: /x}]\nevaluation:\n  human_approval: {required: true}\n")
    dag = build_lifecycle_dags(path)["r-one_evaluate"]
    # which_gate routes a `reevaluate` event to the champion's re-evaluation (operators/loop.py)
    assert set(dag.task_dict) == {"which_gate", "evaluate", "reevaluate", "approve", "promote"}
    assert dag.task_dict["approve"].upstream_task_ids == {"evaluate"}
    assert dag.task_dict["promote"].upstream_task_ids == {"approve"}
    assert [o.uri for o in dag.task_dict["promote"].outlets] == ["llmops://r-one/approved"]
    assert not dag.task_dict["evaluate"].outlets and dag.task_dict["evaluate"].promote is False
    assert "approval_body" in dag.task_dict["approve"].body
    path.write_text("name: r-one\ndata:\n  sources: [{path: /x}]\n")
    dag = build_lifecycle_dags(path)["r-one_evaluate"]
    assert set(dag.task_dict) == {"which_gate", "evaluate", "reevaluate"} and dag.task_dict["evaluate"].promote is True


def test_approval_body_lists_judged_metrics_and_links():
    from llmops_provider.operators.evaluation import approval_body, report_url

    body = _report_body()
    url = report_url("http://127.0.0.1:5000", "3", "abc")
    assert url == "http://127.0.0.1:5000/#/experiments/3/runs/abc/artifacts"
    assert report_url("sqlite:///x.db", "3", "abc") is None
    text = approval_body({**body, "html_path": "/r/report.html", "report_url": url})
    for needle in ("m<x> v7", "v6", "| perplexity | 420 |", "| rouge_l |", "regressed", "/r/report.html", url):
        assert needle in text, needle
