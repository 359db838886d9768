"""Re-evaluating the serving champion: the real gate (lm-eval on the tiny model, real MLflow), on new held-out data.

One eval job (perplexity only, 4 documents, no safety suite) on a dataset version the champion
was not trained or evaluated on, with a threshold it cannot meet: the verdict is recorded as
``reeval_*`` tags and alerted, the admission tags and the ``champion`` alias stay as they were.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT

pytestmark = [pytest.mark.integration]

from tiny_model import build_tiny_model, register_tiny_model  # noqa: E402

TRAINED_ON, HEAD = "c0ffee0001", "beef0002"


@pytest.fixture
def datasets(tmp_path, monkeypatch):
    """Two dataset versions; only the head's held-out split is read by the re-evaluation."""
    docs = []
    for line in (ROOT / "data" / "sample" / "batch-001.jsonl").open():
        try:
            docs.append(json.loads(line))
        except ValueError:
            pass
    short = [
        {"id": x["id"], "text": x["text"]}
        for x in docs
        if isinstance(x.get("text"), str) and 150 <= len(x["text"]) <= 600
    ][:8]
    dirs = {}
    for commit, part in ((TRAINED_ON, short[:4]), (HEAD, short[4:])):
        dirs[commit] = tmp_path / commit
        dirs[commit].mkdir()
        (dirs[commit] / "test.jsonl").write_text("".join(json.dumps(x) + "\n" for x in part))
    reads = []

    def local_path(repo, commit):
        reads.append(commit)
        return dirs.get(commit, tmp_path / f"missing-{commit}")

    monkeypatch.setattr(
        "llmops_provider.datasets.get_store",
        lambda name=None: SimpleNamespace(local_path=local_path, head=lambda r, b: SimpleNamespace(commit_id=HEAD)),
        raising=False,
    )
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return reads


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, context):
        self.calls.append(context["rollout"])


def test_failed_reevaluation_is_recorded_and_alerted_never_demoted(tmp_path, tmp_path_factory, mlflow_conn, datasets):
    from mlflow import MlflowClient

    from llmops_provider.compat import AirflowFailException, Asset
    from llmops_provider.operators.loop import ReEvaluateChampionOperator

    name = "tiny-reeval"
    admitted = {"dataset_commit": TRAINED_ON, "eval_verdict": "passed", "eval_run_id": "gate-run-1"}
    version, _ = register_tiny_model(mlflow_conn, name, build_tiny_model(tmp_path_factory), admitted, alias="champion")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: {name}\ndata:\n  sources: [{{path: /nonexistent}}]\n  dataset_repo: tiny-corpus\n"
        "evaluation:\n  limit: 4\n  tasks: [perplexity]\n  safety: {enabled: false}\n  regression: {enabled: false}\n"
        "  thresholds:\n    perplexity: {max: 1.5}\n"
    )
    reason = "champion was not evaluated on: held-out split of dataset head beef0002"
    event = SimpleNamespace(extra={"model_version": version, "dataset_commit": HEAD, "reevaluate_reason": reason})
    recorder = Recorder()
    op = ReEvaluateChampionOperator(task_id="reevaluate", recipe_path=str(recipe), on_failure_notify=[recorder])

    with pytest.raises(AirflowFailException, match="FAILED re-evaluation on beef0002") as err:
        op.execute({"triggering_asset_events": {Asset(f"llmops://{name}/reevaluate"): [event]}})

    assert "keeps serving (not demoted)" in str(err.value) and "perplexity" in str(err.value)
    assert HEAD in datasets  # judged on the head's held-out split, not on what it was trained on
    client = MlflowClient(mlflow_conn)
    tags = client.get_model_version(name, version).tags
    assert tags["reeval_verdict"] == "failed" and "perplexity" in tags["reeval_failures"]
    assert tags["reeval_dataset_commit"] == HEAD and tags["reeval_run_id"] != "gate-run-1"
    # the admission record is what the original gate wrote; the alias never moved
    assert tags["eval_verdict"] == "passed" and tags["eval_run_id"] == "gate-run-1" and "rejected" not in tags
    assert str(client.get_model_version_by_alias(name, "champion").version) == version
    run = client.get_run(tags["reeval_run_id"])  # the re-evaluation's own MLflow run, on the head
    assert run.data.tags["dataset_commit"] == HEAD and run.data.tags["eval_verdict"] == "failed"
    assert recorder.calls and recorder.calls[0]["candidate_version"] == version
    assert "perplexity" in recorder.calls[0]["reasons"][0]
    report = json.loads(Path(str(err.value).split("Report: ")[1].split(" ")[0]).read_text())
    assert report["dataset_commit"] == HEAD and report["n_docs"] == 4


