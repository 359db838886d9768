"""The monitor stage: SLOs of the served model from Prometheus, plus new-data detection.

Its XCom ``{status, slos, new_data, retrain, reasons, actions, ...}`` decides whether
``request_retrain`` emits the retrain asset, ``request_rollback`` the rollback asset and
``request_reevaluate`` the reevaluate asset (each behind its own incident gate). No traffic is
``no-data``, never a breach; an unreachable Prometheus publishes the result (status
``unreachable``) and then fails the task, so a monitoring outage is visible rather than silently
green.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llmops_provider.compat import AirflowException, BaseOperator


class MonitorOperator(BaseOperator):
    """Check the recipe's SLOs over ``monitoring.window`` and look for new source data.

    :param recipe_path: path of the recipe YAML (templated)
    :param served_model_name: vLLM ``model_name`` label to watch; default the recipe name (templated)
    :param retrain_on_slo_breach: also request retraining on an SLO breach; default: the recipe's
        ``monitoring.retrain_on_slo_breach`` (off by default: new weights rarely fix latency, and a
        retrain on unchanged data and recipe reuses the same model version anyway)
    :param probe_task_id: task whose XCom holds this run's output-quality probe (``ProbeEvalOperator``);
        its breach asks for a rollback (fresh champion) or a re-evaluation (see ``feedback.next_steps``)

    Besides retraining, the result's ``actions`` say whether to roll the champion back
    (``rollback``: an SLO or probe breach within ``monitoring.loop.rollback_within_s`` of its
    promotion, per the deployment record) or re-evaluate it (``reevaluate``: a probe breach of an
    older champion, or evaluation inputs it was not judged on), each with incident keys for its gate.
    """

    template_fields: Sequence[str] = ("recipe_path", "served_model_name")

    def __init__(
        self,
        *,
        recipe_path: str,
        served_model_name: str | None = None,
        retrain_on_slo_breach: bool | None = None,
        probe_task_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.recipe_path = recipe_path
        self.served_model_name = served_model_name
        self.retrain_on_slo_breach = retrain_on_slo_breach
        self.probe_task_id = probe_task_id

    def execute(self, context) -> dict[str, Any]:
        from llmops_provider import config, feedback, monitoring
        from llmops_provider.hooks.prometheus import PrometheusError, PrometheusHook
        from llmops_provider.recipes import expand, load_recipe

        recipe = load_recipe(self.recipe_path)
        spec = recipe.monitoring
        model = self.served_model_name or recipe.name

        hook = PrometheusHook(spec.prometheus_conn_id)
        unreachable: str | None = None
        values: dict[str, float | None] = {}
        try:
            for key, promql in monitoring.vllm_queries(model, spec.window).items():
                values[key] = hook.query_scalar(promql)
                self.log.info("%s = %s   [%s]", key, values[key], promql)
        except PrometheusError as exc:
            unreachable = str(exc)
            self.log.error("%s", exc)
        result = monitoring.evaluate_slos(values, spec.slos)
        if unreachable:
            result = {"status": "unreachable", "slos": {}, "reasons": [f"prometheus: {unreachable}"]}

        reasons = list(result["reasons"])
        watch_events = self._watch_events(context, recipe.name)
        for event in watch_events:
            reasons.insert(
                0,
                f"watcher {event.get('watcher')} fired at {event.get('fired_at')}: {event.get('query')} = "
                f"{event.get('value')} {event.get('op')} {event.get('threshold')} for "
                f"{event.get('held_for_s', 0):.0f}s",
            )

        sources = [expand(s.path, config.home()) for s in recipe.data.sources]
        # curated feedback lands in the first source before the fingerprint: it is this check's new data
        fb = self._feedback(recipe, sources[0])
        reasons += fb.pop("reasons")
        has_files = bool(monitoring.source_files(sources))
        fingerprint = monitoring.source_fingerprint(sources)
        head_info = self._dataset_head_info(recipe.data.dataset_repo, recipe.data.branch)
        head = None if head_info is None else dict(head_info.metadata or {})
        is_new, why = monitoring.new_data(fingerprint, has_files, head, self._processed_fingerprint(recipe.name))
        self.log.info("data: %s (fingerprint %s)", why, fingerprint[:12])
        drift = self._drift(recipe, fb.pop("prompts"), head_info)
        self.log.info("drift: %s", drift["reason"])

        # each reason asking for a retrain, keyed by incident: the DAG's retrain gate lets a new
        # incident through once and holds a persisting one (see feedback.retrain_gate)
        incidents: dict[str, str] = {}
        if is_new:
            reasons.append(why)
            if spec.new_data_retrain:
                incidents["new_data"] = fingerprint
            else:
                reasons.append("monitoring.new_data_retrain is false: not retraining")
        on_breach = spec.retrain_on_slo_breach if self.retrain_on_slo_breach is None else self.retrain_on_slo_breach
        if result["status"] == "breach":
            if on_breach:
                incidents["slo_breach"] = "breach"
            else:
                reasons.append("SLO breach recorded; monitoring.retrain_on_slo_breach is false: not retraining")
        if drift["status"] == "drift":
            reasons.append(drift["reason"])
            if spec.loop.retrain_on_drift:
                incidents["drift"] = "drift"
        if fb["status"] == "breach":
            if spec.loop.retrain_on_negative_feedback:
                incidents["negative_feedback"] = "breach"
        retrain = bool(incidents)

        # the other next steps: roll a fresh champion back, or re-evaluate the one serving
        import time

        record = self._deployment_record(recipe.name)
        probe_result = self._probe_result(context)
        changed = self._eval_inputs_changed(recipe, record, head_info)
        actions = feedback.next_steps(
            slo_status=result["status"],
            slo_reasons=list(result["reasons"]),
            probe=probe_result,
            record=record,
            eval_inputs_changed=changed,
            now=time.time(),
            loop=spec.loop,
        )
        for name, action in actions.items():
            reasons += [r for r in action["reasons"] if r not in reasons]
            if action["incidents"]:
                self.log.info("%s requested: %s", name, "; ".join(action["reasons"]))
        actions["retrain"] = {"incidents": incidents, "cooldown_s": spec.loop.cooldown_s, "reasons": [], "evidence": {}}
        out = {
            "status": result["status"],
            "slos": result["slos"],
            "new_data": is_new,
            "retrain": retrain,
            "reasons": reasons,
            "model_name": model,
            "source_fingerprint": fingerprint,
            "incidents": incidents,
            "cooldown_s": spec.loop.cooldown_s,
            "feedback": fb,
            "drift": drift,
            "watch_events": watch_events,
            "rollback": bool(actions["rollback"]["incidents"]),
            "reevaluate": bool(actions["reevaluate"]["incidents"]),
            "actions": actions,
            "probe": probe_result,
            "champion": (record or {}).get("model_version") if record else None,
        }
        self.log.info(
            "monitor %s: status=%s new_data=%s retrain=%s rollback=%s reevaluate=%s; %s",
            recipe.name,
            out["status"],
            is_new,
            retrain,
            out["rollback"],
            out["reevaluate"],
            "; ".join(reasons) or "all good",
        )
        if unreachable:
            context["ti"].xcom_push(key="return_value", value=out)
            raise AirflowException(f"monitoring unavailable: {unreachable}")
        return out

    def _deployment_record(self, recipe_name: str) -> dict[str, Any] | None:
        """``home()/deployments/<recipe>.json`` (the deploy and rollback operators write it), or None."""
        import json

        from llmops_provider import config

        path = config.deployment_record(recipe_name)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            self.log.warning("deployment record %s unreadable (%s): no rollback or re-evaluation decided", path, exc)
            return None

    def _probe_result(self, context) -> dict[str, Any] | None:
        ti = (context or {}).get("ti")
        if not self.probe_task_id or ti is None:
            return None
        found = ti.xcom_pull(task_ids=self.probe_task_id)
        if found:
            self.log.info(
                "probe: %s (ROUGE-L %s, limit %s)", found.get("status"), found.get("rouge_l"), found.get("limit")
            )
        return found or None

    def _eval_inputs_changed(self, recipe, record: dict[str, Any] | None, head_info) -> list[str]:
        """What the serving champion was not evaluated on: a new held-out split, a new safety prompt set.

        The champion's latest eval run (its ``reeval_run_id`` tag, else ``eval_run_id`` in the
        deployment record) names the dataset commit (tag) and the safety prompt set and version
        (params) it was judged on. Unknowable (no
        record, no eval run, MLflow down) is "nothing changed", logged: never a request.
        """
        if not record or record.get("outcome") not in ("promoted", "restored") or not record.get("eval_run_id"):
            return []
        try:
            from llmops_provider.hooks.mlflow import MLflowHook

            client = MLflowHook(recipe.mlflow_conn_id).get_client()
            # its latest evaluation: a re-evaluation (tag reeval_run_id) supersedes the admission gate's run
            mv_tags = dict(client.get_model_version(recipe.model_name, str(record["model_version"])).tags or {})
            run = client.get_run(mv_tags.get("reeval_run_id") or record["eval_run_id"])
            tags, params = dict(run.data.tags), dict(run.data.params)
        except Exception as exc:  # noqa: BLE001 - a monitoring side check: logged, never fatal
            self.log.warning("eval inputs of champion v%s not checked: %s", record.get("model_version"), exc)
            return []
        changed = []
        evaluated_on = tags.get("dataset_commit") or record.get("dataset_commit")
        if head_info is not None and evaluated_on and head_info.commit_id != evaluated_on:
            from llmops_provider.datasets import get_store

            store = get_store()
            old = held_out_digest(store.local_path(recipe.data.dataset_repo, evaluated_on))
            new = held_out_digest(store.local_path(recipe.data.dataset_repo, head_info.commit_id))
            if old != new:
                changed.append(
                    f"held-out split of dataset head {head_info.commit_id[:12]} (evaluated on {evaluated_on[:12]})"
                )
        safety = recipe.evaluation.safety
        if safety.enabled:
            from llmops_provider.evaluation.safety import load_prompt_set

            current = load_prompt_set(safety.prompt_set)
            was = (params.get("safety_prompt_set"), params.get("safety_prompt_set_version"))
            if was != (current.name, current.version):
                changed.append(
                    f"safety prompt set {current.name} {current.version} "
                    f"(evaluated with {was[0] or 'none'} {was[1] or ''})".rstrip()
                )
        self.log.info("eval inputs of champion v%s: %s", record.get("model_version"), "; ".join(changed) or "unchanged")
        return changed

    def _processed_fingerprint(self, recipe_name: str) -> str | None:
        from llmops_provider import lineage
        from llmops_provider.compat import Variable

        return Variable.get(lineage.processed_sources_variable(recipe_name), default=None)

    def _dataset_head_info(self, repo: str, branch: str):
        from llmops_provider.datasets import get_store

        return get_store().head(repo, branch)

    def _watch_events(self, context, recipe_name: str) -> list[dict[str, Any]]:
        """Payloads of the watcher events that triggered this run (oldest first)."""
        from llmops_provider import lineage

        uri = lineage.watch_uri(recipe_name)
        events = (context or {}).get("triggering_asset_events") or {}
        out = []
        for asset in list(events):
            if getattr(asset, "uri", None) == uri:
                out += [dict((getattr(e, "extra", None) or {}).get("payload") or {}) for e in events[asset]]
        return out

    def _feedback(self, recipe, landing: str) -> dict[str, Any]:
        """Negative-feedback rate and curated-feedback landing; ``prompts`` are the production prompts."""
        import datetime as dt
        from pathlib import Path

        from llmops_provider import config, feedback
        from llmops_provider.recipes import expand

        spec = recipe.monitoring.feedback
        path = expand(spec.path, config.home()).replace("{recipe}", recipe.name)
        records, quarantined = feedback.read_feedback(path)
        reasons: list[str] = []
        if quarantined:
            self.log.warning("feedback: %d malformed record(s) quarantined, e.g. %s", len(quarantined), quarantined[0])
        since = dt.datetime.now(dt.UTC) - dt.timedelta(hours=spec.window_hours)
        rate, rated = feedback.negative_rate(records, since)
        status = "no-data"
        if rated >= spec.min_rated and rate is not None and spec.max_negative_rate is not None:
            status = "breach" if rate > spec.max_negative_rate else "ok"
            if status == "breach":
                reasons.append(
                    f"negative feedback {rate:.0%} > {spec.max_negative_rate:.0%} of {rated} "
                    f"records in {spec.window_hours:g}h"
                )
        landing_dir = Path(landing) if not Path(landing).is_file() else Path(landing).parent
        landed = feedback.land(path, landing_dir, spec.min_curated_records)
        if landed["landed"]:
            reasons.append(f"{landed['landed']} curated feedback records landed as {Path(landed['file']).name}")
        self.log.info(
            "feedback: %d records (%d quarantined), negative rate %s over %d rated; curated landed %d, "
            "pending %d (threshold %d)",
            len(records),
            len(quarantined),
            rate,
            rated,
            landed["landed"],
            landed["pending"],
            spec.min_curated_records,
        )
        newest = sorted(records, key=lambda r: str(r.get("ts")))[-recipe.monitoring.drift.max_prompts :]
        return {
            "status": status,
            "records": len(records),
            "quarantined": len(quarantined),
            "negative_rate": rate,
            "rated": rated,
            "landed": landed["landed"],
            "pending_curated": landed["pending"],
            "landed_file": landed["file"],
            "reasons": reasons,
            "prompts": [r["prompt"] for r in newest],
        }

    def _drift(self, recipe, prompts: list[str], head_info) -> dict[str, Any]:
        """Production prompts against the training split of the dataset head."""
        import json

        from llmops_provider import drift

        spec = recipe.monitoring.drift
        reference: list[str] = []
        if spec.max_js_divergence is not None and len(prompts) >= spec.min_prompts and head_info is not None:
            from llmops_provider.datasets import get_store

            train = get_store().local_path(recipe.data.dataset_repo, head_info.commit_id) / "train.jsonl"
            with train.open(encoding="utf-8") as fh:
                reference = [json.loads(line)["text"] for line in fh if line.strip()]
        return drift.evaluate_drift(prompts, reference, spec.max_js_divergence, spec.min_prompts)


def held_out_digest(root) -> str | None:
    """Content digest of a dataset version's held-out splits (``validation`` + ``test``); None if absent."""
    import hashlib
    from pathlib import Path

    digest, found = hashlib.sha256(), False
    for split in ("validation", "test"):
        path = Path(root) / f"{split}.jsonl"
        if path.is_file():
            found = True
            digest.update(split.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest() if found else None


class ProbeEvalOperator(BaseOperator):
    """Probe the live endpoint with held-out prompts and score the answers against their references.

    Prompts come from the dataset head's ``test`` split (``validation`` when empty): each
    document's first ``monitoring.probe.prompt_words`` words, the reference being the words that
    follow. Returns ``{status, rouge_l, prefix_match, n, limit, model_name, dataset_commit, items}``
    (``items``: the first five, for the log and the UI); status ``breach`` when the mean ROUGE-L is
    below ``monitoring.probe.min_rouge_l``, ``no-data`` when the split has no usable document.

    :param recipe_path: path of the recipe YAML (templated)
    :param endpoint: base URL of the server to probe; default the connection
        ``monitoring.probe.vllm_conn_id`` (templated)
    :param served_model_name: model to ask for; default the recipe name (templated)
    """

    template_fields: Sequence[str] = ("recipe_path", "endpoint", "served_model_name")

    def __init__(
        self, *, recipe_path: str, endpoint: str | None = None, served_model_name: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.recipe_path = recipe_path
        self.endpoint = endpoint
        self.served_model_name = served_model_name

    def execute(self, context) -> dict[str, Any]:
        import json

        from llmops_provider import probe
        from llmops_provider.datasets import get_store
        from llmops_provider.hooks.vllm import VLLMHook
        from llmops_provider.recipes import load_recipe

        recipe = load_recipe(self.recipe_path)
        spec = recipe.monitoring.probe
        model = self.served_model_name or recipe.name
        store = get_store()
        head = store.head(recipe.data.dataset_repo, recipe.data.branch)
        texts: list[str] = []
        if head is not None:
            root = store.local_path(recipe.data.dataset_repo, head.commit_id)
            for split in ("test", "validation"):
                path = root / f"{split}.jsonl"
                if path.is_file():
                    texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
                if texts:
                    break
        items = probe.probe_items(texts, spec.prompt_words, spec.reference_words, spec.limit)
        out: dict[str, Any] = {
            "model_name": model,
            "limit": spec.min_rouge_l,
            "dataset_commit": head.commit_id if head else None,
        }
        if not items:
            self.log.warning(
                "probe: no held-out document with %d+ words in the dataset head: nothing to probe",
                spec.prompt_words + spec.reference_words,
            )
            return {**out, "status": "no-data", "n": 0, "rouge_l": None, "prefix_match": None, "items": []}
        hook = VLLMHook(spec.vllm_conn_id, base_url=self.endpoint)
        completions = [hook.complete(item["prompt"], max_tokens=spec.max_tokens, model=model) for item in items]
        scored = probe.score(items, completions)
        status = "ok"
        if spec.min_rouge_l is not None and scored["rouge_l"] < spec.min_rouge_l:
            status = "breach"
        self.log.info(
            "probe %s: %d prompts, ROUGE-L %.3f, prefix match %.3f (%s)",
            model,
            scored["n"],
            scored["rouge_l"],
            scored["prefix_match"],
            status,
        )
        for row in scored["items"][:5]:
            self.log.info(
                "  %r -> %r (reference %r, ROUGE-L %.2f)",
                row["prompt"],
                row["completion"],
                row["reference"],
                row["rouge_l"],
            )
        return {**out, **scored, "status": status, "items": scored["items"][:5]}


class CostReportOperator(BaseOperator):
    """Record today's cost of a recipe: jobs from MLflow, serving from Prometheus, priced by ``monitoring.cost``.

    Writes ``<monitoring.cost.path>/<day>.json`` (rewritten on each run, so the last run of the
    day leaves the day's record) and returns it: device-hours and dollars per DAG run, per model
    version and per stage, serving replica-hours and tokens served per model version, and tokens
    served per dollar.

    :param recipe_path: path of the recipe YAML (templated)
    :param served_model_name: vLLM ``model_name`` label; default the recipe name (templated)
    """

    template_fields: Sequence[str] = ("recipe_path", "served_model_name")

    def __init__(self, *, recipe_path: str, served_model_name: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.recipe_path = recipe_path
        self.served_model_name = served_model_name

    def execute(self, context) -> dict[str, Any]:
        import datetime as dt
        import json
        import os
        from pathlib import Path

        from llmops_provider import config, cost
        from llmops_provider.recipes import expand, load_recipe

        recipe = load_recipe(self.recipe_path)
        now = dt.datetime.now(dt.UTC)
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        jobs = cost.job_costs(self._mlflow_runs(recipe, start), recipe)
        minutes, tokens = self._serving(recipe, max(60, int((now - start).total_seconds())))
        record = cost.daily_record(start.date(), jobs, cost.serving_costs(minutes, tokens, recipe), recipe)
        record["as_of"] = now.isoformat(timespec="seconds")
        out_dir = Path(expand(recipe.monitoring.cost.path, config.home()).replace("{recipe}", recipe.name))
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / f"{record['day']}.json"
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, target)
        total = record["total"]
        self.log.info(
            "cost %s %s: $%.4f (%.3f GPU-h, %.3f CPU-h), %d tokens served, %s tokens/$ -> %s",
            recipe.name,
            record["day"],
            total.get("usd", 0.0),
            total.get("gpu_hours", 0.0),
            total.get("cpu_hours", 0.0),
            record["tokens_served"],
            record["tokens_per_usd"],
            target,
        )
        return record

    def _mlflow_runs(self, recipe, since) -> list[dict[str, Any]]:
        from llmops_provider import lineage
        from llmops_provider.hooks.mlflow import MLflowHook

        client = MLflowHook(recipe.mlflow_conn_id).get_client()
        ids = [e.experiment_id for e in client.search_experiments()]
        if not ids:
            return []
        runs = client.search_runs(
            ids,
            filter_string=f"tags.{lineage.AIRFLOW_DAG_ID} LIKE '{recipe.name}_%' "
            f"AND attributes.start_time >= {int(since.timestamp() * 1000)}",
            max_results=5000,
        )
        versions = {}
        for mv in client.search_model_versions(f"name='{recipe.model_name}'"):
            versions[mv.run_id] = mv.version
        return [
            {
                "run_id": r.info.run_id,
                "dag_id": r.data.tags.get(lineage.AIRFLOW_DAG_ID),
                "airflow_run_id": r.data.tags.get(lineage.AIRFLOW_RUN_ID),
                "model_version": r.data.tags.get(lineage.MODEL_VERSION) or versions.get(r.info.run_id),
                "start": r.info.start_time / 1000,
                "end": r.info.end_time / 1000 if r.info.end_time else None,
            }
            for r in runs
        ]

    def _serving(self, recipe, window_s: int) -> tuple[dict[str, float], dict[str, float]]:
        """(replica-minutes, tokens served) per model version label since midnight."""
        from llmops_provider.hooks.prometheus import PrometheusHook

        model = self.served_model_name or recipe.name
        if '"' in model or "\\" in model:
            raise ValueError(f"model name {model!r} cannot be used as a PromQL label value")
        sel = f'{{model_name="{model}"}}'
        hook = PrometheusHook(recipe.monitoring.prometheus_conn_id)

        def by_version(promql: str) -> dict[str, float]:
            out: dict[str, float] = {}
            for series in hook.query(promql):
                version = series["metric"].get("model_version") or "unknown"
                out[version] = out.get(version, 0.0) + float(series["value"][1])
            return out

        # a 1-minute subquery counts the minutes each replica exported series, whatever the scrape interval
        minutes = by_version(
            f"sum by (model_version) (count_over_time(vllm:num_requests_running{sel}[{window_s}s:1m]))"
        )
        tokens: dict[str, float] = {}
        for metric in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
            for version, n in by_version(f"sum by (model_version) (increase({metric}{sel}[{window_s}s]))").items():
                tokens[version] = tokens.get(version, 0.0) + n
        return minutes, tokens
