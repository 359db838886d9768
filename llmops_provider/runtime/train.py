"""The training job: tokenizer, Llama causal LM, LoRA (PEFT) or full fine-tune, DeepSpeed ZeRO 0-3.

Entrypoint (one rank)::

    python -m llmops_provider.runtime.train --spec spec.json

``launch_command()`` wraps it in the ``deepspeed`` launcher for ``training.world_size``
ranks (CPU processes with gloo locally, one per GPU in a pod)::

    deepspeed --num_accelerators N --master_port P --no_local_rank \
        --module llmops_provider.runtime.train --spec spec.json

Started without a launcher it runs as a single rank. Never imports Airflow; stdlib only at
import time (the control plane imports ``launch_command``).

Steps: idempotency check (a registered version tagged with the spec's ``idempotency_key``
whose run FINISHED is reused: no new run, no new version) -> data (``packed/`` shards and the
dataset's ``tokenizer/`` when the version has them, else the JSONL packed here) -> model ->
DeepSpeed loop (checkpoint every ``checkpoint_every`` steps on all ranks, resume from the
latest one) -> validation loss -> export -> MLflow -> ``result.json``.

Resume is exact: a checkpoint holds the DeepSpeed engine state (weights, optimizer, LR
scheduler), each rank's RNG state (python, numpy, torch) and the data position; its tag is
published in ``latest`` only after every rank has written its part, so a SIGKILL during a
save leaves the previous checkpoint in charge.

MLflow (rank 0 only; the server comes from ``MLFLOW_TRACKING_URI``)
  experiment ``spec.experiment_name`` (the recipe name); one run per idempotency key: a
  restarted job continues the run of its checkpoint, or the unfinished run with its key;
  tags = ``spec.tags`` (recipe, recipe_fingerprint, dataset_repo, dataset_commit, Airflow
  ids) + ``idempotency_key``, ``code_version``, ``image``, library versions; params =
  flattened ``tokenizer.*``/``model.*``/``training.*`` + ``ds.*`` (the generated DeepSpeed
  config); metrics per step ``train_loss``, ``learning_rate``, ``grad_norm``,
  ``tokens_per_s``, periodic ``val_loss``; final ``final_loss``, ``val_loss``,
  ``val_perplexity``, ``train_runtime_s``; ``system/*`` (CPU, memory, GPU) from MLflow's
  system metrics monitor.

Run artifacts (what evaluation and deployment download)::

    model/base/       HF save_pretrained of the base model BEFORE training (config.json +
                      model.safetensors); a random-init base cannot be re-downloaded
    model/adapter/    PEFT save_pretrained (adapter_config.json, adapter_model.safetensors;
                      includes modules_to_save); absent when training.method == "full"
    model/tokenizer/  the tokenizer (tokenizer.json, tokenizer_config.json, special tokens)
    model/merged/     plain HF model dir (safetensors), adapter merged (merge_and_unload) +
                      tokenizer files: load with AutoModelForCausalLM / AutoTokenizer or serve
                      with vLLM; ZeRO-3 shards are consolidated with zero_to_fp32 first
    ds_config.json    the generated DeepSpeed config

Model version (registered model ``spec.registered_model_name``): source
``<run artifact uri>/model/merged``; tags ``dataset_repo``, ``dataset_commit``,
``mlflow_run_id``, ``recipe``, ``recipe_fingerprint``, ``idempotency_key``, ``code_version``,
``image``, ``artifact_path`` (= model/merged), Airflow ids; alias ``challenger``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from llmops_provider.lineage import CHALLENGER_ALIAS  # set on every newly trained version
from llmops_provider.specs.train import (
    ADAPTER_ARTIFACT_PATH,
    BASE_ARTIFACT_PATH,
    DS_CONFIG_ARTIFACT,
    IDEMPOTENCY_TAG,
    MERGED_ARTIFACT_PATH,
    TOKENIZER_ARTIFACT_PATH,
    TrainJobSpec,
    TrainResult,
)

MODULE = "llmops_provider.runtime.train"
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
LATEST = "latest"  # DeepSpeed's own pointer file: zero_to_fp32 and load_checkpoint read it too
STATE_FILE = "llmops_state.json"
IMAGE_ENV = "LLMOPS_IMAGE"  # set by the Kubernetes backends: the image this job runs in
log = logging.getLogger("llmops.train")


# ---------------------------------------------------------------- launch (no heavy imports)


def launch_command(
    spec_path: str, ranks: int, *, launcher: str = "deepspeed", master_port: int | None = None
) -> list[str]:
    """The deepspeed launcher command for ``ranks`` local ranks.

    ``--num_accelerators`` (alias ``--num_gpus``) sets the slot count directly, so it starts
    N CPU ranks too (the CPU accelerator would otherwise count NUMA nodes: 1 here).
    """
    return [
        launcher,
        "--num_accelerators",
        str(ranks),
        "--master_port",
        str(master_port or 29500),
        "--no_local_rank",
        "--module",
        MODULE,
        "--spec",
        spec_path,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_config(training, world_size: int, precision: str = "fp32") -> dict[str, Any]:
    """The DeepSpeed config generated from the recipe's ``training`` section.

    ``precision`` is the resolved one (:func:`resolve_precision`): ``bf16`` on GPUs, ``fp32``
    on CPU (no fast half precision there). The optimizer is a torch AdamW passed to
    ``deepspeed.initialize`` (no fused op to compile), hence ``zero_allow_untested_optimizer``.
    """
    bf16 = precision == "bf16"
    zero: dict[str, Any] = {"stage": training.zero_stage}
    if training.zero_stage >= 1:
        zero.update(
            contiguous_gradients=True,
            overlap_comm=bf16,
            reduce_scatter=True,
            reduce_bucket_size=50_000_000,
            allgather_bucket_size=50_000_000,
        )
    if training.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=50_000_000,
            stage3_param_persistence_threshold=100_000,
            stage3_gather_16bit_weights_on_model_save=True,
        )
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "gradient_accumulation_steps": training.grad_accum,
        "train_batch_size": training.micro_batch_size * training.grad_accum * world_size,
        "gradient_clipping": training.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": False},
        "bf16": {"enabled": bf16},
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": training.max_steps,
                "warmup_num_steps": max(1, training.warmup_steps),
                "warmup_type": "linear",
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": training.min_lr_ratio,
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def resolve_precision(requested: str, gpu_bf16: bool) -> str:
    """``auto`` -> bf16 on a bf16-capable GPU, else fp32; an impossible request names the fix."""
    if requested == "auto":
        return "bf16" if gpu_bf16 else "fp32"
    if requested == "bf16" and not gpu_bf16:
        raise ValueError(
            "training.precision is bf16 but this job has no GPU with bf16 support; "
            "set training.precision: auto (bf16 on GPUs, fp32 on CPU) or fp32"
        )
    return requested


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Nested dict -> ``{"a.b": "v"}``; lists stay JSON (MLflow params are strings)."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return out
    return {prefix: json.dumps(value) if isinstance(value, list) else str(value)}


def code_version() -> str:
    """``airflow-provider-llmops==X`` plus the git commit when the package runs from a checkout."""
    from llmops_provider import __version__

    version = f"airflow-provider-llmops=={__version__}"
    root = Path(__file__).resolve().parents[2]
    if (root / ".git").exists():
        try:
            sha = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            version += f"+g{sha}{'.dirty' if dirty else ''}"
        except (OSError, subprocess.SubprocessError):
            pass
    return version


def runtime_tags() -> dict[str, str]:
    """Where this job's code runs: code version, image, library versions (MLflow run + version tags)."""
    from importlib.metadata import PackageNotFoundError, version

    tags = {"code_version": code_version(), "image": os.environ.get(IMAGE_ENV) or f"local:{sys.executable}"}
    for pkg in ("torch", "deepspeed", "transformers", "peft"):
        try:
            tags[f"{pkg}_version"] = version(pkg)
        except PackageNotFoundError:
            pass
    return tags


