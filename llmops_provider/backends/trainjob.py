"""Kubeflow compute backend: multi-node training as a Kubeflow Trainer ``TrainJob``.

The TrainJob (``trainer.kubeflow.org/v1alpha1``) refers to the ``deepspeed-distributed``
ClusterTrainingRuntime (``contracts/kubeflow-deepspeed-runtime.yaml``): an MPI runtime whose
``launcher`` job (also a node) runs ``trainer.command`` and whose ``node`` jobs run sshd.
The command starts the same entrypoint as the other backends, one rank per slot::

    mpirun --hostfile /etc/mpi/hostfile -np N ... \
        bash -c 'RANK=$OMPI_COMM_WORLD_RANK ... python -m llmops_provider.runtime.train --spec /etc/llmops/spec.json'

The wrapper maps OpenMPI's rank variables onto the torch ones the runtime reads (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); MASTER_ADDR is the first hostfile entry, where
rank 0 runs.

How things travel (the pod backend's conventions, ``backends/kubernetes.py``):

- the spec: a pod-template annotation on both replicated jobs, projected to
  ``/etc/llmops/spec.json`` by a downward API volume (``runtimePatches``); no ConfigMap;
- MLflow settings: ``env`` entries with ``secretKeyRef`` into the MLflow Secret (a TrainJob's
  trainer has no ``envFrom``); the values never appear in the object;
- identity: labels ``dag_id``, ``task_id``, ``run_id``, ``try_number`` (+ ``map_index``),
  sanitized; the name is a hash of the ids minus ``try_number``, so a retry re-attaches;
- the result: rank 0's final log line ``llmops.train: result: {...}``
  (``runtime/train.py``), read from the launcher pod's log before any cleanup
  (:func:`parse_result`). No result file needs a shared volume.

Nothing here imports Airflow or the kubernetes client at module level.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from llmops_provider import config
from llmops_provider.backends.kubernetes import (
    CHECKPOINTS,
    DEFAULT_MLFLOW_SECRET,
    SPEC_ANNOTATION,
    SPEC_DIR,
    SPEC_PATH,
    WORKSPACE,
    _label_value,
    _tolerations,
    pod_spec,
)
from llmops_provider.recipes import KubernetesSpec
from llmops_provider.specs.train import TrainJobSpec

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
KIND = "TrainJob"
RUNTIME = "deepspeed-distributed"
RUNTIME_KIND = "ClusterTrainingRuntime"
# replicated jobs and container of the deepspeed-distributed runtime (contracts/kubeflow-deepspeed-runtime.yaml)
LAUNCHER = "launcher"
NODE = "node"
CONTAINER = "node"
HOSTFILE = "/etc/mpi/hostfile"
MASTER_PORT = 29500
PATCH_MANAGER = "llmops.apache.org/airflow-provider"

LABEL_TRAINJOB = "llmops.apache.org/trainjob"
LABEL_ROLE = "llmops.apache.org/replicated-job"
IDENTITY_KEYS = ("dag_id", "task_id", "run_id", "map_index")  # try_number is recorded, not matched
RESULT_PATH = f"{WORKSPACE}/out/result.json"  # inside the pod; the operator reads the log line instead
# runtime/train.py logs ``log.info("result: %s", result.model_dump_json())`` on rank 0
RESULT_LINE = re.compile(r"\[rank 0\] llmops\.train: result: (\{.*\})\s*$")
MLFLOW_KEYS = (
    ("MLFLOW_TRACKING_URI", False),
    ("MLFLOW_TRACKING_USERNAME", True),
    ("MLFLOW_TRACKING_PASSWORD", True),
    ("MLFLOW_TRACKING_TOKEN", True),
)

CLEANUP_POLICIES = ("always", "on_success", "never")
DEFAULT_TIMEOUT_S = 72 * 3600.0
DEFAULT_POLL_S = 30.0

# phases derived from status.conditions (see phase_of)
PENDING, RUNNING, SUSPENDED, COMPLETE, FAILED = "Pending", "Running", "Suspended", "Complete", "Failed"
TERMINAL = (COMPLETE, FAILED)

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# JobSet names pods <trainjob>-launcher-<i>-<j>: keep that a DNS label (<= 63)
MAX_NAME = 45


class TrainJobFailed(RuntimeError):
    """The TrainJob failed, timed out or finished without a result; the message says which and why."""


class TrainJobConflict(RuntimeError):
    """A TrainJob with our name exists but belongs to another task instance."""


# ---------------------------------------------------------------- identity


def identity_labels(context: Mapping[str, Any]) -> dict[str, str]:
    """KubernetesPodOperator's identity labels for this task instance, sanitized to label syntax."""
    ti = context["ti"]
    labels = {
        "dag_id": ti.dag_id,
        "task_id": ti.task_id,
        "run_id": str(context.get("run_id") or ti.run_id),
        "try_number": str(ti.try_number),
    }
    map_index = getattr(ti, "map_index", -1)
    if map_index is not None and map_index >= 0:
        labels["map_index"] = str(map_index)
    return {key: _label_value(str(value)) for key, value in labels.items()}


