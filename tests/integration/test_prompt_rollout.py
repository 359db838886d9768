"""A prompt-only canary through the real ``VLLMDeployOperator`` and MLflow's real registries.

The same model version with a new prompt version (a changed ``deployment.prompt.template_file``)
is rolled out by the model rollout: promoted after 50 -> 100 (prompt alias ``champion`` moves, the
model version is untouched), a re-run is a no-op, and a regressing third version is rolled back
(prompt version tagged, ``champion`` stays). MLflow runs in process on SQLite; the serving backend
is a recorder and the analysis events are canned (the vLLM side runs in test_serving.py, the
trigger in test_rollout.py).
"""

from __future__ import annotations

import json

import pytest

from llmops_provider.recipes import load_recipe

pytestmark = pytest.mark.integration

# a chat template over vLLM's `messages` (system text first, then "### role: content" lines)
CHAT_A = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% else %}### {{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### assistant:{% endif %}"
)
CHAT_B = "Answer in one line.\n" + CHAT_A


class RecordingBackend:
    """Records what the operator asks of a serving backend; replicas as the local backend builds them."""

    endpoint = "http://127.0.0.1:1"

    def __init__(self, recipe, stable: dict | None):
        self.recipe, self._stable, self.calls = recipe, stable, []

    def stable(self):
        return self._stable

    def start(self, version, run_id, lineage, inject_latency_ms, artifact_path=None, prompt=None):
        from llmops_provider.rollout import serve_spec

        spec = serve_spec(self.recipe, version, run_id, lineage, host="127.0.0.1", port=9, prompt=prompt)
        self.calls.append(("start", spec.instance, spec.chat_template))
        return {
            "id": spec.instance,
            "version": version,
            "endpoint": f"http://{spec.instance}",
            "prompt_name": spec.prompt_name,
            "prompt_version": spec.prompt_version,
        }

    def route(self, weights, replicas):
        self.calls.append(("route", dict(weights)))

    def label(self, replica, role):
        self.calls.append(("label", replica["id"], role))

    def retire(self, replica):
        self.calls.append(("retire", replica["id"]))


# one analysis window of a healthy replica (the keys of monitoring.vllm_queries)
HEALTHY = dict(
    requests=12.0, ttft_p95_seconds=0.08, e2e_latency_p95_seconds=0.6, error_rate=0.0, generation_tokens_per_s=15.0
)


def window(canary: dict, stable: dict) -> dict:
    return {
        "status": "ok",
        "values": {**{f"canary.{k}": v for k, v in canary.items()}, **{f"stable.{k}": v for k, v in stable.items()}},
    }


def drive(op, ctx, events: list[dict]):
    """execute, then resume each deferral with the next canned analysis event (the trigger is tested elsewhere)."""
    from llmops_provider.compat import TaskDeferred

    method, kwargs = None, {}
    while True:
        try:
            return op.execute(ctx) if method is None else getattr(op, method)(ctx, **kwargs)
        except TaskDeferred as deferred:
            json.dumps(deferred.kwargs)  # the state crosses the deferral as primitives
            method, kwargs = deferred.method_name, {**deferred.kwargs, "event": events.pop(0)}


