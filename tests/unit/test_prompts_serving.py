"""Prompt versions served by vLLM and rolled out through the model rollout: spec, package, queries, aliases.

A replica is (model version, prompt version). The unit tests check the recipe field, the serving
package (chat_template.jinja, serving.json, model card, ``--chat-template``), the replica ids and
the PromQL that tells two prompt versions of one model version apart (parsed by promtool).
tests/integration/test_prompt_rollout.py drives the operator against MLflow's real registries.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from llmops_provider.recipes import RecipeError, load_recipe

pytestmark = pytest.mark.unit

CHAT_A = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% else %}### {{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### assistant:{% endif %}"
)
CHAT_B = "Answer in one line.\n" + CHAT_A


def recipe_text(prompt: str, strategy: str = "canary") -> str:
    return (
        "name: tiny-prompt\ndata:\n  sources: [{path: /nonexistent}]\n"
        f"deployment:\n  prompt: {prompt}\n"
        f"  rollout: {{strategy: {strategy}, steps: [50, 100], analysis_window: 20s, grace_period: 0s, "
        "min_requests: 3}\n"
    )


def write_recipe(tmp_path: Path, prompt: str, **kw) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_text(prompt, **kw))
    return path


@pytest.mark.parametrize(
    "prompt, error",
    [
        ("{name: tiny-chat}", "exactly one of template_file, version, alias (got none)"),
        ("{name: tiny-chat, version: 2, alias: champion}", "(got ['version', 'alias'])"),
        ("{name: 'tiny chat', alias: champion}", "is not a prompt name"),
        ("{name: tiny-chat, version: 0}", "deployment.prompt.version"),
    ],
)
def test_recipe_prompt_errors_name_the_field(tmp_path, prompt, error):
    with pytest.raises(RecipeError) as exc:
        load_recipe(write_recipe(tmp_path, prompt))
    assert "deployment.prompt" in str(exc.value) and error in str(exc.value)


def test_recipe_without_prompt_serves_none(tmp_path):
    assert load_recipe(Path(__file__).parents[2] / "dags" / "recipes" / "tiny-llama.yaml").deployment.prompt is None
    spec = load_recipe(write_recipe(tmp_path, "{name: tiny-chat, template_file: chat.jinja}")).deployment.prompt
    assert spec.template_file == "chat.jinja" and spec.version is None


def test_template_file_is_relative_to_the_recipe_and_checked(tmp_path):
    from llmops_provider import prompts

    spec = load_recipe(write_recipe(tmp_path, "{name: tiny-chat, template_file: chat.jinja}")).deployment.prompt
    assert prompts.template_path(spec, tmp_path / "recipe.yaml", "/h") == tmp_path / "chat.jinja"
    with pytest.raises(ValueError, match=r"deployment.prompt.template_file: .*chat.jinja does not exist"):
        prompts.resolve("sqlite:///unused.db", spec, tmp_path / "recipe.yaml", "/h")
    (tmp_path / "chat.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(ValueError, match=r"deployment.prompt.template_file .*not a valid Jinja chat template"):
        prompts.resolve("sqlite:///unused.db", spec, tmp_path / "recipe.yaml", "/h")


def test_render_chat_as_vllm_would():
    from llmops_provider import prompts

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Return a list of"}]
    assert prompts.render_chat(CHAT_A, messages) == "Be brief.\n### user: Return a list of\n### assistant:"
    assert prompts.render_chat(CHAT_B, messages[1:], add_generation_prompt=False) == (
        "Answer in one line.\n### user: Return a list of\n"
    )


def tiny_model_dir(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 2}))
    (path / "tokenizer.json").write_text("{}")
    return path


def test_package_carries_the_prompt_version(tmp_path):
    from llmops_provider.runtime.serve import package
    from llmops_provider.specs.serve import ServeSpec

    spec = ServeSpec(
        name="tiny-prompt",
        replica="tiny-prompt-v3-p2",
        model_name="tiny-prompt",
        model_version="3",
        prompt_name="tiny-chat",
        prompt_version="2",
        chat_template=CHAT_B,
    )
    assert spec.package_key == "v3-p2"
    assert ServeSpec(name="t", model_name="t", model_version="3").package_key == "v3"
    dst = package(tiny_model_dir(tmp_path / "merged"), tmp_path / spec.package_key / "model", spec)
    assert (dst / "chat_template.jinja").read_text() == CHAT_B
    manifest = json.loads((dst / "serving.json").read_text())
    assert manifest["prompt"] == {"name": "tiny-chat", "version": "2", "chat_template": "chat_template.jinja"}
    assert "| prompt | tiny-chat v2 (chat_template.jinja, vLLM --chat-template) |" in (dst / "README.md").read_text()
    args = spec.vllm_args(str(dst))
    assert args[args.index("--chat-template") + 1] == f"{dst}/chat_template.jinja"
    # no prompt: no template file, no flag, manifest says so
    plain = ServeSpec(name="t", model_name="t", model_version="3")
    dst2 = package(tiny_model_dir(tmp_path / "merged2"), tmp_path / "v3" / "model", plain)
    assert not (dst2 / "chat_template.jinja").exists() and "--chat-template" not in plain.vllm_args(str(dst2))
    assert json.loads((dst2 / "serving.json").read_text())["prompt"] is None


def test_a_replica_is_model_version_and_prompt_version(tmp_path):
    from llmops_provider.rollout import replica_id, serve_spec

    recipe = load_recipe(write_recipe(tmp_path, "{name: tiny-chat, alias: champion}"))
    assert replica_id("tiny", "3") == "tiny-v3" and replica_id("tiny", "3", "2") == "tiny-v3-p2"
    prompt = {"name": "tiny-chat", "version": "2", "template": CHAT_A}
    spec = serve_spec(recipe, "3", "run-3", {}, host="127.0.0.1", port=9000, prompt=prompt)
    assert (spec.instance, spec.prompt_name, spec.prompt_version, spec.chat_template) == (
        "tiny-prompt-v3-p2",
        "tiny-chat",
        "2",
        CHAT_A,
    )
    assert serve_spec(recipe, "3", "run-3", {}, host="127.0.0.1", port=9000).instance == "tiny-prompt-v3"


def promtool() -> str:
    binary = shutil.which("promtool")
    if not binary:
        pytest.fail("promtool not installed: run `make setup` (apt-get install prometheus ships it)")
    return binary


def test_prompt_versions_of_one_model_version_are_told_apart_in_promql(tmp_path):
    from llmops_provider.rollout import analysis_queries, replica_analysis_queries

    # no prompt anywhere: exactly the model-version queries of before
    plain = analysis_queries("tiny", "7", "6", "20s")
    assert "prompt_version" not in json.dumps(plain)
    # same model version, new prompt version: told apart by the prompt label only
    q = replica_analysis_queries(
        "tiny", {"version": "7", "prompt_version": "3"}, {"version": "7", "prompt_version": "2"}, "20s"
    )
    assert 'model_name="tiny",model_version="7",prompt_version="3"' in q["canary.ttft_p95_seconds"]
    assert 'model_name="tiny",model_version="7",prompt_version="2"' in q["stable.ttft_p95_seconds"]
    # a stable replica without a prompt: prompt_version="" selects the series without that label
    first = replica_analysis_queries("tiny", {"version": "7", "prompt_version": "1"}, {"version": "7"}, "20s")
    assert 'model_version="7",prompt_version=""' in first["stable.requests"]
    with pytest.raises(ValueError, match="label value"):
        analysis_queries("tiny", "7", "7", "20s", canary_prompt='1"} or vector(1')
    # every query is valid PromQL (promtool parses them as recording rules)
    rules = [{"record": f"q:{i}", "expr": e} for i, e in enumerate([*q.values(), *first.values()])]
    path = tmp_path / "q.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "q", "rules": rules}]}))
    out = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_local_target_carries_the_prompt_label(tmp_path, monkeypatch):
    from llmops_provider.routers.local import write_target

    monkeypatch.setenv("AIRFLOW__LLMOPS__HOME", str(tmp_path))
    replica = {"id": "tiny-v7-p3", "version": "7", "prompt_version": "3", "address": "127.0.0.1:9"}
    labels = json.loads(write_target(replica, "canary", "tiny").read_text())[0]["labels"]
    assert labels == {
        "deployment": "tiny",
        "replica": "tiny-v7-p3",
        "model_version": "7",
        "prompt_version": "3",
        "role": "canary",
    }
    plain = json.loads(write_target({**replica, "id": "tiny-v7", "prompt_version": None}, "stable", "t").read_text())
    assert "prompt_version" not in plain[0]["labels"]


def test_ab_verdict_splits_feedback_by_prompt_version():
    from llmops_provider.recipes import ABSpec
    from llmops_provider.rollout import ab_verdict

    since = "2026-11-28T00:00:00+00:00"
    rec = [
        {"ts": "2026-11-28T01:00:00+00:00", "model_version": "7", "prompt_version": p, "rating": r}
        for p, ratings in (("2", [-1] * 5 + [1] * 5), ("3", [-1] * 1 + [1] * 9))
        for r in ratings
    ]
    won = ab_verdict(rec, "7", "7", since, ABSpec(min_rated=5), a_prompt="2", b_prompt="3")
    assert won["verdict"] == "pass", won
    assert won["values"]["a"]["negative_rate"] == 0.5 and won["values"]["b"]["negative_rate"] == 0.1
    # without the prompt versions the two variants of one model version are indistinguishable
    same = ab_verdict(rec, "7", "7", since, ABSpec(min_rated=5))
    assert same["values"]["a"] == {**same["values"]["b"]}


def test_kubernetes_replica_of_a_prompt_version_validates_and_serves_the_template():
    from test_deploy_kubernetes import EXAMPLES, k8s_validate

    from llmops_provider.routers.kubernetes import (
        LABEL_PROMPT,
        KubernetesServingBackend,
        build_deployment,
        build_service,
        serve_spec,
    )

    recipe = load_recipe(EXAMPLES / "recipe-canary.yaml")
    spec = serve_spec(recipe, "7", "run-7", {}, prompt={"name": "tiny-chat", "version": "2", "template": CHAT_A})
    dep, svc = build_deployment(recipe, spec), build_service(recipe, "7", "2")
    k8s_validate(dep)
    k8s_validate(svc)
    assert dep["metadata"]["name"] == svc["metadata"]["name"] == "tiny-llama-v7-p2"
    assert dep["spec"]["template"]["metadata"]["labels"][LABEL_PROMPT] == "2"
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--model") + 1] == "/models/serving/tiny-llama/v7-p2/model"
    assert args[args.index("--chat-template") + 1] == "/models/serving/tiny-llama/v7-p2/model/chat_template.jinja"
    annotation = json.loads(dep["spec"]["template"]["metadata"]["annotations"]["llmops.apache.org/serve-spec"])
    assert annotation["chat_template"] == CHAT_A  # the init container packages it with the model
    backend = KubernetesServingBackend.__new__(KubernetesServingBackend)
    backend.recipe, backend.namespace = recipe, "llm-serving"
    assert backend._replica_of("tiny-llama-v7-p2")["prompt_version"] == "2"
    assert backend._replica_of("tiny-llama-v7") == {
        "id": "tiny-llama-v7",
        "version": "7",
        "prompt_version": None,
        "prompt_name": None,
        "endpoint": "http://tiny-llama-v7.llm-serving.svc:8000",
    }
