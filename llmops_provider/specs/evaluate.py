"""The evaluation job: its spec (operator -> runtime), its result (runtime -> operator), the gate.

Pure pydantic and stdlib: imported by the operator in the control plane and by the job
runtime, so the threshold logic that decides a verdict exists exactly once.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from llmops_provider.evaluation.bootstrap import Comparison

# Where the training job logs the servable model inside its MLflow run (a plain HF
# save_pretrained dir, adapter merged, tokenizer included); one constant, owned by training.
from llmops_provider.lineage import VERDICT_FAILED, VERDICT_PASSED  # the gate's verdicts, defined once
from llmops_provider.recipes import (
    GENERATED_TASKS,
    RegressionPolicy,
    ResourceBenchmarkSpec,
    SafetySpec,
    Threshold,
)
from llmops_provider.specs.train import MERGED_ARTIFACT_PATH  # noqa: F401 - re-exported

# The metric the recipe's default threshold names. It is TOKEN-level perplexity:
# exp(-sum(loglikelihood) / sum(tokens)) over the held-out documents, tokens counted with
# the model's own tokenizer (no special tokens: lm-eval scores every text token, the first
# conditioned on the BOS/EOS prefix). Word/byte perplexity and bits-per-byte are reported too.
PERPLEXITY = "perplexity"


class BaselineRef(BaseModel):
    """The model the candidate must not regress against (the version holding the ``champion`` alias)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_version: str
    mlflow_run_id: str
    artifact_path: str = MERGED_ARTIFACT_PATH
    alias: str = "champion"


class EvalJobSpec(BaseModel):
    """Everything the eval runtime needs; credentials travel in the environment, never here."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    recipe: str = Field(description="recipe name (MLflow experiment `<recipe>-eval`)")
    model_name: str
    model_version: str
    mlflow_run_id: str = Field(description="training run that holds the model artifacts")
    artifact_path: str = MERGED_ARTIFACT_PATH
    dataset_repo: str | None = None
    dataset_commit: str | None = None
    dataset_dir: str = Field(description="local directory of the dataset version (has test.jsonl)")
    test_split: str = "test.jsonl"
    thresholds: dict[str, Threshold] = Field(min_length=1)
    limit: int | None = Field(None, ge=1)
    output_dir: str
    batch_size: int = Field(4, ge=1)
    max_length: int | None = Field(None, ge=16, description="context window; default: the model's")
    experiment_name: str | None = None
    extra_tags: dict[str, str] = {}
    tasks: list[str] = Field(default_factory=lambda: [str(t) for t in GENERATED_TASKS])
    extra_tasks: list[str] = []
    task_dirs: list[str] = []
    max_gen_tokens: int = Field(32, ge=1)
    baseline: BaselineRef | None = Field(None, description="champion to compare with; None: no comparison")
    regression: RegressionPolicy = RegressionPolicy(enabled=False)
    safety: SafetySpec = SafetySpec(enabled=False)
    resources: ResourceBenchmarkSpec = ResourceBenchmarkSpec()
    seed: int = 1234

    @property
    def experiment(self) -> str:
        return self.experiment_name or f"{self.recipe}-eval"


class GateFailure(BaseModel):
    metric: str
    value: float | None
    reason: str


class EvalResult(BaseModel):
    """``result.json`` written by the runtime; the operator's XCom ``return_value``."""

    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    model_version: str
    eval_run_id: str | None
    verdict: Literal["passed", "failed"]
    metrics: dict[str, float]
    thresholds: dict[str, dict[str, float | None]]
    report_path: str
    failures: list[GateFailure] = []
    dataset_commit: str | None = None
    markdown_path: str | None = None
    html_path: str | None = None
    baseline_version: str | None = None
    comparisons: list[Comparison] = []


def apply_thresholds(metrics: dict[str, float], thresholds: dict[str, Threshold]) -> list[GateFailure]:
    """Judge ``metrics`` against ``thresholds``; an empty list means the gate passes.

    Fails closed: a metric absent from the results, or not a finite number, is a failure.
    Bounds are inclusive (``min <= value <= max``).
    """
    if not thresholds:
        return [GateFailure(metric="<none>", value=None, reason="no thresholds: a gate with no criteria never passes")]
    failures: list[GateFailure] = []
    for name, bound in sorted(thresholds.items()):
        value = metrics.get(name)
        if value is None:
            failures.append(GateFailure(metric=name, value=None, reason=f"metric {name!r} missing from the results"))
            continue
        try:
            value = float(value)
        except (TypeError, ValueError):
            failures.append(GateFailure(metric=name, value=None, reason=f"metric {name!r} is not a number: {value!r}"))
            continue
        if not math.isfinite(value):
            failures.append(GateFailure(metric=name, value=None, reason=f"metric {name!r} is not finite: {value}"))
            continue
        if bound.min is not None and value < bound.min:
            failures.append(GateFailure(metric=name, value=value, reason=f"{name}={value:.6g} < min {bound.min:g}"))
        if bound.max is not None and value > bound.max:
            failures.append(GateFailure(metric=name, value=value, reason=f"{name}={value:.6g} > max {bound.max:g}"))
    return failures


def regression_failures(
    comparisons: list[Comparison], policy: RegressionPolicy, baseline_present: bool
) -> list[GateFailure]:
    """A failure per compared metric that regressed, or that the policy names but nobody compared.

    Fails closed: with a baseline, every metric of ``policy.metrics`` must have a comparison.
    """
    if not policy.enabled or not baseline_present:
        return []
    failures = [
        GateFailure(
            metric=c.metric, value=c.candidate, reason=f"regression vs {policy.baseline_alias}: " + c.describe()
        )
        for c in comparisons
        if c.regressed
    ]
    compared = {c.metric for c in comparisons}
    for metric in sorted(set(policy.metrics) - compared):
        failures.append(
            GateFailure(
                metric=metric,
                value=None,
                reason=f"metric {metric!r} has no paired comparison with {policy.baseline_alias} "
                "(missing per-document scores)",
            )
        )
    return failures


def verdict_of(failures: list[GateFailure]) -> Literal["passed", "failed"]:
    return VERDICT_FAILED if failures else VERDICT_PASSED
