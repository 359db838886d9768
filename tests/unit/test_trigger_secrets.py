"""No trigger of the provider serializes a credential.

A trigger's ``serialize()`` output and a deferral's method kwargs are stored in Airflow's
``trigger`` and ``task_instance`` tables (an AssetWatcher's also in the serialized DAG), readable
by anyone with database access. So every trigger takes connection *ids* and reads the
connection in the triggerer.

Every trigger class defined in ``llmops_provider`` is found by importing the package, and each
is built here the way its operator, sensor or the DAG factory builds it, with recognisable
credentials on every connection those builders can read; the serialized kwargs and the
deferral kwargs must contain none of them. A trigger class without a builder below fails the
test, so a new trigger cannot slip past.
"""

from __future__ import annotations

import base64
import importlib
import json
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

# the TrainJob operator's test harness: a recording Kubernetes API validating against the CRD
from test_trainjob import (  # noqa: F401 - fixtures, used through request.getfixturevalue
    RecordingCustomObjects,
    _context,
    base_recipe,
    crd,
    operator_env,
    patched_clients,
    validator,
)

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SKIPPED_PACKAGES = ("llmops_provider.runtime",)  # runs inside jobs, needs the job venv (torch, vllm, ...)


def _basic(login: str, password: str) -> str:
    return base64.b64encode(f"{login}:{password}".encode()).decode()


PROM_DEFAULT = {"login": "prom-user-LOGIN7f3", "password": "prom-PASSWORD-9c1e"}
PROM_RECIPE = {"login": "prom-recipe-LOGIN2b8", "password": "prom-recipe-PASSWORD-4d0a"}
LAKEFS = {"login": "AKIALAKEFSLOGIN5e21", "password": "lakefs-SECRET-8a7b"}
MLFLOW = {"login": "mlflow-user-LOGIN61c", "password": "mlflow-PASSWORD-0e5f"}
K8S_TOKEN = "k8s-BEARER-TOKEN-3f9d"
VLLM_KEY = "sk-vllm-APIKEY-77a2"
RECIPE_PROM_CONN = "prometheus_recipe"

CONNECTIONS = {
    "prometheus_default": {"conn_type": "llmops_prometheus", "host": "127.0.0.1", "port": 9090, **PROM_DEFAULT},
    RECIPE_PROM_CONN: {"conn_type": "llmops_prometheus", "host": "127.0.0.1", "port": 9091, **PROM_RECIPE},
    "lakefs_default": {"conn_type": "llmops_lakefs", "host": "http://127.0.0.1:8000", **LAKEFS},
    "mlflow_default": {"conn_type": "llmops_mlflow", "host": "127.0.0.1", "port": 5000, **MLFLOW},
    "vllm_default": {"conn_type": "llmops_vllm", "host": "127.0.0.1", "port": 8011, "password": VLLM_KEY},
    "kubernetes_default": {
        "conn_type": "kubernetes",
        "extra": {
            "kube_config": json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "c",
                    "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:6443"}}],
                    "users": [{"name": "u", "user": {"token": K8S_TOKEN}}],
                    "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
                }
            ),
            "namespace": "ml-train",
        },
    },
}

# what a leak would look like: each login, password, Basic-auth token and bearer token
NEEDLES = {
    "prometheus_default login": PROM_DEFAULT["login"],
    "prometheus_default password": PROM_DEFAULT["password"],
    "prometheus_default basic token": _basic(**PROM_DEFAULT),
    f"{RECIPE_PROM_CONN} login": PROM_RECIPE["login"],
    f"{RECIPE_PROM_CONN} password": PROM_RECIPE["password"],
    f"{RECIPE_PROM_CONN} basic token": _basic(**PROM_RECIPE),
    "lakefs_default access key": LAKEFS["login"],
    "lakefs_default secret key": LAKEFS["password"],
    "lakefs_default basic token": _basic(**LAKEFS),
    "mlflow_default login": MLFLOW["login"],
    "mlflow_default password": MLFLOW["password"],
    "mlflow_default basic token": _basic(**MLFLOW),
    "vllm_default api key": VLLM_KEY,
    "kubernetes_default token": K8S_TOKEN,
}


# ---------------------------------------------------------------- discovery


