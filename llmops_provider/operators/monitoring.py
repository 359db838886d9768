"""The monitor stage: SLOs of the served model from Prometheus, plus new-data detection.

Its XCom ``{status, slos, new_data, retrain, reasons}`` decides whether ``request_retrain``
emits the retrain asset. No traffic is ``no-data``, never a breach; an unreachable
Prometheus publishes the result (status ``unreachable``) and then fails the task, so a
monitoring outage is visible rather than silently green.
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
    """

    template_fields: Sequence[str] = ("recipe_path", "served_model_name")

    def __init__(self, *, recipe_path: str, served_model_name: str | None = None,
                 retrain_on_slo_breach: bool | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.recipe_path = recipe_path
        self.served_model_name = served_model_name
        self.retrain_on_slo_breach = retrain_on_slo_breach

    def execute(self, context) -> dict[str, Any]:
        from llmops_provider import config, monitoring
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

        sources = [expand(s.path, config.home()) for s in recipe.data.sources]
        has_files = bool(monitoring.source_files(sources))
        fingerprint = monitoring.source_fingerprint(sources)
        head = self._dataset_head(recipe.data.dataset_repo, recipe.data.branch)
        is_new, why = monitoring.new_data(fingerprint, has_files, head, self._processed_fingerprint(recipe.name))
        self.log.info("data: %s (fingerprint %s)", why, fingerprint[:12])

        reasons = list(result["reasons"])
        retrain = False
        if is_new:
            reasons.append(why)
            retrain = spec.new_data_retrain
            if not retrain:
                reasons.append("monitoring.new_data_retrain is false: not retraining")
        on_breach = spec.retrain_on_slo_breach if self.retrain_on_slo_breach is None else self.retrain_on_slo_breach
        if result["status"] == "breach":
            if on_breach:
                retrain = True
            else:
                reasons.append("SLO breach recorded; monitoring.retrain_on_slo_breach is false: not retraining")
        out = {"status": result["status"], "slos": result["slos"], "new_data": is_new, "retrain": retrain,
               "reasons": reasons, "model_name": model, "source_fingerprint": fingerprint}
        self.log.info("monitor %s: status=%s new_data=%s retrain=%s; %s", recipe.name, out["status"], is_new,
                      retrain, "; ".join(reasons) or "all good")
        if unreachable:
            context["ti"].xcom_push(key="return_value", value=out)
            raise AirflowException(f"monitoring unavailable: {unreachable}")
        return out

    def _processed_fingerprint(self, recipe_name: str) -> str | None:
        from llmops_provider import lineage
        from llmops_provider.compat import Variable

        return Variable.get(lineage.processed_sources_variable(recipe_name), default=None)

    def _dataset_head(self, repo: str, branch: str) -> dict[str, Any] | None:
        from llmops_provider.datasets import get_store

        head = get_store().head(repo, branch)
        return None if head is None else dict(head.metadata or {})
