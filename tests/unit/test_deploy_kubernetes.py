"""The Kubernetes serving backend's objects, validated against the official contracts.

- Deployment and Service: kubernetes-validate (strict) against the Kubernetes 1.33 schemas;
- HTTPRoute: the Gateway API CRD's ``v1`` ``openAPIV3Schema``
  (``contracts/gateway-api-httproute-crd.yaml``) with the API server's pruning made strict and
  the CEL rules that apply to the route evaluated (an unknown rule on a reached path fails);
- the backend driven against a recording API that validates every body the same way and
  answers like the API server (generation, Accepted condition);
- the committed example manifests (``deploy/kubernetes/``) are exactly what the code renders.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml
from test_trainjob import _structural  # the CRD-as-JSON-schema conversion shared by the contract tests

from llmops_provider.recipes import Recipe, load_recipe

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CONTRACTS = ROOT.parent / "shared" / "contracts"
if not CONTRACTS.exists():
    CONTRACTS = ROOT / "shared" / "contracts"
K8S_VERSION = "1.33"
EXAMPLES = ROOT / "deploy" / "kubernetes"

_PATH_CHARS = re.compile(r"^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|[%][0-9a-fA-F]{2})+$")


def _ref_key(p: dict) -> tuple:
    return (
        p.get("group"),
        p.get("kind"),
        p.get("name"),
        p.get("namespace") or "",
        p.get("sectionName") or "",
        p.get("port") or 0,
    )


def _path_ok(path: dict) -> bool:
    if path.get("type") not in ("Exact", "PathPrefix"):
        return path.get("type") == "RegularExpression"
    v = path.get("value", "")
    return (
        v.startswith("/")
        and not any(bad in v for bad in ("//", "/./", "/../", "%2f", "%2F", "#"))
        and not v.endswith(("/..", "/."))
        and _PATH_CHARS.match(v) is not None
    )


def _cel(rule: str, instance, schema_path: str):
    """The CEL rules of the HTTPRoute CRD that our routes reach; None: not understood."""
    if schema_path.endswith("parentRefs"):
        keys = [_ref_key(p) for p in instance]
        return len(keys) == len(set(keys))
    if schema_path.endswith("rules") and "matches.size()" in rule:
        return sum(len(r.get("matches", [])) for r in instance) <= 128
    if schema_path.endswith("rules[]") and ("filters" in rule or "has(self.backendRefs)" in rule):
        # every rule at this level constrains filters (redirects, rewrites): vacuous without any
        has_filters = "filters" in instance or any("filters" in b for b in instance.get("backendRefs", []))
        return None if has_filters else True
    if schema_path.endswith("backendRefs[]") and "has(self.port)" in rule:
        return (
            not (instance.get("group", "") == "" and instance.get("kind", "Service") == "Service") or "port" in instance
        )
    if schema_path.endswith("matches[].path"):
        return _path_ok(instance)
    return None


def httproute_errors(route: dict) -> list[str]:
    import jsonschema

    raw = yaml.safe_load((CONTRACTS / "gateway-api-httproute-crd.yaml").read_text())
    schema = next(v for v in raw["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft7Validator(_structural(schema)).iter_errors(route)
    ]

    def walk(s: dict, obj, path: str) -> None:
        for rule in s.get("x-kubernetes-validations") or []:
            ok = _cel(rule["rule"], obj, path)
            if ok is None:
                errors.append(f"{path}: CEL rule not understood by this test: {rule['rule'][:80]}")
            elif not ok:
                errors.append(f"{path}: {rule.get('message', rule['rule'])}")
        if isinstance(obj, dict):
            for key, sub in (s.get("properties") or {}).items():
                if key in obj:
                    walk(sub, obj[key], f"{path}.{key}")
        elif isinstance(obj, list) and "items" in s:
            for item in obj:
                walk(s["items"], item, f"{path}[]")

    walk(schema, route, "")
    return errors


def k8s_validate(obj: dict) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.fixture
def recipe() -> Recipe:
    return load_recipe(EXAMPLES / "recipe-canary.yaml")


def test_deployment_and_service_validate_and_carry_the_serving_contract(recipe):
    from llmops_provider.routers.kubernetes import build_deployment, build_service, serve_spec

    spec = serve_spec(recipe, "7", "run-7", {"dataset_commit": "abc"})
    dep = build_deployment(recipe, spec)
    k8s_validate(dep)
    k8s_validate(build_service(recipe, "7"))
    pod = dep["spec"]["template"]["spec"]
    vllm = pod["containers"][0]
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert vllm["readinessProbe"]["httpGet"]["path"] == "/health"
    drain = int(vllm["lifecycle"]["preStop"]["exec"]["command"][1])
    assert drain == 20 and pod["terminationGracePeriodSeconds"] > drain
    args = vllm["args"]
    assert args[args.index("--quantization") + 1] == "fp8" and args[args.index("--tensor-parallel-size") + 1] == "2"
    assert args[args.index("--served-model-name") + 1] == recipe.name
    assert args[args.index("--model") + 1] == "/models/serving/tiny-llama/v7/model"
    init = pod["initContainers"][0]
    assert "--package-only" in init["command"]
    assert {e["name"] for e in init["env"]} >= {"AIRFLOW__LLMOPS__HOME", "MLFLOW_TRACKING_URI"}
    assert all("value" not in e for e in init["env"] if e["name"].startswith("MLFLOW_"))  # secrets by reference only
    annotation = dep["spec"]["template"]["metadata"]["annotations"]["llmops.apache.org/serve-spec"]
    assert json.loads(annotation)["mlflow_run_id"] == "run-7"
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_model_pvc_replaces_the_emptydir(recipe):
    from llmops_provider.routers.kubernetes import build_deployment, serve_spec

    raw = recipe.model_dump(mode="json")
    raw["deployment"]["kubernetes"]["model_pvc"] = "models"
    dep = build_deployment(Recipe.model_validate(raw), serve_spec(recipe, "7", "r", {}))
    k8s_validate(dep)
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "models"


@pytest.mark.parametrize(
    "weights",
    [{"tiny-llama-v6": 90, "tiny-llama-v7": 10}, {"tiny-llama-v7": 100}, {"tiny-llama-v6": 0, "tiny-llama-v7": 100}],
)
def test_httproute_validates_against_the_gateway_api_crd(recipe, weights):
    from llmops_provider.routers.kubernetes import build_httproute, route_weights

    route = build_httproute(recipe, weights)
    assert httproute_errors(route) == []
    assert route_weights(route) == weights
    assert route["spec"]["parentRefs"][0] == {
        "group": "gateway.networking.k8s.io",
        "kind": "Gateway",
        "name": "public",
        "namespace": "gateways",
    }


def test_the_validator_rejects_broken_routes(recipe):
    from llmops_provider.routers.kubernetes import build_httproute

    route = build_httproute(recipe, {"tiny-llama-v7": 100})
    no_port = copy.deepcopy(route)
    del no_port["spec"]["rules"][0]["backendRefs"][0]["port"]
    assert any("port" in e.lower() for e in httproute_errors(no_port))
    bad_weight = copy.deepcopy(route)
    bad_weight["spec"]["rules"][0]["backendRefs"][0]["weight"] = 2000000
    assert httproute_errors(bad_weight)
    unknown = copy.deepcopy(route)
    unknown["spec"]["rules"][0]["backendRefs"][0]["weigth"] = 1
    assert httproute_errors(unknown)
    bad_path = copy.deepcopy(route)
    bad_path["spec"]["rules"][0]["matches"][0]["path"]["value"] = "no-slash"
    assert httproute_errors(bad_path)


def test_committed_example_manifests_are_what_the_code_renders(recipe):
    from llmops_provider.routers.kubernetes import dump_yaml, render_all

    text = dump_yaml(render_all(recipe, {"6": 90, "7": 10}, {"6": "run-6", "7": "run-7"}))
    example = EXAMPLES / "canary-example.yaml"
    assert example.read_text() == text, f"regenerate: .venv/bin/python deploy/kubernetes/render_example.py > {example}"
    for obj in yaml.safe_load_all(text):
        if obj["kind"] == "HTTPRoute":
            assert httproute_errors(obj) == []
        else:
            k8s_validate(obj)


class RecordingKube:
    """AppsV1/CoreV1/CustomObjects stand-ins that validate every body and answer like the API server."""

    def __init__(self):
        self.objects: dict[tuple[str, str], dict] = {}
        self.calls: list[tuple[str, str]] = []
        self.scale: dict[str, int] = {}

    # apps
    def create_namespaced_deployment(self, ns, body):
        k8s_validate(body)
        self._create("Deployment", body)

    def replace_namespaced_deployment(self, name, ns, body):
        k8s_validate(body)
        self.objects[("Deployment", name)] = body
        self.calls.append(("replace", name))

    def read_namespaced_deployment_status(self, name, ns):
        from types import SimpleNamespace

        replicas = self.objects[("Deployment", name)]["spec"]["replicas"]
        return SimpleNamespace(status=SimpleNamespace(ready_replicas=replicas))

    def read_namespaced_deployment(self, name, ns):
        from types import SimpleNamespace

        return SimpleNamespace(metadata=SimpleNamespace(**self.objects[("Deployment", name)]["metadata"]))

    def patch_namespaced_deployment(self, name, ns, body):
        assert set(body) == {"metadata"}  # never the pod template: no restart for a role change
        self.objects[("Deployment", name)]["metadata"].setdefault("annotations", {}).update(
            body["metadata"]["annotations"]
        )

    def patch_namespaced_deployment_scale(self, name, ns, body):
        self.scale[name] = body["spec"]["replicas"]

    # core
    def create_namespaced_service(self, ns, body):
        k8s_validate(body)
        self._create("Service", body)

    def replace_namespaced_service(self, name, ns, body):
        k8s_validate(body)
        self.objects[("Service", name)] = body

    # custom objects
    def get_namespaced_custom_object(self, group, version, ns, plural, name):
        from kubernetes.client.exceptions import ApiException

        if ("HTTPRoute", name) not in self.objects:
            raise ApiException(status=404)
        return self.objects[("HTTPRoute", name)]

    def create_namespaced_custom_object(self, group, version, ns, plural, body):
        assert httproute_errors(body) == []
        return self._accept(self._create("HTTPRoute", body))

    def patch_namespaced_custom_object(self, group, version, ns, plural, name, body):
        obj = copy.deepcopy(self.objects[("HTTPRoute", name)])
        obj["spec"] = body["spec"]  # a merge patch of the whole spec
        obj["metadata"]["generation"] += 1
        assert httproute_errors({k: v for k, v in obj.items() if k != "status"}) == []
        self.objects[("HTTPRoute", name)] = obj
        return self._accept(obj)

    def _create(self, kind, body):
        from kubernetes.client.exceptions import ApiException

        name = body["metadata"]["name"]
        if (kind, name) in self.objects:
            raise ApiException(status=409)
        obj = copy.deepcopy(body)
        obj["metadata"]["generation"] = 1
        self.objects[(kind, name)] = obj
        self.calls.append(("create", name))
        return obj

    def _accept(self, obj):
        gen = obj["metadata"]["generation"]
        obj["status"] = {
            "parents": [
                {
                    "parentRef": obj["spec"]["parentRefs"][0],
                    "controllerName": "example.com/gw",
                    "conditions": [{"type": "Accepted", "status": "True", "observedGeneration": gen}],
                }
            ]
        }
        return obj


def test_backend_walks_a_rollout_through_the_api(recipe, monkeypatch):
    from llmops_provider.routers import kubernetes as kb

    kube = RecordingKube()
    backend = kb.KubernetesServingBackend(recipe, api_client=object(), poll_s=0)
    for getter in ("_apps", "_core", "_custom"):
        monkeypatch.setattr(backend, getter, lambda: kube)

    assert backend.stable() is None
    v6 = backend.start("6", "run-6", {})
    backend.route({v6["id"]: 100}, {v6["id"]: v6})
    assert backend.stable()["version"] == "6" and backend.endpoint == "http://llm.example.com"
    backend.label(v6, "stable")
    v7 = backend.start("7", "run-7", {})
    backend.label(v7, "canary")
    for w in (10, 50):
        backend.route({v6["id"]: 100 - w, v7["id"]: w}, {})
        assert kb.route_weights(kube.objects[("HTTPRoute", recipe.name)]) == {v6["id"]: 100 - w, v7["id"]: w}
        assert backend.stable()["version"] == "6"  # mid-canary (a retried task) the stable one is still known
    backend.route({v6["id"]: 0, v7["id"]: 100}, {})
    backend.label(v7, "stable")
    backend.label(v6, "retiring")
    assert backend.stable()["version"] == "7"
    backend.retire(v6)
    assert kube.scale == {v6["id"]: 0}
    assert kube.objects[("HTTPRoute", recipe.name)]["metadata"]["generation"] == 4
    again = backend.start("7", "run-7", {})  # an existing Deployment is replaced, not duplicated
    assert again == v7 and ("replace", v7["id"]) in kube.calls
    with pytest.raises(ValueError, match="inject_latency_ms"):
        backend.start("8", "run-8", {}, inject_latency_ms=100)