def provider_trigger_classes() -> dict[str, type]:
    """Every BaseTrigger subclass defined in the provider, by classpath (imports every module)."""
    import llmops_provider
    from llmops_provider.compat import BaseTrigger

    failed = []
    for info in pkgutil.walk_packages(llmops_provider.__path__, "llmops_provider."):
        if info.name.startswith(tuple(f"{p}." for p in SKIPPED_PACKAGES)):
            continue
        try:
            importlib.import_module(info.name)
        except Exception as exc:  # noqa: BLE001 - reported below: a module we cannot see could hide a trigger
            failed.append(f"{info.name}: {type(exc).__name__}: {exc}")
    assert not failed, "modules that do not import in the control-plane venv: " + "; ".join(failed)

    found, todo = {}, [BaseTrigger]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.split(".")[0] == "llmops_provider":
                found[f"{sub.__module__}.{sub.__qualname__}"] = sub
    return found


# ---------------------------------------------------------------- builders


@dataclass
class Deferral:
    """One trigger as a builder made it, with the deferral's method kwargs (None: an AssetWatcher)."""

    label: str
    trigger: Any
    kwargs: dict | None = None


@dataclass
class Builder:
    build: Callable[[SimpleNamespace], list[Deferral]]
    classes: tuple[str, ...]  # the trigger classes it builds (classpaths)


BUILDERS: dict[str, Builder] = {}
TRIGGERS = "llmops_provider.triggers"


def builder(*classes: str):
    def register(fn):
        BUILDERS[fn.__name__] = Builder(fn, classes)
        return fn

    return register


def _deferred(call, *args) -> Deferral:
    from llmops_provider.compat import TaskDeferred

    with pytest.raises(TaskDeferred) as caught:
        call(*args)
    return Deferral("", caught.value.trigger, caught.value.kwargs)


@builder(f"{TRIGGERS}.watchers.PromQLWatchTrigger")
def promql_sensor(env):
    """``PromQLSensor.execute``: the default connection and the recipe's."""
    from llmops_provider.sensors.prometheus import PromQLSensor

    out = []
    for conn_id in ("prometheus_default", env.recipe.monitoring.prometheus_conn_id):
        sensor = PromQLSensor(
            task_id="wait", query="up", op=">", threshold=0, hold_for_s=30, prometheus_conn_id=conn_id
        )
        deferral = _deferred(sensor.execute, {})
        assert deferral.trigger.prometheus_conn_id == conn_id and deferral.trigger.base_url is None
        deferral.label = f"PromQLSensor({conn_id})"
        out.append(deferral)
    return out


@builder(f"{TRIGGERS}.watchers.PromQLWatchTrigger", f"{TRIGGERS}.watchers.FeedbackWatchTrigger")
def monitor_dag_watchers(env):
    """The AssetWatchers ``dag_factory.watch_asset`` attaches to the monitor DAG's asset."""
    from llmops_provider.dag_factory import watch_asset

    asset = watch_asset(env.recipe)
    assert asset.watchers, "the recipe enables watchers: watch_asset must attach some"
    prom = [w.trigger for w in asset.watchers if hasattr(w.trigger, "prometheus_conn_id")]
    assert prom and {t.prometheus_conn_id for t in prom} == {RECIPE_PROM_CONN}
    return [Deferral(f"AssetWatcher {w.name}", w.trigger) for w in asset.watchers]


class _RecordingBackend:
    """Stands in for a serving backend: the rollout's trigger construction is under test, not the backend."""

    endpoint = "http://127.0.0.1:8011"

    def __init__(self):
        self.calls: list[tuple] = []

    def route(self, weights, replicas):
        self.calls.append(("route", dict(weights)))

    def label(self, replica, role):
        self.calls.append(("label", replica["id"], role))

    def retire(self, replica):
        self.calls.append(("retire", replica["id"]))


class _RecordingMlflowClient:
    def __init__(self):
        self.calls: list[tuple] = []

    def get_model_version_by_alias(self, name, alias):
        return SimpleNamespace(version="1")

    def set_registered_model_alias(self, *args):
        self.calls.append(("alias", *args))

    def set_model_version_tag(self, *args):
        self.calls.append(("tag", *args))


