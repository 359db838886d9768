"""The LLMOps lineage view: the Airflow plugin's FastAPI app, driven with FastAPI's TestClient."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("AIRFLOW__LLMOPS__HOME", str(home))
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    shutil.copy(ROOT / "dags" / "recipes" / "tiny-llama.yaml", recipes / "tiny-llama.yaml")
    broken = yaml.safe_load((recipes / "tiny-llama.yaml").read_text())
    broken["name"] = "Bad Name"
    (recipes / "broken.yaml").write_text(yaml.safe_dump(broken))
    monkeypatch.setenv("AIRFLOW__LLMOPS__RECIPES_DIR", str(recipes))
    return home


def _client():
    from llmops_provider.ui import create_app

    return TestClient(create_app())


def test_plugin_registers_the_app_and_a_nav_link():
    import importlib.util

    spec = importlib.util.spec_from_file_location("llmops_plugin", ROOT / "plugins" / "llmops_plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    plugin = module.LLMOpsPlugin
    assert plugin.fastapi_apps[0]["url_prefix"] == "/llmops"
    assert plugin.external_views[0]["href"] == "/llmops/"


def test_lineage_shows_dataset_head_deployment_and_broken_recipes(home, tmp_path):
    from llmops_provider.datasets import get_store

    staged = tmp_path / "staged"
    staged.mkdir()
    for split in ("train", "validation", "test"):
        (staged / f"{split}.jsonl").write_text(json.dumps({"id": split, "text": "some text " * 5}) + "\n")
    commit = get_store().commit("tiny-corpus", "main", staged, {"airflow_run_id": "r1"}).commit_id
    (home / "deployments").mkdir(parents=True)
    (home / "deployments" / "tiny-llama.json").write_text(json.dumps({
        "model_name": "tiny-llama", "model_version": "3", "dataset_commit": commit, "mlflow_run_id": "run-abc",
        "eval_run_id": "eval-def", "endpoint": "http://127.0.0.1:8011"}))

    rows = {r["recipe"]: r for r in _client().get("/api/lineage").json()}
    assert rows["tiny-llama"]["dataset"]["commit"] == commit
    assert rows["tiny-llama"]["deployment"]["model_version"] == "3"
    assert "Bad Name" in rows["broken"]["error"] and "`name`" in rows["broken"]["error"]

    page = _client().get("/").text
    assert "tiny-llama v3" in page and commit[:12] in page and "run-abc" in page and "eval-def" in page
    assert "not a valid recipe name" in page


def test_lineage_without_any_deployment(home):
    rows = {r["recipe"]: r for r in _client().get("/api/lineage").json()}
    assert rows["tiny-llama"]["deployment"] is None
    assert rows["tiny-llama"]["dataset"]["commit"] is None
    assert "tiny-llama" in _client().get("/").text
