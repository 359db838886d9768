"""The LLMOps lineage view: the Airflow plugin's FastAPI app, driven with FastAPI's TestClient.

Authentication is Airflow's real simple auth manager, initialised as the api-server does it, with
JWTs it signs itself. A *valid* token is checked against Airflow's revoked-token table, so requests
that pass authentication, and per-DAG access under the FAB auth manager, are tested against a live
api-server in tests/integration/test_ui_auth.py; here the rows are built for a user directly.
"""

import json
import shutil
import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

pytestmark = pytest.mark.unit
JWT_SECRET = "unit-test-jwt-secret-" + "0123456789abcdef" * 3  # >= 64 bytes for HS512
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


@pytest.fixture(autouse=True)
def auth_manager(tmp_path, monkeypatch):
    """Airflow's simple auth manager with an admin and a viewer, initialised as the api-server does."""
    from airflow.api_fastapi import app as api_app

    monkeypatch.setenv(
        "AIRFLOW__CORE__AUTH_MANAGER", "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
    )
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "admin:admin,viewer:viewer")
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", str(tmp_path / "passwords.json"))
    monkeypatch.setenv("AIRFLOW__API_AUTH__JWT_SECRET", JWT_SECRET)
    monkeypatch.setattr(api_app._AuthManagerState, "instance", None)
    return api_app.init_auth_manager()


def _token(manager, username: str, role: str) -> str:
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    return manager.generate_jwt(SimpleAuthManagerUser(username=username, role=role))


def _client(token: str | None = None, cookie: str | None = None):
    from airflow.api_fastapi.auth.managers.base_auth_manager import COOKIE_NAME_JWT_TOKEN

    from llmops_provider.ui import create_app

    client = TestClient(create_app(), follow_redirects=False)
    if token:
        client.headers["Authorization"] = f"Bearer {token}"
    if cookie:
        client.cookies.set(COOKIE_NAME_JWT_TOKEN, cookie)
    return client


def _rows(manager, role: str) -> list[dict]:
    """The rows the view builds for a user of ``role`` (what the routes return once authenticated)."""
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    from llmops_provider.ui import Access, lineage_rows

    return lineage_rows(Access(SimpleAuthManagerUser(username=role, role=role), manager))


def test_plugin_registers_the_app_and_a_nav_link():
    import importlib.util

    spec = importlib.util.spec_from_file_location("llmops_plugin", ROOT / "plugins" / "llmops_plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    plugin = module.LLMOpsPlugin
    assert plugin.fastapi_apps[0]["url_prefix"] == "/llmops"
    assert plugin.external_views[0]["href"] == "/llmops/"


def test_lineage_shows_dataset_head_deployment_and_broken_recipes(home, tmp_path, auth_manager):
    from llmops_provider.datasets import get_store
    from llmops_provider.ui import render

    staged = tmp_path / "staged"
    staged.mkdir()
    for split in ("train", "validation", "test"):
        (staged / f"{split}.jsonl").write_text(json.dumps({"id": split, "text": "some text " * 5}) + "\n")
    commit = get_store().commit("tiny-corpus", "main", staged, {"airflow_run_id": "r1"}).commit_id
    (home / "deployments").mkdir(parents=True)
    (home / "deployments" / "tiny-llama.json").write_text(
        json.dumps(
            {
                "model_name": "tiny-llama",
                "model_version": "3",
                "dataset_commit": commit,
                "mlflow_run_id": "run-abc",
                "eval_run_id": "eval-def",
                "endpoint": "http://127.0.0.1:8011",
            }
        )
    )

    rows = {r["recipe"]: r for r in _rows(auth_manager, "admin")}
    assert rows["tiny-llama"]["dataset"]["commit"] == commit
    assert rows["tiny-llama"]["deployment"]["model_version"] == "3"
    assert "Bad Name" in rows["broken"]["error"] and "`name`" in rows["broken"]["error"]

    page = render(list(rows.values()))
    assert "tiny-llama v3" in page and commit[:12] in page and "run-abc" in page and "eval-def" in page
    assert "not a valid recipe name" in page


def test_lineage_without_any_deployment(home, auth_manager):
    from llmops_provider.ui import render

    rows = {r["recipe"]: r for r in _rows(auth_manager, "admin")}
    assert rows["tiny-llama"]["deployment"] is None
    assert rows["tiny-llama"]["dataset"]["commit"] is None
    assert "tiny-llama" in render(list(rows.values()))
    assert "No recipe whose DAGs you may read" in render([])


def test_every_route_refuses_an_anonymous_caller(home):
    from llmops_provider.ui import create_app

    paths = sorted(route.path for route in create_app().routes)
    assert paths == ["/", "/api/lineage"]  # no /docs or /openapi.json answering anyone
    client = _client()
    api = client.get("/api/lineage")
    assert api.status_code == 401 and "tiny-llama" not in api.text
    page = client.get("/")
    assert page.status_code == 307 and "tiny-llama" not in page.text
    # to the auth manager's login page, and back here afterwards
    assert page.headers["location"] == "/auth/login?next=http%3A%2F%2Ftestserver%2F"
    for missing in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(missing).status_code == 404


def test_a_bad_or_expired_token_is_refused(home, auth_manager):
    import jwt

    forged = jwt.encode({"sub": "admin", "role": "admin"}, "not-the-secret", algorithm="HS512")
    assert _client(forged).get("/api/lineage").status_code == 403
    assert _client(cookie=forged).get("/").status_code == 307
    # a token the auth manager signed, re-signed with the same secret as if it had expired an hour ago
    claims = jwt.decode(_token(auth_manager, "admin", "admin"), options={"verify_signature": False})
    shift = claims["exp"] - time.time() + 3600
    claims.update(iat=claims["iat"] - shift, nbf=claims["nbf"] - shift, exp=claims["exp"] - shift)
    expired = jwt.encode(claims, JWT_SECRET, algorithm="HS512")
    response = _client(expired).get("/api/lineage")
    assert response.status_code == 401 and response.json()["detail"] == "Token Expired"


def test_simple_auth_roles_all_read_every_recipe_and_the_import_errors(home, auth_manager):
    # the simple auth manager has no per-DAG access: every role reads every DAG and the import errors
    for role in ("viewer", "user", "op", "admin"):
        assert {r["recipe"] for r in _rows(auth_manager, role)} == {"tiny-llama", "broken"}


def test_recipe_dag_ids_are_the_dags_the_factory_generates():
    from llmops_provider.dag_factory import build_lifecycle_dags
    from llmops_provider.lineage import recipe_dag_ids

    dags = build_lifecycle_dags(ROOT / "dags" / "recipes" / "tiny-llama.yaml")
    assert set(dags) == recipe_dag_ids("tiny-llama")