def test_monitor_sees_what_the_champion_was_not_evaluated_on(tmp_path, mlflow_conn, monkeypatch):
    """The check's eval-inputs rule against a real registry: held-out split by content, prompt set by version."""
    from mlflow import MlflowClient

    from llmops_provider.evaluation.safety import load_prompt_set
    from llmops_provider.operators.monitoring import MonitorOperator
    from llmops_provider.recipes import load_recipe

    shipped = load_prompt_set(None)
    client = MlflowClient(mlflow_conn)
    exp = client.create_experiment(f"inputs-{tmp_path.name}")

    def eval_run(commit: str, prompt_version: str) -> str:
        run = client.create_run(exp, tags={"dataset_commit": commit}).info.run_id
        client.log_param(run, "safety_prompt_set", shipped.name)
        client.log_param(run, "safety_prompt_set_version", prompt_version)
        return run

    name = f"inputs-{tmp_path.name[-12:]}".lower().replace("_", "-")
    client.create_registered_model(name)
    gate_run = eval_run("aaa", shipped.version)
    mv = client.create_model_version(name, f"runs:/{gate_run}/model", run_id=gate_run, tags={"eval_run_id": gate_run})
    dirs = {c: tmp_path / c for c in ("aaa", "bbb", "ccc")}
    for commit, (held_out, train) in {
        "aaa": ("t1\n", "x\n"),
        "bbb": ("t1\nt2\n", "x\n"),
        "ccc": ("t1\n", "y\n"),
    }.items():
        dirs[commit].mkdir()
        (dirs[commit] / "test.jsonl").write_text(held_out)
        (dirs[commit] / "train.jsonl").write_text(train)
    monkeypatch.setattr(
        "llmops_provider.datasets.get_store",
        lambda name=None: SimpleNamespace(local_path=lambda repo, commit: dirs[commit]),
        raising=False,
    )
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(f"name: {name}\ndata: {{sources: [{{path: /x}}]}}\n")
    recipe = load_recipe(recipe_path)
    record = {"model_version": str(mv.version), "outcome": "promoted", "eval_run_id": gate_run}
    op = MonitorOperator(task_id="check", recipe_path=str(recipe_path))

    def changed(head: str) -> list[str]:
        return op._eval_inputs_changed(recipe, record, SimpleNamespace(commit_id=head))

    assert changed("aaa") == [] and changed("ccc") == []  # same held-out split (only train differs)
    assert changed("bbb") == ["held-out split of dataset head bbb (evaluated on aaa)"]
    older = eval_run("aaa", "v0-old")
    client.set_model_version_tag(name, mv.version, "reeval_run_id", older)  # its latest evaluation counts
    assert changed("aaa") == [
        f"safety prompt set {shipped.name} {shipped.version} (evaluated with {shipped.name} v0-old)"
    ]
    client.set_model_version_tag(name, mv.version, "reeval_run_id", eval_run("bbb", shipped.version))
    assert changed("bbb") == []  # re-evaluated on the new head: nothing left to re-judge
    assert op._eval_inputs_changed(recipe, {**record, "outcome": "rolled-back"}, SimpleNamespace(commit_id="bbb")) == []