# ---------------------------------------------------------------- tokenizer and model


def build_tokenizer(spec: TrainJobSpec, train_texts: list[str], out_dir: Path, source: str | Path | None = None):
    """Load ``source`` (the dataset's tokenizer), ``tokenizer.path`` or the checkpoint's.

    With none of them, train a byte-level BPE on ``train_texts``.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    source = source or spec.tokenizer.path or spec.model.checkpoint
    if source:
        try:
            tok = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as exc:
            field = (
                ("tokenizer.path" if spec.tokenizer.path else "model.checkpoint")
                if source in (spec.tokenizer.path, spec.model.checkpoint)
                else "the dataset's tokenizer/ (packed manifest)"
            )
            raise ValueError(
                f"cannot load a tokenizer from {field}={source!r}: {exc}; "
                "set tokenizer.path to a directory saved with save_pretrained"
            ) from None
        missing = {k: v for k, v in SPECIAL_TOKENS.items() if getattr(tok, k) is None}
        if missing:
            tok.add_special_tokens(missing)
    else:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        bpe = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=spec.tokenizer.vocab_size,
            special_tokens=list(SPECIAL_TOKENS.values()),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        bpe.train_from_iterator(train_texts, trainer=trainer)
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, **SPECIAL_TOKENS)
    tok.save_pretrained(out_dir)
    return tok


def build_model(spec: TrainJobSpec, tokenizer):
    """Random-init Llama from ``model.config`` (seeded), or ``model.checkpoint`` when set."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.training.seed)
    if spec.model.checkpoint:
        model = AutoModelForCausalLM.from_pretrained(spec.model.checkpoint, dtype=torch.float32)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
    else:
        config = LlamaConfig(
            **{
                **spec.model.config,
                "vocab_size": len(tokenizer),
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            },
        )
        model = LlamaForCausalLM(config)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and spec.training.seq_len > max_pos:
        raise ValueError(
            f"training.seq_len ({spec.training.seq_len}) exceeds the model's max_position_embeddings "
            f"({max_pos}); lower seq_len or raise model.config.max_position_embeddings"
        )
    return model


