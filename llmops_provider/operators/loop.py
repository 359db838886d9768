"""The feedback loop's other next steps: roll a regressed champion back, re-evaluate the one serving.

The monitor (``operators/monitoring.py``) decides which step a condition asks for
(``feedback.next_steps``) and its per-action gate emits at most one asset event per incident:

- ``llmops://<recipe>/rollback`` schedules ``<recipe>_rollback``: :class:`RollbackOperator` moves
  traffic back to the previous champion through the same serving backend the deploy operator uses
  (restarting its replica from the kept package when it is gone), moves the ``champion`` alias
  back, tags the demoted version ``rollout_status=rolled-back`` with the evidence, records it in
  the deployment record and calls the ``on_rollback`` notifiers;
- ``llmops://<recipe>/reevaluate`` also schedules ``<recipe>_evaluate``, whose ``reevaluate`` task
  (:class:`ReEvaluateChampionOperator`) runs the champion through the same gate on the current
  evaluation inputs. Its verdict is recorded as ``reeval_*`` tags (the admission tags
  ``eval_verdict``/``eval_run_id`` stay those of the gate that let it in); a failure alerts and
  fails the task, and never demotes: rolling back is a decision, made by the monitor's rollback
  rule or by a person triggering ``<recipe>_rollback``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmops_provider import config, lineage
from llmops_provider.compat import AirflowFailException
from llmops_provider.operators.deployment import (
    CHAMPION_ALIAS,
    PASSED,
    VLLMDeployOperator,
    _now,
    model_card_lineage,
)
from llmops_provider.operators.evaluation import EvalGateFailed, LMEvalGateOperator

RESTORED = "restored"  # deployment-record outcome after a rollback (the monitor treats it as a champion)
NOTHING = "nothing-to-roll-back-to"
STALE = "stale"  # the champion moved since the incident: nothing to do

ROLLBACK_MESSAGE = (
    "ROLLBACK {{ rollout.model_name }} champion v{{ rollout.candidate_version }} -> v{{ rollout.stable_version }} "
    "in production: {{ rollout.reasons | join('; ') }}"
)
REEVAL_MESSAGE = (
    "RE-EVALUATION FAILED {{ rollout.model_name }} champion v{{ rollout.candidate_version }} "
    "(still serving, not demoted): {{ rollout.reasons | join('; ') }}"
)
# model-version tags of a re-evaluation; the gate's own tags (admission) are restored after the job
REEVAL_TAGS = {"eval_verdict": "reeval_verdict", "eval_run_id": "reeval_run_id", "eval_failures": "reeval_failures"}
GATE_TAGS = ("eval_verdict", "eval_run_id", "eval_failures", "rejected")


def read_record(recipe_name: str) -> dict[str, Any] | None:
    try:
        return json.loads(config.deployment_record(recipe_name).read_text())
    except (OSError, ValueError):
        return None


def write_record(recipe_name: str, record: dict[str, Any]) -> None:
    path = config.deployment_record(recipe_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(path)


def _champion(client, model_name: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(model_name, CHAMPION_ALIAS).version)
    except Exception:  # noqa: BLE001 - "alias not found" has many shapes across MLflow versions
        return None


def _notify(notifiers, context, payload: dict[str, Any], log) -> None:
    for notifier in notifiers:
        try:
            notifier({**context, "rollout": payload})
        except Exception as exc:  # noqa: BLE001 - an alert channel down must not hide the outcome
            log.error("notifier %s failed: %s", type(notifier).__name__, exc)


class RollbackOperator(VLLMDeployOperator):
    """Roll the champion back to the previous champion: traffic, alias, tags, record, alerts.

    The version to restore: ``to_version``, else the ``previous_champion`` of the deployment record
    ``home()/deployments/<recipe>.json`` when that record promoted the current champion. A run
    triggered by the monitor's ``rollback`` event also checks the champion is still the version the
    incident was about (else: ``stale``, nothing done). No version to go back to returns
    ``{"status": "nothing-to-roll-back-to"}`` (logged, and noted in the record), never a crash.

    Fails closed: the restored version must carry ``eval_verdict=passed``; its replica (restarted
    from its kept package when it no longer runs) must answer a smoke completion before any traffic
    moves. Only then: weights 100 % to it, ``champion`` alias back, the demoted version tagged
    ``rollout_status=rolled-back`` + ``rollout_evidence``, its replica drained and stopped (scaled to
    0 on Kubernetes), the ``on_rollback`` notifiers called, and the ``deployment`` asset emitted.

    :param recipe_path: path of the recipe YAML. (templated)
    :param to_version: restore this version instead of the record's previous champion. (templated)
    :param on_rollback: notifiers called with the evidence (context key ``rollout``); default
        :class:`~llmops_provider.notifiers.RolloutAlertNotifier` (log + ``home()/alerts/<recipe>.jsonl``).
    """

    template_fields = ("recipe_path", "to_version")
    ui_color = "#ffe6e6"

    def __init__(
        self, *, recipe_path: str, to_version: str | int | None = None, on_rollback: Any = None, **kwargs: Any
    ) -> None:
        if on_rollback is None:
            from llmops_provider.notifiers import RolloutAlertNotifier

            on_rollback = [RolloutAlertNotifier(message=ROLLBACK_MESSAGE)]
        super().__init__(recipe_path=recipe_path, on_rollback=on_rollback, **kwargs)
        self.to_version = to_version

    def execute(self, context) -> dict[str, Any]:
        from llmops_provider.feedback import action_uri
        from llmops_provider.operators.evaluation import version_from

        recipe = self._recipe()
        name = recipe.model_name
        hook = self._mlflow(recipe)
        client = hook.get_client()
        event = lineage.triggering_extra(context, action_uri(recipe.name, "rollback"))
        reasons = [event.get("rollback_reason") or "rollback requested by hand"]
        evidence = dict(event.get("evidence") or {})
        record = read_record(recipe.name)
        champion = _champion(client, name)
        out: dict[str, Any] = {
            "model_name": name,
            "from_version": champion,
            "to_version": None,
            "reasons": reasons,
            "evidence": evidence,
        }
        if champion is None:
            return self._nothing(context, recipe, record, out, f"no version of {name} holds alias {CHAMPION_ALIAS!r}")
        incident = evidence.get("from_version")
        if incident and str(incident) != champion:
            return self._nothing(
                context,
                recipe,
                record,
                out,
                f"the incident was about v{incident} but the "
                f"{CHAMPION_ALIAS} is v{champion} now: it moved since; nothing rolled back",
                STALE,
            )
        target = version_from(self.to_version, "to_version")
        if (
            target is None
            and record
            and str(record.get("model_version")) == champion
            and record.get("outcome") == "promoted"
            and record.get("previous_champion")
        ):
            target = str(record["previous_champion"])
        if target is None or target == champion:
            return self._nothing(
                context,
                recipe,
                record,
                out,
                f"nothing to roll back to: the deployment record names no previous {CHAMPION_ALIAS} "
                f"of v{champion} (first deployment, or already rolled back)",
            )
        out["to_version"] = target
        mv = client.get_model_version(name, target)
        tags = dict(mv.tags or {})
        if tags.get(lineage.EVAL_VERDICT) != PASSED:
            raise AirflowFailException(
                f"refusing to roll back to {name} v{target}: tag "
                f"{lineage.EVAL_VERDICT}={tags.get(lineage.EVAL_VERDICT)!r}"
                f", not {PASSED!r}; {CHAMPION_ALIAS} stays v{champion}. Pass to_version= a version that passed the gate"
            )
        self.log.warning("rolling %s back: v%s -> v%s; %s", name, champion, target, "; ".join(reasons))

        backend = self.backend(recipe, hook)
        current = backend.stable()
        if current is None or current["version"] != champion:
            current = self._replica_of(backend, record, champion)
        lineage_card = model_card_lineage(recipe, tags)
        # the previous champion's replica: still running (grace period, Kubernetes at 0) or restarted from its package
        prompt = self._previous_prompt(recipe, hook, record, target)
        restored = backend.start(
            target,
            mv.run_id or tags.get(lineage.MLFLOW_RUN_ID),
            lineage_card,
            0,
            artifact_path=tags.get("artifact_path"),
            **({"prompt": prompt} if prompt else {}),
        )
        self.log.info(
            "v%s replica %s at %s (%s)",
            target,
            restored["id"],
            restored["endpoint"],
            "already running" if restored.get("reused") else "restarted from its package",
        )
        try:
            self._smoke(recipe, restored["endpoint"])
        except Exception:
            if not restored.get("reused"):
                backend.retire(restored)
            raise
        replicas = {r["id"]: r for r in (current, restored) if r}
        weights = {restored["id"]: 100, **({current["id"]: 0} if current else {})}
        backend.route(weights, replicas)
        backend.label(restored, "stable")
        if current:
            backend.label(current, "retiring")
        client.set_registered_model_alias(name, CHAMPION_ALIAS, target)
        client.set_model_version_tag(name, target, lineage.ENDPOINT, backend.endpoint)
        self._tag_demoted(client, name, champion, target, reasons, evidence)
        completion = self._smoke(recipe, backend.endpoint)  # through the router: what users get now
        entry = self._entry(context, "rolled-back", weights, reasons, evidence, champion, target)
        history = list((record or {}).get("history") or [])
        new_record = {
            "model_name": name,
            "model_version": target,
            "endpoint": backend.endpoint,
            "mlflow_run_id": mv.run_id or tags.get(lineage.MLFLOW_RUN_ID),
            "eval_run_id": tags.get(lineage.EVAL_RUN_ID),
            "dataset_commit": tags.get(lineage.DATASET_COMMIT),
            "previous_champion": None,
            "rolled_back_from": champion,
            "outcome": RESTORED,
            "strategy": "rollback",
            "replica": restored,
            "stable_before": current,
            "reasons": reasons,
            "prompt": recipe.deployment.smoke_prompt,
            "completion": completion,
            "history": history + [entry],
            "rollbacks": list((record or {}).get("rollbacks") or []) + [entry],
            "started_at": entry["at"],
            "deployed_at": _now(),
        }
        if "ti" in context:
            new_record.update(lineage.airflow_ids(context))
        write_record(recipe.name, new_record)
        if current:
            backend.retire(current)
        self.log.error(
            "rolled back %s: v%s -> v%s at %s; %s", name, champion, target, backend.endpoint, "; ".join(reasons)
        )
        _notify(
            self.on_rollback,
            context,
            {
                "recipe": recipe.name,
                "model_name": name,
                "candidate_version": champion,
                "stable_version": target,
                "step": "production",
                "weights": weights,
                "reasons": reasons,
                "evidence": evidence,
                "history": [entry],
            },
            self.log,
        )
        extra = {
            lineage.MODEL_NAME: name,
            lineage.MODEL_VERSION: target,
            lineage.ENDPOINT: backend.endpoint,
            lineage.DATASET_COMMIT: tags.get(lineage.DATASET_COMMIT),
            lineage.EVAL_RUN_ID: tags.get(lineage.EVAL_RUN_ID),
            lineage.MLFLOW_RUN_ID: mv.run_id or tags.get(lineage.MLFLOW_RUN_ID),
            "strategy": "rollback",
            "rolled_back_from": champion,
            "reasons": reasons,
        }
        if "ti" in context:
            extra.update(lineage.airflow_ids(context))
        lineage.emit_outlet_extra(context, self.outlets, lineage.asset_uri(recipe.name, "deployment"), extra, self.log)
        return {
            **out,
            "status": "rolled-back",
            "endpoint": backend.endpoint,
            "completion": completion,
            "restarted": not restored.get("reused"),
            "weights": weights,
        }

    # ------------------------------------------------------------------ helpers
    def _replica_of(self, backend, record: dict | None, version: str) -> dict | None:
        """The champion's replica from the backend's own record when it is not the healthy stable one."""
        replicas = (backend.state() if hasattr(backend, "state") else {}).get("replicas") or {}
        found = [r for r in replicas.values() if str(r.get("version")) == version]
        if not found and record and str((record.get("replica") or {}).get("version")) == version:
            found = [record["replica"]]
        return found[0] if found else None

    def _previous_prompt(self, recipe, hook, record: dict | None, target: str) -> dict | None:
        """The prompt version the previous champion's replica served (deployment record ``stable_before``)."""
        before = (record or {}).get("stable_before") or {}
        if str(before.get("version")) != target or not before.get("prompt_version"):
            return None
        from llmops_provider import prompts

        hook.get_client()  # credentials into the environment for mlflow.genai
        version, template = prompts.load(hook.tracking_uri(), before["prompt_name"], before["prompt_version"])
        self.log.info("v%s served prompt %s v%s: restoring it with the model", target, before["prompt_name"], version)
        return {"name": before["prompt_name"], "version": str(version), "template": template}

    def _tag_demoted(self, client, name: str, version: str, target: str, reasons: list[str], evidence: dict) -> None:
        from llmops_provider.rollout import ROLLED_BACK, ROLLOUT_EVIDENCE, ROLLOUT_STATUS

        body = json.dumps(
            {"step": "production", "rolled_back_to": target, "reasons": reasons, "evidence": evidence}, default=str
        )
        client.set_model_version_tag(name, version, ROLLOUT_STATUS, ROLLED_BACK)
        client.set_model_version_tag(name, version, ROLLOUT_EVIDENCE, body[:4900])

    def _entry(
        self,
        context,
        verdict: str,
        weights: dict,
        reasons: list[str],
        evidence: dict,
        champion: str | None,
        target: str | None,
    ) -> dict[str, Any]:
        from llmops_provider.rollout import step_record

        entry = step_record("rollback", weights, {}, evidence, {"verdict": verdict, "reasons": reasons}, _now())
        entry.update({"from_version": champion, "to_version": target})
        if "ti" in context:
            entry.update(lineage.airflow_ids(context))
        return entry

    def _nothing(self, context, recipe, record, out: dict, why: str, status: str = NOTHING) -> dict[str, Any]:
        self.log.warning("rollback of %s: %s", recipe.model_name, why)
        if record is not None:  # noted where the next reader of the deployment looks
            entry = self._entry(context, status, {}, out["reasons"] + [why], out["evidence"], out["from_version"], None)
            record["rollbacks"] = list(record.get("rollbacks") or []) + [entry]
            write_record(recipe.name, record)
        return {**out, "status": status, "why": why}


