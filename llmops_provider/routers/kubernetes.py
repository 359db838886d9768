"""The Kubernetes serving backend: a vLLM Deployment + Service per model version, a Gateway API HTTPRoute.

- ``<recipe>-v<version>`` Deployment: vLLM's OpenAI server (GPU requests), readiness on
  ``/health``, a ``preStop`` sleep of ``drain_seconds`` (the endpoint leaves the Service
  before vLLM gets SIGTERM) and ``terminationGracePeriodSeconds`` longer than that drain; the
  model comes from a PVC or is packaged by an init container that runs
  ``llmops_provider.runtime.serve --package-only`` (downloads the version from MLflow with the
  ``llmops-mlflow`` Secret, the same code as the local backend) into an ``emptyDir``;
- a Service of the same name;
- one HTTPRoute ``<recipe>`` on the configured Gateway whose ``backendRefs`` weights carry the
  split. Weights change by patching that route; nothing else moves.

Prometheus tells versions apart by the pod label ``llmops.apache.org/model-version`` (see
``deploy/kubernetes/prometheus-scrape.yaml``): the analysis queries are the local ones.
Builders are pure functions returning plain dicts (validated in tests/unit/test_deploy_kubernetes.py
against the Kubernetes schemas and the Gateway API CRD); the backend applies them with the
``kubernetes`` client (imported lazily).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from llmops_provider import config, rollout
from llmops_provider.rollout import replica_id
from llmops_provider.specs.serve import ServeSpec

log = logging.getLogger("llmops.serving.kubernetes")

PORT = 8000
MODELS = "/models"
SPEC_DIR = "/etc/llmops"
SPEC_ANNOTATION = "llmops.apache.org/serve-spec"
LABEL_RECIPE = "llmops.apache.org/recipe"
LABEL_VERSION = "llmops.apache.org/model-version"
LABEL_PROMPT = "llmops.apache.org/prompt-version"
LABEL_REPLICA = "llmops.apache.org/replica"
ROLE_ANNOTATION = "llmops.apache.org/role"
MLFLOW_SECRET = "llmops-mlflow"
GATEWAY_GROUP, GATEWAY_VERSION = "gateway.networking.k8s.io", "v1"


def namespace_of(recipe) -> str:
    return recipe.deployment.kubernetes.namespace or config.get("kubernetes_namespace")


def serve_spec(
    recipe,
    version: str,
    run_id: str | None,
    lineage: dict[str, str],
    artifact_path: str | None = None,
    prompt: dict | None = None,
) -> ServeSpec:
    """The same ServeSpec the local backend runs, with the pod's host and port."""
    return rollout.serve_spec(
        recipe, version, run_id, lineage, host="0.0.0.0", port=PORT, artifact_path=artifact_path, prompt=prompt
    )


def labels_for(recipe, version: str, prompt_version: str | None = None) -> dict[str, str]:
    rid = replica_id(recipe.name, version, prompt_version)
    labels = {
        "app.kubernetes.io/name": "vllm",
        "app.kubernetes.io/part-of": "llmops",
        "app.kubernetes.io/instance": rid,
        LABEL_RECIPE: recipe.name,
        LABEL_VERSION: str(version),
        LABEL_REPLICA: rid,
    }
    if prompt_version:
        labels[LABEL_PROMPT] = str(prompt_version)
    return labels


