"""Render the example manifests of a canary at 90/10 between v6 and v7 of recipe-canary.yaml.

    .venv/bin/python deploy/kubernetes/render_example.py > deploy/kubernetes/canary-example.yaml

tests/unit/test_deploy_kubernetes.py checks the committed file is exactly this output and that
every object validates (Kubernetes schemas, Gateway API HTTPRoute CRD).
"""

from __future__ import annotations

import sys
from pathlib import Path

from llmops_provider.recipes import load_recipe
from llmops_provider.routers.kubernetes import dump_yaml, render_all

HERE = Path(__file__).resolve().parent


def render() -> str:
    recipe = load_recipe(HERE / "recipe-canary.yaml")
    return dump_yaml(render_all(recipe, {"6": 90, "7": 10}, {"6": "run-6", "7": "run-7"}))


if __name__ == "__main__":
    sys.stdout.write(render())
