"""Generate the lifecycle DAGs of one recipe.

    from llmops_provider.dag_factory import build_lifecycle_dags
    dags = build_lifecycle_dags("/opt/airflow/dags/recipes/my-model.yaml")

Five DAGs, linked by Assets whose event extras carry the lineage ids (see lineage.py):

    <name>_data ──dataset──▶ <name>_train ──model──▶ <name>_evaluate ──approved──▶ <name>_deploy
         ▲                                                                          │
         └──────────────retrain◀── <name>_monitor (cron: SLOs via Prometheus, new data)

Operators receive only the recipe *path* and load it when they run, so the serialized DAG stays
small and a recipe edit is picked up by the next run without touching DAG code.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from llmops_provider import lineage
from llmops_provider.compat import (
    DAG,
    Asset,
    AssetOrTimeSchedule,
    CronTriggerTimetable,
    task,
)
from llmops_provider.recipes import Recipe, load_recipe

DEFAULT_ARGS = {
    "retries": 1,
    "retry_delay": dt.timedelta(seconds=30),
}


def assets_for(recipe: Recipe) -> dict[str, Asset]:
    return {
        stage: Asset(uri=lineage.asset_uri(recipe.name, stage), name=f"{recipe.name}.{stage}", group="llmops")
        for stage in lineage.STAGES
    }


def watch_asset(recipe: Recipe) -> Asset:
    """The asset that schedules the monitor DAG, with one AssetWatcher per SLO and one for feedback.

    Without ``monitoring.watchers.enabled`` it has no watchers (nothing polls; the cron runs the monitor).
    """
    from llmops_provider import config, monitoring
    from llmops_provider.compat import AssetWatcher
    from llmops_provider.recipes import expand

    spec = recipe.monitoring
    watchers = []
    if spec.watchers.enabled:
        from llmops_provider.triggers.watchers import FeedbackWatchTrigger, PromQLWatchTrigger

        w = spec.watchers
        for cond in monitoring.watch_conditions(recipe.name, spec.slos, spec.window):
            trigger = PromQLWatchTrigger(
                name=cond["name"],
                query=cond["query"],
                op=cond["op"],
                threshold=cond["threshold"],
                hold_for_s=w.hold_for_s,
                poll_interval_s=w.poll_interval_s,
                rearm_after_s=w.rearm_after_s,
                prometheus_conn_id=spec.prometheus_conn_id,
                recipe=recipe.name,
            )
            watchers.append(AssetWatcher(name=f"{recipe.name}-{cond['name']}", trigger=trigger))
        landing = expand(recipe.data.sources[0].path, config.home())
        feedback_path = expand(spec.feedback.path, config.home()).replace("{recipe}", recipe.name)
        watchers.append(
            AssetWatcher(
                name=f"{recipe.name}-feedback",
                trigger=FeedbackWatchTrigger(
                    path=feedback_path,
                    landed_path=landing,
                    min_records=spec.feedback.min_curated_records,
                    poll_interval_s=max(w.poll_interval_s, 60.0),
                    recipe=recipe.name,
                ),
            )
        )
    return Asset(uri=lineage.watch_uri(recipe.name), name=f"{recipe.name}.watch", group="llmops", watchers=watchers)


def loop_assets(recipe: Recipe) -> dict[str, Asset]:
    """The feedback loop's other next steps: ``llmops://<recipe>/rollback`` and ``/reevaluate``."""
    from llmops_provider.feedback import action_uri

    return {
        action: Asset(uri=action_uri(recipe.name, action), name=f"{recipe.name}.{action}", group="llmops")
        for action in ("rollback", "reevaluate")
    }


def _which_gate(recipe: Recipe):
    """Branch of the evaluate DAG: a ``model`` event (or a manual run) -> ``evaluate``;
    ``reevaluate`` -> ``reevaluate``."""
    from llmops_provider.feedback import action_uri

    model_uri, reevaluate_uri = lineage.asset_uri(recipe.name, "model"), action_uri(recipe.name, "reevaluate")

    @task.branch(task_id="which_gate")
    def which_gate(**context) -> list[str]:
        uris = {getattr(a, "uri", None) for a in list(context.get("triggering_asset_events") or {})}
        chosen = (["evaluate"] if model_uri in uris else []) + (["reevaluate"] if reevaluate_uri in uris else [])
        print(f"triggered by {sorted(u for u in uris if u) or 'hand'}: running {chosen or ['evaluate']}")
        return chosen or ["evaluate"]

    return which_gate()


