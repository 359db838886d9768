"""Evaluation gate: lm-eval tasks from the held-out split, champion comparison, safety, fail closed.

The gate publishes first (report files, MLflow eval run, model-version tags, task log) and
decides second: on a pass it sets the recipe's ``approved_alias`` (``candidate-approved``) and
emits the ``approved`` asset event; otherwise the version is tagged ``rejected`` and
:class:`EvalGateFailed` is raised. A job crash, timeout or missing result never approves.
With ``evaluation.human_approval.required`` the promotion waits for a person
(``PromoteApprovedModelOperator`` after Airflow's ``ApprovalOperator``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmops_provider import config, lineage
from llmops_provider.backends.local import LocalJobMixin
from llmops_provider.compat import AirflowException, AirflowFailException, BaseOperator
from llmops_provider.lineage import emit_outlet_extra, triggering_extra  # noqa: F401 - re-exported

CHALLENGER_ALIAS = lineage.CHALLENGER_ALIAS


class EvalGateFailed(AirflowFailException):
    """The model version failed a threshold or regressed vs the champion (the report is already published)."""


# --- asset-event helpers (shared with the deployment operator) --------------------------------


def version_from_param_or_event(value: Any, context: Mapping[str, Any], uri: str) -> tuple[str, str] | None:
    """(version, how): the operator's ``model_version`` parameter, else the triggering event of ``uri``.

    None when neither names one: each operator then applies its own fallback (alias, newest passed).
    """
    explicit = version_from(value, "model_version")
    if explicit:
        return explicit, "parameter"
    extra = triggering_extra(context, uri)
    from_event = version_from(extra.get(lineage.MODEL_VERSION), f"{uri} asset event extra model_version")
    return (from_event, "triggering asset event") if from_event else None


def version_from(value: Any, field: str) -> str | None:
    if value is None or str(value).strip() in ("", "None"):
        return None
    text = str(value).strip()
    if not text.isdigit():
        raise AirflowFailException(
            f"{field}={value!r} is not a model version number; pass e.g. model_version='3' or leave it empty"
        )
    return text


def resolve_baseline(client, model_name: str, alias: str, candidate_version: str, log) -> dict[str, str] | None:
    """The version holding ``alias`` (the champion) as a job-spec baseline, or None.

    None when no version holds the alias (the first model: thresholds only) or when the candidate
    IS the champion (a re-evaluation compares it with nothing).
    """
    try:
        mv = client.get_model_version_by_alias(model_name, alias)
    except Exception:  # noqa: BLE001 - "alias not found" has many shapes across MLflow versions
        log.info("no version of %s holds alias %r: no non-regression comparison (thresholds only)", model_name, alias)
        return None
    version = str(mv.version)
    if version == candidate_version:
        log.info("%s v%s already holds alias %r: nothing to compare with", model_name, version, alias)
        return None
    tags = dict(mv.tags or {})
    run_id = mv.run_id or tags.get(lineage.MLFLOW_RUN_ID)
    if not run_id:
        raise AirflowFailException(
            f"{alias} {model_name} v{version} has no training run id; cannot load it to "
            "compare. Re-register it through the train DAG or set evaluation.regression.enabled: false"
        )
    ref = {"model_version": version, "mlflow_run_id": run_id, "alias": alias}
    if tags.get("artifact_path"):
        ref["artifact_path"] = tags["artifact_path"]
    return ref


def report_url(tracking_uri: str, experiment_id: str | None, run_id: str | None) -> str | None:
    """The MLflow UI page of the eval run (its artifacts hold ``eval/report.html``)."""
    if not (experiment_id and run_id) or not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}/artifacts"


def promote(context: Mapping[str, Any], client, recipe, payload: Mapping[str, Any], outlets, log) -> dict[str, Any]:
    """Set the approved alias on a version that passed and emit the ``approved`` asset event.

    Re-checks the registry first (fail closed): the version's ``eval_verdict`` tag must still be
    ``passed`` and its ``eval_run_id`` tag must be the run that passed.
    """
    version = str(payload["model_version"])
    tags = dict(client.get_model_version(recipe.model_name, version).tags or {})
    passed = tags.get(lineage.EVAL_VERDICT) == lineage.VERDICT_PASSED
    if not passed or tags.get(lineage.EVAL_RUN_ID) != payload.get("eval_run_id"):
        raise AirflowFailException(
            f"refusing to promote {recipe.model_name} v{version}: registry says eval_verdict="
            f"{tags.get(lineage.EVAL_VERDICT)!r}, eval_run_id={tags.get(lineage.EVAL_RUN_ID)!r}; expected a pass by "
            f"{payload.get('eval_run_id')!r}. Re-run the evaluate DAG"
        )
    alias = recipe.evaluation.approved_alias
    client.set_registered_model_alias(recipe.model_name, alias, version)
    log.info("%s v%s now holds alias %r", recipe.model_name, version, alias)
    extra = {
        lineage.MODEL_NAME: recipe.model_name,
        lineage.MODEL_VERSION: version,
        lineage.MLFLOW_RUN_ID: payload.get(lineage.MLFLOW_RUN_ID),
        lineage.DATASET_REPO: recipe.data.dataset_repo,
        lineage.DATASET_COMMIT: payload.get("dataset_commit"),
        lineage.EVAL_RUN_ID: payload.get("eval_run_id"),
        lineage.EVAL_VERDICT: payload.get("verdict"),
        lineage.EVAL_REPORT: payload.get("report_path"),
        "eval_report_html": payload.get("html_path"),
        "eval_report_url": payload.get("report_url"),
        "baseline_version": payload.get("baseline_version"),
        "approved_alias": alias,
        "regressions": [c["metric"] for c in payload.get("comparisons", []) if c.get("verdict") == "regressed"],
        **payload.get("airflow_ids", {}),
    }
    emit_outlet_extra(context, outlets, lineage.asset_uri(recipe.name, "approved"), extra, log)
    return extra


class LMEvalGateOperator(LocalJobMixin, BaseOperator):
    """Evaluate a registered model version and gate it on thresholds and non-regression.

    Publishes first (MLflow eval run with every metric, ``eval/report.html``, model-version tags),
    then decides: on a pass the version gets the recipe's ``approved_alias`` (default
    ``candidate-approved``) and the ``approved`` asset event; on a failure it is tagged ``rejected``
    with the reasons and :class:`EvalGateFailed` is raised. The champion is never touched.

    :param recipe_path: path of the recipe YAML (loaded in ``execute``). (templated)
    :param model_version: registry version to evaluate; empty: the triggering ``model`` asset
        event's ``model_version``, else the version with alias ``challenger``. (templated)
    :param mlflow_conn_id: MLflow connection; default: the recipe's ``mlflow_conn_id``.
    :param promote: on a pass, set the alias and emit the ``approved`` event here. False when a
        human approval step follows (``PromoteApprovedModelOperator`` promotes after it).
    """

    template_fields = ("recipe_path", "model_version")
    ui_color = "#f3e6ff"

    def __init__(
        self,
        *,
        recipe_path: str,
        model_version: str | int | None = None,
        mlflow_conn_id: str | None = None,
        promote: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.recipe_path = recipe_path
        self.model_version = model_version
        self.mlflow_conn_id = mlflow_conn_id
        self.promote = promote

    # -- resolution --------------------------------------------------------------------

    def resolve_version(self, context: Mapping[str, Any], client, recipe) -> tuple[str, str]:
        """(version, how it was chosen)."""
        found = version_from_param_or_event(self.model_version, context, lineage.asset_uri(recipe.name, "model"))
        if found:
            return found
        try:
            mv = client.get_model_version_by_alias(recipe.model_name, CHALLENGER_ALIAS)
        except Exception as exc:  # noqa: BLE001 - the registry says "not found" many ways
            raise AirflowFailException(
                f"no model_version given, no triggering `model` asset event, and registered model "
                f"{recipe.model_name!r} has no alias {CHALLENGER_ALIAS!r} ({exc}); run the train DAG first "
                "or pass model_version"
            ) from None
        return str(mv.version), f"alias {CHALLENGER_ALIAS}"

    def dataset_dir(self, recipe, commit: str) -> Path:
        from llmops_provider.datasets import get_store

        return Path(get_store().local_path(recipe.data.dataset_repo, commit))

    # -- job -----------------------------------------------------------------------------

    def run_job(self, spec_path: Path, env: dict[str, str], secrets: list[str], timeout_s: float | None = None) -> None:
        """Run the eval job; past ``timeout_s`` its process group is killed and nothing is approved."""
        backend_name = config.get("compute_backend")
        if backend_name != "local":
            self.log.warning("[llmops] compute_backend=%s: the eval gate runs as a local process", backend_name)
        cmd = [config.get("runtime_python"), "-m", "llmops_provider.runtime.evaluate", "--spec", str(spec_path)]
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            self.log.error("evaluation job exceeded evaluation.timeout_minutes (%.0f s): killing it", timeout_s)
            self.on_kill()

        timer = threading.Timer(timeout_s, kill) if timeout_s else None
        if timer:
            timer.daemon = True
            timer.start()
        try:
            self.run_local_job(cmd, env, "evaluation job crashed; the model is NOT approved.", secrets=secrets)
        except AirflowException:
            if timed_out.is_set():
                raise AirflowException(
                    f"evaluation job killed after {timeout_s:.0f} s (evaluation.timeout_minutes); "
                    "the model is NOT approved"
                ) from None
            raise
        finally:
            if timer:
                timer.cancel()

    def execute(self, context) -> dict[str, Any]:
        from llmops_provider.hooks.mlflow import MLflowHook
        from llmops_provider.recipes import load_recipe
        from llmops_provider.specs.evaluate import (
            VERDICT_PASSED,
            EvalJobSpec,
            EvalResult,
        )

        recipe = load_recipe(self.recipe_path)
        hook = MLflowHook(self.mlflow_conn_id or recipe.mlflow_conn_id)
        client = hook.get_client()
        version, how = self.resolve_version(context, client, recipe)
        mv = client.get_model_version(recipe.model_name, version)
        tags = dict(mv.tags or {})
        run_id = mv.run_id or tags.get(lineage.MLFLOW_RUN_ID)
        commit = tags.get(lineage.DATASET_COMMIT)
        if not run_id or not commit:
            raise AirflowFailException(
                f"model version {recipe.model_name} v{version} lacks lineage (run_id={run_id!r}, "
                f"tag {lineage.DATASET_COMMIT}={commit!r}); register it through the train DAG"
            )
        ev = recipe.evaluation
        baseline = None
        if ev.regression.enabled:
            baseline = resolve_baseline(client, recipe.model_name, ev.regression.baseline_alias, version, self.log)
        self.log.info(
            "evaluating %s v%s (chosen by %s), run %s, dataset %s@%s, baseline %s",
            recipe.model_name,
            version,
            how,
            run_id,
            recipe.data.dataset_repo,
            commit,
            f"{ev.regression.baseline_alias} v{baseline['model_version']}" if baseline else "none",
        )

        stamp = time.strftime("%Y%m%dT%H%M%S")
        out_dir = config.home() / "evaluations" / recipe.name / f"v{version}" / stamp
        out_dir.mkdir(parents=True, exist_ok=True)
        extra_tags = {}
        if "ti" in context:
            extra_tags = {k: str(v) for k, v in lineage.airflow_ids(context).items()}
        spec = EvalJobSpec(
            recipe=recipe.name,
            model_name=recipe.model_name,
            model_version=version,
            mlflow_run_id=run_id,
            dataset_repo=recipe.data.dataset_repo,
            dataset_commit=commit,
            dataset_dir=str(self.dataset_dir(recipe, commit)),
            thresholds=dict(ev.thresholds),
            **({"artifact_path": tags["artifact_path"]} if tags.get("artifact_path") else {}),
            limit=ev.limit,
            output_dir=str(out_dir),
            extra_tags=extra_tags,
            tasks=list(ev.tasks),
            extra_tasks=list(ev.extra_tasks),
            task_dirs=list(ev.task_dirs),
            max_gen_tokens=ev.max_gen_tokens,
            baseline=baseline,
            regression=ev.regression,
            safety=ev.safety,
            resources=ev.resources,
        )
        spec_path = out_dir / "spec.json"
        spec_path.write_text(spec.model_dump_json(indent=2))
        env = hook.job_env()
        self.run_job(
            spec_path,
            env,
            [v for k, v in env.items() if k == "MLFLOW_TRACKING_PASSWORD"],
            timeout_s=ev.timeout_minutes * 60,
        )

        result_path = out_dir / "result.json"
        if not result_path.is_file():
            raise AirflowException(f"evaluation job exited without {result_path}; the model is NOT approved")
        result = EvalResult.model_validate_json(result_path.read_text())
        if (result.model_name, result.model_version) != (recipe.model_name, version):
            raise AirflowException(
                f"{result_path} is for {result.model_name} v{result.model_version}, expected v{version}"
            )
        if result.markdown_path and Path(result.markdown_path).is_file():
            self.log.info("evaluation report:\n%s", Path(result.markdown_path).read_text())
        payload = json.loads(result.model_dump_json())
        experiment_id = None
        try:
            experiment_id = client.get_run(result.eval_run_id).info.experiment_id
        except Exception:  # noqa: BLE001 - a link is a convenience, not part of the verdict
            pass
        payload.update(
            {
                lineage.MLFLOW_RUN_ID: run_id,
                "airflow_ids": extra_tags,
                "report_url": report_url(hook.tracking_uri(), experiment_id, result.eval_run_id),
            }
        )
        self.log.info(
            "HTML report: %s%s",
            result.html_path,
            f" (MLflow: {payload['report_url']})" if payload["report_url"] else "",
        )

        if result.verdict != VERDICT_PASSED:
            if "ti" in context:
                context["ti"].xcom_push(key="eval_result", value=payload)
            reasons = "; ".join(f.reason for f in result.failures) or "no passing criteria"
            regressed = [c.metric for c in result.comparisons if c.regressed]
            raise EvalGateFailed(
                f"eval gate FAILED for {recipe.model_name} v{version}: {reasons}. "
                + (
                    f"Regressed vs {ev.regression.baseline_alias} v{result.baseline_version}: {', '.join(regressed)}. "
                    if regressed
                    else ""
                )
                + f"Report: {result.report_path} (HTML {result.html_path}; MLflow run {result.eval_run_id})"
            )

        if self.promote:
            promote(context, client, recipe, payload, self.outlets, self.log)
        elif "ti" in context:  # a person decides next: the approval form shows this
            context["ti"].xcom_push(key="approval_body", value=approval_body(payload))
        return payload


class PromoteApprovedModelOperator(BaseOperator):
    """After a human approved: set the approved alias and emit the ``approved`` asset event.

    :param recipe_path: path of the recipe YAML. (templated)
    :param eval_task_id: the gate task whose XCom ``return_value`` holds the passed result.
    :param mlflow_conn_id: MLflow connection; default: the recipe's ``mlflow_conn_id``.
    """

    template_fields = ("recipe_path",)
    ui_color = "#e6ffe6"

    def __init__(
        self, *, recipe_path: str, eval_task_id: str = "evaluate", mlflow_conn_id: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.recipe_path = recipe_path
        self.eval_task_id = eval_task_id
        self.mlflow_conn_id = mlflow_conn_id

    def execute(self, context) -> dict[str, Any]:
        from llmops_provider.hooks.mlflow import MLflowHook
        from llmops_provider.recipes import load_recipe

        recipe = load_recipe(self.recipe_path)
        payload = context["ti"].xcom_pull(task_ids=self.eval_task_id)
        if not payload or payload.get("verdict") != lineage.VERDICT_PASSED:
            raise AirflowFailException(f"task {self.eval_task_id!r} left no passed result; nothing to promote")
        client = MLflowHook(self.mlflow_conn_id or recipe.mlflow_conn_id).get_client()
        return promote(context, client, recipe, payload, self.outlets, self.log)


def approval_body(payload: Mapping[str, Any]) -> str:
    """Markdown shown in the Airflow approval form: the verdict, every judged metric, the report links."""
    lines = [
        f"**{payload.get('model_name')} v{payload.get('model_version')}** passed the automatic gate "
        f"(baseline: {('v' + str(payload['baseline_version'])) if payload.get('baseline_version') else 'none'}).",
        "",
        "| metric | value | vs baseline |",
        "|---|---|---|",
    ]
    comparisons = {c["metric"]: c for c in payload.get("comparisons", [])}
    for name in sorted(set(payload.get("thresholds", {})) | set(comparisons)):
        value = payload.get("metrics", {}).get(name)
        c = comparisons.get(name)
        vs = f"{c['diff']:+.4g} [{c['ci_low']:+.4g}, {c['ci_high']:+.4g}] {c['verdict']}" if c else ""
        lines.append(f"| {name} | {value if value is None else format(value, '.6g')} | {vs} |")
    lines += ["", f"HTML report: `{payload.get('html_path')}`"]
    if payload.get("report_url"):
        lines.append(f"MLflow run (artifacts: eval/report.html): {payload['report_url']}")
    return "\n".join(lines)
