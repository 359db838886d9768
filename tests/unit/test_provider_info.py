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


KINDS = {  # get_provider_info key -> (subpackage, base class in llmops_provider.compat)
    "operators": ("operators", "BaseOperator"),
    "sensors": ("sensors", "BaseSensorOperator"),
    "hooks": ("hooks", "BaseHook"),
    "triggers": ("triggers", "BaseTrigger"),
}


def _defining_modules(subpackage: str, base_name: str) -> set[str]:
    """Modules of ``llmops_provider.<subpackage>`` that define a subclass of ``base_name``."""
    import inspect
    import pkgutil

    from llmops_provider import compat

    base = getattr(compat, base_name)
    package = importlib.import_module(f"llmops_provider.{subpackage}")
    found = set()
    for info in pkgutil.iter_modules(package.__path__, f"{package.__name__}."):
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and issubclass(cls, base) and cls is not base:
                found.add(module.__name__)
    return found


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_module_that_defines_one_is_declared(kind):
    subpackage, base = KINDS[kind]
    declared = {m for entry in _info()[kind] for m in entry["python-modules"]}
    defining = _defining_modules(subpackage, base)
    assert declared == defining, (
        f"get_provider_info()[{kind!r}] must list exactly the modules defining a {base}: "
        f"missing {sorted(defining - declared)}, stale {sorted(declared - defining)}"
    )


def test_every_hook_with_a_connection_type_is_declared():
    import inspect

    from llmops_provider.compat import BaseHook

    declared = {c["connection-type"]: c["hook-class-name"] for c in _info()["connection-types"]}
    hooks = {}
    for module_name in _defining_modules("hooks", "BaseHook"):
        module = importlib.import_module(module_name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module_name and issubclass(cls, BaseHook) and getattr(cls, "conn_type", None):
                hooks[cls.conn_type] = f"{module_name}.{cls.__name__}"
    assert declared == hooks
