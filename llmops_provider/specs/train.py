"""The training job: its spec (operator -> runtime) and its result (runtime -> operator).

Pure pydantic and stdlib: the control plane builds the spec, the job runtime (a local
process or a pod) reads it. Credentials never appear here; they travel in the environment
(``MLflowHook.job_env()`` locally, a Kubernetes secret reference in a pod).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from llmops_provider.recipes import ModelSpec, Recipe, TokenizerSpec, TrainingSpec

# Where the training job logs each part inside its MLflow run (see runtime/train.py).
BASE_ARTIFACT_PATH = "model/base"
ADAPTER_ARTIFACT_PATH = "model/adapter"
TOKENIZER_ARTIFACT_PATH = "model/tokenizer"
MERGED_ARTIFACT_PATH = "model/merged"
DS_CONFIG_ARTIFACT = "ds_config.json"

# Model version tag that makes a training run idempotent.
IDEMPOTENCY_TAG = "idempotency_key"


def idempotency_key(recipe_fingerprint: str, dataset_commit: str) -> str:
    """Same recipe (what gets trained) + same data -> same key -> the trained version is reused."""
    return hashlib.sha256(f"{recipe_fingerprint}:{dataset_commit}".encode()).hexdigest()[:24]


class TrainJobSpec(BaseModel):
    """Everything the training runtime needs to train, track and register one model version."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    recipe: str = Field(description="recipe name")
    recipe_fingerprint: str
    tokenizer: TokenizerSpec
    model: ModelSpec
    training: TrainingSpec
    dataset_dir: str = Field(description="local directory of the dataset commit (train.jsonl, validation.jsonl)")
    dataset_repo: str
    dataset_commit: str
    output_dir: str = Field(description="job working directory: exports, result.json")
    checkpoint_dir: str | None = Field(
        None, description="DeepSpeed checkpoints for resume; default <output_dir>/checkpoints"
    )
    result_path: str | None = Field(None, description="where result.json goes; default <output_dir>/result.json")
    experiment_name: str = Field(description="MLflow experiment (one per recipe)")
    registered_model_name: str
    tags: dict[str, str] = Field(default_factory=dict, description="lineage tags for the MLflow run and model version")
    idempotency_key: str
    log_every: int = Field(5, ge=1, description="print/log metrics every N optimizer steps")
    eval_every: int | None = Field(
        None,
        ge=1,
        description="validation loss every N steps (always at the end); "
        "default training.eval_every, else training.checkpoint_every",
    )
    max_eval_blocks: int = Field(64, ge=1, description="cap on validation blocks per evaluation")

    @property
    def checkpoints(self) -> Path:
        return Path(self.checkpoint_dir or Path(self.output_dir) / "checkpoints")

    @property
    def result_file(self) -> Path:
        return Path(self.result_path or Path(self.output_dir) / "result.json")

    @classmethod
    def from_recipe(
        cls,
        recipe: Recipe,
        *,
        dataset_dir: str,
        dataset_repo: str,
        dataset_commit: str,
        output_dir: str,
        tags: dict[str, str] | None = None,
        **overrides,
    ) -> TrainJobSpec:
        fingerprint = recipe.fingerprint()
        lineage = {
            "recipe": recipe.name,
            "recipe_fingerprint": fingerprint,
            "dataset_repo": dataset_repo,
            "dataset_commit": dataset_commit,
            **(tags or {}),
        }
        return cls(
            recipe=recipe.name,
            recipe_fingerprint=fingerprint,
            tokenizer=recipe.tokenizer,
            model=recipe.model,
            training=recipe.training,
            dataset_dir=dataset_dir,
            dataset_repo=dataset_repo,
            dataset_commit=dataset_commit,
            output_dir=output_dir,
            experiment_name=recipe.name,
            registered_model_name=recipe.model_name,
            tags={k: str(v) for k, v in lineage.items()},
            idempotency_key=idempotency_key(fingerprint, dataset_commit),
            **overrides,
        )


class TrainResult(BaseModel):
    """``result.json``: what the operator returns to XCom and puts in the model asset event."""

    model_config = ConfigDict(protected_namespaces=())

    mlflow_run_id: str
    model_name: str
    model_version: str
    dataset_commit: str
    reused: bool
    final_loss: float | None = None
    val_loss: float | None = None
    tokens_per_s: float | None = Field(None, description="training throughput after the first step (all ranks)")
