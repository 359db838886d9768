"""The training stage for real: DeepSpeed on 2 CPU ranks (gloo) under the deepspeed launcher,
PEFT LoRA on a random-init tiny Llama, a real MLflow server; then the idempotent re-run, and a
run killed with SIGKILL mid-way that an Airflow retry resumes from its last checkpoint.

Driven through ``DeepSpeedTrainOperator.execute`` on the local backend, so the operator's
spec, launcher command, MLflow environment, result and asset extra are exercised too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, RUNTIME_PYTHON, free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(600),
]

NAME = "tiny-train"
COMMIT = "9c2e5b7d41a0f3e6b8c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a3"
# the same files under another commit id: the same training, another idempotency key
COMMIT_RESUME = "4d1a7f3e9b2c8d5e6f0a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e4f5a6"
_reference: dict = {}  # the uninterrupted run's result, for the resume test


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
        assert repo == "tiny-corpus" and commit in (COMMIT, COMMIT_RESUME), (repo, commit)
        return dataset_dir

    fake = SimpleNamespace(local_path=local_path, head=lambda repo, branch: SimpleNamespace(commit_id=COMMIT))
    monkeypatch.setattr("llmops_provider.datasets.get_store", lambda name=None: fake, raising=False)


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory) -> str:
    """The demo recipe, shortened for a test: fewer steps, shorter blocks."""
    import yaml

    raw = yaml.safe_load((ROOT / "dags" / "recipes" / "tiny-llama.yaml").read_text())
    raw["name"] = NAME
    raw["training"].update(
        max_steps=16, warmup_steps=2, seq_len=64, micro_batch_size=4, checkpoint_every=8, world_size=2, backend="local"
    )
    path = tmp_path_factory.mktemp("recipe") / f"{NAME}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def run_train(recipe_path: str, run_id: str, *, dataset_commit=None, event_commit=None, try_number=1):
    from airflow.sdk.execution_time.context import OutletEventAccessors

    from llmops_provider.compat import Asset
    from llmops_provider.operators.training import DeepSpeedTrainOperator

    model_asset = Asset(f"llmops://{NAME}/model")
    events = {}
    if event_commit:
        events = {
            Asset(f"llmops://{NAME}/dataset"): [
                SimpleNamespace(extra={"dataset_repo": "tiny-corpus", "dataset_commit": event_commit})
            ]
        }
    ti = SimpleNamespace(dag_id=f"{NAME}_train", task_id="train", run_id=run_id, try_number=try_number, map_index=-1)
    ctx = {"ti": ti, "run_id": run_id, "triggering_asset_events": events, "outlet_events": OutletEventAccessors()}
    op = DeepSpeedTrainOperator(
        task_id="train", recipe_path=recipe_path, dataset_commit=dataset_commit, outlets=[model_asset]
    )
    return op.execute(ctx), dict(ctx["outlet_events"][model_asset].extra)


def test_train_register_then_reuse(recipe_path, store, mlflow_conn):
    from mlflow import MlflowClient

    from llmops_provider import config

    # 1) a real run, the commit arriving in the triggering dataset event
    result, extra = run_train(recipe_path, "manual__2026-11-28T03:00:00+00:00", event_commit=COMMIT)
    _reference.update(result)
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
    assert run.data.metrics["train_tokens_per_s"] > 0 and run.data.metrics["grad_norm"] > 0
    val_steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
    assert sorted(val_steps) == [8, 16], "validation every checkpoint_every steps, and at the end"
    assert params["ds.gradient_clipping"] == "1.0" and params["ds.scheduler.params.cos_min_ratio"] == "0.1"
    assert params["ds.bf16.enabled"] == "False", "fp32 on CPU"
    assert run.data.tags["code_version"].startswith("airflow-provider-llmops==")
    assert run.data.tags["image"].startswith("local:") and run.data.tags["deepspeed_version"]
    last = job_dir / "train" / "checkpoints" / "step0000016"
    assert {"rng_state_rank0.pt", "rng_state_rank1.pt", "llmops_state.json"} <= {p.name for p in last.iterdir()}

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
    assert mv.tags["code_version"] == run.data.tags["code_version"] and mv.tags["image"] == run.data.tags["image"]

    # 2) same recipe + same commit (now as the parameter, in a new DAG run): reused, nothing new
    again, extra2 = run_train(recipe_path, "manual__2026-11-28T04:00:00+00:00", dataset_commit=COMMIT)
    assert again["reused"] is True
    assert again["mlflow_run_id"] == result["mlflow_run_id"] and again["model_version"] == "1"
    assert extra2["reused"] is True and extra2["model_version"] == "1"
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 1
    runs = client.search_runs([run.info.experiment_id])
    assert [r.info.run_id for r in runs] == [run.info.run_id]


def _runs_with_key(client, key: str):
    exp = client.get_experiment_by_name(NAME)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.idempotency_key = '{key}'")


def test_sigkill_mid_run_then_retry_resumes_exactly(recipe_path, store, mlflow_conn):
    """SIGKILL the launcher's whole process group after step 10 (checkpoint at 8); the Airflow retry
    (same DAG run, try 2) resumes at step 8, redoes steps 9-10 identically, ends at the uninterrupted
    run's loss, and leaves one MLflow run and one model version with the dataset commit."""
    from mlflow import MlflowClient

    from llmops_provider.operators.training import DeepSpeedTrainOperator
    from llmops_provider.recipes import load_recipe
    from llmops_provider.runtime.train import launch_command

    if not _reference:  # run alone: make the uninterrupted reference here
        _reference.update(run_train(recipe_path, "manual__2026-11-28T05:00:00+00:00", dataset_commit=COMMIT)[0])
    run_id = "manual__2026-11-28T06:00:00+00:00"
    ti = SimpleNamespace(dag_id=f"{NAME}_train", task_id="train", run_id=run_id, try_number=1, map_index=-1)
    op = DeepSpeedTrainOperator(task_id="train", recipe_path=recipe_path, dataset_commit=COMMIT_RESUME)
    spec, spec_path = op.build_spec(
        load_recipe(recipe_path), {"ti": ti, "run_id": run_id, "triggering_asset_events": {}}
    )
    # try 1: the operator's own launch command, killed with SIGKILL after step 10 is logged
    port = free_port()
    cmd = launch_command(str(spec_path), 2, launcher=str(RUNTIME_PYTHON.parent / "deepspeed"), master_port=port)
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_conn, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("step 10/16 "):
                os.killpg(proc.pid, signal.SIGKILL)
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-30:])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # every rank is gone (they were in the launcher's group)
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("ranks survived SIGKILL of the process group")
    # a killed job cannot unlink DeepSpeed's shared-memory buffers; the operator's cleanup does
    from llmops_provider.backends.local import release_shm_buffers

    assert release_shm_buffers(port) == 2, "one all-reduce buffer per rank, left behind by the kill"
    ckpt = Path(spec.output_dir) / "checkpoints"
    assert (ckpt / "latest").read_text() == "step0000008"
    assert {"rng_state_rank0.pt", "rng_state_rank1.pt"} <= {p.name for p in (ckpt / "step0000008").iterdir()}
    client = MlflowClient(mlflow_conn)
    [killed] = _runs_with_key(client, spec.idempotency_key)
    assert killed.info.status == "RUNNING", "SIGKILL leaves the run open"

    # try 2: the Airflow retry of the same task in the same DAG run
    result, extra = run_train(recipe_path, run_id, dataset_commit=COMMIT_RESUME, try_number=2)
    assert result["reused"] is False and result["mlflow_run_id"] == killed.info.run_id
    reference = _reference["final_loss"]
    assert abs(result["final_loss"] - reference) <= 0.02 * abs(reference), (result["final_loss"], reference)

    [run] = _runs_with_key(client, spec.idempotency_key)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_step"] == "8"

    def by_step(run_id):
        points: dict[int, list[float]] = {}
        for m in sorted(client.get_metric_history(run_id, "train_loss"), key=lambda m: m.timestamp):
            points.setdefault(m.step, []).append(m.value)
        return points

    resumed, uninterrupted = by_step(run.info.run_id), by_step(_reference["mlflow_run_id"])
    assert sorted(resumed) == list(range(1, 17))
    redone = sorted(step for step, values in resumed.items() if len(values) > 1)
    assert set(redone) <= {9, 10}, f"only steps after the last checkpoint are redone: {redone}"
    # optimizer, LR schedule, data position and RNG restored: every step matches the uninterrupted run
    for step in range(1, 17):
        assert resumed[step][-1] == pytest.approx(uninterrupted[step][-1], rel=1e-5), step

    versions = client.search_model_versions(f"name = '{NAME}' and tags.idempotency_key = '{spec.idempotency_key}'")
    assert [v.run_id for v in versions] == [run.info.run_id]
    assert versions[0].tags["dataset_commit"] == COMMIT_RESUME and extra["dataset_commit"] == COMMIT_RESUME
    assert extra["model_version"] == versions[0].version