def trainjob_name(recipe: str, context: Mapping[str, Any]) -> str:
    """Deterministic per task instance (not per try): a retry finds the same TrainJob."""
    ti = context["ti"]
    ids = [ti.dag_id, ti.task_id, str(context.get("run_id") or ti.run_id), str(getattr(ti, "map_index", -1))]
    digest = hashlib.sha256("\0".join(ids).encode()).hexdigest()[:12]
    slug = re.sub(r"[^a-z0-9-]+", "-", recipe.lower()).strip("-")[:20].strip("-") or "job"
    return f"train-{slug}-{digest}"


# ---------------------------------------------------------------- the object


def procs_per_node(spec: TrainJobSpec, k8s: KubernetesSpec) -> int:
    """``training.world_size`` ranks split evenly over ``num_nodes``; one rank per GPU at most."""
    n, nodes = spec.training.world_size, k8s.num_nodes
    if n % nodes:
        raise ValueError(
            f"training.world_size ({n}) is not a multiple of training.kubernetes.num_nodes ({nodes}): every node "
            f"runs the same number of ranks; set training.world_size to a multiple of {nodes}, "
            f"e.g. {nodes * max(1, n // nodes)}"
        )
    per_node = n // nodes
    if k8s.gpus and per_node > k8s.gpus:
        raise ValueError(
            f"training.world_size ({n}) over {nodes} node(s) is {per_node} ranks per node, more than "
            f"training.kubernetes.gpus ({k8s.gpus}): a node runs one rank per GPU; set training.world_size: "
            f"{nodes * k8s.gpus} or training.kubernetes.gpus: {per_node}"
        )
    return per_node


def job_spec(spec: TrainJobSpec, k8s: KubernetesSpec) -> TrainJobSpec:
    """The spec as the ranks see it: pod paths, result inside the pod (the log line carries it out)."""
    return pod_spec(spec, k8s).model_copy(update={"result_path": RESULT_PATH})


def launch_command(ranks: int, spec_path: str = SPEC_PATH) -> list[str]:
    """``trainer.command``: mpirun over the runtime's hostfile, each rank the plain entrypoint."""
    from llmops_provider.runtime.train import MODULE  # stdlib-only at import

    per_rank = (
        'export RANK="$OMPI_COMM_WORLD_RANK" WORLD_SIZE="$OMPI_COMM_WORLD_SIZE" '
        'LOCAL_RANK="$OMPI_COMM_WORLD_LOCAL_RANK" LOCAL_WORLD_SIZE="$OMPI_COMM_WORLD_LOCAL_SIZE"; '
        f"exec python -m {MODULE} --spec {spec_path}"
    )
    # $1 = ranks, $2 = the per-rank script; MLflow variables are forwarded by name (values stay out of argv)
    launcher = (
        "set -eu; "
        f"{{ read -r MASTER_ADDR _ || true; }} < {HOSTFILE}; "
        f"export MASTER_ADDR MASTER_PORT={MASTER_PORT} PYTHONUNBUFFERED=1; "
        "fwd=(-x MASTER_ADDR -x MASTER_PORT -x PYTHONUNBUFFERED); "
        f"for v in {' '.join(k for k, _ in MLFLOW_KEYS)}; do "
        'if [ -n "${!v:-}" ]; then fwd+=(-x "$v"); fi; done; '
        f'exec mpirun --hostfile {HOSTFILE} -np "$1" --map-by slot "${{fwd[@]}}" bash -c "$2"'
    )
    return ["bash", "-c", launcher, "llmops-train", str(ranks), per_rank]


def _check_name(name: str) -> None:
    if not _DNS1035.match(name) or len(name) > MAX_NAME:
        raise ValueError(
            f"TrainJob name {name!r} must be a DNS-1035 label of at most {MAX_NAME} characters "
            "(lowercase letters, digits, '-', starting with a letter); use trainjob_name()"
        )


