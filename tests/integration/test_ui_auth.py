"""The LLMOps view behind Airflow's auth, against a live ``airflow api-server`` on 127.0.0.1.

Two real api-servers, one per auth manager, each on its own SQLite database:

- the **simple auth manager** (the local default): anonymous callers get 401 / a redirect to the
  login page; a JWT from ``POST /auth/token`` (as a header, or as the UI session's cookie) gets
  the lineage;
- the **FAB auth manager** (Airflow's FAB provider), which can grant read access per DAG: roles
  and users are made with FAB's own security manager (as ``airflow roles``/``users`` do), and
  a user sees a recipe only when FAB lets them read every DAG generated for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, free_port, wait_http

pytestmark = pytest.mark.integration
AIRFLOW = Path(sys.executable).with_name("airflow")
FAB = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"
SIMPLE = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
PASSWORD = "pw-for-the-ui-test"  # FAB users' password (test users of a throw-away database)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def http(url: str, token: str | None = None, cookie: str | None = None, data: dict | None = None):
    """(status, headers, body) without following redirects."""
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if cookie:
        headers["Cookie"] = f"_token={cookie}"
    body = json.dumps(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body else "GET")
    try:
        with urllib.request.build_opener(NoRedirect).open(request, timeout=30) as resp:
            return resp.status, resp.headers, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read().decode()


def token(base: str, username: str, password: str) -> str:
    status, _, body = http(f"{base}/auth/token", data={"username": username, "password": password})
    assert status in (200, 201), f"/auth/token for {username}: {status} {body[:300]}"
    return json.loads(body)["access_token"]


def recipes_of(base: str, jwt: str) -> set[str]:
    status, _, body = http(f"{base}/llmops/api/lineage", token=jwt)
    assert status == 200, body[:300]
    return {row["recipe"] for row in json.loads(body)}


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    """Two valid recipes (tiny-llama with a deployment record, other-llama) and a broken one."""
    work = tmp_path_factory.mktemp("ui-auth")
    folder = work / "recipes"
    folder.mkdir()
    base = yaml.safe_load((ROOT / "dags" / "recipes" / "tiny-llama.yaml").read_text())
    (folder / "tiny-llama.yaml").write_text(yaml.safe_dump(base))
    (folder / "other-llama.yaml").write_text(yaml.safe_dump({**base, "name": "other-llama"}))
    (folder / "broken.yaml").write_text(yaml.safe_dump({**base, "name": "Bad Name"}))
    home = work / "llmops-home"
    (home / "deployments").mkdir(parents=True)
    (home / "deployments" / "tiny-llama.json").write_text(json.dumps({
        "model_name": "tiny-llama", "model_version": "4", "dataset_commit": "c0ffee" * 10, "mlflow_run_id": "run-123",
        "eval_run_id": "eval-456", "endpoint": "http://127.0.0.1:8011"}))  # fmt: skip
    return work, folder, home


def airflow_env(home: Path, port: int, recipes_dir: Path, llmops_home: Path, auth_manager: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "LLMOPS"))}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__AUTH_MANAGER": auth_manager,
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),  # the view reads recipes, not parsed DAGs
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
        "AIRFLOW__API_AUTH__JWT_SECRET": "ui-auth-test-jwt-secret-" + "0123456789abcdef" * 3,
        "AIRFLOW__API__SECRET_KEY": "ui-auth-test-flask-secret",
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__LLMOPS__HOME": str(llmops_home),
        "AIRFLOW__LLMOPS__RECIPES_DIR": str(recipes_dir),
        "AIRFLOW__LLMOPS__DATASET_STORE": "local",
        "NO_PROXY": "127.0.0.1,localhost",
    })  # fmt: skip
    (home / "dags").mkdir(parents=True, exist_ok=True)
    return env


@contextlib.contextmanager
def api_server(env: dict[str, str], port: int, log: Path):
    subprocess.run([str(AIRFLOW), "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    with open(log, "w") as out:
        proc = subprocess.Popen([str(AIRFLOW), "api-server", "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", "1"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            wait_http(f"http://127.0.0.1:{port}/api/v2/monitor/health", 240, proc)
            yield f"http://127.0.0.1:{port}"
        except BaseException:
            print(log.read_text()[-4000:])
            raise
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)


# ------------------------------------------------------------------ simple auth manager (local default)


@pytest.fixture(scope="module")
def simple_server(recipes, tmp_path_factory):
    work, folder, llmops_home = recipes
    home, port = tmp_path_factory.mktemp("airflow-simple"), free_port()
    env = airflow_env(home, port, folder, llmops_home, SIMPLE)
    with api_server(env, port, home / "api-server.log") as base:
        passwords = json.loads((home / "passwords.json").read_text())
        yield base, passwords


def test_anonymous_callers_get_401_or_the_login_page(simple_server):
    base, _ = simple_server
    assert http(f"{base}/api/v2/dags")[0] == 401  # what the core API answers
    status, _, body = http(f"{base}/llmops/api/lineage")
    assert status == 401 and "tiny-llama" not in body
    status, headers, body = http(f"{base}/llmops/")
    assert status == 307 and "tiny-llama" not in body
    login = urllib.parse.urlsplit(headers["Location"])
    assert login.path == "/auth/login"
    assert urllib.parse.parse_qs(login.query)["next"] == [f"{base}/llmops/"]
    assert http(f"{base}{login.path}?{login.query}")[0] == 200  # the auth manager's login page
    for path in ("/llmops/docs", "/llmops/openapi.json"):
        assert http(f"{base}{path}")[0] in (401, 404)


def test_a_token_from_auth_token_gets_the_lineage(simple_server):
    base, passwords = simple_server
    jwt = token(base, "admin", passwords["admin"])
    status, _, body = http(f"{base}/llmops/api/lineage", token=jwt)
    assert status == 200
    rows = {row["recipe"]: row for row in json.loads(body)}
    assert set(rows) == {"tiny-llama", "other-llama", "broken"}
    assert rows["tiny-llama"]["deployment"]["mlflow_run_id"] == "run-123"
    assert "not a valid recipe name" in rows["broken"]["error"]
    # the UI session carries the same JWT as a cookie: the page renders for it
    status, _, page = http(f"{base}/llmops/", cookie=jwt)
    assert status == 200 and "tiny-llama v4" in page and "run-123" in page
    # a viewer reads every DAG under the simple auth manager
    assert recipes_of(base, token(base, "viewer", passwords["viewer"])) == {"tiny-llama", "other-llama", "broken"}


def test_a_forged_token_is_refused(simple_server):
    import jwt as pyjwt

    base, _ = simple_server
    forged = pyjwt.encode({"sub": "admin", "role": "admin", "exp": 4e9, "iat": 0, "nbf": 0}, "x" * 64,
                          algorithm="HS512")  # fmt: skip
    assert http(f"{base}/llmops/api/lineage", token=forged)[0] == 403
    assert http(f"{base}/llmops/", cookie=forged)[0] == 307


# ------------------------------------------------------------------ FAB auth manager: access per DAG

FAB_SETUP = textwrap.dedent("""
    import json, sys
    from airflow.providers.fab.auth_manager.cli_commands.utils import get_application_builder

    spec = json.loads(sys.argv[1])
    with get_application_builder() as appbuilder:
        sm = appbuilder.sm
        for role_name, dag_ids in spec["roles"].items():
            role = sm.add_role(role_name)
            for dag_id in dag_ids:
                sm.add_permission_to_role(role, sm.create_permission("can_read", f"DAG:{dag_id}"))
        for user, role_name in spec["users"].items():
            assert sm.add_user(user, user, "Test", f"{user}@example.com", sm.find_role(role_name),
                               password=spec["password"]), user
