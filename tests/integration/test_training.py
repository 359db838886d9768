"""The training stage for real: DeepSpeed on 2 CPU ranks (gloo) under the deepspeed launcher,
PEFT LoRA on a random-init tiny Llama, a real MLflow server; then the idempotent re-run.

Driven through ``DeepSpeedTrainOperator.execute`` on the local backend, so the operator's
spec, launcher command, MLflow environment, result and asset extra are exercised too.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(600),
]

NAME = "tiny-train"
COMMIT = "9c2e5b7d41a0f3e6b8c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a3"


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    """A dataset commit directory: batch-002 split into train/validation ``{"id","text"}`` lines."""
    d = tmp_path_factory.mktemp("dataset")
    docs = []
    for line in (ROOT / "data" / "sample" / "batch-002.jsonl").open():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc.get("text"), str) and doc["text"].strip():
            docs.append({"id": str(doc.get("id")), "text": doc["text"]})
    (d / "validation.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs[:20]))
    (d / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs[20:]))
    return d


@pytest.fixture
def store(monkeypatch, dataset_dir):
    """`llmops_provider.datasets.get_store` stand-in: COMMIT is the head and maps to dataset_dir."""
    def local_path(repo, commit):
        assert (repo, commit) == ("tiny-corpus", COMMIT), (repo, commit)
        return dataset_dir

    fake = SimpleNamespace(local_path=local_path, head=lambda repo, branch: SimpleNamespace(commit_id=COMMIT))
    monkeypatch.setattr("llmops_provider.datasets.get_store", lambda name=None: fake, raising=False)


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory) -> str:
    """The demo recipe, shortened for a test: fewer steps, shorter blocks."""
    import yaml

    raw = yaml.safe_load((ROOT / "dags" / "recipes" / "tiny-llama.yaml").read_text())
    raw["name"] = NAME
    raw["training"].update(max_steps=16, warmup_steps=2, seq_len=64, micro_batch_size=4, checkpoint_every=8,
                           world_size=2, backend="local")
    path = tmp_path_factory.mktemp("recipe") / f"{NAME}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def run_train(recipe_path: str, run_id: str, *, dataset_commit=None, event_commit=None):
    from airflow.sdk.execution_time.context import OutletEventAccessors

    from llmops_provider.compat import Asset
    from llmops_provider.operators.training import DeepSpeedTrainOperator

    model_asset = Asset(f"llmops://{NAME}/model")
    events = {}
    if event_commit:
        events = {Asset(f"llmops://{NAME}/dataset"): [
            SimpleNamespace(extra={"dataset_repo": "tiny-corpus", "dataset_commit": event_commit})]}
    ti = SimpleNamespace(dag_id=f"{NAME}_train", task_id="train", run_id=run_id, try_number=1, map_index=-1)
    ctx = {"ti": ti, "run_id": run_id, "triggering_asset_events": events, "outlet_events": OutletEventAccessors()}
    op = DeepSpeedTrainOperator(task_id="train", recipe_path=recipe_path, dataset_commit=dataset_commit,
                                outlets=[model_asset])
    return op.execute(ctx), dict(ctx["outlet_events"][model_asset].extra)


def test_train_register_then_reuse(recipe_path, store, mlflow_conn):
    from mlflow import MlflowClient

    from llmops_provider import config

    # 1) a real run, the commit arriving in the triggering dataset event
    result, extra = run_train(recipe_path, "manual__2026-11-28T03:00:00+00:00", event_commit=COMMIT)
    assert result["reused"] is False
    assert result["model_name"] == NAME and result["model_version"] == "1"
    assert result["dataset_commit"] == COMMIT
    assert set(result) == {"mlflow_run_id", "model_name", "model_version", "dataset_commit", "reused", "final_loss"}
    assert extra["dataset_commit"] == COMMIT and extra["model_version"] == "1"
    assert extra["mlflow_run_id"] == result["mlflow_run_id"] and extra["dataset_repo"] == "tiny-corpus"

    job_dir = config.home() / "jobs" / NAME / "manual__2026-11-28T03_00_00_00_00"
    assert (job_dir / "train-spec.json").exists()
    on_disk = json.loads((job_dir / "train" / "result.json").read_text())
    assert on_disk["mlflow_run_id"] == result["mlflow_run_id"] and on_disk["val_loss"] > 0
    assert (job_dir / "train" / "checkpoints" / "latest").read_text().strip() == "step0000016"

    client = MlflowClient(mlflow_conn)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["dataset_commit"] == COMMIT
    assert run.data.tags["dataset_repo"] == "tiny-corpus"
    assert run.data.tags["airflow_dag_id"] == f"{NAME}_train"
    assert run.data.tags["recipe_fingerprint"]
    params = run.data.params
    assert params["training.max_steps"] == "16" and params["training.method"] == "lora"
    assert params["model.config.hidden_size"] == "64" and params["tokenizer.vocab_size"] == "2000"
    assert params["ds.zero_optimization.stage"] == "0" and params["ds.train_batch_size"] == "8"
    assert params["ds.scheduler.type"] == "WarmupCosineLR"

    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)]
    assert len(losses) == 16, "one train_loss per optimizer step"
    assert losses[-1] < losses[0] - 0.2, f"loss did not decrease: {losses}"
    assert result["final_loss"] == pytest.approx(losses[-1])
    assert run.data.metrics["val_loss"] > 0 and run.data.metrics["tokens_per_s"] > 0

    def listing(path):
        return {Path(f.path).name for f in client.list_artifacts(run.info.run_id, path)}

    assert {"model", "ds_config.json"} <= listing("")
    assert {"base", "adapter", "tokenizer", "merged"} <= listing("model")
    assert {"config.json", "model.safetensors"} <= listing("model/base")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= listing("model/adapter")
    assert {"tokenizer.json", "tokenizer_config.json"} <= listing("model/tokenizer")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= listing("model/merged")

    mv = client.get_model_version_by_alias(NAME, "challenger")
    assert mv.version == "1" and mv.run_id == run.info.run_id
    assert mv.tags["dataset_commit"] == COMMIT
    assert mv.tags["mlflow_run_id"] == run.info.run_id
    assert mv.tags["recipe_fingerprint"] == run.data.tags["recipe_fingerprint"]
    assert mv.source.endswith("/model/merged")

    # 2) same recipe + same commit (now as the parameter, in a new DAG run): reused, nothing new
    again, extra2 = run_train(recipe_path, "manual__2026-11-28T04:00:00+00:00", dataset_commit=COMMIT)
    assert again["reused"] is True
    assert again["mlflow_run_id"] == result["mlflow_run_id"] and again["model_version"] == "1"
    assert extra2["reused"] is True and extra2["model_version"] == "1"
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 1
    runs = client.search_runs([run.info.experiment_id])
    assert [r.info.run_id for r in runs] == [run.info.run_id]