def build_trainjob(
    spec: TrainJobSpec,
    k8s: KubernetesSpec,
    *,
    name: str,
    namespace: str,
    labels: Mapping[str, str],
    mlflow_secret: str = DEFAULT_MLFLOW_SECRET,
) -> dict[str, Any]:
    """The TrainJob object (a plain dict, as the API takes it) that runs ``spec`` on ``k8s.num_nodes`` nodes."""
    from kubernetes.client import ApiClient

    _check_name(name)
    per_node = procs_per_node(spec, k8s)
    inner = job_spec(spec, k8s)
    all_labels = {
        "app.kubernetes.io/name": "llmops-train",
        "app.kubernetes.io/part-of": "llmops",
        "llmops.apache.org/recipe": _label_value(spec.recipe),
        "llmops.apache.org/dataset-commit": _label_value(spec.dataset_commit),
        **{key: _label_value(str(value)) for key, value in labels.items()},
    }

    requests = {"cpu": k8s.cpu, "memory": k8s.memory}
    limits = {"memory": k8s.memory}
    if k8s.gpus:
        requests["nvidia.com/gpu"] = str(k8s.gpus)
        limits["nvidia.com/gpu"] = str(k8s.gpus)

    volumes: list[dict[str, Any]] = [
        {
            "name": "train-spec",
            "downwardAPI": {
                "items": [
                    {
                        "path": SPEC_PATH.rsplit("/", 1)[1],
                        "fieldRef": {"fieldPath": f"metadata.annotations['{SPEC_ANNOTATION}']"},
                    }
                ]
            },
        },
        # DeepSpeed/NCCL and dataloaders need more shared memory than the runtime's 64Mi default
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": k8s.shm_size}},
        {"name": "workspace", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "train-spec", "mountPath": SPEC_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "workspace", "mountPath": WORKSPACE},
    ]
    if k8s.checkpoint_pvc:
        # every node writes its ZeRO shards here: the claim must be ReadWriteMany when num_nodes > 1
        volumes.append({"name": "checkpoints", "persistentVolumeClaim": {"claimName": k8s.checkpoint_pvc}})
        mounts.append({"name": "checkpoints", "mountPath": CHECKPOINTS})

    pod_patch: dict[str, Any] = {"volumes": volumes, "containers": [{"name": CONTAINER, "volumeMounts": mounts}]}
    if k8s.node_selector:
        pod_patch["nodeSelector"] = dict(k8s.node_selector)
    if k8s.tolerations:
        pod_patch["tolerations"] = ApiClient().sanitize_for_serialization(_tolerations(k8s.tolerations))
    if k8s.service_account:
        pod_patch["serviceAccountName"] = k8s.service_account

    spec_json = inner.model_dump_json()
    replicated = [
        {
            "name": job,
            "template": {
                "spec": {
                    "template": {
                        "metadata": {
                            "labels": {**all_labels, LABEL_TRAINJOB: name, LABEL_ROLE: job},
                            "annotations": {SPEC_ANNOTATION: spec_json},
                        },
                        "spec": pod_patch,
                    }
                }
            },
        }
        for job in (LAUNCHER, NODE)
    ]
    image = k8s.image or config.get("runtime_image")
    # LLMOPS_IMAGE: the runtime tags its MLflow run and model version with the image it ran in
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}, {"name": "LLMOPS_IMAGE", "value": image}] + [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": mlflow_secret, "key": key, "optional": optional}}}
        for key, optional in MLFLOW_KEYS
    ]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace, "labels": all_labels},
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": RUNTIME_KIND, "name": RUNTIME},
            "trainer": {
                "image": image,
                "command": launch_command(spec.training.world_size),
                "numNodes": k8s.num_nodes,
                "numProcPerNode": per_node,
                "resourcesPerNode": {"requests": requests, "limits": limits},
                "env": env,
            },
            "runtimePatches": [
                {
                    "manager": PATCH_MANAGER,
                    "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": replicated}}},
                }
            ],
        },
    }


# ---------------------------------------------------------------- status and result


def phase_of(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(phase, message) from a TrainJob's ``status.conditions`` (and ``jobsStatus`` for Running)."""
    status = obj.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}

    def true(kind: str) -> dict[str, Any] | None:
        cond = conditions.get(kind)
        return cond if cond and cond.get("status") == "True" else None

    for kind, phase in ((FAILED, FAILED), (COMPLETE, COMPLETE), ("Suspended", SUSPENDED)):
        cond = true(kind)
        if cond:
            return phase, f"{cond.get('reason', '')}: {cond.get('message', '')}".strip(": ")
    jobs = status.get("jobsStatus") or []
    if true("Running") or any((j.get("active") or 0) + (j.get("ready") or 0) > 0 for j in jobs):
        return RUNNING, ", ".join(
            f"{j['name']}: {j.get('ready', 0)} ready/{j.get('active', 0)} active" for j in jobs
        ) or "running"
    created = true("Created")
    return PENDING, (created.get("message", "created") if created else "no status yet")


