"""Surface invalid recipes as an Airflow import error naming the file, the field and the fix.

This file defines no DAG (the word "DAG" appears so the safe-mode parser reads it). The DAGs of
valid recipes come from dags/lifecycle.py and keep running while a broken recipe is fixed.
"""

from __future__ import annotations

from pathlib import Path

from llmops_provider.recipe_discovery import discover, recipes_dir
from llmops_provider.recipes import RecipeError

_valid, _invalid = discover(recipes_dir(Path(__file__).parent / "recipes"))
if _invalid:
    raise RecipeError("\n\n".join(_invalid.values()))