def wrap_lora(model, training):
    from peft import LoraConfig, get_peft_model

    lora = training.lora
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        modules_to_save=list(lora.modules_to_save) or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def prepare_model(model, training):
    """Gradient checkpointing (if asked) and LoRA (if the method says so): what the loop trains."""
    if training.gradient_checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return wrap_lora(model, training) if training.method == "lora" else model


# ---------------------------------------------------------------- MLflow (rank 0)


class Tracker:
    """MLflow on rank 0: idempotency lookup, one run per key, metrics, artifacts, registration."""

    def __init__(self, spec: TrainJobSpec):
        from mlflow import MlflowClient

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            raise RuntimeError(
                "MLFLOW_TRACKING_URI is not set: the training job logs to an MLflow server "
                "(the operator passes MLflowHook.job_env(); in a pod, the llmops-mlflow secret)"
            )
        self.spec = spec
        self.client = MlflowClient()
        self.run_id: str | None = None
        self._pending: list = []
        self._sender = None  # one background thread for metric batches
        self._sending = None  # the batch in flight
        self._system = None

    def _versions(self):
        name = self.spec.registered_model_name
        try:
            return self.client.search_model_versions(
                f"name = '{name}' and tags.{IDEMPOTENCY_TAG} = '{self.spec.idempotency_key}'"
            )
        except Exception as exc:  # noqa: BLE001 - a registry without the model answers with an error on some servers
            log.info("no model version with this idempotency key yet (%s)", exc)
            return []

    def find_existing(self) -> TrainResult | None:
        """The version a FINISHED run registered for this key: the job has nothing left to do."""
        for mv in sorted(self._versions(), key=lambda v: int(v.version), reverse=True):
            run = self.client.get_run(mv.run_id) if mv.run_id else None
            if run is None or run.info.status != "FINISHED":
                continue
            metrics = run.data.metrics
            return TrainResult(
                mlflow_run_id=mv.run_id,
                model_name=self.spec.registered_model_name,
                model_version=str(mv.version),
                dataset_commit=self.spec.dataset_commit,
                reused=True,
                final_loss=metrics.get("final_loss"),
                val_loss=metrics.get("val_loss"),
                tokens_per_s=metrics.get("train_tokens_per_s"),
            )
        return None

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.spec.experiment_name)
        return exp.experiment_id if exp else self.client.create_experiment(self.spec.experiment_name)

    def unfinished_run(self, exp_id: str) -> str | None:
        """The newest run with this key that never finished (a crash before its first checkpoint)."""
        runs = self.client.search_runs(
            [exp_id],
            filter_string=f"tags.{IDEMPOTENCY_TAG} = '{self.spec.idempotency_key}' and attributes.status != 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def start(self, resume_run_id: str | None, ds_config: dict, extra_tags: dict[str, str]) -> str:
        """Continue the checkpoint's run, else the key's unfinished run, else create one: one run per key."""
        exp_id = self._experiment_id()
        run_id = None
        if resume_run_id:
            try:
                if self.client.get_run(resume_run_id).info.status != "FINISHED":
                    run_id = resume_run_id
            except Exception as exc:  # noqa: BLE001 - deleted run or another server: start a fresh one
                log.warning("checkpoint's MLflow run %s is not usable (%s)", resume_run_id, exc)
        run_id = run_id or self.unfinished_run(exp_id)
        tags = {**self.spec.tags, **extra_tags, IDEMPOTENCY_TAG: self.spec.idempotency_key}
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            log.info("continuing MLflow run %s", run_id)
        else:
            tags["mlflow.runName"] = f"{self.spec.recipe}-{self.spec.dataset_commit[:12]}"
            run_id = self.client.create_run(exp_id, tags=tags).info.run_id
        self.run_id = run_id
        from mlflow.entities import Param, RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items() if k != "mlflow.runName"])
        params = {
            **flatten("tokenizer", self.spec.tokenizer.model_dump(mode="json")),
            **flatten("model", self.spec.model.model_dump(mode="json")),
            **flatten("training", self.spec.training.model_dump(mode="json", exclude={"kubernetes"})),
            **flatten("ds", ds_config),
        }
        params = {k[:250]: v[:6000] for k, v in params.items()}
        logged = self.client.get_run(run_id).data.params  # params are immutable: a continued run keeps its own
        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
        if changed:
            log.warning("continuing run %s with different params (kept the first values): %s", run_id, changed)
        items = [Param(k, v) for k, v in params.items() if k not in logged]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])
        self._start_system_metrics(resumed=bool(logged))
        return run_id

    def _start_system_metrics(self, resumed: bool) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system = SystemMetricsMonitor(
                self.run_id, sampling_interval=10, samples_before_logging=1, resume_logging=resumed
            )
            self._system.start()
        except Exception as exc:  # noqa: BLE001 - psutil missing or an old server: training goes on
            log.warning("system metrics are off: %s", exc)
            self._system = None

    def _stop_system_metrics(self) -> None:
        if self._system is not None:
            try:
                self._system.finish()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                log.debug("system metrics monitor did not stop cleanly", exc_info=True)
            self._system = None

    def metrics(self, values: dict[str, float], step: int, flush: bool = False) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in values.items()]
        if flush or len(self._pending) >= 500:
            self.flush(wait=False)

    def flush(self, wait: bool = True) -> None:
        """Send the pending metrics; ``wait=False`` hands them to a background thread (the training
        loop does not stall on the tracking server; the next flush re-raises its error)."""
        if self._sending is not None:
            self._sending.result()
            self._sending = None
        if self._pending and self.run_id:
            batch, self._pending = self._pending, []
            if wait:
                self._send(batch)
            else:
                if self._sender is None:
                    from concurrent.futures import ThreadPoolExecutor

                    self._sender = ThreadPoolExecutor(1, thread_name_prefix="mlflow-metrics")
                self._sending = self._sender.submit(self._send, batch)

    def _send(self, batch: list) -> None:
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def finish(self, export_dir: Path, ds_config_path: Path, extra_tags: dict[str, str]) -> str:
        """Upload artifacts, register the version (once per run) with lineage tags, alias it, end the run."""
        from mlflow.exceptions import MlflowException

        self.flush()
        self._stop_system_metrics()
        self.client.log_artifacts(self.run_id, str(export_dir / "model"), "model")
        self.client.log_artifact(self.run_id, str(ds_config_path))
        name = self.spec.registered_model_name
        try:
            self.client.create_registered_model(name, tags={"recipe": self.spec.recipe})
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        # a crash after registration but before the run ended: the retry adopts that version
        mine = [v for v in self._versions() if v.run_id == self.run_id]
        if mine:
            mv = max(mine, key=lambda v: int(v.version))
            log.info("model version %s was already registered by run %s", mv.version, self.run_id)
        else:
            run = self.client.get_run(self.run_id)
            tags = {
                **self.spec.tags,
                **extra_tags,
                "mlflow_run_id": self.run_id,
                IDEMPOTENCY_TAG: self.spec.idempotency_key,
                "artifact_path": MERGED_ARTIFACT_PATH,
            }
            mv = self.client.create_model_version(
                name,
                source=f"{run.info.artifact_uri}/{MERGED_ARTIFACT_PATH}",
                run_id=self.run_id,
                tags=tags,
                description=f"{self.spec.recipe} trained on {self.spec.dataset_repo}@{self.spec.dataset_commit}",
            )
        self.client.set_registered_model_alias(name, CHALLENGER_ALIAS, mv.version)
        self.client.set_terminated(self.run_id, status="FINISHED")
        log.info("registered %s version %s (alias %s) from run %s", name, mv.version, CHALLENGER_ALIAS, self.run_id)
        return str(mv.version)

    def fail(self) -> None:
        self._stop_system_metrics()
        if self.run_id:
            try:
                self.flush()
                self.client.set_terminated(self.run_id, status="FAILED")
            except Exception:  # noqa: BLE001 - already failing; keep the original error
                log.exception("could not mark MLflow run %s FAILED", self.run_id)