def parse_result(log_text: str) -> dict[str, Any]:
    """The training result from the launcher log: rank 0's last ``llmops.train: result: {...}`` line."""
    from llmops_provider.specs.train import TrainResult

    found = None
    for line in log_text.splitlines():
        match = RESULT_LINE.search(line)
        if match:
            found = match.group(1)
    if found is None:
        raise TrainJobFailed(
            "the launcher log has no rank-0 'llmops.train: result: {...}' line: "
            "the training job ended without reporting a result"
        )
    try:
        return TrainResult.model_validate_json(found).model_dump()
    except ValueError as exc:
        raise TrainJobFailed(f"the training result line is not a valid TrainResult ({exc}): {found[:500]}") from None


def kube_clients(kubernetes_conn_id: str | None):
    """(CustomObjectsApi, CoreV1Api) from the Airflow Kubernetes connection (tests replace this)."""
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

    hook = KubernetesHook(conn_id=kubernetes_conn_id)
    return hook.custom_object_client, hook.core_v1_client


def _not_found(exc: Exception) -> bool:
    return getattr(exc, "status", None) == 404


def _conflict(exc: Exception) -> bool:
    return getattr(exc, "status", None) == 409


class TrainJobBackend:
    """Submit, watch, read and clean up TrainJobs in one namespace.

    :param api: ``kubernetes.client.CustomObjectsApi`` (or anything with its methods)
    :param namespace: namespace of the TrainJobs
    :param core: ``kubernetes.client.CoreV1Api`` for the launcher log (the result)
    :param cleanup: ``always``, ``on_success`` (keep failed jobs for debugging) or ``never``
    :param log: a logger (the operator's)
    """

    def __init__(
        self,
        api,
        namespace: str,
        *,
        core=None,
        cleanup: str = "on_success",
        log=None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if cleanup not in CLEANUP_POLICIES:
            raise ValueError(f"cleanup={cleanup!r} is not a cleanup policy; use one of {list(CLEANUP_POLICIES)}")
        import logging

        self.api = api
        self.core = core
        self.namespace = namespace
        self.cleanup = cleanup
        self.log = log or logging.getLogger(__name__)
        self._sleep = sleep
        self._clock = clock

    def _ref(self) -> dict[str, str]:
        return {"group": GROUP, "version": VERSION, "namespace": self.namespace, "plural": PLURAL}

    def get(self, name: str) -> dict[str, Any]:
        return self.api.get_namespaced_custom_object(name=name, **self._ref())

    def submit(self, obj: dict[str, Any]) -> tuple[str, bool]:
        """Create the TrainJob, or adopt the one this task instance created on an earlier try.

        Returns ``(name, adopted)``. An earlier try's *failed* job is deleted and replaced; one
        owned by another task instance is a :class:`TrainJobConflict`.
        """
        from kubernetes.client.exceptions import ApiException

        name = obj["metadata"]["name"]
        try:
            self.api.create_namespaced_custom_object(body=obj, **self._ref())
            self.log.info("created TrainJob %s/%s", self.namespace, name)
            return name, False
        except ApiException as exc:
            if not _conflict(exc):
                raise
        existing = self.get(name)
        ours = {k: v for k, v in obj["metadata"].get("labels", {}).items() if k in IDENTITY_KEYS}
        theirs = {k: v for k, v in (existing.get("metadata", {}).get("labels") or {}).items() if k in IDENTITY_KEYS}
        if ours != theirs:
            raise TrainJobConflict(
                f"TrainJob {self.namespace}/{name} exists but belongs to {theirs}, not {ours}; delete it "
                f"(kubectl -n {self.namespace} delete trainjob {name}) or run the task under another id"
            )
        phase, message = phase_of(existing)
        if phase == FAILED:
            self.log.warning(
                "TrainJob %s/%s from an earlier try failed (%s); replacing it", self.namespace, name, message
            )
            self.delete(name, force=True)
            self._wait_gone(name)
            self.api.create_namespaced_custom_object(body=obj, **self._ref())
            return name, False
        tried = (existing.get("metadata", {}).get("labels") or {}).get("try_number")
        self.log.info("re-attached to TrainJob %s/%s (created by try %s, %s)", self.namespace, name, tried, phase)
        return name, True

    def status(self, name: str) -> tuple[str, str]:
        return phase_of(self.get(name))

    def wait(
        self, name: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, poll_interval_s: float = DEFAULT_POLL_S
    ) -> tuple[str, str]:
        """Poll until the job is terminal; ``("Timeout", ...)`` when ``timeout_s`` passes first."""
        deadline = self._clock() + timeout_s
        last = None
        while True:
            phase, message = self.status(name)
            if (phase, message) != last:
                self.log.info("TrainJob %s/%s: %s %s", self.namespace, name, phase, message)
                last = (phase, message)
            if phase in TERMINAL:
                return phase, message
            if self._clock() >= deadline:
                return "Timeout", f"still {phase} after {timeout_s:.0f}s"
            self._sleep(poll_interval_s)

    def delete(self, name: str, *, succeeded: bool | None = None, force: bool = False) -> bool:
        """Delete per the cleanup policy (``force`` ignores it); True when a delete was sent."""
        from kubernetes.client.exceptions import ApiException

        wanted = force or self.cleanup == "always" or (self.cleanup == "on_success" and bool(succeeded))
        if not wanted:
            self.log.info("keeping TrainJob %s/%s (cleanup=%s)", self.namespace, name, self.cleanup)
            return False
        try:
            self.api.delete_namespaced_custom_object(name=name, propagation_policy="Foreground", **self._ref())
        except ApiException as exc:
            if _not_found(exc):
                return False
            raise
        self.log.info("deleted TrainJob %s/%s", self.namespace, name)
        return True

    def suspend(self, name: str) -> None:
        """Stop the pods but keep the object (a timed-out job kept for debugging holds no GPUs)."""
        self.api.patch_namespaced_custom_object(name=name, body={"spec": {"suspend": True}}, **self._ref())

    def _wait_gone(self, name: str, timeout_s: float = 300.0) -> None:
        from kubernetes.client.exceptions import ApiException

        deadline = self._clock() + timeout_s
        while self._clock() < deadline:
            try:
                self.get(name)
            except ApiException as exc:
                if _not_found(exc):
                    return
                raise
            self._sleep(2.0)
        raise TrainJobFailed(f"TrainJob {self.namespace}/{name} was not deleted within {timeout_s:.0f}s")

    def launcher_log(self, name: str, tail_lines: int | None = None) -> str:
        """The launcher pod's log (mpirun forwards every rank's output there)."""
        if self.core is None:
            raise TrainJobFailed("no CoreV1Api given: cannot read the launcher log")
        pods = self.core.list_namespaced_pod(
            self.namespace, label_selector=f"{LABEL_TRAINJOB}={name},{LABEL_ROLE}={LAUNCHER}"
        ).items
        if not pods:
            raise TrainJobFailed(f"TrainJob {self.namespace}/{name} has no launcher pod to read the result from")

        def rank(pod) -> tuple:
            status = getattr(pod, "status", None)
            return (getattr(status, "phase", None) == "Succeeded", str(pod.metadata.creation_timestamp or ""))

        pod = max(pods, key=rank)
        kwargs = {"tail_lines": tail_lines} if tail_lines else {}
        return self.core.read_namespaced_pod_log(pod.metadata.name, self.namespace, container=CONTAINER, **kwargs)

    def conclude(self, name: str, phase: str, message: str) -> dict[str, Any]:
        """Read the result (or the failure's log tail) first, then clean up; raise unless it succeeded."""
        succeeded = False
        try:
            if phase == COMPLETE:
                result = parse_result(self.launcher_log(name))
                succeeded = True
                return result
            try:
                tail = self.launcher_log(name, tail_lines=40)
            except Exception as exc:  # noqa: BLE001 - best effort: the failure itself is what matters
                tail = f"(no launcher log: {exc})"
            raise TrainJobFailed(
                f"TrainJob {self.namespace}/{name} {phase}: {message}\nlast launcher log lines:\n{tail}"
            )
        finally:
            deleted = self.delete(name, succeeded=succeeded)
            if not deleted and phase not in TERMINAL:
                self._suspend_if_present(name, phase)

    def _suspend_if_present(self, name: str, phase: str) -> None:
        """A timed-out job kept for debugging must not keep holding nodes; a vanished one needs nothing."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.suspend(name)
        except ApiException as exc:
            if not _not_found(exc):
                raise
            return
        self.log.info("suspended TrainJob %s/%s (%s)", self.namespace, name, phase)


def result_event(name: str, namespace: str, phase: str, message: str) -> dict[str, Any]:
    """The trigger's event payload (primitives)."""
    status = {COMPLETE: "success", FAILED: "failed"}.get(phase, "timeout" if phase == "Timeout" else "error")
    return {"status": status, "phase": phase, "message": message, "name": name, "namespace": namespace}
