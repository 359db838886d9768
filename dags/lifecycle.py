"""The reference lifecycle DAGs: five DAGs per recipe in dags/recipes/*.yaml.

Invalid recipes are skipped here (so one typo never hides the other recipes' DAGs) and reported
as an Airflow import error by dags/recipe_errors.py.
"""

from __future__ import annotations

from pathlib import Path

from llmops_provider.dag_factory import build_lifecycle_dags
from llmops_provider.recipe_discovery import discover, recipes_dir

_valid, _invalid = discover(recipes_dir(Path(__file__).parent / "recipes"))
for _path in _valid:
    for _dag_id, _dag in build_lifecycle_dags(_path).items():
        globals()[_dag_id] = _dag