def test_prompt_only_canary_promotes_and_rolls_back_through_the_model_rollout(tmp_path, monkeypatch):
    import mlflow
    from airflow.sdk.execution_time.context import OutletEventAccessors
    from mlflow import MlflowClient

    from llmops_provider import prompts
    from llmops_provider.compat import AirflowFailException
    from llmops_provider.operators.deployment import VLLMDeployOperator

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root on SQLite is ./mlruns
    monkeypatch.setenv("AIRFLOW__LLMOPS__HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_DEFAULT", json.dumps({"conn_type": "llmops_mlflow", "host": uri}))
    monkeypatch.setenv("AIRFLOW_CONN_PROMETHEUS_DEFAULT", json.dumps({"conn_type": "llmops_prometheus", "host": "x"}))
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    client.create_registered_model("tiny-prompt")
    version = str(client.create_model_version("tiny-prompt", "file:///x", tags={"eval_verdict": "passed"}).version)
    client.set_registered_model_alias("tiny-prompt", "champion", version)
    p1 = prompts.register(uri, "tiny-chat", CHAT_A)
    prompts.set_alias(uri, "tiny-chat", "champion", p1)

    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(
        "name: tiny-prompt\ndata:\n  sources: [{path: /nonexistent}]\n"
        "deployment:\n  prompt: {name: tiny-chat, template_file: chat.jinja}\n"
        "  rollout: {strategy: canary, steps: [50, 100], analysis_window: 20s, grace_period: 0s, min_requests: 3}\n"
    )
    (tmp_path / "chat.jinja").write_text(CHAT_B)
    recipe = load_recipe(recipe_path)
    stable = {"id": f"tiny-prompt-v{version}-p{p1}", "version": version, "endpoint": "http://s"}
    backend = RecordingBackend(recipe, {**stable, "prompt_name": "tiny-chat", "prompt_version": str(p1)})
    monkeypatch.setattr(VLLMDeployOperator, "backend", lambda self, recipe, hook=None: backend)
    monkeypatch.setattr(VLLMDeployOperator, "_smoke", lambda self, recipe, endpoint: "ok")
    rendered = []
    monkeypatch.setattr(
        VLLMDeployOperator, "_smoke_prompt", lambda self, recipe, endpoint, prompt: rendered.append(prompt) or "r"
    )

    def op():
        return VLLMDeployOperator(task_id="deploy", recipe_path=str(recipe_path), model_version=version)

    def ctx():
        return {"triggering_asset_events": {}, "outlet_events": OutletEventAccessors()}

    # ---- the same model version with a new prompt version: a canary, promoted after 50 -> 100
    result = drive(op(), ctx(), [window(HEALTHY, HEALTHY), window(HEALTHY, {})])
    p2 = str(p1 + 1)
    candidate = f"tiny-prompt-v{version}-p{p2}"
    assert (result["model_version"], result["prompt_version"], result["prompt_name"]) == (version, p2, "tiny-chat")
    assert [s["weights"][candidate] for s in result["steps"]] == [50, 100]
    assert backend.calls[0] == ("start", candidate, CHAT_B) and rendered[0]["version"] == p2
    record = json.loads((tmp_path / "home" / "deployments" / "tiny-prompt.json").read_text())
    assert f'prompt_version="{p2}"' in record["history"][0]["queries"]["canary.e2e_latency_p95_seconds"]
    assert f'prompt_version="{p1}"' in record["history"][0]["queries"]["stable.e2e_latency_p95_seconds"]
    assert prompts.load(uri, "tiny-chat", "champion") == (int(p2), CHAT_B)
    genai = prompts._genai(uri)
    assert genai.load_prompt("tiny-chat", version=int(p2), link_to_model=False).tags["rollout_status"] == "promoted"
    assert ("retire", stable["id"]) in backend.calls
    assert str(client.get_model_version_by_alias("tiny-prompt", "champion").version) == version
    assert "rollout_status" not in client.get_model_version("tiny-prompt", version).tags  # the model did not change

    # ---- re-running with the same template: nothing new to roll out, no new prompt version
    backend._stable = {
        "id": candidate,
        "version": version,
        "endpoint": "http://c",
        "prompt_name": "tiny-chat",
        "prompt_version": p2,
    }
    backend.calls.clear()
    again = drive(op(), ctx(), [])
    assert again["prompt_version"] == p2 and not [c for c in backend.calls if c[0] == "start"]

    # ---- a third prompt version that regresses latency: rolled back at its first step
    (tmp_path / "chat.jinja").write_text("Think step by step.\n" + CHAT_A)
    slow = {**HEALTHY, "ttft_p95_seconds": 2.0, "e2e_latency_p95_seconds": 4.0}
    with pytest.raises(AirflowFailException, match="rolled back") as failed:
        drive(op(), ctx(), [window(slow, HEALTHY)])
    p3 = str(int(p2) + 1)
    assert "e2e_latency_p95_seconds_ratio" in str(failed.value)
    assert backend.calls[-2:] == [("route", {candidate: 100}), ("retire", f"tiny-prompt-v{version}-p{p3}")]
    tags = genai.load_prompt("tiny-chat", version=int(p3), link_to_model=False).tags
    assert tags["rollout_status"] == "rolled-back" and json.loads(tags["rollout_evidence"])["step"] == 0
    assert prompts.load(uri, "tiny-chat", "champion")[0] == int(p2)  # champion did not move
    assert "rollout_status" not in client.get_model_version("tiny-prompt", version).tags
