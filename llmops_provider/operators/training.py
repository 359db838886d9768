"""Training: one operator, two scales (a local DeepSpeed process group or a Kubernetes pod).

Both paths write the same :class:`~llmops_provider.specs.train.TrainJobSpec` and run the same
entrypoint (``llmops_provider.runtime.train`` under the ``deepspeed`` launcher); they differ
only in how the job is started and watched. The job is idempotent: the same recipe
fingerprint and dataset commit reuse the registered model version.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmops_provider import __version__, config, lineage
from llmops_provider.backends.local import LocalJobMixin, kill_leftover, release_shm_buffers
from llmops_provider.compat import AirflowException, AirflowFailException, BaseOperator
from llmops_provider.lineage import emit_outlet_extra, triggering_extra

RESULT_KEYS = ("mlflow_run_id", "model_name", "model_version", "dataset_commit", "reused", "final_loss")


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", part)


class DeepSpeedTrainOperator(LocalJobMixin, BaseOperator):
    """Train (or reuse) the recipe's model on one dataset commit; register it as ``challenger``.

    :param recipe_path: path of the recipe YAML (templated)
    :param dataset_commit: dataset commit to train on (templated); empty: the triggering
        dataset asset event's ``dataset_commit``, else the head of the recipe's dataset branch
    :param backend: ``local``, ``kubernetes`` (one pod) or ``kubeflow`` (a multi-node Kubeflow
        TrainJob); default the recipe's ``training.backend``, else ``[llmops] compute_backend``
    :param mlflow_conn_id: MLflow connection; default the recipe's ``mlflow_conn_id``
    :param kubernetes_conn_id: Kubernetes connection for the pod backend
    :param mlflow_secret: Kubernetes Secret the pod reads MLflow settings/credentials from
    :param deferrable: on Kubernetes, wait for the pod in the triggerer (no worker slot)
    :param trainjob_cleanup: on Kubeflow, delete the TrainJob ``always``, ``on_success`` or ``never``
    :param trainjob_poll_interval_s: on Kubeflow, seconds between TrainJob status reads

    Returns ``{mlflow_run_id, model_name, model_version, dataset_commit, reused, final_loss}``
    and puts the lineage ids into the event extra of the recipe's ``model`` asset outlet.
    """

    template_fields = ("recipe_path", "dataset_commit")
    ui_color = "#f6d6b8"

    def __init__(
        self,
        *,
        recipe_path: str,
        dataset_commit: str | None = None,
        backend: str | None = None,
        mlflow_conn_id: str | None = None,
        kubernetes_conn_id: str = "kubernetes_default",
        mlflow_secret: str = "llmops-mlflow",
        deferrable: bool = True,
        trainjob_cleanup: str = "on_success",
        trainjob_poll_interval_s: float = 30.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.recipe_path = recipe_path
        self.dataset_commit = dataset_commit
        self.backend = backend
        self.mlflow_conn_id = mlflow_conn_id
        self.kubernetes_conn_id = kubernetes_conn_id
        self.mlflow_secret = mlflow_secret
        self.deferrable = deferrable
        self.trainjob_cleanup = trainjob_cleanup
        self.trainjob_poll_interval_s = trainjob_poll_interval_s
        self._pod_op = None
        self._trainjob = None  # (backend, name) while a TrainJob runs, for on_kill

    # -- inputs ---------------------------------------------------------------------------

    def resolve_dataset(self, recipe, context: Mapping[str, Any]) -> tuple[str, str]:
        """(dataset_repo, commit): the parameter, else the triggering event, else the branch head."""
        repo = recipe.data.dataset_repo
        commit = str(self.dataset_commit).strip() if self.dataset_commit not in (None, "", "None") else None
        if commit:
            self.log.info("dataset commit %s from the dataset_commit parameter", commit)
            return repo, commit
        extra = triggering_extra(context, lineage.asset_uri(recipe.name, "dataset"))
        if extra.get(lineage.DATASET_COMMIT):
            self.log.info("dataset commit %s from the triggering dataset asset event", extra[lineage.DATASET_COMMIT])
            return extra.get(lineage.DATASET_REPO) or repo, str(extra[lineage.DATASET_COMMIT])
        from llmops_provider.datasets import get_store

        head = get_store().head(repo, recipe.data.branch)
        if head is None or not getattr(head, "commit_id", None):
            raise AirflowFailException(
                f"no dataset commit to train on: dataset_commit is empty, no dataset asset event triggered this run, "
                f"and {repo}@{recipe.data.branch} has no commit; run the {recipe.name}_data DAG first"
            )
        self.log.info("dataset commit %s: head of %s@%s", head.commit_id, repo, recipe.data.branch)
        return repo, head.commit_id

    def build_spec(self, recipe, context: Mapping[str, Any]):
        from llmops_provider.datasets import get_store
        from llmops_provider.specs.train import TrainJobSpec

        repo, commit = self.resolve_dataset(recipe, context)
        dataset_dir = Path(get_store().local_path(repo, commit))
        job_dir = config.home() / "jobs" / recipe.name / _safe(str(context["run_id"]))
        tags = {
            **lineage.airflow_ids(context),
            "airflow_task_id": context["ti"].task_id,
            "code_version": f"airflow-provider-llmops=={__version__}",
        }
        spec = TrainJobSpec.from_recipe(
            recipe,
            dataset_dir=str(dataset_dir),
            dataset_repo=repo,
            dataset_commit=commit,
            output_dir=str(job_dir / "train"),
            tags=tags,
        )
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / "train-spec.json").write_text(spec.model_dump_json(indent=2))
        return spec, job_dir / "train-spec.json"

    # -- execution ------------------------------------------------------------------------

    def execute(self, context):
        from llmops_provider.recipes import load_recipe

        recipe = load_recipe(self.recipe_path)
        spec, spec_path = self.build_spec(recipe, context)
        backend = self.backend or recipe.training.backend or config.get("compute_backend")
        self.log.info(
            "training %s on %s@%s (%s backend), spec %s, idempotency key %s",
            recipe.name,
            spec.dataset_repo,
            spec.dataset_commit,
            backend,
            spec_path,
            spec.idempotency_key,
        )
        if backend == "local":
            result = self.run_local(spec, spec_path, recipe.mlflow_conn_id)
        elif backend == "kubernetes":
            result = self.run_pod(spec, recipe, context, lambda op: op.execute(context))
        elif backend == "kubeflow":
            result = self.run_trainjob(spec, recipe, context)
        else:
            raise AirflowFailException(
                f"backend={backend!r} is not a compute backend; use 'local', 'kubernetes' or 'kubeflow'"
            )
        return self.complete(context, recipe, spec, result)

    def run_local(self, spec, spec_path: Path, recipe_conn_id: str) -> dict[str, Any]:
        from llmops_provider.hooks.mlflow import MLflowHook
        from llmops_provider.runtime.train import free_port, launch_command

        python = Path(config.get("runtime_python"))
        launcher = python.parent / "deepspeed"  # the runtime venv's launcher (not resolved: venv bin dirs are symlinks)
        if not launcher.exists():
            raise AirflowFailException(
                f"no deepspeed launcher next to [llmops] runtime_python={python}; point runtime_python at the "
                "job-runtime venv's python (the one with deepspeed installed)"
            )
        env = MLflowHook(self.mlflow_conn_id or recipe_conn_id).job_env()
        secrets = [v for k, v in env.items() if k.endswith(("PASSWORD", "TOKEN"))]
        master_port = free_port()
        cmd = launch_command(str(spec_path), spec.training.world_size, launcher=str(launcher), master_port=master_port)
        spec.result_file.unlink(missing_ok=True)  # a failed earlier try must not pass for this one
        pid_file = spec_path.parent / "train.pid"
        kill_leftover(pid_file, str(spec_path), self.log)  # a lost worker's ranks must not train beside ours
        try:
            self.run_local_job(
                cmd,
                env,
                "training job failed; no model version was registered by this try.",
                secrets=secrets,
                pid_file=pid_file,
            )
        finally:
            release_shm_buffers(master_port, self.log)
        return json.loads(spec.result_file.read_text())

    def run_pod(self, spec, recipe, context, start) -> dict[str, Any]:
        """Run the pod; if it defers, resume in :meth:`execute_complete` with what's needed to rebuild it."""
        from llmops_provider.backends.kubernetes import build_operator
        from llmops_provider.compat import TaskDeferred

        self._pod_op = build_operator(
            spec,
            recipe.training.kubernetes,
            task_id=self.task_id,
            kubernetes_conn_id=self.kubernetes_conn_id,
            mlflow_secret=self.mlflow_secret,
            deferrable=self.deferrable,
        )
        try:
            xcom = start(self._pod_op)
        except TaskDeferred as deferred:
            raise TaskDeferred(
                trigger=deferred.trigger,
                method_name="execute_complete",
                timeout=deferred.timeout,
                kwargs={
                    **(deferred.kwargs or {}),
                    "train_spec": spec.model_dump_json(),
                    "pod_method": deferred.method_name,
                },
            ) from None
        if not xcom:
            raise AirflowException("the training pod finished without a result (/airflow/xcom/return.json)")
        return xcom

    def execute_complete(self, context, event=None, *, train_spec: str, pod_method: str, **kwargs):
        """Resume after the pod trigger fired: let KubernetesPodOperator finish, then publish."""
        from llmops_provider.recipes import load_recipe
        from llmops_provider.specs.train import TrainJobSpec

        recipe = load_recipe(self.recipe_path)
        spec = TrainJobSpec.model_validate_json(train_spec)
        result = self.run_pod(spec, recipe, context, lambda op: getattr(op, pod_method)(context, event=event, **kwargs))
        return self.complete(context, recipe, spec, result)

    def _trainjob_backend(self, namespace: str):
        from llmops_provider.backends import trainjob

        api, core = trainjob.kube_clients(self.kubernetes_conn_id)
        return trainjob.TrainJobBackend(api, namespace, core=core, cleanup=self.trainjob_cleanup, log=self.log)

    def run_trainjob(self, spec, recipe, context) -> dict[str, Any]:
        """Submit (or re-attach to) the Kubeflow TrainJob; wait here or defer to :class:`TrainJobTrigger`."""
        import time

        from llmops_provider.backends import trainjob
        from llmops_provider.compat import TaskDeferred

        k8s = recipe.training.kubernetes
        namespace = k8s.namespace or config.get("kubernetes_namespace")
        name = trainjob.trainjob_name(spec.recipe, context)
        try:
            obj = trainjob.build_trainjob(
                spec,
                k8s,
                name=name,
                namespace=namespace,
                labels=trainjob.identity_labels(context),
                mlflow_secret=self.mlflow_secret,
            )
        except ValueError as exc:
            raise AirflowFailException(str(exc)) from None
        backend = self._trainjob_backend(namespace)
        backend.submit(obj)
        self._trainjob = (backend, name)
        timeout = trainjob.DEFAULT_TIMEOUT_S
        if self.execution_timeout:  # fire a little before Airflow's own timeout, so cleanup still runs
            limit = self.execution_timeout.total_seconds()
            timeout = max(limit / 2, limit - min(300.0, limit * 0.05))
        if self.deferrable:
            from llmops_provider.triggers.trainjob import TrainJobTrigger

            self._trainjob = None  # the worker lets go; execute_trainjob_complete cleans up
            raise TaskDeferred(
                trigger=TrainJobTrigger(
                    name=name,
                    namespace=namespace,
                    deadline=time.time() + timeout,
                    kubernetes_conn_id=self.kubernetes_conn_id,
                    poll_interval_s=self.trainjob_poll_interval_s,
                ),
                method_name="execute_trainjob_complete",
                kwargs={"train_spec": spec.model_dump_json(), "name": name, "namespace": namespace},
            )
        phase, message = backend.wait(name, timeout_s=timeout, poll_interval_s=self.trainjob_poll_interval_s)
        return self._conclude_trainjob(backend, name, phase, message)

    def _conclude_trainjob(self, backend, name: str, phase: str, message: str) -> dict[str, Any]:
        from llmops_provider.backends.trainjob import TrainJobFailed

        try:
            return backend.conclude(name, phase, message)
        except TrainJobFailed as exc:
            raise AirflowException(str(exc)) from None
        finally:
            self._trainjob = None

    def execute_trainjob_complete(self, context, event=None, *, train_spec: str, name: str, namespace: str):
        """Resume after :class:`TrainJobTrigger` fired: read the result from the launcher log, clean up, publish."""
        from llmops_provider.recipes import load_recipe
        from llmops_provider.specs.train import TrainJobSpec

        recipe = load_recipe(self.recipe_path)
        spec = TrainJobSpec.model_validate_json(train_spec)
        event = event or {}
        result = self._conclude_trainjob(
            self._trainjob_backend(namespace),
            name,
            event.get("phase", "Unknown"),
            event.get("message", f"no trigger event: {event!r}"),
        )
        return self.complete(context, recipe, spec, result)

    def complete(self, context, recipe, spec, result: dict[str, Any]) -> dict[str, Any]:
        from llmops_provider.specs.train import TrainResult

        res = TrainResult.model_validate(result)
        if not res.model_version:
            raise AirflowException(f"training job reported no model version: {result}")
        extra = {
            lineage.RECIPE_NAME: recipe.name,
            lineage.RECIPE_FINGERPRINT: spec.recipe_fingerprint,
            lineage.DATASET_REPO: spec.dataset_repo,
            lineage.DATASET_COMMIT: res.dataset_commit,
            lineage.MLFLOW_RUN_ID: res.mlflow_run_id,
            lineage.MODEL_NAME: res.model_name,
            lineage.MODEL_VERSION: res.model_version,
            "reused": res.reused,
            **lineage.airflow_ids(context),
        }
        emit_outlet_extra(context, self.outlets, lineage.asset_uri(recipe.name, "model"), extra, self.log)
        self.log.info(
            "%s model %s version %s (run %s, dataset %s)",
            "reused" if res.reused else "trained",
            res.model_name,
            res.model_version,
            res.mlflow_run_id,
            res.dataset_commit,
        )
        dumped = res.model_dump()
        return {key: dumped[key] for key in RESULT_KEYS}

    def on_kill(self) -> None:
        LocalJobMixin.on_kill(self)
        if self._pod_op is not None:
            self._pod_op.on_kill()
        if self._trainjob is not None:  # a killed task stops its job, whatever the cleanup policy
            backend, name = self._trainjob
            backend.delete(name, force=True)


def trained_version(recipe_path: str, dataset_commit: str, mlflow_conn_id: str | None = None) -> str | None:
    """The registered model version already trained from this recipe on this dataset commit, if any.

    Same key as the training runtime's idempotency check, so the data DAG can skip a retrain that
    would only reuse an existing version.
    """
    from llmops_provider.hooks.mlflow import MLflowHook
    from llmops_provider.recipes import load_recipe
    from llmops_provider.specs.train import IDEMPOTENCY_TAG, idempotency_key

    recipe = load_recipe(recipe_path)
    client = MLflowHook(mlflow_conn_id or recipe.mlflow_conn_id).get_client()
    key = idempotency_key(recipe.fingerprint(), dataset_commit)
    if not client.search_registered_models(filter_string=f"name = '{recipe.model_name}'"):
        return None
    versions = client.search_model_versions(f"name = '{recipe.model_name}' and tags.{IDEMPOTENCY_TAG} = '{key}'")
    finished = [v for v in versions if v.run_id and client.get_run(v.run_id).info.status == "FINISHED"]
    return str(max(int(v.version) for v in finished)) if finished else None
