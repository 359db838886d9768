"""Kubernetes compute backend: the training job as a pod, via the cncf-kubernetes provider.

The pod runs the same entrypoint and spec as the local backend (``deepspeed ... --module
llmops_provider.runtime.train --spec /etc/llmops/spec.json``); only how it is started and
watched differs. The spec travels as a pod annotation projected into a file by a downward
API volume (no ConfigMap object to create or leak); its result comes back through the
KubernetesPodOperator XCom sidecar (``/airflow/xcom/return.json``).

Pod identity lives in labels (dag_id, task_id, run_id, try_number, added by
KubernetesPodOperator from the task context, sanitized), so a retried task re-attaches.
MLflow credentials come from a Kubernetes Secret (``envFrom``), never from literal values:
the Secret holds ``MLFLOW_TRACKING_URI`` and, if needed, ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD``.

The cncf-kubernetes provider and the kubernetes client are imported inside functions only
(KubernetesPodOperator's module costs ~5 s to import).
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

from llmops_provider import config
from llmops_provider.recipes import KubernetesSpec
from llmops_provider.specs.train import TrainJobSpec

SPEC_ANNOTATION = "llmops.apache.org/train-spec"
SPEC_DIR = "/etc/llmops"
SPEC_PATH = f"{SPEC_DIR}/spec.json"
WORKSPACE = "/workspace"
CHECKPOINTS = "/checkpoints"
XCOM_RESULT = "/airflow/xcom/return.json"
DEFAULT_MLFLOW_SECRET = "llmops-mlflow"
CONTAINER = "train"


def pod_spec(spec: TrainJobSpec, k8s: KubernetesSpec) -> TrainJobSpec:
    """The job spec as the pod sees it: its own paths for outputs, checkpoints and result."""
    if k8s.checkpoint_pvc:
        # keyed by the idempotency key: a retry or re-run of the same recipe + data resumes
        ckpt = f"{CHECKPOINTS}/{spec.recipe}/{spec.idempotency_key}"
    else:
        ckpt = f"{WORKSPACE}/checkpoints"
    return spec.model_copy(
        update={"output_dir": f"{WORKSPACE}/out", "checkpoint_dir": ckpt, "result_path": XCOM_RESULT}
    )


def ranks(spec: TrainJobSpec, k8s: KubernetesSpec) -> int:
    """One rank per GPU; CPU ranks (gloo) when the pod has no GPU."""
    n = spec.training.world_size
    if k8s.gpus and n > k8s.gpus:
        raise ValueError(
            f"training.world_size ({n}) exceeds training.kubernetes.gpus ({k8s.gpus}): a pod runs one rank per GPU; "
            f"set training.world_size: {k8s.gpus} or training.kubernetes.gpus: {n}"
        )
    return n


def _label_value(value: str) -> str:
    from airflow.providers.cncf.kubernetes import pod_generator

    return pod_generator.make_safe_label_value(value)


def _tolerations(items: list[dict[str, Any]]):
    from kubernetes.client import models as k8s

    camel = re.compile(r"(?<!^)(?=[A-Z])")
    out = []
    for i, item in enumerate(items):
        kwargs = {camel.sub("_", key).lower(): value for key, value in item.items()}
        try:
            out.append(k8s.V1Toleration(**kwargs))
        except TypeError as exc:
            raise ValueError(
                f"training.kubernetes.tolerations[{i}] = {item!r} is not a Kubernetes toleration ({exc}); "
                "use the keys key, operator, value, effect, tolerationSeconds"
            ) from None
    return out


def build_operator(
    spec: TrainJobSpec,
    k8s_spec: KubernetesSpec,
    *,
    task_id: str,
    kubernetes_conn_id: str | None = "kubernetes_default",
    mlflow_secret: str = DEFAULT_MLFLOW_SECRET,
    deferrable: bool = True,
    **kpo_kwargs: Any,
):
    """A ``KubernetesPodOperator`` (not attached to any DAG) that runs ``spec`` in a pod."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    from llmops_provider.runtime.train import launch_command  # stdlib-only at import

    inner = pod_spec(spec, k8s_spec)
    n_ranks = ranks(spec, k8s_spec)
    requests = {"cpu": k8s_spec.cpu, "memory": k8s_spec.memory}
    limits = {"memory": k8s_spec.memory}
    if k8s_spec.gpus:
        requests["nvidia.com/gpu"] = str(k8s_spec.gpus)
        limits["nvidia.com/gpu"] = str(k8s_spec.gpus)

    volumes = [
        k8s.V1Volume(
            name="train-spec",
            downward_api=k8s.V1DownwardAPIVolumeSource(
                items=[
                    k8s.V1DownwardAPIVolumeFile(
                        path=PurePosixPath(SPEC_PATH).name,
                        field_ref=k8s.V1ObjectFieldSelector(field_path=f"metadata.annotations['{SPEC_ANNOTATION}']"),
                    )
                ]
            ),
        ),
        # DeepSpeed/NCCL and dataloaders need more shared memory than the runtime's 64Mi default
        k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=k8s_spec.shm_size)),
        k8s.V1Volume(name="workspace", empty_dir=k8s.V1EmptyDirVolumeSource()),
    ]
    mounts = [
        k8s.V1VolumeMount(name="train-spec", mount_path=SPEC_DIR, read_only=True),
        k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
        k8s.V1VolumeMount(name="workspace", mount_path=WORKSPACE),
    ]
    if k8s_spec.checkpoint_pvc:
        volumes.append(
            k8s.V1Volume(
                name="checkpoints",
                persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name=k8s_spec.checkpoint_pvc),
            )
        )
        mounts.append(k8s.V1VolumeMount(name="checkpoints", mount_path=CHECKPOINTS))

    cmd = launch_command(SPEC_PATH, n_ranks)
    image = k8s_spec.image or config.get("runtime_image")
    return KubernetesPodOperator(
        task_id=task_id,
        kubernetes_conn_id=kubernetes_conn_id,
        namespace=k8s_spec.namespace or config.get("kubernetes_namespace"),
        image=image,
        name=f"train-{spec.recipe}",
        base_container_name=CONTAINER,
        cmds=cmd[:1],
        arguments=cmd[1:],
        labels={
            "app.kubernetes.io/name": "llmops-train",
            "app.kubernetes.io/part-of": "llmops",
            "llmops.apache.org/recipe": _label_value(spec.recipe),
            "llmops.apache.org/dataset-commit": _label_value(spec.dataset_commit),
        },
        annotations={SPEC_ANNOTATION: inner.model_dump_json()},
        # LLMOPS_IMAGE: the runtime tags its MLflow run and model version with the image it ran in
        env_vars=[k8s.V1EnvVar(name="PYTHONUNBUFFERED", value="1"), k8s.V1EnvVar(name="LLMOPS_IMAGE", value=image)],
        env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=mlflow_secret, optional=False))],
        container_resources=k8s.V1ResourceRequirements(requests=requests, limits=limits),
        volumes=volumes,
        volume_mounts=mounts,
        node_selector=dict(k8s_spec.node_selector) or None,
        tolerations=_tolerations(k8s_spec.tolerations) or None,
        service_account_name=k8s_spec.service_account,
        do_xcom_push=True,
        get_logs=True,
        deferrable=deferrable,
        on_finish_action="delete_pod",
        **kpo_kwargs,
    )


def build_pod(
    spec: TrainJobSpec, k8s_spec: KubernetesSpec, context: Any = None, *, task_id: str = "train", **kwargs: Any
):
    """The ``V1Pod`` the backend would create, built without a cluster (dry run)."""
    op = build_operator(spec, k8s_spec, task_id=task_id, **kwargs)
    return op.build_pod_request_obj(context, dry_run=True)
