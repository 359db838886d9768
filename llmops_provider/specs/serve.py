"""The serving job spec: which model version vLLM serves, where, with which engine limits."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from llmops_provider.specs.train import MERGED_ARTIFACT_PATH


class ServeSpec(BaseModel):
    """One serving deployment: which model version, where, with which engine limits."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = Field(description="served model name (the recipe name); names pid/log/state files")
    model_name: str
    model_version: str
    mlflow_run_id: str | None = Field(None, description="run holding the merged model; None with model_dir")
    artifact_path: str = MERGED_ARTIFACT_PATH
    model_dir: str | None = Field(None, description="serve this local HF directory instead of downloading")
    host: str = "127.0.0.1"
    port: int = Field(8011, ge=1, le=65535)
    max_model_len: int = Field(256, ge=16)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    startup_timeout_s: int = Field(600, ge=1)
    kv_cache_space_gb: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE")
    extra_args: list[str] = []

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"
