"""The training pod, built without a cluster and validated against the Kubernetes schema.

The schema is the real one: ``kubernetes-validate`` ships the JSON schemas generated from
the Kubernetes OpenAPI spec (strict variant: unknown fields are errors).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmops_provider.recipes import load_recipe
from llmops_provider.specs.train import TrainJobSpec

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.33"


@pytest.fixture
def recipe():
    base = load_recipe(ROOT / "dags/recipes/tiny-llama.yaml")
    raw = base.model_dump(mode="json")
    raw["training"]["world_size"] = 1
    raw["training"]["kubernetes"] = {
        "image": "registry.example.com/llmops-runtime:0.1.0",
        "namespace": "ml-train",
        "gpus": 1,
        "cpu": "4",
        "memory": "16Gi",
        "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "service_account": "llmops-train",
        "checkpoint_pvc": "llmops-checkpoints",
        "shm_size": "8Gi",
    }
    return type(base).model_validate(raw)


@pytest.fixture
def spec(recipe, tmp_path):
    return TrainJobSpec.from_recipe(
        recipe,
        dataset_dir="/data/tiny-corpus/5f1c0a",
        dataset_repo="tiny-corpus",
        dataset_commit="5f1c0a9e" * 8,
        output_dir=str(tmp_path / "out"),
        tags={"airflow_dag_id": "tiny-llama_train"},
    )


@pytest.fixture
def context():
    ti = SimpleNamespace(
        dag_id="tiny-llama_train",
        task_id="train",
        try_number=2,
        map_index=-1,
        run_id="manual__2026-11-28T03:00:00+00:00",
    )
    return {"ti": ti, "run_id": ti.run_id, "dag": SimpleNamespace(dag_id=ti.dag_id)}


@pytest.fixture
def pod(spec, recipe, context):
    from llmops_provider.backends.kubernetes import build_pod

    return build_pod(spec, recipe.training.kubernetes, context)


def serialized(pod) -> dict:
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(pod)


def test_pod_is_valid_against_kubernetes_schema(pod):
    import kubernetes_validate

    manifest = serialized(pod)
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def test_schema_check_is_not_vacuous(pod):
    """A misspelt field or a wrong type must fail the same validation."""
    import kubernetes_validate

    bad = serialized(pod)
    bad["spec"]["containers"][0]["resource"] = bad["spec"]["containers"][0].pop("resources")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = serialized(pod)
    spec_volume = next(v for v in bad["spec"]["volumes"] if v["name"] == "train-spec")
    spec_volume["downwardAPI"]["items"][0]["path"] = 7
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_identity_labels_for_reattach(pod):
    labels = pod.metadata.labels
    assert labels["dag_id"] == "tiny-llama_train"
    assert labels["task_id"] == "train"
    assert labels["try_number"] == "2"
    # run ids hold ':' and '+', which label values may not: sanitized, not dropped
    assert labels["run_id"].startswith("manual__2026-11-28T03") and ":" not in labels["run_id"]
    assert labels["llmops.apache.org/recipe"] == "tiny-llama"
    assert len(labels["llmops.apache.org/dataset-commit"]) <= 63
    assert pod.metadata.namespace == "ml-train"
    assert pod.metadata.name.startswith("train-tiny-llama")


def test_gpu_resources_scheduling_and_volumes(pod):
    spec = pod.spec
    train = next(c for c in spec.containers if c.name == "train")
    assert train.image == "registry.example.com/llmops-runtime:0.1.0"
    assert train.resources.limits["nvidia.com/gpu"] == "1"
    assert train.resources.requests == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}
    assert spec.node_selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert [(t.key, t.operator, t.effect) for t in spec.tolerations] == [("nvidia.com/gpu", "Exists", "NoSchedule")]
    assert spec.service_account_name == "llmops-train"
    assert spec.restart_policy == "Never"

    volumes = {v.name: v for v in spec.volumes}
    mounts = {m.name: m.mount_path for m in train.volume_mounts}
    assert volumes["dshm"].empty_dir.medium == "Memory" and volumes["dshm"].empty_dir.size_limit == "8Gi"
    assert mounts["dshm"] == "/dev/shm"
    assert volumes["checkpoints"].persistent_volume_claim.claim_name == "llmops-checkpoints"
    assert mounts["checkpoints"] == "/checkpoints"


def test_command_and_spec_delivery(pod, spec):
    from llmops_provider.backends.kubernetes import SPEC_ANNOTATION

    train = next(c for c in pod.spec.containers if c.name == "train")
    argv = train.command + train.args
    assert argv[0] == "deepspeed"
    assert argv[argv.index("--num_accelerators") + 1] == "1"
    assert argv[-4:] == ["--module", "llmops_provider.runtime.train", "--spec", "/etc/llmops/spec.json"]

    # the spec reaches /etc/llmops/spec.json through a downward API projection of an annotation
    item = next(v for v in pod.spec.volumes if v.name == "train-spec").downward_api.items[0]
    assert item.path == "spec.json"
    assert item.field_ref.field_path == f"metadata.annotations['{SPEC_ANNOTATION}']"
    inner = TrainJobSpec.model_validate_json(pod.metadata.annotations[SPEC_ANNOTATION])
    assert inner.dataset_commit == spec.dataset_commit
    assert inner.result_path == "/airflow/xcom/return.json"
    assert inner.checkpoint_dir == f"/checkpoints/tiny-llama/{spec.idempotency_key}"
    assert inner.idempotency_key == spec.idempotency_key


def test_mlflow_credentials_only_by_secret_reference(pod, spec):
    train = next(c for c in pod.spec.containers if c.name == "train")
    assert [e.secret_ref.name for e in train.env_from] == ["llmops-mlflow"]
    names = {e.name for e in train.env or []}
    assert not names & {"MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_USERNAME"}
    dumped = json.dumps(serialized(pod))
    assert "PASSWORD" not in dumped.replace("MLFLOW_TRACKING_PASSWORD", "")
    assert "password" not in spec.model_dump_json().lower()


def test_pod_tells_the_runtime_its_image(pod):
    train = next(c for c in pod.spec.containers if c.name == "train")
    env = {e.name: e.value for e in train.env or []}
    assert env["LLMOPS_IMAGE"] == train.image, "the run and model version are tagged with the image"


def test_result_comes_back_through_xcom_sidecar(pod):
    assert {c.name for c in pod.spec.containers} == {"train", "airflow-xcom-sidecar"}


def test_more_ranks_than_gpus_is_refused(recipe, spec):
    from llmops_provider.backends.kubernetes import build_pod

    wide = spec.model_copy(update={"training": spec.training.model_copy(update={"world_size": 4})})
    with pytest.raises(ValueError, match=r"training.world_size \(4\) exceeds training.kubernetes.gpus \(1\)"):
        build_pod(wide, recipe.training.kubernetes)


def test_bad_toleration_names_the_field(recipe, spec):
    from llmops_provider.backends.kubernetes import build_pod

    k8s = recipe.training.kubernetes.model_copy(update={"tolerations": [{"keyy": "x"}]})
    with pytest.raises(ValueError, match=r"training.kubernetes.tolerations\[0\]"):
        build_pod(spec, k8s)


def test_cpu_only_pod_has_no_gpu_resources(recipe, spec, context):
    from llmops_provider.backends.kubernetes import build_pod

    k8s = recipe.training.kubernetes.model_copy(
        update={"gpus": 0, "checkpoint_pvc": None, "node_selector": {}, "tolerations": []}
    )
    pod = build_pod(spec, k8s, context)
    train = next(c for c in pod.spec.containers if c.name == "train")
    assert "nvidia.com/gpu" not in train.resources.limits
    assert "checkpoints" not in {v.name for v in pod.spec.volumes}
    import kubernetes_validate

    kubernetes_validate.validate(serialized(pod), K8S_VERSION, strict=True)


def test_operator_defers_on_kubernetes_and_publishes_on_resume(recipe, context, tmp_path, monkeypatch):
    """KubernetesPodOperator's deferral is re-raised onto DeepSpeedTrainOperator and resumed there."""
    import yaml
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.sdk.exceptions import TaskDeferred
    from airflow.sdk.execution_time.context import OutletEventAccessors

    from llmops_provider.compat import Asset
    from llmops_provider.operators.training import DeepSpeedTrainOperator

    raw = recipe.model_dump(mode="json")
    raw["training"]["backend"] = "kubernetes"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    commit = "ab" * 32
    store = SimpleNamespace(
        local_path=lambda repo, c: tmp_path / c, head=lambda repo, branch: SimpleNamespace(commit_id=commit)
    )
    monkeypatch.setattr("llmops_provider.datasets.get_store", lambda name=None: store, raising=False)
    monkeypatch.setenv("AIRFLOW__LLMOPS__HOME", str(tmp_path / "home"))

    pods = []
    trigger = object()

    def fake_execute(self, ctx):
        pods.append(self.build_pod_request_obj(ctx, dry_run=True))
        raise TaskDeferred(trigger=trigger, method_name="trigger_reentry", kwargs={"k": 1})

    def fake_reentry(self, ctx, event, k):
        assert event == {"status": "success"} and k == 1
        return {
            "mlflow_run_id": "r1",
            "model_name": "tiny-llama",
            "model_version": "3",
            "dataset_commit": commit,
            "reused": False,
            "final_loss": 5.5,
            "val_loss": 5.9,
        }

    monkeypatch.setattr(KubernetesPodOperator, "execute", fake_execute)
    monkeypatch.setattr(KubernetesPodOperator, "trigger_reentry", fake_reentry, raising=False)

    model = Asset("llmops://tiny-llama/model")
    context = {**context, "triggering_asset_events": {}, "outlet_events": OutletEventAccessors()}
    op = DeepSpeedTrainOperator(task_id="train", recipe_path=str(path), outlets=[model])
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context)
    assert deferred.value.trigger is trigger and deferred.value.method_name == "execute_complete"
    assert deferred.value.kwargs["pod_method"] == "trigger_reentry" and deferred.value.kwargs["k"] == 1
    assert pods[0].metadata.labels["dag_id"] == "tiny-llama_train"
    json.dumps(deferred.value.kwargs)  # serialized into the trigger row: primitives only

    result = op.execute_complete(context, event={"status": "success"}, **deferred.value.kwargs)
    assert result == {
        "mlflow_run_id": "r1",
        "model_name": "tiny-llama",
        "model_version": "3",
        "dataset_commit": commit,
        "reused": False,
        "final_loss": 5.5,
    }
    extra = context["outlet_events"][model].extra
    assert extra["dataset_commit"] == commit and extra["model_version"] == "3" and extra["mlflow_run_id"] == "r1"