def build_deployment(recipe, spec: ServeSpec) -> dict[str, Any]:
    k8s = recipe.deployment.kubernetes
    name = spec.instance
    labels = labels_for(recipe, spec.model_version, spec.prompt_version)
    model_path = f"{MODELS}/serving/{spec.name}/{spec.package_key}/model"  # where --package-only puts it
    resources: dict[str, dict[str, str]] = {
        "requests": {"cpu": k8s.cpu, "memory": k8s.memory},
        "limits": {"memory": k8s.memory},
    }
    if k8s.gpus:
        resources["requests"]["nvidia.com/gpu"] = str(k8s.gpus)
        resources["limits"]["nvidia.com/gpu"] = str(k8s.gpus)
    mlflow_env = [
        {
            "name": key,
            "valueFrom": {
                "secretKeyRef": {"name": MLFLOW_SECRET, "key": key, "optional": key != "MLFLOW_TRACKING_URI"}
            },
        }
        for key in (
            "MLFLOW_TRACKING_URI",
            "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD",
            "MLFLOW_TRACKING_TOKEN",
        )
    ]
    volumes: list[dict[str, Any]] = [
        {
            "name": "models",
            **({"persistentVolumeClaim": {"claimName": k8s.model_pvc}} if k8s.model_pvc else {"emptyDir": {}}),
        },
        {
            "name": "serve-spec",
            "downwardAPI": {
                "items": [
                    {"path": "spec.json", "fieldRef": {"fieldPath": f"metadata.annotations['{SPEC_ANNOTATION}']"}}
                ]
            },
        },
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}},
    ]
    pod: dict[str, Any] = {
        # longer than the preStop drain, so vLLM always gets its own SIGTERM shutdown afterwards
        "terminationGracePeriodSeconds": k8s.drain_seconds + 30,
        "initContainers": [
            {
                # idempotent (.packaged marker): with a PVC the package is built once per version
                "name": "package",
                "image": k8s.init_image or config.get("runtime_image"),
                "command": [
                    "python",
                    "-m",
                    "llmops_provider.runtime.serve",
                    "--spec",
                    f"{SPEC_DIR}/spec.json",
                    "--package-only",
                ],
                "env": [{"name": "AIRFLOW__LLMOPS__HOME", "value": MODELS}, *mlflow_env],
                "volumeMounts": [
                    {"name": "models", "mountPath": MODELS},
                    {"name": "serve-spec", "mountPath": SPEC_DIR},
                ],
            }
        ],
        "containers": [
            {
                "name": "vllm",
                "image": k8s.image,
                "command": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
                "args": spec.vllm_args(model_path),
                "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
                "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
                "readinessProbe": {
                    "httpGet": {"path": "/health", "port": "http"},
                    "periodSeconds": 5,
                    "failureThreshold": 2,
                },
                "livenessProbe": {
                    "httpGet": {"path": "/health", "port": "http"},
                    "periodSeconds": 15,
                    "failureThreshold": 4,
                },
                "startupProbe": {
                    "httpGet": {"path": "/health", "port": "http"},
                    "periodSeconds": 10,
                    "failureThreshold": max(1, spec.startup_timeout_s // 10),
                },
                "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(k8s.drain_seconds)]}}},
                "resources": resources,
                "volumeMounts": [
                    {"name": "models", "mountPath": MODELS, "readOnly": True},
                    {"name": "dshm", "mountPath": "/dev/shm"},
                ],
            }
        ],
        "volumes": volumes,
    }
    if k8s.node_selector:
        pod["nodeSelector"] = dict(k8s.node_selector)
    if k8s.tolerations:
        pod["tolerations"] = [dict(t) for t in k8s.tolerations]
    if k8s.service_account:
        pod["serviceAccountName"] = k8s.service_account
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace_of(recipe), "labels": labels},
        "spec": {
            "replicas": k8s.replicas,
            "selector": {"matchLabels": {LABEL_REPLICA: name}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": labels, "annotations": {SPEC_ANNOTATION: spec.model_dump_json()}},
                "spec": pod,
            },
        },
    }


def build_service(recipe, version: str, prompt_version: str | None = None) -> dict[str, Any]:
    name = replica_id(recipe.name, version, prompt_version)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": namespace_of(recipe),
            "labels": labels_for(recipe, version, prompt_version),
        },
        "spec": {
            "selector": {LABEL_REPLICA: name},
            "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def build_httproute(recipe, weights: dict[str, int]) -> dict[str, Any]:
    """The route of ``recipe`` with ``weights`` (Service name -> percent); 0 keeps a backend listed, unused."""
    k8s = recipe.deployment.kubernetes
    parent: dict[str, Any] = {"group": GATEWAY_GROUP, "kind": "Gateway", "name": k8s.gateway}
    if k8s.gateway_namespace:
        parent["namespace"] = k8s.gateway_namespace
    spec: dict[str, Any] = {
        "parentRefs": [parent],
        "rules": [
            {
                "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                "backendRefs": [
                    {"group": "", "kind": "Service", "name": svc, "port": PORT, "weight": int(w)}
                    for svc, w in weights.items()
                ],
            }
        ],
    }
    if k8s.hostnames:
        spec["hostnames"] = list(k8s.hostnames)
    return {
        "apiVersion": f"{GATEWAY_GROUP}/{GATEWAY_VERSION}",
        "kind": "HTTPRoute",
        "metadata": {
            "name": recipe.name,
            "namespace": namespace_of(recipe),
            "labels": {"app.kubernetes.io/part-of": "llmops", LABEL_RECIPE: recipe.name},
        },
        "spec": spec,
    }


