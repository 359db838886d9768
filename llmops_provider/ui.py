"""The LLMOps view in the Airflow UI: one page per platform showing each recipe's lineage.

dataset commit -> training run -> model version -> eval verdict -> serving endpoint, read from
the dataset store and the deployment records the deploy stage writes. Served by the Airflow
api-server through plugins/llmops_plugin.py (a FastAPI app under /llmops).

Airflow does not put its authentication in front of a plugin's app, so every route here asks
the api-server's own auth manager ([core] auth_manager: simple, FAB, Keycloak, ...):

- who is asking: the core API's ``get_user`` dependency (a JWT as ``Authorization: Bearer`` from
  ``POST /auth/token``, or the UI session's cookie). None or expired: 401 for the JSON route,
  a redirect to the auth manager's login page (back here after it) for the page;
- what they may see: a recipe only when the auth manager lets them read every DAG generated for
  it (``<recipe>_data`` ... ``<recipe>_rollback``); the messages of invalid recipes, which belong
  to no DAG, only to users who may read import errors and all DAGs (as Airflow's own import
  errors endpoint does for files without a readable DAG).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from llmops_provider import compat, config, lineage
from llmops_provider.recipe_discovery import discover, recipes_dir

DEFAULT_RECIPES = Path(__file__).resolve().parents[1] / "dags" / "recipes"


class Access:
    """What one authenticated user may see, as the configured auth manager answers it."""

    def __init__(self, user: Any, manager: Any) -> None:
        self.user, self.manager = user, manager

    def readable(self, recipe_names: list[str]) -> set[str]:
        """The recipes whose every DAG the user may read (one batched question to the auth manager)."""
        wanted = {name: lineage.recipe_dag_ids(name) for name in recipe_names}
        if not wanted:
            return set()
        allowed = self.manager.filter_authorized_dag_ids(
            dag_ids=set().union(*wanted.values()), user=self.user, method="GET"
        )
        return {name for name, ids in wanted.items() if ids <= allowed}

    def sees_import_errors(self) -> bool:
        return self.manager.is_authorized_view(access_view=compat.import_errors_view(), user=self.user) and (
            self.manager.is_authorized_dag(method="GET", user=self.user)
        )


def lineage_rows(access: Access) -> list[dict]:
    """One row per recipe ``access`` may see; nothing is read for the others."""
    from llmops_provider.datasets import get_store
    from llmops_provider.recipes import load_recipe

    valid, invalid = discover(recipes_dir(DEFAULT_RECIPES))
    recipes = [load_recipe(path) for path in valid]
    readable = access.readable([r.name for r in recipes])
    rows = []
    for path, recipe in zip(valid, recipes, strict=True):
        if recipe.name not in readable:
            continue
        row: dict = {"recipe": recipe.name, "file": str(path), "error": None}
        try:
            head = get_store().head(recipe.data.dataset_repo, recipe.data.branch)
            row["dataset"] = {
                "repo": recipe.data.dataset_repo,
                "branch": recipe.data.branch,
                "commit": head.commit_id if head else None,
            }
        except Exception as exc:  # noqa: BLE001 - shown on the page, never breaks it
            row["dataset"] = {"error": str(exc)}
        record = config.deployment_record(recipe.name)
        row["deployment"] = json.loads(record.read_text()) if record.exists() else None
        rows.append(row)
    if invalid and access.sees_import_errors():
        for path, message in invalid.items():
            rows.append({"recipe": path.stem, "file": str(path), "error": message})
    return rows


def _cell(value) -> str:
    return html.escape("" if value is None else str(value))


def render(rows: list[dict]) -> str:
    body = []
    for row in rows:
        if row.get("error"):
            body.append(
                f"<tr><td>{_cell(row['recipe'])}</td><td colspan=6><pre class=err>{_cell(row['error'])}</pre></td></tr>"
            )
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
    if not body:
        body.append("<tr><td colspan=7>No recipe whose DAGs you may read.</td></tr>")
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>LLMOps lineage</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{border:1px solid #ccc;padding:.4em}"
        "table{border-collapse:collapse}.err{color:#b00;white-space:pre-wrap}</style></head><body>"
        "<h1>LLMOps lineage</h1>"
        "<p>dataset commit &rarr; training run &rarr; model version &rarr; eval &rarr; endpoint</p>"
        "<table><tr><th>recipe</th><th>dataset head</th><th>serving model</th><th>trained on commit</th>"
        "<th>training run</th><th>eval run</th><th>endpoint</th></tr>" + "".join(body) + "</table></body></html>"
    )


async def _access(request: Request) -> Access:
    """The request's user (401/403 from Airflow's own dependency) and the auth manager to ask."""
    return Access(await compat.airflow_user(request), compat.auth_manager())


def _login_redirect(request: Request) -> RedirectResponse:
    """To the auth manager's login page, back to this page after it."""
    return RedirectResponse(compat.auth_manager().get_url_login(next_url=str(request.url)), status_code=307)


def create_app() -> FastAPI:
    # no /docs, /redoc or /openapi.json: every route of this app checks the caller
    app = FastAPI(
        title="LLMOps",
        description="Lineage of every recipe's serving model",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    @app.get("/api/lineage")
    async def api_lineage(request: Request) -> list[dict]:
        return await run_in_threadpool(lineage_rows, await _access(request))

    @app.get("/", response_class=HTMLResponse)
    async def page(request: Request):
        try:
            access = await _access(request)
        except HTTPException as exc:
            if exc.status_code in (401, 403):  # no, expired or invalid session: log in again
                return _login_redirect(request)
            raise
        return HTMLResponse(render(await run_in_threadpool(lineage_rows, access)))

    return app
