import importlib
from importlib.metadata import entry_points

import pytest

pytestmark = pytest.mark.unit


def _info():
    (ep,) = [e for e in entry_points(group="apache_airflow_provider") if e.value.startswith("llmops_provider")]
    return ep.load()()


def test_entry_point_declares_connections_and_config():
    info = _info()
    assert info["package-name"] == "airflow-provider-llmops"
    types = {c["connection-type"]: c["hook-class-name"] for c in info["connection-types"]}
    assert set(types) == {"llmops_lakefs", "llmops_mlflow", "llmops_prometheus", "llmops_vllm"}
    options = info["config"]["llmops"]["options"]
    assert options["compute_backend"]["default"] == "local"
    assert options["dataset_store"]["default"] == "local"
    assert "home" in options


@pytest.mark.parametrize("conn_type", ["llmops_lakefs", "llmops_mlflow", "llmops_prometheus", "llmops_vllm"])
def test_each_connection_type_has_a_hook_with_form_behaviour(conn_type):
    info = _info()
    path = {c["connection-type"]: c["hook-class-name"] for c in info["connection-types"]}[conn_type]
    module, name = path.rsplit(".", 1)
    hook = getattr(importlib.import_module(module), name)
    assert hook.conn_type == conn_type
    behaviour = hook.get_ui_field_behaviour()
    assert "hidden_fields" in behaviour or "relabeling" in behaviour


def test_airflow_sees_the_provider():
    from airflow.providers_manager import ProvidersManager

    pm = ProvidersManager()
    assert "airflow-provider-llmops" in pm.providers
    assert "llmops_mlflow" in pm.hooks
