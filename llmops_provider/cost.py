"""Cost: device-hours per DAG run and per model version, priced from the recipe, and per day.

Where the hours come from:

* training, evaluation, deployment: the MLflow runs each stage records, tagged with the Airflow
  dag and run ids (``lineage.airflow_ids``); duration x the devices the recipe gives that stage
  (training: ``training.kubernetes.gpus`` x ``num_nodes`` on a GPU backend, else
  ``training.world_size`` CPU ranks);
* serving: Prometheus, the minutes in the day each replica exported vLLM series (a 1-minute
  subquery, so it does not depend on the scrape interval), x ``monitoring.cost.serving_gpus``
  (or ``serving_cpus``); tokens served are vLLM's own prompt + generation counters.

Pure functions here; ``operators.monitoring.CostReportOperator`` does the I/O.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

STAGES = {"_train": "training", "_evaluate": "evaluation", "_deploy": "deployment"}


def stage_of(dag_id: str | None) -> str | None:
    for suffix, stage in STAGES.items():
        if dag_id and dag_id.endswith(suffix):
            return stage
    return None


def stage_devices(recipe, stage: str) -> tuple[float, str]:
    """(devices, kind) a stage holds while it runs; kind is ``gpu`` or ``cpu``."""
    spec = recipe.monitoring.cost
    if stage == "training":
        k8s = recipe.training.kubernetes
        if recipe.training.backend in ("kubernetes", "kubeflow") and k8s.gpus:
            return float(k8s.gpus * k8s.num_nodes), "gpu"
        return float(recipe.training.world_size), "cpu"
    if stage == "serving":
        return (float(spec.serving_gpus), "gpu") if spec.serving_gpus else (float(spec.serving_cpus), "cpu")
    return (float(spec.job_gpus), "gpu") if spec.job_gpus else (float(spec.job_cpus), "cpu")


def price(hours: float, devices: float, kind: str, spec) -> dict[str, float]:
    device_hours = hours * devices
    rate = spec.gpu_hour_usd if kind == "gpu" else spec.cpu_hour_usd
    return {"hours": hours, f"{kind}_hours": device_hours, "usd": device_hours * rate}


def _add(total: dict[str, float], part: dict[str, float]) -> None:
    for key, value in part.items():
        total[key] = total.get(key, 0.0) + value


def job_costs(runs: Iterable[dict[str, Any]], recipe) -> dict[str, Any]:
    """Price MLflow runs ``{run_id, dag_id, airflow_run_id, model_version, start, end}`` (epoch seconds).

    Returns ``{by_dag_run: {"<dag_id>/<run_id>": {...}}, by_model_version: {...}, by_stage: {...}}``.
    """
    by_run: dict[str, dict[str, Any]] = {}
    by_version: dict[str, dict[str, float]] = defaultdict(dict)
    by_stage: dict[str, dict[str, float]] = defaultdict(dict)
    for run in runs:
        stage = stage_of(run.get("dag_id"))
        if stage is None or run.get("end") is None:
            continue  # not a lifecycle job, or still running (priced once it ends)
        hours = max(0.0, float(run["end"]) - float(run["start"])) / 3600
        devices, kind = stage_devices(recipe, stage)
        part = price(hours, devices, kind, recipe.monitoring.cost)
        key = f"{run['dag_id']}/{run.get('airflow_run_id') or run['run_id']}"
        entry = by_run.setdefault(key, {"stage": stage, "model_version": run.get("model_version"), "mlflow_runs": []})
        entry["mlflow_runs"].append(run["run_id"])
        _add(entry, part)
        _add(by_stage[stage], part)
        if run.get("model_version"):
            _add(by_version[str(run["model_version"])], part)
    return {"by_dag_run": by_run, "by_model_version": dict(by_version), "by_stage": dict(by_stage)}


def serving_costs(replica_minutes: dict[str, float], tokens: dict[str, float], recipe) -> dict[str, Any]:
    """Price serving per model version: replica-minutes and tokens served (keys: model version)."""
    devices, kind = stage_devices(recipe, "serving")
    out: dict[str, Any] = {}
    for version in sorted(set(replica_minutes) | set(tokens)):
        part = price(replica_minutes.get(version, 0.0) / 60, devices, kind, recipe.monitoring.cost)
        served = tokens.get(version, 0.0)
        part["tokens"] = served
        part["tokens_per_usd"] = served / part["usd"] if part["usd"] > 0 else None
        out[version] = part
    return out


def daily_record(day: dt.date, jobs: dict[str, Any], serving: dict[str, Any], recipe) -> dict[str, Any]:
    """One day's record: jobs and serving, totals, and tokens served per dollar."""
    total: dict[str, float] = {}
    for part in jobs["by_stage"].values():
        _add(total, {k: v for k, v in part.items() if k != "hours"})
    serving_total: dict[str, float] = {}
    for part in serving.values():
        _add(serving_total, {k: v for k, v in part.items() if k in ("gpu_hours", "cpu_hours", "usd", "tokens")})
    _add(total, {k: v for k, v in serving_total.items() if k != "tokens"})
    tokens = serving_total.get("tokens", 0.0)
    return {
        "recipe": recipe.name,
        "day": day.isoformat(),
        "prices": recipe.monitoring.cost.model_dump(),
        "jobs": jobs,
        "serving": serving,
        "total": total,
        "tokens_served": tokens,
        "tokens_per_usd": tokens / total["usd"] if total.get("usd") else None,
    }