def route_weights(route: dict[str, Any]) -> dict[str, int]:
    refs = route.get("spec", {}).get("rules", [{}])[0].get("backendRefs", [])
    return {ref["name"]: int(ref.get("weight", 1)) for ref in refs}


class KubernetesServingBackend:
    """vLLM Deployments behind a Gateway API HTTPRoute (see the module docstring).

    :param api_client: a ``kubernetes.client.ApiClient``; default: in-cluster config, else kubeconfig.
    """

    def __init__(self, recipe, drain_timeout_s: float = 60.0, api_client: Any = None, poll_s: float = 5.0) -> None:
        self.recipe = recipe
        self.namespace = namespace_of(recipe)
        self.drain_timeout_s = drain_timeout_s
        self.poll_s = poll_s
        self._api_client = api_client

    # ---------------------------------------------------------------- clients
    def _client(self):
        if self._api_client is None:
            from kubernetes import client
            from kubernetes import config as kube_config

            try:
                kube_config.load_incluster_config()
            except kube_config.ConfigException:
                kube_config.load_kube_config()
            self._api_client = client.ApiClient()
        return self._api_client

    def _apps(self):
        from kubernetes import client

        return client.AppsV1Api(self._client())

    def _core(self):
        from kubernetes import client

        return client.CoreV1Api(self._client())

    def _custom(self):
        from kubernetes import client

        return client.CustomObjectsApi(self._client())

    @property
    def endpoint(self) -> str:
        """The Gateway's first hostname; without one, the Service of the replica with the most traffic."""
        hosts = self.recipe.deployment.kubernetes.hostnames
        if hosts:
            return f"http://{hosts[0]}"
        weights = route_weights(self._route() or {})
        if not weights:
            raise ValueError(
                f"no HTTPRoute {self.namespace}/{self.recipe.name} yet and no "
                "deployment.kubernetes.hostnames: set the Gateway hostname clients use"
            )
        return self._replica_of(max(weights, key=weights.get))["endpoint"]

    def _replica(self, version: str, prompt_version: str | None = None) -> dict:
        rid = replica_id(self.recipe.name, version, prompt_version)
        return {
            "id": rid,
            "version": str(version),
            "prompt_version": prompt_version,
            "prompt_name": self.recipe.deployment.prompt.name
            if prompt_version and self.recipe.deployment.prompt
            else None,
            "endpoint": f"http://{rid}.{self.namespace}.svc:{PORT}",
        }

    def _replica_of(self, rid: str) -> dict:
        """The replica of a Service name ``<recipe>-v<version>[-p<prompt version>]``."""
        version, _, prompt_version = rid[len(self.recipe.name) + 2 :].partition("-p")
        return self._replica(version, prompt_version or None)

    def _route(self) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self._custom().get_namespaced_custom_object(
                GATEWAY_GROUP, GATEWAY_VERSION, self.namespace, "httproutes", self.recipe.name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    # ---------------------------------------------------------------- backend protocol
    def stable(self) -> dict | None:
        """The backend annotated stable (a retry mid-canary still finds it), else the one at 100 %."""
        route = self._route()
        weights = route_weights(route) if route else {}
        for svc in weights:
            meta = self._apps().read_namespaced_deployment(svc, self.namespace).metadata
            if (getattr(meta, "annotations", None) or {}).get(ROLE_ANNOTATION) == "stable":
                return self._replica_of(svc)
        full = [svc for svc, w in weights.items() if w == 100]
        return self._replica_of(full[0]) if full else None

    def _apply(self, create, replace, body: dict) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            create(self.namespace, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            replace(body["metadata"]["name"], self.namespace, body)

    def start(
        self,
        version: str,
        run_id: str | None,
        lineage: dict[str, str],
        inject_latency_ms: float = 0,
        artifact_path: str | None = None,
        prompt: dict | None = None,
    ) -> dict:
        if inject_latency_ms:
            raise ValueError(
                "deployment.inject_latency_ms is a local drill (runtime.fault_injection); "
                "set it to 0 for the kubernetes backend"
            )
        spec = serve_spec(self.recipe, version, run_id, lineage, artifact_path, prompt)
        apps, core = self._apps(), self._core()
        self._apply(
            apps.create_namespaced_deployment, apps.replace_namespaced_deployment, build_deployment(self.recipe, spec)
        )
        self._apply(
            core.create_namespaced_service,
            core.replace_namespaced_service,
            build_service(self.recipe, version, spec.prompt_version),
        )
        name = spec.instance
        deadline = time.monotonic() + spec.startup_timeout_s
        want = self.recipe.deployment.kubernetes.replicas
        while True:
            status = apps.read_namespaced_deployment_status(name, self.namespace).status
            if (status.ready_replicas or 0) >= want:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Deployment {self.namespace}/{name}: {status.ready_replicas or 0}/{want} ready after "
                    f"{spec.startup_timeout_s}s (deployment.startup_timeout_s); kubectl describe it"
                )
            time.sleep(self.poll_s)
        log.info("Deployment %s/%s ready (%d replicas)", self.namespace, name, want)
        return self._replica(version, spec.prompt_version)

    def route(self, weights: dict[str, int], replicas: dict[str, dict]) -> dict:
        """Create or patch the HTTPRoute; returns once the Gateway accepted this generation."""
        body = build_httproute(self.recipe, weights)
        custom = self._custom()
        current = self._route()
        if current is None:
            obj = custom.create_namespaced_custom_object(
                GATEWAY_GROUP, GATEWAY_VERSION, self.namespace, "httproutes", body
            )
        else:
            obj = custom.patch_namespaced_custom_object(
                GATEWAY_GROUP, GATEWAY_VERSION, self.namespace, "httproutes", self.recipe.name, {"spec": body["spec"]}
            )
        generation = obj.get("metadata", {}).get("generation")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            parents = (obj.get("status") or {}).get("parents") or []
            accepted = [
                c
                for p in parents
                for c in p.get("conditions", [])
                if c.get("type") == "Accepted"
                and c.get("status") == "True"
                and (generation is None or c.get("observedGeneration", generation) >= generation)
            ]
            if accepted:
                log.info("HTTPRoute %s/%s: %s", self.namespace, self.recipe.name, weights)
                return {"weights": weights, "generation": generation}
            time.sleep(self.poll_s)
            obj = self._route() or obj
        raise TimeoutError(
            f"HTTPRoute {self.namespace}/{self.recipe.name} generation {generation} not accepted by "
            f"Gateway {self.recipe.deployment.kubernetes.gateway} in 120s; kubectl describe httproute"
        )

    def label(self, replica: dict, role: str) -> None:
        # metadata only (not the pod template): a role change must not restart pods
        self._apps().patch_namespaced_deployment(
            replica["id"], self.namespace, {"metadata": {"annotations": {ROLE_ANNOTATION: role}}}
        )

    def retire(self, replica: dict) -> None:
        """Scale to zero: pods get preStop + SIGTERM (the drain); the objects stay for a fast rollback."""
        self._apps().patch_namespaced_deployment_scale(replica["id"], self.namespace, {"spec": {"replicas": 0}})
        log.info("Deployment %s/%s scaled to 0", self.namespace, replica["id"])


def render_all(recipe, versions: dict[str, int], run_ids: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every object of a rollout at ``versions`` (version -> weight): the example manifests."""
    objects: list[dict[str, Any]] = []
    for version in versions:
        spec = serve_spec(recipe, version, (run_ids or {}).get(version), {"recipe": recipe.name})
        objects += [build_deployment(recipe, spec), build_service(recipe, version)]
    objects.append(build_httproute(recipe, {replica_id(recipe.name, v): w for v, w in versions.items()}))
    return objects


def dump_yaml(objects: list[dict[str, Any]]) -> str:
    import yaml

    return "---\n".join(yaml.safe_dump(json.loads(json.dumps(o)), sort_keys=False) for o in objects)
