"""Airflow UI plugin: the LLMOps lineage view (a FastAPI app plus a nav link)."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from llmops_provider.ui import create_app


class LLMOpsPlugin(AirflowPlugin):
    name = "llmops"
    fastapi_apps = [{"app": create_app(), "url_prefix": "/llmops", "name": "LLMOps lineage"}]
    external_views = [{"name": "LLMOps lineage", "href": "/llmops/", "destination": "nav", "url_route": "llmops"}]
