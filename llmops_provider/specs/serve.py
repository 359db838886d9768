"""The serving job spec: which model version vLLM serves, where, with which engine limits."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from llmops_provider.specs.train import MERGED_ARTIFACT_PATH

CHAT_TEMPLATE_FILE = "chat_template.jinja"


class ServeSpec(BaseModel):
    """One serving deployment: which model version, where, with which engine limits."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = Field(description="served model name (the recipe name): what clients ask for")
    replica: str | None = Field(
        None, description="names pid/log/state files; default: name (one replica per version: <name>-v<version>)"
    )
    model_name: str
    model_version: str
    mlflow_run_id: str | None = Field(None, description="run holding the merged model; None with model_dir")
    artifact_path: str = MERGED_ARTIFACT_PATH
    model_dir: str | None = Field(None, description="serve this local HF directory instead of downloading")
    host: str = "127.0.0.1"
    port: int = Field(8011, ge=1, le=65535)
    max_model_len: int = Field(256, ge=16)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    tensor_parallel_size: int = Field(1, ge=1)
    quantization: str | None = Field(None, description="vLLM --quantization (e.g. fp8 on GPU)")
    inject_latency_ms: float = Field(
        0, ge=0, description="drills/tests: runtime.fault_injection delays every model step"
    )
    lineage: dict[str, str] = Field(
        default_factory=dict, description="dataset commit, run, eval verdict: the model card"
    )
    startup_timeout_s: int = Field(600, ge=1)
    kv_cache_space_gb: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE")
    extra_args: list[str] = []
    prompt_name: str | None = Field(None, description="MLflow prompt registry name of the chat template")
    prompt_version: str | None = Field(None, description="its version: a replica is (model version, prompt version)")
    chat_template: str | None = Field(None, description="the template text; packaged as chat_template.jinja")

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def instance(self) -> str:
        return self.replica or self.name

    @property
    def package_key(self) -> str:
        """Directory of the serving package under ``serving/<name>/``: one per (model, prompt) version."""
        return f"v{self.model_version}" + (f"-p{self.prompt_version}" if self.prompt_version else "")

    def vllm_args(self, model_dir: str) -> list[str]:
        """The vLLM OpenAI server arguments (the serving spec; the Kubernetes backend uses them too)."""
        args = [
            "--model",
            model_dir,
            "--served-model-name",
            self.name,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--max-model-len",
            str(self.max_model_len),
            "--dtype",
            self.dtype,
        ]
        if self.tensor_parallel_size > 1:
            args += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.quantization:
            args += ["--quantization", self.quantization]
        if self.chat_template is not None:  # written into the package by runtime.serve.package
            args += ["--chat-template", f"{model_dir}/{CHAT_TEMPLATE_FILE}"]
        return [*args, *self.extra_args]