def _evaluate_tasks(recipe: Recipe, recipe_path: str, approved: Asset) -> None:
    """The gate; with ``evaluation.human_approval.required``: gate >> approval (HITL) >> promote.

    A ``reevaluate`` event (the monitor's) runs ``reevaluate`` instead: the champion re-judged by the
    same gate, recorded, alerted on failure, never demoted (``operators/loop.py``).
    """
    from llmops_provider.operators.evaluation import LMEvalGateOperator, PromoteApprovedModelOperator
    from llmops_provider.operators.loop import ReEvaluateChampionOperator

    ev = recipe.evaluation
    timeout = dt.timedelta(minutes=ev.timeout_minutes + 10)  # the job's own timeout fires first
    route = _which_gate(recipe)
    route >> ReEvaluateChampionOperator(task_id="reevaluate", recipe_path=recipe_path, execution_timeout=timeout)
    if not ev.human_approval.required:
        route >> LMEvalGateOperator(
            task_id="evaluate", recipe_path=recipe_path, outlets=[approved], execution_timeout=timeout
        )
        return
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    gate = LMEvalGateOperator(task_id="evaluate", recipe_path=recipe_path, promote=False, execution_timeout=timeout)
    hours = ev.human_approval.timeout_hours
    approve = ApprovalOperator(
        task_id="approve",
        subject=f"Promote {recipe.model_name} v{{{{ ti.xcom_pull(task_ids='evaluate')['model_version'] }}}} "
        f"to `{ev.approved_alias}`?",
        body="{{ ti.xcom_pull(task_ids='evaluate', key='approval_body') }}",
        response_timeout=dt.timedelta(hours=hours) if hours else None,
        **(
            {"assigned_users": [{"id": u, "name": u} for u in ev.human_approval.assigned_users]}
            if ev.human_approval.assigned_users
            else {}
        ),
    )
    promote = PromoteApprovedModelOperator(task_id="promote", recipe_path=recipe_path, outlets=[approved])
    route >> gate >> approve >> promote


def _cron(expr: str) -> CronTriggerTimetable:
    # run_immediately=False: unpausing a DAG must not start a run by itself
    return CronTriggerTimetable(expr, timezone="UTC")