def _rollout_state() -> dict:
    return {
        "version": "2",
        "prompt": None,
        "run_id": "r2",
        "strategy": "canary",
        "stable": {"id": "tiny-llama-v1", "version": "1", "endpoint": "http://127.0.0.1:8101"},
        "candidate": {"id": "tiny-llama-v2", "version": "2", "endpoint": "http://127.0.0.1:8102"},
        "history": [],
        "rollout_run_id": "h1",
        "started_at": "2026-01-01T00:00:00+0000",
        "tags": {},
    }


@builder(f"{TRIGGERS}.rollout.RolloutWindowTrigger")
def deploy_rollout(env):
    """``VLLMDeployOperator``: each canary step (recipe's and operator's connection), the A/B wait, the grace timer."""
    from llmops_provider.operators.deployment import VLLMDeployOperator

    recipe, out = env.recipe, []
    for conn_id in (None, "prometheus_default"):  # None: the recipe's monitoring.prometheus_conn_id
        op = VLLMDeployOperator(task_id="deploy", recipe_path=str(env.recipe_path), prometheus_conn_id=conn_id)
        for index in range(len(recipe.deployment.rollout.steps)):
            backend = _RecordingBackend()
            deferral = _deferred(op._canary_step, {}, _rollout_state(), recipe, backend, index)
            assert backend.calls and backend.calls[0][0] == "route"
            assert deferral.trigger.queries and deferral.trigger.prometheus_conn_id == (conn_id or RECIPE_PROM_CONN)
            deferral.label = f"canary step {index} (prometheus_conn_id={conn_id})"
            out.append(deferral)
    op = VLLMDeployOperator(task_id="deploy", recipe_path=str(env.recipe_path))
    deferral = _deferred(lambda: op._ab_start({}, _rollout_state(), recipe, _RecordingBackend()))
    deferral.label = "A/B wait"
    out.append(deferral)
    state = {**_rollout_state(), "history": [{"step": 0, "verdict": "pass"}]}
    deferral = _deferred(lambda: op._promote({}, state, recipe, _RecordingMlflowClient(), _RecordingBackend()))
    deferral.label = "grace period"
    out.append(deferral)
    return out


@builder(f"{TRIGGERS}.dataset.DatasetCommitTrigger")
def dataset_commit_sensor(env):
    """``DatasetCommitSensor.execute`` with ``[llmops] dataset_store = lakefs`` (connection ``lakefs_default``)."""
    from llmops_provider.sensors.dataset import DatasetCommitSensor

    out = []
    for store in (None, "lakefs"):
        sensor = DatasetCommitSensor(task_id="wait", repo="tiny-corpus", since_commit="ab" * 32, store=store)
        deferral = _deferred(sensor.execute, {})
        deferral.label = f"DatasetCommitSensor(store={store})"
        out.append(deferral)
    return out


@builder(f"{TRIGGERS}.trainjob.TrainJobTrigger")
def deepspeed_trainjob(env):
    """``DeepSpeedTrainOperator`` on the Kubeflow TrainJob path (test_trainjob's recording API)."""
    from llmops_provider.compat import Asset
    from llmops_provider.operators.training import DeepSpeedTrainOperator

    recipe_path = env.request.getfixturevalue("operator_env")
    validator_ = env.request.getfixturevalue("validator")
    env.request.getfixturevalue("patched_clients")(RecordingCustomObjects(validator_, "success"))
    op = DeepSpeedTrainOperator(task_id="train", recipe_path=str(recipe_path), outlets=[Asset("llmops://x/model")])
    deferral = _deferred(lambda: op.execute(_context()))
    deferral.label = "DeepSpeedTrainOperator (kubeflow)"
    return [deferral]


# ---------------------------------------------------------------- the checks


