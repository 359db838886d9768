"""The ``[llmops]`` config section, readable with or without Airflow.

Inside Airflow the values come from ``airflow.cfg`` / ``AIRFLOW__LLMOPS__*``; inside a job
runtime (no Airflow installed) the same environment variables are read directly.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULTS = {
    "home": "~/llmops",
    "compute_backend": "local",
    "serving_backend": "local",
    "dataset_store": "local",
    "runtime_python": "python3",
    "recipes_dir": "",
    "kubernetes_namespace": "default",
    "runtime_image": "llmops-runtime:latest",
}


def get(key: str) -> str:
    """Return ``[llmops] key``: env var first, then Airflow config, then the default."""
    env = os.environ.get(f"AIRFLOW__LLMOPS__{key.upper()}")
    if env is not None:
        return env
    try:
        from airflow.configuration import conf  # light: already imported by any DAG
    except ImportError:
        return DEFAULTS[key]
    return conf.get("llmops", key, fallback=DEFAULTS[key])


def home() -> Path:
    path = Path(os.path.expanduser(get("home"))).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def deployment_record(recipe_name: str) -> Path:
    """The deployment record the deploy stage writes for a recipe (read by the monitor, rollback and UI)."""
    return home() / "deployments" / f"{recipe_name}.json"


def run_dir() -> Path:
    """Pid files of long-running processes the platform starts (the stop command reads them)."""
    path = home() / "run"
    path.mkdir(parents=True, exist_ok=True)
    return path