def build_lifecycle_dags(recipe_path: str | Path) -> dict[str, DAG]:
    """Build the data/train/evaluate/deploy/monitor DAGs for ``recipe_path``.

    Raises ``RecipeError`` (file, field, fix) when the recipe is invalid.
    """
    # Imported here so an invalid recipe is reported before any operator module loads.
    from llmops_provider.operators.data import (
        CommitDatasetOperator,
        SparkPrepareDataOperator,
        ValidateDatasetOperator,
    )
    from llmops_provider.operators.deployment import VLLMDeployOperator
    from llmops_provider.operators.monitoring import MonitorOperator
    from llmops_provider.operators.training import DeepSpeedTrainOperator

    recipe_path = str(Path(recipe_path).resolve())
    recipe = load_recipe(recipe_path)
    assets = assets_for(recipe)
    name = recipe.name
    common = {
        "start_date": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        "catchup": False,
        "max_active_runs": 1,  # one run per stage at a time: no retrain storms, no racing deploys
        "default_args": {**DEFAULT_ARGS, "owner": recipe.owner},
        "tags": ["llmops", name],
        "params": {},
    }
    dags: dict[str, DAG] = {}

    data_schedule = (
        AssetOrTimeSchedule(timetable=_cron(recipe.schedule.data_refresh), assets=assets["retrain"])
        if recipe.schedule.data_refresh
        else [assets["retrain"]]
    )
    with DAG(
        f"{name}_data",
        schedule=data_schedule,
        description=f"{name}: Spark data prep -> Great Expectations -> dataset commit",
        doc_md=f"Data stage of recipe `{recipe_path}`. Emits `{assets['dataset'].uri}` with the dataset commit id.",
        **common,
    ) as data_dag:
        prepare = SparkPrepareDataOperator(task_id="prepare", recipe_path=recipe_path)
        validate = ValidateDatasetOperator(
            task_id="validate",
            recipe_path=recipe_path,
            staging_dir="{{ ti.xcom_pull(task_ids='prepare')['staging_dir'] }}",
        )
        commit = CommitDatasetOperator(
            task_id="commit",
            recipe_path=recipe_path,
            staging_dir="{{ ti.xcom_pull(task_ids='prepare')['staging_dir'] }}",
        )

        # Publish (and so retrain) only a new dataset version, or one this recipe has not trained on
        # yet (the recipe changed): unchanged inputs must not re-run train/evaluate/deploy.
        @task.short_circuit(task_id="needs_training")
        def needs_training(result: dict) -> bool:
            from llmops_provider.operators.training import trained_version

            if result.get("created"):
                return True
            version = trained_version(recipe_path, result["dataset_commit"])
            print(
                f"dataset {result['dataset_commit'][:12]} unchanged; trained with this recipe: "
                f"{'model version ' + version if version else 'not yet'}"
            )
            return version is None

        @task(task_id="publish", outlets=[assets["dataset"]])
        def publish(result: dict, **context) -> dict:
            stats = result.get("stats") or {}
            extra = {
                lineage.DATASET_REPO: result["dataset_repo"],
                lineage.DATASET_COMMIT: result["dataset_commit"],
                lineage.DATASET_BRANCH: result["branch"],
                lineage.RECIPE_NAME: name,
                "kept": stats.get("kept"),
                "quarantined": stats.get("quarantined"),
                "duplicates_removed": stats.get("duplicates_removed"),
                **lineage.airflow_ids(context),
            }
            context["outlet_events"][assets["dataset"]].extra = extra
            return extra

        prepare >> validate >> commit
        needs_training(commit.output) >> publish(commit.output)
    dags[data_dag.dag_id] = data_dag

    with DAG(
        f"{name}_train",
        schedule=[assets["dataset"]],
        description=f"{name}: tokenizer + DeepSpeed/PEFT training, tracked and registered in MLflow",
        doc_md="Runs on each new dataset commit, or manually (trains on the branch head).",
        **common,
    ) as train_dag:
        DeepSpeedTrainOperator(
            task_id="train",
            recipe_path=recipe_path,
            outlets=[assets["model"]],
            execution_timeout=dt.timedelta(hours=12),
        )
    dags[train_dag.dag_id] = train_dag

    loop = loop_assets(recipe)
    with DAG(
        f"{name}_evaluate",
        schedule=(assets["model"] | loop["reevaluate"]),  # a new version, or the monitor re-judging the champion
        description=f"{name}: lm-eval tasks, safety suite and champion comparison, gated by the recipe's policy",
        doc_md="Publishes the full report (MLflow eval run, `eval/report.html`), then passes (alias "
        f"`{recipe.evaluation.approved_alias}`, the approved asset) or fails closed."
        + (
            " A person approves in the Airflow UI before promotion."
            if recipe.evaluation.human_approval.required
            else ""
        ),
        **{**common, "default_args": {**common["default_args"], "retries": 0}},
    ) as eval_dag:
        _evaluate_tasks(recipe, recipe_path, assets["approved"])
    dags[eval_dag.dag_id] = eval_dag

    with DAG(
        f"{name}_deploy",
        schedule=[assets["approved"]],
        description=f"{name}: serve the approved model with vLLM behind the router; replace, canary or A/B "
        "rollout (analysis on vLLM's series, automatic rollback); champion",
        doc_md="Rollout strategy, steps and bounds: `deployment.rollout` of the recipe; see docs/deployment.md.",
        **common,
    ) as deploy_dag:
        VLLMDeployOperator(task_id="deploy", recipe_path=recipe_path, outlets=[assets["deployment"]])
    dags[deploy_dag.dag_id] = deploy_dag

    monitor_schedule = _cron(recipe.schedule.monitor) if recipe.schedule.monitor else None
    if recipe.monitoring.watchers.enabled:  # a watcher event runs the monitor at once, between cron ticks
        watch = watch_asset(recipe)
        monitor_schedule = (
            AssetOrTimeSchedule(timetable=monitor_schedule, assets=watch) if monitor_schedule else [watch]
        )
    with DAG(
        f"{name}_monitor",
        schedule=monitor_schedule,
        description=f"{name}: SLOs from Prometheus and new data; requests retraining when needed",
        **{**common, "default_args": {**common["default_args"], "retries": 0}},
    ) as monitor_dag:
        probe_on = recipe.monitoring.probe.enabled
        check = MonitorOperator(
            task_id="check",
            recipe_path=recipe_path,
            probe_task_id="probe" if probe_on else None,
            trigger_rule="all_done",
        )  # a failed probe must not stop the check

        @task(task_id="request_retrain", outlets=[assets["retrain"]])
        def request_retrain(result: dict, **context) -> dict:
            extra = {
                lineage.RETRAIN_REASON: "; ".join(result.get("reasons", [])) or "unspecified",
                **lineage.airflow_ids(context),
            }
            context["outlet_events"][assets["retrain"]].extra = extra
            return extra

        result = check.output
        _loop_gate(name, "retrain", [f"{name}_data"])(result) >> request_retrain(result)
        # rollback: not while a deploy or another rollback moves traffic; re-evaluation: not while a
        # new version is on its way (it is evaluated on the newest data anyway)
        _loop_gate(name, "rollback", [f"{name}_deploy", f"{name}_rollback"])(result) >> _loop_request(
            name, "rollback", loop["rollback"]
        )(result)
        _loop_gate(name, "reevaluate", [f"{name}_{s}" for s in ("data", "train", "evaluate", "deploy")])(
            result
        ) >> _loop_request(name, "reevaluate", loop["reevaluate"])(result)
        if probe_on:
            from llmops_provider.operators.monitoring import ProbeEvalOperator

            ProbeEvalOperator(task_id="probe", recipe_path=recipe_path) >> check
        if recipe.monitoring.cost.enabled:
            from llmops_provider.operators.monitoring import CostReportOperator

            CostReportOperator(task_id="cost", recipe_path=recipe_path)
    dags[monitor_dag.dag_id] = monitor_dag

    from llmops_provider.operators.loop import RollbackOperator

    with DAG(
        f"{name}_rollback",
        schedule=[loop["rollback"]],
        description=f"{name}: roll a regressed champion back to the previous one (traffic, alias, tags, record)",
        doc_md="Scheduled by the monitor's `rollback` asset (an SLO or probe breach soon after a promotion); "
        "a manual run rolls the champion back to the previous champion named in the deployment record. "
        "See docs/monitoring.md.",
        **{**common, "default_args": {**common["default_args"], "retries": 0}},
    ) as rollback_dag:
        RollbackOperator(task_id="rollback", recipe_path=recipe_path, outlets=[assets["deployment"]])
    dags[rollback_dag.dag_id] = rollback_dag
    return dags