@pytest.fixture
def env(tmp_path, monkeypatch, request):
    """Every connection with credentials; the demo recipe with its own Prometheus, watchers and a canary."""
    for conn_id, conn in CONNECTIONS.items():
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))
    monkeypatch.setenv("AIRFLOW__LLMOPS__HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AIRFLOW__LLMOPS__DATASET_STORE", "lakefs")
    from llmops_provider.recipes import load_recipe

    raw = load_recipe(ROOT / "dags/recipes/tiny-llama.yaml").model_dump(mode="json")
    raw["monitoring"]["prometheus_conn_id"] = RECIPE_PROM_CONN
    raw["monitoring"]["watchers"]["enabled"] = True
    raw["deployment"]["rollout"].update(strategy="canary", steps=[10, 100], analysis_window="20s")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return SimpleNamespace(recipe_path=path, recipe=load_recipe(path), request=request)


def leaks(blob: str) -> list[str]:
    return [name for name, value in NEEDLES.items() if value in blob]


def test_every_trigger_class_has_a_builder():
    found = provider_trigger_classes()
    covered = {cls for b in BUILDERS.values() for cls in b.classes}
    missing = sorted(set(found) - covered)
    assert not missing, (
        f"trigger classes with no builder in {Path(__file__).name}: {missing}; add one that builds each the way "
        "its operator/sensor/DAG factory does, so the credential check covers it"
    )
    stale = sorted(covered - set(found))
    assert not stale, f"builders name trigger classes the provider no longer defines: {stale}"
    # the discovery itself works: it finds triggers in every module known to define one
    assert {f"{TRIGGERS}.{m}" for m in ("dataset", "rollout", "trainjob", "watchers")} <= {
        cls.__module__ for cls in found.values()
    }, sorted(found)


def test_the_needles_are_what_the_hooks_would_send(env):
    """The values scanned for are the ones the connections really carry (so a leak would match)."""
    from llmops_provider.compat import BaseHook
    from llmops_provider.hooks.mlflow import MLflowHook
    from llmops_provider.hooks.prometheus import PrometheusHook

    assert PrometheusHook().headers() == {"Authorization": f"Basic {NEEDLES['prometheus_default basic token']}"}
    assert PrometheusHook(RECIPE_PROM_CONN).headers()["Authorization"].endswith(_basic(**PROM_RECIPE))
    assert MLflowHook().job_env()["MLFLOW_TRACKING_PASSWORD"] == MLFLOW["password"]
    conn = BaseHook.get_connection("lakefs_default")
    assert (conn.login, conn.password) == (LAKEFS["login"], LAKEFS["password"])
    kube = json.loads(BaseHook.get_connection("kubernetes_default").extra_dejson["kube_config"])
    assert kube["users"][0]["user"]["token"] == K8S_TOKEN


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_no_trigger_serializes_a_credential(env, name):
    spec = BUILDERS[name]
    deferrals = spec.build(env)
    assert deferrals, f"builder {name} built nothing"
    built = {f"{type(d.trigger).__module__}.{type(d.trigger).__qualname__}" for d in deferrals}
    assert built == set(spec.classes), f"builder {name} declares {spec.classes} but built {sorted(built)}"
    problems = []
    for d in deferrals:
        classpath, kwargs = d.trigger.serialize()
        trigger_blob = json.dumps(kwargs, default=str)
        if found := leaks(trigger_blob):
            problems.append(f"{d.label}: {classpath} kwargs carry {found}: {trigger_blob}")
        if found := leaks(json.dumps(d.kwargs, default=str)):
            problems.append(f"{d.label}: deferral kwargs carry {found}")
        # primitives only, and complete: the triggerer rebuilds it from exactly these
        assert json.loads(json.dumps(kwargs)) == kwargs, f"{d.label}: {classpath} serializes non-primitives"
        assert type(d.trigger)(**kwargs).serialize() == (classpath, kwargs), f"{d.label}: does not round-trip"
        if d.kwargs is not None:
            json.dumps(d.kwargs)  # stored on the task instance: primitives only
    assert not problems, "credentials in serialized triggers:\n" + "\n".join(problems)


def test_serialized_lifecycle_dags_carry_no_credential(env):
    from airflow.serialization.serialized_objects import DagSerialization

    from llmops_provider.dag_factory import build_lifecycle_dags

    dags = build_lifecycle_dags(env.recipe_path)
    blob = json.dumps({dag_id: DagSerialization.to_dict(dag) for dag_id, dag in dags.items()}, default=str)
    assert "PromQLWatchTrigger" in blob  # the watchers are in there
    assert not leaks(blob), leaks(blob)
