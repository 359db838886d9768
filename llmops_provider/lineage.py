"""Asset URIs and lineage keys: the spine that links every stage to the one before.

dataset commit -> MLflow run -> model version -> eval report -> deployment -> monitor -> retrain.
Each stage puts the ids below into its Asset event extra (and MLflow tags / commit metadata),
so a serving model can be traced back to the dataset commit it was trained on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

# keys used in Asset event extras, MLflow tags and commit metadata
DATASET_REPO = "dataset_repo"
DATASET_COMMIT = "dataset_commit"
DATASET_BRANCH = "dataset_branch"
RECIPE_NAME = "recipe"
RECIPE_FINGERPRINT = "recipe_fingerprint"
MLFLOW_RUN_ID = "mlflow_run_id"
MODEL_NAME = "model_name"
MODEL_VERSION = "model_version"
EVAL_RUN_ID = "eval_run_id"
EVAL_VERDICT = "eval_verdict"
# the values of EVAL_VERDICT: the eval gate's verdict (report, tags, asset extras)
VERDICT_PASSED: Final = "passed"
VERDICT_FAILED: Final = "failed"
EVAL_REPORT = "eval_report"
ENDPOINT = "endpoint"
RETRAIN_REASON = "retrain_reason"
AIRFLOW_DAG_ID = "airflow_dag_id"
AIRFLOW_RUN_ID = "airflow_run_id"
AIRFLOW_TRY = "airflow_try_number"

SOURCE_FINGERPRINT = "source_fingerprint"

# registry alias set on every newly trained version; the evaluation gate promotes it
CHALLENGER_ALIAS = "challenger"


def processed_sources_variable(recipe_name: str) -> str:
    """Airflow Variable holding the fingerprint of the raw sources the last data run processed.

    Kept outside the (content-addressed) dataset store because a data run over new files that
    change nothing (e.g. only duplicates) makes no commit, yet must count as processed, or the
    monitor would request the same retrain forever.
    """
    return f"llmops.{recipe_name}.processed_source_fingerprint"


# the DAGs the factory generates per recipe: ``<recipe>_<stage>``
STAGE_DAGS = ("data", "train", "evaluate", "deploy", "monitor", "rollback")


def recipe_dag_ids(recipe_name: str) -> set[str]:
    """The ids of the DAGs generated for a recipe (who may read them may see its lineage)."""
    return {f"{recipe_name}_{stage}" for stage in STAGE_DAGS}


STAGES = ("dataset", "model", "approved", "deployment", "retrain")


def asset_uri(recipe_name: str, stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    return f"llmops://{recipe_name}/{stage}"


def watch_uri(recipe_name: str) -> str:
    """The asset the recipe's metric and feedback watchers (AssetWatchers) emit to; it schedules the monitor DAG."""
    return f"llmops://{recipe_name}/watch"


def airflow_ids(context) -> dict[str, str]:
    """The Airflow identity of the running task, for commit metadata and MLflow tags."""
    ti = context["ti"]
    return {AIRFLOW_DAG_ID: ti.dag_id, AIRFLOW_RUN_ID: ti.run_id, AIRFLOW_TRY: str(ti.try_number)}


def triggering_extra(context: Mapping[str, Any], uri: str) -> dict[str, Any]:
    """Extra of the newest triggering event of the asset ``uri``; ``{}`` for a manual run."""
    events = context.get("triggering_asset_events") or {}
    found: list[Any] = []
    for asset in list(events):
        if getattr(asset, "uri", None) == uri:
            found.extend(events[asset])
    for event in reversed(found):  # the accessor lists events oldest first
        extra = getattr(event, "extra", None) or {}
        if extra:
            return dict(extra)
    return {}


def emit_outlet_extra(context: Mapping[str, Any], outlets: Iterable[Any], uri: str, extra: dict[str, Any], log) -> bool:
    """Attach ``extra`` to this task's outlet event for ``uri``; False if the task lacks that outlet."""
    target = next((o for o in outlets or () if getattr(o, "uri", None) == uri), None)
    if target is None:
        log.warning("task has no outlet %s: no asset event carries the lineage %s", uri, extra)
        return False
    context["outlet_events"][target].extra.update(extra)
    return True
