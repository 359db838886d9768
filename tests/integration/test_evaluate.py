"""The eval gate end to end: real lm-eval (HF backend, CPU) on a tiny model, real MLflow server.

Also home of the tiny-model fixture helpers (``build_tiny_model``, ``register_tiny_model``)
that ``test_serving.py`` reuses until the training runtime registers real versions.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT


pytestmark = [
    pytest.mark.integration,
]

from tiny_model import CORPUS, build_tiny_model, register_tiny_model  # noqa: E402,F401

# --- fixtures ------------------------------------------------------------------------------

COMMIT = "c0ffee0001"


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    """A dataset version with a held-out split of short sample documents."""
    d = tmp_path_factory.mktemp("dataset") / COMMIT
    d.mkdir()
    docs = []
    for line in (ROOT / "data" / "sample" / "batch-001.jsonl").open():
        try:  # the sample corpus holds deliberately malformed records
            docs.append(json.loads(line))
        except ValueError:
            pass
    short = [{"id": x["id"], "text": x["text"]} for x in docs
             if isinstance(x.get("text"), str) and 80 <= len(x["text"]) <= 500][:20]
    (d / "test.jsonl").write_text("".join(json.dumps(x) + "\n" for x in short))
    return d


@pytest.fixture
def store(monkeypatch, dataset_dir):
    """`llmops_provider.datasets.get_store` stand-in: commit COMMIT -> dataset_dir."""
    calls = []

    def local_path(repo, commit):
        calls.append((repo, commit))
        return dataset_dir if commit == COMMIT else dataset_dir.parent / f"missing-{commit}"

    monkeypatch.setattr("llmops_provider.datasets.get_store", lambda name=None: SimpleNamespace(local_path=local_path),
                        raising=False)
    return calls


def write_recipe(path: Path, name: str, thresholds: str, limit: int = 12) -> str:
    path.write_text(
        f"name: {name}\n"
        "data:\n  sources: [{path: /nonexistent}]\n  dataset_repo: tiny-corpus\n"
        f"evaluation:\n  limit: {limit}\n  thresholds:\n{thresholds}"
    )
    return str(path)


def run_gate(recipe_path: str, name: str, model_version=None, event_version=None):
    from airflow.sdk.execution_time.context import OutletEventAccessors

    from llmops_provider.compat import Asset
    from llmops_provider.operators.evaluation import LMEvalGateOperator

    approved = Asset(f"llmops://{name}/approved")
    events = {}
    if event_version is not None:
        events = {Asset(f"llmops://{name}/model"): [SimpleNamespace(extra={"model_version": event_version})]}
    ctx = {"triggering_asset_events": events, "outlet_events": OutletEventAccessors()}
    op = LMEvalGateOperator(task_id="evaluate", recipe_path=recipe_path, model_version=model_version, outlets=[approved])
    try:
        return op.execute(ctx), ctx["outlet_events"][approved].extra
    except Exception as exc:
        exc.outlet_extra = ctx["outlet_events"][approved].extra
        raise


# --- tests ---------------------------------------------------------------------------------

def test_gate_passes_with_generous_threshold(tmp_path, tmp_path_factory, mlflow_conn, store):
    from mlflow import MlflowClient

    name = "tiny-eval"
    version, run_id = register_tiny_model(mlflow_conn, name, build_tiny_model(tmp_path_factory), {"dataset_commit": COMMIT})
    recipe = write_recipe(tmp_path / "r.yaml", name, "    perplexity: {max: 1.0e9}\n    bits_per_byte: {min: 0.0}\n")

    result, extra = run_gate(recipe, name, event_version=version)  # version from the triggering model event

    assert store == [("tiny-corpus", COMMIT)]
    assert result["verdict"] == "passed" and result["model_version"] == version and result["failures"] == []
    for metric in ("perplexity", "token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert result["metrics"][metric] > 0, metric
    # a random-init model over a 500-token vocabulary: token perplexity near the vocabulary size
    assert 50 < result["metrics"]["perplexity"] < 5000
    report = json.loads(Path(result["report_path"]).read_text())
    assert report["verdict"] == "passed" and report["n_docs"] == 12 and report["dataset_commit"] == COMMIT
    md = Path(result["markdown_path"]).read_text()
    for word in ("perplexity", "word_perplexity", "bits_per_byte", "PASSED", "1e+09"):
        assert word in md, word
    assert extra["model_version"] == version and extra["eval_run_id"] == result["eval_run_id"]
    assert extra["dataset_commit"] == COMMIT and extra["eval_verdict"] == "passed"

    client = MlflowClient(mlflow_conn)
    tags = client.get_model_version(name, version).tags
    assert tags["eval_verdict"] == "passed" and tags["eval_run_id"] == result["eval_run_id"]
    run = client.get_run(result["eval_run_id"])
    assert run.data.tags["model_version"] == version and run.data.tags["dataset_commit"] == COMMIT
    assert run.data.metrics["perplexity"] == pytest.approx(result["metrics"]["perplexity"])
    assert {a.path for a in client.list_artifacts(result["eval_run_id"], "eval")} == {"eval/report.json", "eval/report.md"}


def test_gate_fails_with_tight_threshold_and_missing_metric(tmp_path, tmp_path_factory, mlflow_conn, store):
    from mlflow import MlflowClient

    from llmops_provider.operators.evaluation import EvalGateFailed

    name = "tiny-eval"
    version, _ = register_tiny_model(mlflow_conn, name, build_tiny_model(tmp_path_factory), {"dataset_commit": COMMIT})
    recipe = write_recipe(tmp_path / "r.yaml", name, "    perplexity: {max: 1.5}\n    rouge1: {min: 0.1}\n", limit=4)

    with pytest.raises(EvalGateFailed) as err:
        run_gate(recipe, name)  # no parameter, no event: the `challenger` alias (this version)

    msg = str(err.value)
    assert f"v{version}" in msg and "perplexity" in msg and "rouge1" in msg and "missing" in msg
    assert err.value.outlet_extra == {}  # never approved
    tags = MlflowClient(mlflow_conn).get_model_version(name, version).tags
    assert tags["eval_verdict"] == "failed" and "rouge1" in tags["eval_failures"]
    report_dir = Path(msg.split("Report: ")[1].split(" ")[0]).parent
    result = json.loads((report_dir / "result.json").read_text())
    assert result["verdict"] == "failed" and {f["metric"] for f in result["failures"]} == {"perplexity", "rouge1"}
    assert "FAIL" in (report_dir / "report.md").read_text()


def test_job_crash_never_approves(tmp_path, tmp_path_factory, mlflow_conn, store):
    from mlflow import MlflowClient

    from llmops_provider.compat import AirflowException
    from llmops_provider.operators.evaluation import EvalGateFailed

    name = "tiny-eval"
    version, _ = register_tiny_model(mlflow_conn, name, build_tiny_model(tmp_path_factory), {"dataset_commit": "nosuch"},
                                     alias=None)
    recipe = write_recipe(tmp_path / "r.yaml", name, "    perplexity: {max: 1.0e9}\n")

    with pytest.raises(AirflowException, match="NOT approved") as err:
        run_gate(recipe, name, model_version=version)
    assert not isinstance(err.value, EvalGateFailed) and err.value.outlet_extra == {}
    assert "eval_verdict" not in MlflowClient(mlflow_conn).get_model_version(name, version).tags