def _loop_gate(name: str, action: str, guard_dag_ids: list[str]):
    """``needs_<action>``: the incident gate of one loop action (short-circuit).

    Concurrency guard first (a run of ``guard_dag_ids`` queued or running takes the request), then
    :func:`~llmops_provider.feedback.gate_monitor_result`: de-duplication and cool-down per action,
    state in the Airflow Variable ``llmops.<recipe>.<action>_gate``.
    """

    @task.short_circuit(task_id=f"needs_{action}")
    def needs(result: dict, **context) -> bool:
        import json
        import time

        from llmops_provider import feedback
        from llmops_provider.compat import Variable

        if not result:
            return False
        # one incident, one run: a run already queued or running takes the request; what it did not
        # handle is still "new" at the next check
        if result.get(action):
            for dag_id in guard_dag_ids:
                in_flight = context["ti"].get_dr_count(dag_id=dag_id, states=["queued", "running"])
                if in_flight:
                    print(f"{in_flight} {dag_id} run(s) already queued or running: not requesting a {action}")
                    return False
        # and a persisting incident (or a second one within the cool-down) asks only once
        key = feedback.gate_variable(name, action)
        state = json.loads(Variable.get(key, default=None) or "{}")
        allow, state, why = feedback.gate_monitor_result(result, state, time.time(), action)
        Variable.set(key, json.dumps(state))
        print(f"{action} gate: {why}")
        return allow

    return needs


def _loop_request(name: str, action: str, asset: Asset):
    """``request_<action>``: emit the action's asset event with the reasons and the evidence in its extra."""

    @task(task_id=f"request_{action}", outlets=[asset])
    def request(result: dict, **context) -> dict:
        entry = (result.get("actions") or {}).get(action) or {}
        evidence = entry.get("evidence") or {}
        extra = {
            f"{action}_reason": "; ".join(entry.get("reasons") or []) or "unspecified",
            "incidents": entry.get("incidents") or {},
            "evidence": evidence,
            lineage.RECIPE_NAME: name,
            lineage.MODEL_VERSION: evidence.get("from_version") or evidence.get("model_version"),
            **lineage.airflow_ids(context),
        }
        print(f"requesting a {action}: {extra[f'{action}_reason']}")
        context["outlet_events"][asset].extra = extra
        return extra

    return request