class ReEvaluateChampionOperator(LMEvalGateOperator):
    """Run the serving champion through the eval gate again, on the current evaluation inputs.

    The version: the triggering ``reevaluate`` event's ``model_version``, else the ``champion``
    alias. The held-out data: the event's ``dataset_commit``, else the dataset head (the gate's
    own run uses the commit the version was trained on). Thresholds, tasks and the safety prompt
    set are the recipe's now; the champion is its own baseline, so nothing is compared.

    Records, never demotes: the verdict goes to the eval run in MLflow and to the model-version
    tags ``reeval_verdict``, ``reeval_run_id``, ``reeval_failures``, ``reeval_dataset_commit``,
    while the admission tags (``eval_verdict``, ``eval_run_id``, ``rejected``) are restored to
    what the original gate wrote. A failure calls ``on_failure_notify`` notifiers (default: the
    rollout alert log + file) and fails the task with the reasons; the champion keeps serving
    until the monitor's rollback rule or a person (``<recipe>_rollback``) decides otherwise.
    """

    ui_color = "#fff0e6"

    def __init__(
        self, *, recipe_path: str, model_version: str | int | None = None, on_failure_notify: Any = None, **kwargs: Any
    ) -> None:
        super().__init__(recipe_path=recipe_path, model_version=model_version, promote=False, **kwargs)
        if on_failure_notify is None:
            from llmops_provider.notifiers import RolloutAlertNotifier

            on_failure_notify = [RolloutAlertNotifier(message=REEVAL_MESSAGE)]
        self.on_failure_notify = (
            list(on_failure_notify) if isinstance(on_failure_notify, (list, tuple)) else [on_failure_notify]
        )
        self._eval_commit: str | None = None

    def resolve_version(self, context, client, recipe) -> tuple[str, str]:
        from llmops_provider.feedback import action_uri
        from llmops_provider.operators.evaluation import version_from_param_or_event

        found = version_from_param_or_event(self.model_version, context, action_uri(recipe.name, "reevaluate"))
        if found:
            return found
        champion = _champion(client, recipe.model_name)
        if champion is None:
            raise AirflowFailException(
                f"nothing to re-evaluate: no model_version given, no triggering `reevaluate` "
                f"event, and no version of {recipe.model_name} holds alias {CHAMPION_ALIAS!r}"
            )
        return champion, f"alias {CHAMPION_ALIAS}"

    def run_job(self, spec_path: Path, env: dict[str, str], secrets: list[str], timeout_s: float | None = None) -> None:
        """The gate's job, on the data being re-evaluated: the spec's dataset is rewritten before it runs."""
        spec = json.loads(Path(spec_path).read_text())
        if self._eval_commit and self._eval_commit != spec.get("dataset_commit"):
            self.log.info(
                "re-evaluating on %s@%s (the version was trained on %s)",
                spec["dataset_repo"],
                self._eval_commit,
                spec.get("dataset_commit"),
            )
            spec["dataset_commit"] = self._eval_commit
            spec["dataset_dir"] = str(self.dataset_dir(self._recipe_obj, self._eval_commit))
            Path(spec_path).write_text(json.dumps(spec, indent=2))
        super().run_job(spec_path, env, secrets, timeout_s)

    def execute(self, context) -> dict[str, Any]:
        from llmops_provider.datasets import get_store
        from llmops_provider.feedback import action_uri
        from llmops_provider.hooks.mlflow import MLflowHook
        from llmops_provider.recipes import load_recipe

        recipe = self._recipe_obj = load_recipe(self.recipe_path)
        client = MLflowHook(self.mlflow_conn_id or recipe.mlflow_conn_id).get_client()
        event = lineage.triggering_extra(context, action_uri(recipe.name, "reevaluate"))
        version, how = self.resolve_version(context, client, recipe)
        self.model_version = version  # the gate below evaluates exactly this one
        self._eval_commit = event.get(lineage.DATASET_COMMIT)
        if not self._eval_commit:
            head = get_store().head(recipe.data.dataset_repo, recipe.data.branch)
            self._eval_commit = head.commit_id if head else None
        reasons = event.get("reevaluate_reason") or "re-evaluation requested by hand"
        self.log.info(
            "re-evaluating %s v%s (chosen by %s) on %s: %s", recipe.model_name, version, how, self._eval_commit, reasons
        )
        before = dict(client.get_model_version(recipe.model_name, version).tags or {})
        payload: dict[str, Any] | None = None
        failure: EvalGateFailed | None = None
        try:
            payload = super().execute(context)
        except EvalGateFailed as exc:
            failure = exc
            payload = context["ti"].xcom_pull(task_ids=self.task_id, key="eval_result") if "ti" in context else None
        finally:
            self._record(client, recipe.model_name, version, before)
        verdict = lineage.VERDICT_PASSED if failure is None else lineage.VERDICT_FAILED
        out = {
            **(payload or {}),
            "model_version": version,
            "reevaluation": True,
            "verdict": verdict,
            "reevaluate_reason": reasons,
            "evaluated_on": self._eval_commit,
        }
        if failure is None:
            self.log.info("re-evaluation of %s v%s passed on %s", recipe.model_name, version, self._eval_commit)
            return out
        _notify(
            self.on_failure_notify,
            context,
            {
                "recipe": recipe.name,
                "model_name": recipe.model_name,
                "candidate_version": version,
                "stable_version": version,
                "step": "re-evaluation",
                "weights": None,
                "reasons": [str(failure)],
                "evaluated_on": self._eval_commit,
            },
            self.log,
        )
        if "ti" in context:
            context["ti"].xcom_push(key="return_value", value=out)
        raise AirflowFailException(
            f"champion {recipe.model_name} v{version} FAILED re-evaluation on {self._eval_commit}: {failure}. It keeps "
            f"serving (not demoted); trigger {recipe.name}_rollback to restore the previous champion"
        )

    def _record(self, client, name: str, version: str, before: dict[str, str]) -> None:
        """Move the job's verdict to ``reeval_*`` tags and restore the admission tags the gate had written."""
        after = dict(client.get_model_version(name, version).tags or {})
        if after.get("eval_run_id") == before.get("eval_run_id"):
            self.log.warning("the eval job left no new verdict on %s v%s; nothing recorded", name, version)
            return
        for src, dst in REEVAL_TAGS.items():
            client.set_model_version_tag(name, version, dst, after.get(src) or "")
        client.set_model_version_tag(name, version, "reeval_dataset_commit", self._eval_commit or "")
        client.set_model_version_tag(name, version, "reeval_at", _now())
        for key in GATE_TAGS:
            if key in before:
                client.set_model_version_tag(name, version, key, before[key])
            elif key in after:
                client.delete_model_version_tag(name, version, key)