def test_tracker_retries_keep_one_run_and_one_version(mlflow_conn, tmp_path):
    """Crashes at the two awkward moments, against the real MLflow server: before the first
    checkpoint (no run id to resume) and after registration but before the run was closed."""
    from mlflow import MlflowClient

    from llmops_provider.recipes import load_recipe
    from llmops_provider.runtime.train import Tracker
    from llmops_provider.specs.train import TrainJobSpec

    recipe = load_recipe(ROOT / "dags" / "recipes" / "tiny-llama.yaml")
    spec = TrainJobSpec.from_recipe(
        recipe.model_copy(update={"name": "tiny-tracker"}),
        dataset_dir=str(tmp_path),
        dataset_repo="tiny-corpus",
        dataset_commit=COMMIT,
        output_dir=str(tmp_path),
    )
    export = tmp_path / "export"
    (export / "model" / "merged").mkdir(parents=True)
    (export / "model" / "merged" / "config.json").write_text("{}")
    ds_config = tmp_path / "ds_config.json"
    ds_config.write_text("{}")
    client = MlflowClient(mlflow_conn)

    first = Tracker(spec)
    assert first.find_existing() is None
    run_id = first.start(None, {"stage": 0}, {"image": "test"})
    first._stop_system_metrics()  # then the job dies before its first checkpoint

    second = Tracker(spec)
    assert second.start(None, {"stage": 0}, {"image": "test"}) == run_id, "the unfinished run is continued"
    version = second.finish(export, ds_config, {"image": "test"})
    client.update_run(run_id, status="RUNNING")  # as if killed between registering and ending the run

    third = Tracker(spec)
    assert third.find_existing() is None, "a version whose run never finished is not reused as is"
    assert third.start(run_id, {"stage": 0}, {"image": "test"}) == run_id
    assert third.finish(export, ds_config, {"image": "test"}) == version

    found = Tracker(spec).find_existing()
    assert found is not None and found.reused and found.model_version == version and found.mlflow_run_id == run_id
    exp = client.get_experiment_by_name(spec.experiment_name)
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [run_id]
    [mv] = client.search_model_versions(f"name = '{spec.registered_model_name}'")
    assert mv.version == version and mv.tags["dataset_commit"] == COMMIT