# ---------------------------------------------------------------- checkpoints


def rng_state() -> dict[str, Any]:
    import random

    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Checkpoints:
    """Save and resume: DeepSpeed engine state + per-rank RNG + data position, published atomically.

    Layout (DeepSpeed's, so its tools work on it)::

        <dir>/latest                          tag of the newest COMPLETE checkpoint
        <dir>/step0000050/mp_rank_00_model_states.pt, *_optim_states.pt   (DeepSpeed)
        <dir>/step0000050/rng_state_rank{r}.pt                              (every rank)
        <dir>/step0000050/llmops_state.json   step, MLflow run id, idempotency key, data position
    """

    def __init__(self, directory: Path, spec: TrainJobSpec, rank: int, world: int, dist):
        self.dir, self.spec, self.rank, self.world, self.dist = directory, spec, rank, world, dist
        # LoRA: frozen base weights are rebuilt from the recipe; only what trains is saved
        self.exclude_frozen = spec.training.method == "lora"

    def latest_tag(self) -> str | None:
        path = self.dir / LATEST
        return path.read_text().strip() if path.is_file() else None

    def save(self, engine, step: int, state: dict[str, Any]) -> str:
        import torch

        tag = f"step{step:07d}"
        tag_dir = self.dir / tag
        tag_dir.mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), tag_dir / f"rng_state_rank{self.rank}.pt")
        if self.rank == 0:
            (tag_dir / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
        engine.save_checkpoint(
            str(self.dir),
            tag=tag,
            client_state={"step": step, **state},
            save_latest=False,
            exclude_frozen_parameters=self.exclude_frozen,
        )
        self.dist.barrier()  # every rank's shards and RNG state are on disk: only now publish the tag
        if self.rank == 0:
            tmp = self.dir / f".{LATEST}.tmp"
            tmp.write_text(tag)
            os.replace(tmp, self.dir / LATEST)
            for child in self.dir.iterdir():
                if child.is_dir() and child.name.startswith("step") and child.name != tag:
                    shutil.rmtree(child, ignore_errors=True)
        return tag

    def resume(self, engine) -> dict[str, Any] | None:
        """Load the latest checkpoint into ``engine`` and this rank's RNG; its state, or None to start fresh."""
        import torch

        tag = self.latest_tag()
        if tag is None:
            return None
        tag_dir = self.dir / tag
        try:
            state = json.loads((tag_dir / STATE_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RuntimeError(
                f"checkpoint {tag_dir} has no readable {STATE_FILE} ({exc}); delete {self.dir} to train from scratch"
            ) from None
        if state.get("idempotency_key") != self.spec.idempotency_key:
            if self.rank == 0:
                log.warning(
                    "ignoring checkpoint %s: it belongs to idempotency key %s, not %s (another recipe "
                    "or dataset commit); training from scratch",
                    tag_dir,
                    state.get("idempotency_key"),
                    self.spec.idempotency_key,
                )
            return None
        path, _ = engine.load_checkpoint(
            str(self.dir),
            tag=tag,
            load_module_strict=not self.exclude_frozen,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}; delete {self.dir} to start over")
        rng_file = tag_dir / f"rng_state_rank{self.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            log.warning(
                "no RNG state for rank %d in %s (saved with %s ranks): reseeding",
                self.rank,
                tag_dir,
                state.get("data", {}).get("world"),
            )
            seed_everything(self.spec.training.seed + 1000 * int(state["step"]) + self.rank)
        saved_world = state.get("data", {}).get("world")
        if saved_world not in (None, self.world) and self.rank == 0:
            log.warning(
                "resuming %d ranks from a checkpoint of %s ranks: the data order is not the uninterrupted one",
                self.world,
                saved_world,
            )
        return state


# ---------------------------------------------------------------- the job


def _init_distributed():
    """Single-process defaults when no launcher set the rendezvous env, then DeepSpeed's init (gloo on CPU)."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    import torch

    local = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or os.environ["WORLD_SIZE"])
    # ranks share the node's cores: oversubscribed threads slow every rank down; OMP_NUM_THREADS wins
    threads = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(
        int(threads)
        if threads.isdigit() and int(threads) > 0
        else max(1, len(os.sched_getaffinity(0)) // max(1, local))
    )
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)  # its INFO dumps the whole config per rank
    deepspeed.init_distributed()
    import torch.distributed as dist

    return dist, dist.get_rank(), dist.get_world_size()


def _fmt_s(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def evaluate(engine, blocks, rank: int, world: int, batch: int, dist) -> float:
    """Mean token loss over ``blocks`` (split across ranks, summed with all_reduce)."""
    import torch

    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=engine.device)
    mine = list(range(rank, len(blocks), world))
    with torch.no_grad():
        for i in range(0, len(mine), batch):
            ids = torch.from_numpy(blocks.take(mine[i : i + batch])).to(engine.device)
            loss = engine(input_ids=ids, labels=ids).loss
            total[0] += loss.double() * ids.numel()
            total[1] += ids.numel()
    dist.all_reduce(total)
    engine.train()
    total = total.cpu()
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def train(spec: TrainJobSpec) -> TrainResult:
    dist, rank, world = _init_distributed()
    out = Path(spec.output_dir)
    export = out / "export"
    tracker = Tracker(spec) if rank == 0 else None
    try:
        result = _train(spec, dist, rank, world, out, export, tracker)
    except BaseException:
        if tracker is not None:
            tracker.fail()
        raise
    if rank == 0:
        spec.result_file.parent.mkdir(parents=True, exist_ok=True)
        spec.result_file.write_text(result.model_dump_json(indent=2))
        log.info("result: %s", result.model_dump_json())
    dist.barrier()
    if os.environ.get("MASTER_PORT") and int(os.environ.get("LOCAL_RANK", rank)) == 0:
        from llmops_provider.backends.local import release_shm_buffers

        release_shm_buffers(int(os.environ["MASTER_PORT"]), log)  # DeepSpeed never unlinks them itself
    shut_down_distributed(dist)
    return result


def shut_down_distributed(dist) -> None:
    """Destroy the process group while the interpreter is whole: no gloo or TCPStore thread is left at exit.

    Left alive, the group's native threads (gloo's run loops and TCP loop, rank 0's TCPStore
    server) are torn down by interpreter finalization and static destructors, in no fixed order
    and while a peer may be gone already. That is the likely cause of the one abort seen in CI: a
    rank on the reuse path (which exits a second after starting) died after writing its result
    with ``terminate called without an active exception`` (SIGABRT, the launcher's exit 250).
    PyTorch asks for this call before a process exits.
    """
    if dist.is_initialized():
        dist.destroy_process_group()


def load_data(spec: TrainJobSpec, rank: int, dist, tok_dir: Path):
    """(tokenizer, train Blocks, validation Blocks): the packed shards when the version has them."""
    from transformers import AutoTokenizer

    from llmops_provider.runtime.train_data import Blocks, load_manifest, pack, read_texts

    t = spec.training
    data_dir = Path(spec.dataset_dir)
    manifest = load_manifest(data_dir, t.seq_len)
    if manifest is not None:
        if rank == 0:
            build_tokenizer(spec, [], tok_dir, source=manifest.tokenizer_dir)
        dist.barrier()
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        train_blocks = manifest.split("train")
        val_blocks = manifest.split("validation", limit=spec.max_eval_blocks)
        vocab = int(manifest.raw.get("vocab_size") or 0)
        if vocab > len(tokenizer):
            raise ValueError(
                f"{data_dir}/packed/manifest.json: vocab_size {vocab} exceeds the tokenizer's "
                f"{len(tokenizer)} tokens ({manifest.tokenizer_dir}); re-run the data stage"
            )
        if rank == 0:
            log.info(
                "packed dataset: %d train / %d validation blocks of %d tokens (%s)",
                len(train_blocks),
                len(val_blocks),
                t.seq_len,
                manifest.raw["dtype"],
            )
    else:
        train_texts = read_texts(data_dir / "train.jsonl")
        val_texts = read_texts(data_dir / "validation.jsonl")
        if rank == 0:
            build_tokenizer(spec, train_texts, tok_dir)
        dist.barrier()
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        train_blocks = Blocks([pack(tokenizer, train_texts, t.seq_len)])
        val_blocks = Blocks([pack(tokenizer, val_texts, t.seq_len)[: spec.max_eval_blocks]])
    return tokenizer, train_blocks, val_blocks


def _train(spec, dist, rank, world, out: Path, export: Path, tracker: Tracker | None) -> TrainResult:
    import deepspeed
    import torch

    from llmops_provider.runtime.train_data import BlockSampler

    t = spec.training
    # idempotency: rank 0 asks the registry, every rank follows its answer
    found = [tracker.find_existing() if tracker else None]
    dist.broadcast_object_list(found, src=0)
    if found[0] is not None:
        if rank == 0:
            log.info(
                "reusing model %s version %s (run %s): same recipe fingerprint and dataset commit",
                found[0].model_name,
                found[0].model_version,
                found[0].mlflow_run_id,
            )
        return found[0]

    if world != t.world_size and rank == 0:
        log.warning("running %d ranks but training.world_size is %d", world, t.world_size)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    tokenizer, train_blocks, val_blocks = load_data(spec, rank, dist, export / TOKENIZER_ARTIFACT_PATH)
    sampler = BlockSampler(len(train_blocks), t.micro_batch_size, rank, world, t.seed)
    precision = resolve_precision(t.precision, torch.cuda.is_available() and torch.cuda.is_bf16_supported())

    model = build_model(spec, tokenizer)
    if rank == 0:
        model.save_pretrained(export / BASE_ARTIFACT_PATH)  # before any update: the merge base
    model = prepare_model(model, t)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    ds_config = deepspeed_config(t, world, precision)
    ds_config_path = out / DS_CONFIG_ARTIFACT
    if rank == 0:
        ds_config_path.write_text(json.dumps(ds_config, indent=2))
        log.info(
            "ranks=%d method=%s precision=%s zero=%d params=%d trainable=%d (%.2f%%) train_blocks=%d "
            "val_blocks=%d ds_config=%s",
            world,
            t.method,
            precision,
            t.zero_stage,
            total,
            trainable,
            100 * trainable / total,
            len(train_blocks),
            len(val_blocks),
            json.dumps(ds_config),
        )
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=t.learning_rate, weight_decay=t.weight_decay
    )
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    seed_everything(t.seed + rank)  # dropout streams differ per rank, reproducibly

    ckpt = Checkpoints(spec.checkpoints, spec, rank, world, dist)
    resumed = ckpt.resume(engine)
    start_step = int(resumed["step"]) if resumed else 0
    if resumed and rank == 0:
        log.info("resumed from checkpoint %s at step %d", spec.checkpoints / ckpt.latest_tag(), start_step)
    extra_tags = runtime_tags() if rank == 0 else {}
    run_id = (
        tracker.start(resumed.get("mlflow_run_id") if resumed else None, ds_config, extra_tags) if tracker else None
    )
    if tracker and resumed:
        tracker.client.set_tag(run_id, "resumed_from_step", str(start_step))

    eval_every = spec.eval_every or t.eval_every or t.checkpoint_every
    tokens_per_step = t.micro_batch_size * t.grad_accum * world * t.seq_len
    vocab = len(tokenizer)
    loss, val_loss = float("nan"), None
    started = time.monotonic()
    steady_since, steady_steps, tps = None, 0, 0.0  # tokens/s after the first step (it pays for lazy init)
    trainable_params = [p for p in engine.module.parameters() if p.requires_grad]
    grad_norm = None
    engine.train()
    for step in range(start_step + 1, t.max_steps + 1):
        step_loss = torch.zeros(1, device=engine.device)
        for micro in range(t.grad_accum):
            micro_step = (step - 1) * t.grad_accum + micro
            batch = train_blocks.take(sampler.indices(micro_step))
            if batch.max() >= vocab:
                raise ValueError(
                    f"token id {int(batch.max())} in the training data exceeds the tokenizer's "
                    f"{vocab} tokens: the packed shards and tokenizer/ do not match; re-run the data stage"
                )
            ids = torch.from_numpy(batch).to(engine.device)
            out_ = engine(input_ids=ids, labels=ids)
            engine.backward(out_.loss)
            if t.zero_stage == 0 and micro == t.grad_accum - 1:  # ZeRO reports its own norm; stage 0 does not
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trainable_params if p.grad is not None])
            engine.step()
            step_loss += out_.loss.detach().float() / t.grad_accum
        dist.all_reduce(step_loss)  # also the sync point that makes the step time honest
        loss = float(step_loss) / world
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}: lower training.learning_rate")
        now = time.monotonic()
        if steady_since is None:
            steady_since = now
            tps = tokens_per_step / max(now - started, 1e-9)
        else:
            steady_steps += 1
            tps = tokens_per_step * steady_steps / max(now - steady_since, 1e-9)
        metrics = {"train_loss": loss, "learning_rate": scheduler.get_last_lr()[0], "tokens_per_s": tps}
        if t.zero_stage:
            grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        if step % eval_every == 0 and step < t.max_steps:
            val_loss = evaluate(engine, val_blocks, rank, world, t.micro_batch_size, dist)
            metrics["val_loss"] = val_loss
        if rank == 0:
            at_log = step % spec.log_every == 0 or step == start_step + 1 or step == t.max_steps
            tracker.metrics(metrics, step, flush=at_log)
            if at_log:
                eta = (t.max_steps - step) * tokens_per_step / max(tps, 1e-9)
                extra = f" | val_loss {val_loss:.4f}" if "val_loss" in metrics else ""
                print(
                    f"step {step}/{t.max_steps} | loss {loss:.4f} | lr {metrics['learning_rate']:.2e} | "
                    f"{tps:,.0f} tokens/s | elapsed {_fmt_s(now - started)} | ETA {_fmt_s(eta)}{extra}",
                    flush=True,
                )
        if step % t.checkpoint_every == 0 or step == t.max_steps:
            state = {
                "mlflow_run_id": run_id,
                "idempotency_key": spec.idempotency_key,
                "data": sampler.state(step * t.grad_accum),
            }
            if rank == 0:
                tracker.flush()  # metrics up to the checkpoint are on the server before it counts
            ckpt.save(engine, step, state)

    val_loss = evaluate(engine, val_blocks, rank, world, t.micro_batch_size, dist)
    runtime_s = time.monotonic() - started
    tokens_per_s = tps if steady_steps else None  # end of step 1 -> end of the last step
    if rank == 0:
        print(
            f"done: final train loss {loss:.4f} | val_loss {val_loss:.4f} | "
            f"val_perplexity {math.exp(min(val_loss, 50)):.1f} | {_fmt_s(runtime_s)}",
            flush=True,
        )
        final = {
            "final_loss": loss,
            "val_loss": val_loss,
            "val_perplexity": math.exp(min(val_loss, 50)),
            "train_runtime_s": runtime_s,
        }
        if tokens_per_s:
            final["train_tokens_per_s"] = tokens_per_s
        tracker.metrics(final, t.max_steps)
    if t.zero_stage == 3:
        dist.barrier()
        if rank == 0:
            _export(consolidate_zero3(spec, ckpt, export), tokenizer, export, t.method)
    elif rank == 0:
        _export(engine.module, tokenizer, export, t.method)
    version = tracker.finish(export, ds_config_path, extra_tags) if rank == 0 else None
    dist.barrier()
    if math.isnan(loss):  # resumed from the final checkpoint: nothing left to train; report its loss
        loss = _last_logged(tracker, "train_loss") if tracker else loss
    return TrainResult(
        mlflow_run_id=run_id or "",
        model_name=spec.registered_model_name,
        model_version=version or "",
        dataset_commit=spec.dataset_commit,
        reused=False,
        final_loss=None if math.isnan(loss) else loss,
        val_loss=val_loss,
        tokens_per_s=tokens_per_s,
    )


def _last_logged(tracker: Tracker, key: str) -> float:
    history = tracker.client.get_metric_history(tracker.run_id, key)
    return max(history, key=lambda m: (m.step, m.timestamp)).value if history else float("nan")


def consolidate_zero3(spec: TrainJobSpec, ckpt: Checkpoints, export: Path):
    """ZeRO-3 shards -> one fp32 model (DeepSpeed's zero_to_fp32) on the exported base: rank 0, CPU."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    tag = ckpt.latest_tag()
    state = get_fp32_state_dict_from_zero_checkpoint(
        str(ckpt.dir), tag=tag, exclude_frozen_parameters=ckpt.exclude_frozen
    )
    model = prepare_model(
        AutoModelForCausalLM.from_pretrained(export / BASE_ARTIFACT_PATH, dtype=torch.float32), spec.training
    )
    missing, unexpected = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected or trainable & set(missing):
        raise RuntimeError(
            f"zero_to_fp32 state of {ckpt.dir}/{tag} does not fit the model: missing trainable "
            f"{sorted(trainable & set(missing))[:5]}, unexpected {unexpected[:5]}"
        )
    log.info("consolidated ZeRO-3 checkpoint %s/%s (%d tensors) with zero_to_fp32", ckpt.dir, tag, len(state))
    return model


def _export(model, tokenizer, export: Path, method: str) -> None:
    """adapter (LoRA) and merged full model (safetensors), both loadable without this package."""
    merged_dir = export / MERGED_ARTIFACT_PATH
    if method == "lora":
        model.save_pretrained(export / ADAPTER_ARTIFACT_PATH)
        model = model.merge_and_unload()  # mutates: last use of the PEFT model
    model.save_pretrained(merged_dir, safe_serialization=True)
    tokenizer.save_pretrained(merged_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0])
    parser.add_argument("--spec", required=True, help="path of a TrainJobSpec JSON file")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # older launchers add it
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s [rank " + os.environ.get("RANK", "0") + "] %(name)s: %(message)s",
        stream=sys.stdout,
    )
    log.setLevel(logging.INFO)
    spec = TrainJobSpec.model_validate_json(Path(args.spec).read_text())
    train(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
