"""Evaluation gate: lm-eval on the held-out split, thresholds from the recipe, fail closed.

The gate publishes first (report files, MLflow eval run, model-version tags, task log) and
decides second: it emits the recipe's ``approved`` asset event only on a pass, and raises
:class:`EvalGateFailed` otherwise. A job crash or a missing result never approves.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmops_provider import config, lineage
from llmops_provider.backends.local import LocalJobMixin
from llmops_provider.compat import AirflowException, AirflowFailException, BaseOperator
from llmops_provider.lineage import emit_outlet_extra, triggering_extra  # noqa: F401 - re-exported

CHALLENGER_ALIAS = "challenger"


class EvalGateFailed(AirflowFailException):
    """The model version did not meet the recipe's thresholds (the report is already published)."""


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
        raise AirflowFailException(f"{field}={value!r} is not a model version number; pass e.g. model_version='3' or leave it empty")
    return text


class LMEvalGateOperator(LocalJobMixin, BaseOperator):
    """Evaluate a registered model version and gate it on the recipe's thresholds.

    :param recipe_path: path of the recipe YAML (loaded in ``execute``). (templated)
    :param model_version: registry version to evaluate; empty: the triggering ``model`` asset
        event's ``model_version``, else the version with alias ``challenger``. (templated)
    :param mlflow_conn_id: MLflow connection; default: the recipe's ``mlflow_conn_id``.
    """

    template_fields = ("recipe_path", "model_version")
    ui_color = "#f3e6ff"

    def __init__(self, *, recipe_path: str, model_version: str | int | None = None,
                 mlflow_conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.recipe_path = recipe_path
        self.model_version = model_version
        self.mlflow_conn_id = mlflow_conn_id

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

    def run_job(self, spec_path: Path, env: dict[str, str], secrets: list[str]) -> None:
        backend_name = config.get("compute_backend")
        if backend_name != "local":
            self.log.warning("[llmops] compute_backend=%s: the eval gate runs as a local process", backend_name)
        cmd = [config.get("runtime_python"), "-m", "llmops_provider.runtime.evaluate", "--spec", str(spec_path)]
        self.run_local_job(cmd, env, "evaluation job crashed; the model is NOT approved.", secrets=secrets)

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
        self.log.info("evaluating %s v%s (chosen by %s), run %s, dataset %s@%s",
                      recipe.model_name, version, how, run_id, recipe.data.dataset_repo, commit)

        stamp = time.strftime("%Y%m%dT%H%M%S")
        out_dir = config.home() / "evaluations" / recipe.name / f"v{version}" / stamp
        out_dir.mkdir(parents=True, exist_ok=True)
        extra_tags = {}
        if "ti" in context:
            extra_tags = {k: str(v) for k, v in lineage.airflow_ids(context).items()}
        spec = EvalJobSpec(
            recipe=recipe.name, model_name=recipe.model_name, model_version=version, mlflow_run_id=run_id,
            dataset_repo=recipe.data.dataset_repo, dataset_commit=commit,
            dataset_dir=str(self.dataset_dir(recipe, commit)), thresholds=dict(recipe.evaluation.thresholds),
            **({"artifact_path": tags["artifact_path"]} if tags.get("artifact_path") else {}),
            limit=recipe.evaluation.limit, output_dir=str(out_dir), extra_tags=extra_tags,
        )
        spec_path = out_dir / "spec.json"
        spec_path.write_text(spec.model_dump_json(indent=2))
        env = hook.job_env()
        self.run_job(spec_path, env, [v for k, v in env.items() if k == "MLFLOW_TRACKING_PASSWORD"])

        result_path = out_dir / "result.json"
        if not result_path.is_file():
            raise AirflowException(f"evaluation job exited without {result_path}; the model is NOT approved")
        result = EvalResult.model_validate_json(result_path.read_text())
        if (result.model_name, result.model_version) != (recipe.model_name, version):
            raise AirflowException(f"{result_path} is for {result.model_name} v{result.model_version}, expected v{version}")
        if result.markdown_path and Path(result.markdown_path).is_file():
            self.log.info("evaluation report:\n%s", Path(result.markdown_path).read_text())
        payload = json.loads(result.model_dump_json())

        if result.verdict != VERDICT_PASSED:
            if "ti" in context:
                context["ti"].xcom_push(key="eval_result", value=payload)
            reasons = "; ".join(f.reason for f in result.failures) or "no passing criteria"
            raise EvalGateFailed(
                f"eval gate FAILED for {recipe.model_name} v{version}: {reasons}. "
                f"Report: {result.report_path} (MLflow run {result.eval_run_id})"
            )

        extra = {
            lineage.MODEL_NAME: recipe.model_name,
            lineage.MODEL_VERSION: version,
            lineage.MLFLOW_RUN_ID: run_id,
            lineage.DATASET_REPO: recipe.data.dataset_repo,
            lineage.DATASET_COMMIT: commit,
            lineage.EVAL_RUN_ID: result.eval_run_id,
            lineage.EVAL_VERDICT: result.verdict,
            lineage.EVAL_REPORT: result.report_path,
            **extra_tags,
        }
        emit_outlet_extra(context, self.outlets, lineage.asset_uri(recipe.name, "approved"), extra, self.log)
        return payload
