"""The LLMOps view in the Airflow UI: one page per platform showing each recipe's lineage.

dataset commit -> training run -> model version -> eval verdict -> serving endpoint, read from
the dataset store and the deployment records the deploy stage writes. Served by the Airflow
api-server through plugins/llmops_plugin.py (a FastAPI app under /llmops).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from llmops_provider import config, lineage
from llmops_provider.recipe_discovery import discover, recipes_dir

DEFAULT_RECIPES = Path(__file__).resolve().parents[1] / "dags" / "recipes"


def lineage_rows() -> list[dict]:
    from llmops_provider.datasets import get_store

    valid, invalid = discover(recipes_dir(DEFAULT_RECIPES))
    rows = []
    from llmops_provider.recipes import load_recipe

    for path in valid:
        recipe = load_recipe(path)
        row: dict = {"recipe": recipe.name, "file": str(path), "error": None}
        try:
            head = get_store().head(recipe.data.dataset_repo, recipe.data.branch)
            row["dataset"] = {"repo": recipe.data.dataset_repo, "branch": recipe.data.branch,
                              "commit": head.commit_id if head else None}
        except Exception as exc:  # noqa: BLE001 - shown on the page, never breaks it
            row["dataset"] = {"error": str(exc)}
        record = config.home() / "deployments" / f"{recipe.name}.json"
        row["deployment"] = json.loads(record.read_text()) if record.exists() else None
        rows.append(row)
    for path, message in invalid.items():
        rows.append({"recipe": path.stem, "file": str(path), "error": message})
    return rows


def _cell(value) -> str:
    return html.escape("" if value is None else str(value))


def render(rows: list[dict]) -> str:
    body = []
    for row in rows:
        if row.get("error"):
            body.append(f"<tr><td>{_cell(row['recipe'])}</td><td colspan=6><pre class=err>{_cell(row['error'])}</pre></td></tr>")
            continue
        dep = row.get("deployment") or {}
        ds = row.get("dataset") or {}
        serving = f"{dep.get(lineage.MODEL_NAME)} v{dep.get(lineage.MODEL_VERSION)}" if dep else None
        body.append(
            "<tr>"
            f"<td>{_cell(row['recipe'])}</td>"
            f"<td>{_cell(ds.get('repo'))}@{_cell((ds.get('commit') or '')[:12])}</td>"
            f"<td>{_cell(serving)}</td>"
            f"<td>{_cell((dep.get(lineage.DATASET_COMMIT) or '')[:12])}</td>"
            f"<td>{_cell(dep.get(lineage.MLFLOW_RUN_ID))}</td>"
            f"<td>{_cell(dep.get(lineage.EVAL_RUN_ID))}</td>"
            f"<td>{_cell(dep.get(lineage.ENDPOINT))}</td>"
            "</tr>"
        )
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>LLMOps lineage</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{border:1px solid #ccc;padding:.4em}"
        "table{border-collapse:collapse}.err{color:#b00;white-space:pre-wrap}</style></head><body>"
        "<h1>LLMOps lineage</h1><p>dataset commit &rarr; training run &rarr; model version &rarr; eval &rarr; endpoint</p>"
        "<table><tr><th>recipe</th><th>dataset head</th><th>serving model</th><th>trained on commit</th>"
        "<th>training run</th><th>eval run</th><th>endpoint</th></tr>" + "".join(body) + "</table></body></html>"
    )


def create_app() -> FastAPI:
    app = FastAPI(title="LLMOps", description="Lineage of every recipe's serving model")

    @app.get("/api/lineage")
    def api_lineage() -> list[dict]:
        return lineage_rows()

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return render(lineage_rows())

    return app