""")


@pytest.fixture(scope="module")
def fab_server(recipes, tmp_path_factory):
    from llmops_provider.lineage import recipe_dag_ids

    work, folder, llmops_home = recipes
    home, port = tmp_path_factory.mktemp("airflow-fab"), free_port()
    env = airflow_env(home, port, folder, llmops_home, FAB)
    tiny = sorted(recipe_dag_ids("tiny-llama"))
    spec = {
        "roles": {"TinyReader": tiny, "TinyPartial": [d for d in tiny if not d.endswith("_rollback")], "NoDags": []},
        "users": {"admin": "Admin", "alice": "TinyReader", "pat": "TinyPartial", "bob": "NoDags", "vera": "Viewer"},
        "password": PASSWORD,
    }
    subprocess.run([str(AIRFLOW), "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    done = subprocess.run([sys.executable, "-c", FAB_SETUP, json.dumps(spec)], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    with api_server(env, port, home / "api-server.log") as base:
        yield base


def test_fab_shows_a_recipe_only_to_users_who_may_read_its_dags(fab_server):
    base = fab_server
    assert recipes_of(base, token(base, "admin", PASSWORD)) == {"tiny-llama", "other-llama", "broken"}
    assert recipes_of(base, token(base, "vera", PASSWORD)) == {"tiny-llama", "other-llama", "broken"}
    # read on tiny-llama's six DAGs only: tiny-llama, not other-llama, and no import errors (no DAG of theirs)
    alice = token(base, "alice", PASSWORD)
    assert recipes_of(base, alice) == {"tiny-llama"}
    status, _, page = http(f"{base}/llmops/", cookie=alice)
    assert status == 200 and "tiny-llama v4" in page and "other-llama" not in page and "Bad Name" not in page
    # five of the six: the recipe's lineage spans all its DAGs, so it stays hidden
    assert recipes_of(base, token(base, "pat", PASSWORD)) == set()
    bob = token(base, "bob", PASSWORD)
    assert recipes_of(base, bob) == set()
    status, _, page = http(f"{base}/llmops/", token=bob)
    assert status == 200 and "No recipe whose DAGs you may read" in page and "tiny-llama" not in page


def test_fab_anonymous_callers_are_sent_to_fab_login(fab_server):
    base = fab_server
    assert http(f"{base}/llmops/api/lineage")[0] == 401
    status, headers, _ = http(f"{base}/llmops/")
    assert status == 307
    login = urllib.parse.urlsplit(headers["Location"])
    assert login.path.startswith("/auth/login")
    assert urllib.parse.parse_qs(login.query)["next"] == [f"{base}/llmops/"]
