"""The training job: BPE tokenizer, Llama causal LM, LoRA (PEFT) or full fine-tune, DeepSpeed ZeRO.

Entrypoint (one rank)::

    python -m llmops_provider.runtime.train --spec spec.json

``launch_command()`` wraps it in the ``deepspeed`` launcher for ``training.world_size``
ranks (CPU processes with gloo locally, one per GPU in a pod)::

    deepspeed --num_accelerators N --master_port P --no_local_rank \
        --module llmops_provider.runtime.train --spec spec.json

Started without a launcher it runs as a single rank. Never imports Airflow.

Steps: idempotency check (a registered version tagged with the spec's ``idempotency_key``
whose run FINISHED is reused: no new run, no new version) -> tokenizer -> model -> packed
blocks -> DeepSpeed loop (checkpoint every ``checkpoint_every`` steps, resume from the
latest) -> validation loss -> export -> MLflow -> ``result.json``.

MLflow (rank 0 only; the server comes from ``MLFLOW_TRACKING_URI``)
  experiment ``spec.experiment_name`` (the recipe name); run tags = ``spec.tags`` (recipe,
  recipe_fingerprint, dataset_repo, dataset_commit, Airflow ids, ...) + ``idempotency_key``;
  params = flattened ``tokenizer.*``/``model.*``/``training.*`` + ``ds.*`` (generated
  DeepSpeed config); metrics per step ``train_loss``, ``learning_rate``, ``tokens_per_s``,
  ``val_loss`` (periodic), final ``final_loss``, ``val_loss``, ``val_perplexity``,
  ``train_runtime_s``.

Run artifacts (what evaluation and deployment download)::

    model/base/       HF save_pretrained of the base model BEFORE training (config.json +
                      model.safetensors); a random-init base cannot be re-downloaded
    model/adapter/    PEFT save_pretrained (adapter_config.json, adapter_model.safetensors;
                      includes modules_to_save); absent when training.method == "full"
    model/tokenizer/  PreTrainedTokenizerFast save_pretrained (tokenizer.json, bos/eos/pad/unk)
    model/merged/     plain HF model dir, adapter merged (merge_and_unload) + tokenizer files:
                      load with AutoModelForCausalLM / AutoTokenizer or serve with vLLM
    ds_config.json    the generated DeepSpeed config

Model version (registered model ``spec.registered_model_name``): source
``<run artifact uri>/model/merged``; tags ``dataset_repo``, ``dataset_commit``,
``mlflow_run_id``, ``recipe``, ``recipe_fingerprint``, ``idempotency_key``,
``artifact_path`` (= model/merged), Airflow ids; alias ``challenger``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from llmops_provider.specs.train import (
    ADAPTER_ARTIFACT_PATH,
    BASE_ARTIFACT_PATH,
    CHALLENGER_ALIAS,
    DS_CONFIG_ARTIFACT,
    IDEMPOTENCY_TAG,
    MERGED_ARTIFACT_PATH,
    TOKENIZER_ARTIFACT_PATH,
    TrainJobSpec,
    TrainResult,
)

MODULE = "llmops_provider.runtime.train"
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
log = logging.getLogger("llmops.train")


# ---------------------------------------------------------------- launch (no heavy imports)

def launch_command(spec_path: str, ranks: int, *, launcher: str = "deepspeed", master_port: int | None = None) -> list[str]:
    """The deepspeed launcher command for ``ranks`` local ranks.

    ``--num_accelerators`` (alias ``--num_gpus``) sets the slot count directly, so it starts
    N CPU ranks too (the CPU accelerator would otherwise count NUMA nodes: 1 here).
    """
    return [
        launcher, "--num_accelerators", str(ranks),
        "--master_port", str(master_port or 29500),
        "--no_local_rank", "--module", MODULE, "--spec", spec_path,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_config(training, world_size: int) -> dict[str, Any]:
    """DeepSpeed config generated from the recipe's ``training`` section (fp32: CPU has no fast half)."""
    return {
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "gradient_accumulation_steps": training.grad_accum,
        "train_batch_size": training.micro_batch_size * training.grad_accum * world_size,
        "gradient_clipping": training.grad_clip,
        "zero_optimization": {"stage": training.zero_stage},
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": training.max_steps,
                "warmup_num_steps": max(1, training.warmup_steps),
                "warmup_type": "linear",
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": 0.1,
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Nested dict -> ``{"a.b": "v"}``; lists stay JSON (MLflow params are strings)."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return out
    return {prefix: json.dumps(value) if isinstance(value, list) else str(value)}


# ---------------------------------------------------------------- data

def read_texts(path: Path) -> list[str]:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: dataset_dir must hold train.jsonl and validation.jsonl")
    texts = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{n}: expected a JSON object with a `text` field ({exc})") from None
    return texts


def pack(tokenizer, texts: list[str], seq_len: int) -> list[list[int]]:
    """Documents as <s> ids </s>, concatenated and cut into seq_len blocks (the tail is dropped)."""
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id])
    return [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


class BlockSampler:
    """Deterministic micro-batches: micro step m on rank r is a pure function of (seed, m, r).

    That makes resume exact: restarting at step s continues the same data order.
    """

    def __init__(self, n_blocks: int, batch: int, rank: int, world: int, seed: int):
        self.n, self.batch, self.rank, self.world, self.seed = n_blocks, batch, rank, world, seed
        self.per_epoch = n_blocks // (batch * world)
        self._perm: tuple[int, Any] | None = None

    def indices(self, micro_step: int) -> list[int]:
        import torch

        epoch, i = divmod(micro_step, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g).tolist())
        start = (i * self.world + self.rank) * self.batch
        return self._perm[1][start:start + self.batch]


# ---------------------------------------------------------------- tokenizer and model

def build_tokenizer(spec: TrainJobSpec, train_texts: list[str], out_dir: Path):
    """Load ``tokenizer.path`` (or the checkpoint's tokenizer), else train a byte-level BPE."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    source = spec.tokenizer.path or spec.model.checkpoint
    if source:
        try:
            tok = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as exc:
            field = "tokenizer.path" if spec.tokenizer.path else "model.checkpoint"
            raise ValueError(f"cannot load a tokenizer from {field}={source!r}: {exc}; "
                             "set tokenizer.path to a directory saved with save_pretrained") from None
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
            **{**spec.model.config, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        )
        model = LlamaForCausalLM(config)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and spec.training.seq_len > max_pos:
        raise ValueError(f"training.seq_len ({spec.training.seq_len}) exceeds the model's max_position_embeddings "
                         f"({max_pos}); lower seq_len or raise model.config.max_position_embeddings")
    return model


def wrap_lora(model, training):
    from peft import LoraConfig, get_peft_model

    lora = training.lora
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
        modules_to_save=list(lora.modules_to_save) or None, task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


# ---------------------------------------------------------------- MLflow (rank 0)

class Tracker:
    """MLflow on rank 0: idempotency lookup, run, metrics, artifacts, registration."""

    def __init__(self, spec: TrainJobSpec):
        from mlflow import MlflowClient

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            raise RuntimeError("MLFLOW_TRACKING_URI is not set: the training job logs to an MLflow server "
                               "(the operator passes MLflowHook.job_env(); in a pod, the llmops-mlflow secret)")
        self.spec = spec
        self.client = MlflowClient()
        self.run_id: str | None = None
        self._pending: list = []

    def find_existing(self) -> TrainResult | None:
        name = self.spec.registered_model_name
        try:
            versions = self.client.search_model_versions(
                f"name = '{name}' and tags.{IDEMPOTENCY_TAG} = '{self.spec.idempotency_key}'")
        except Exception as exc:  # noqa: BLE001 - a registry without the model answers with an error on some servers
            log.info("no reusable model version (%s)", exc)
            return None
        for mv in sorted(versions, key=lambda v: int(v.version), reverse=True):
            run = self.client.get_run(mv.run_id) if mv.run_id else None
            if run is None or run.info.status != "FINISHED":
                continue
            metrics = run.data.metrics
            return TrainResult(mlflow_run_id=mv.run_id, model_name=name, model_version=str(mv.version),
                               dataset_commit=self.spec.dataset_commit, reused=True,
                               final_loss=metrics.get("final_loss"), val_loss=metrics.get("val_loss"))
        return None

    def start(self, resume_run_id: str | None, ds_config: dict) -> str:
        if resume_run_id and self.client.get_run(resume_run_id).info.status != "FINISHED":
            self.run_id = resume_run_id
            self.client.update_run(resume_run_id, status="RUNNING")
            log.info("resuming MLflow run %s", resume_run_id)
            return resume_run_id
        exp = self.client.get_experiment_by_name(self.spec.experiment_name)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(self.spec.experiment_name)
        tags = {**self.spec.tags, IDEMPOTENCY_TAG: self.spec.idempotency_key,
                "mlflow.runName": f"{self.spec.recipe}-{self.spec.dataset_commit[:12]}"}
        run = self.client.create_run(exp_id, tags=tags)
        self.run_id = run.info.run_id
        params = {
            **flatten("tokenizer", self.spec.tokenizer.model_dump(mode="json")),
            **flatten("model", self.spec.model.model_dump(mode="json")),
            **flatten("training", self.spec.training.model_dump(mode="json", exclude={"kubernetes"})),
            **flatten("ds", ds_config),
        }
        from mlflow.entities import Param

        items = [Param(k[:250], v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        return self.run_id

    def metrics(self, values: dict[str, float], step: int, flush: bool = False) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in values.items()]
        if flush or len(self._pending) >= 500:
            self.flush()

    def flush(self) -> None:
        if self._pending and self.run_id:
            for i in range(0, len(self._pending), 1000):
                self.client.log_batch(self.run_id, metrics=self._pending[i:i + 1000])
            self._pending = []

    def finish(self, export_dir: Path, ds_config_path: Path) -> str:
        """Upload artifacts, register the version with lineage tags, alias it, end the run."""
        from mlflow.exceptions import MlflowException

        self.flush()
        self.client.log_artifacts(self.run_id, str(export_dir / "model"), "model")
        self.client.log_artifact(self.run_id, str(ds_config_path))
        name = self.spec.registered_model_name
        try:
            self.client.create_registered_model(name, tags={"recipe": self.spec.recipe})
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        run = self.client.get_run(self.run_id)
        tags = {
            **{k: v for k, v in self.spec.tags.items()},
            "mlflow_run_id": self.run_id,
            IDEMPOTENCY_TAG: self.spec.idempotency_key,
            "artifact_path": MERGED_ARTIFACT_PATH,
        }
        mv = self.client.create_model_version(
            name, source=f"{run.info.artifact_uri}/{MERGED_ARTIFACT_PATH}", run_id=self.run_id, tags=tags,
            description=f"{self.spec.recipe} trained on {self.spec.dataset_repo}@{self.spec.dataset_commit}",
        )
        self.client.set_registered_model_alias(name, CHALLENGER_ALIAS, mv.version)
        self.client.set_terminated(self.run_id, status="FINISHED")
        log.info("registered %s version %s (alias %s) from run %s", name, mv.version, CHALLENGER_ALIAS, self.run_id)
        return str(mv.version)

    def fail(self) -> None:
        if self.run_id:
            try:
                self.flush()
                self.client.set_terminated(self.run_id, status="FAILED")
            except Exception:  # noqa: BLE001 - already failing; keep the original error
                log.exception("could not mark MLflow run %s FAILED", self.run_id)


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
    # ranks share the node's cores: oversubscribed threads slow every rank down
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // max(1, local)))
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)  # its INFO dumps the whole config per rank
    deepspeed.init_distributed()
    import torch.distributed as dist

    return dist, dist.get_rank(), dist.get_world_size()


def _fmt_s(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _latest_checkpoint(ckpt_dir: Path) -> bool:
    return (ckpt_dir / "latest").exists()


def _prune_checkpoints(ckpt_dir: Path, keep: str) -> None:
    for child in ckpt_dir.iterdir():
        if child.is_dir() and child.name.startswith("step") and child.name != keep:
            shutil.rmtree(child, ignore_errors=True)


def evaluate(engine, blocks, rank: int, world: int, batch: int, dist) -> float:
    """Mean token loss over ``blocks`` (split across ranks, summed with all_reduce)."""
    import torch

    engine.eval()
    total = torch.zeros(2, dtype=torch.float64)
    mine = blocks[rank::world]
    with torch.no_grad():
        for i in range(0, len(mine), batch):
            ids = torch.tensor(mine[i:i + batch], device=engine.device)
            loss = engine(input_ids=ids, labels=ids).loss
            total += torch.tensor([loss.item() * ids.numel(), ids.numel()], dtype=torch.float64)
    dist.all_reduce(total)
    engine.train()
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
    return result


def _train(spec, dist, rank, world, out: Path, export: Path, tracker: Tracker | None) -> TrainResult:
    import deepspeed
    import torch

    t = spec.training
    # idempotency: rank 0 asks the registry, every rank follows its answer
    found = [tracker.find_existing() if tracker else None]
    dist.broadcast_object_list(found, src=0)
    if found[0] is not None:
        if rank == 0:
            log.info("reusing model %s version %s (run %s): same recipe fingerprint and dataset commit",
                     found[0].model_name, found[0].model_version, found[0].mlflow_run_id)
        return found[0]

    if world != t.world_size and rank == 0:
        log.warning("running %d ranks but training.world_size is %d", world, t.world_size)
    data_dir = Path(spec.dataset_dir)
    train_texts = read_texts(data_dir / "train.jsonl")
    val_texts = read_texts(data_dir / "validation.jsonl")

    tok_dir = export / TOKENIZER_ARTIFACT_PATH
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        build_tokenizer(spec, train_texts, tok_dir)
    dist.barrier()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)

    train_blocks = pack(tokenizer, train_texts, t.seq_len)
    val_blocks = pack(tokenizer, val_texts, t.seq_len)[: spec.max_eval_blocks]
    need = t.micro_batch_size * world
    if len(train_blocks) < need:
        raise ValueError(f"train.jsonl packs into {len(train_blocks)} blocks of {t.seq_len} tokens; one step needs "
                         f"{need} (micro_batch_size x ranks): add data or lower training.seq_len/micro_batch_size")

    model = build_model(spec, tokenizer)
    if rank == 0:
        model.save_pretrained(export / BASE_ARTIFACT_PATH)  # before any update: the merge base
    if t.method == "lora":
        model = wrap_lora(model, t)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    ds_config = deepspeed_config(t, world)
    ds_config_path = out / DS_CONFIG_ARTIFACT
    if rank == 0:
        ds_config_path.write_text(json.dumps(ds_config, indent=2))
        log.info("ranks=%d method=%s params=%d trainable=%d (%.2f%%) train_blocks=%d val_blocks=%d ds_config=%s",
                 world, t.method, total, trainable, 100 * trainable / total, len(train_blocks), len(val_blocks),
                 json.dumps(ds_config))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=t.learning_rate, weight_decay=t.weight_decay)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

    start_step, resume_run_id = 0, None
    ckpt_dir = spec.checkpoints
    if _latest_checkpoint(ckpt_dir):
        path, state = engine.load_checkpoint(str(ckpt_dir))
        if path is not None:
            start_step, resume_run_id = int(state["step"]), state.get("mlflow_run_id")
            if rank == 0:
                log.info("resumed from checkpoint %s at step %d", path, start_step)
    run_id = tracker.start(resume_run_id, ds_config) if tracker else None

    sampler = BlockSampler(len(train_blocks), t.micro_batch_size, rank, world, t.seed)
    tokens_per_step = t.micro_batch_size * t.grad_accum * world * t.seq_len
    started, loss, val_loss = time.monotonic(), float("nan"), None
    engine.train()
    for step in range(start_step + 1, t.max_steps + 1):
        step_loss = torch.zeros(1)
        for micro in range(t.grad_accum):
            ids = torch.tensor([train_blocks[i] for i in sampler.indices((step - 1) * t.grad_accum + micro)],
                               device=engine.device)
            out_ = engine(input_ids=ids, labels=ids)
            engine.backward(out_.loss)
            engine.step()
            step_loss += out_.loss.detach().float().cpu() / t.grad_accum
        dist.all_reduce(step_loss)
        loss = float(step_loss) / world
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step}: lower training.learning_rate")
        elapsed = time.monotonic() - started
        tps = tokens_per_step * (step - start_step) / max(elapsed, 1e-9)
        metrics = {"train_loss": loss, "learning_rate": scheduler.get_last_lr()[0], "tokens_per_s": tps}
        if spec.eval_every and step % spec.eval_every == 0 and step < t.max_steps:
            val_loss = evaluate(engine, val_blocks, rank, world, t.micro_batch_size, dist)
            metrics["val_loss"] = val_loss
        if rank == 0:
            at_log = step % spec.log_every == 0 or step == start_step + 1 or step == t.max_steps
            tracker.metrics(metrics, step, flush=at_log)
            if at_log:
                eta = elapsed / (step - start_step) * (t.max_steps - step)
                extra = f" | val_loss {val_loss:.4f}" if "val_loss" in metrics else ""
                print(f"step {step}/{t.max_steps} | loss {loss:.4f} | lr {metrics['learning_rate']:.2e} | "
                      f"{tps:,.0f} tokens/s | elapsed {_fmt_s(elapsed)} | ETA {_fmt_s(eta)}{extra}", flush=True)
        if step % t.checkpoint_every == 0 or step == t.max_steps:
            tag = f"step{step:07d}"
            engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step, "mlflow_run_id": run_id})
            dist.barrier()
            if rank == 0:
                _prune_checkpoints(ckpt_dir, tag)

    val_loss = evaluate(engine, val_blocks, rank, world, t.micro_batch_size, dist)
    runtime_s = time.monotonic() - started
    version = None
    if rank == 0:
        print(f"done: final train loss {loss:.4f} | val_loss {val_loss:.4f} | "
              f"val_perplexity {math.exp(min(val_loss, 50)):.1f} | {_fmt_s(runtime_s)}", flush=True)
        tracker.metrics({"final_loss": loss, "val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50)),
                         "train_runtime_s": runtime_s}, t.max_steps)
    # ZeRO-3 shards every parameter: all ranks gather them so rank 0 can save whole tensors
    gathered = (deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
                if t.zero_stage == 3 else contextlib.nullcontext())
    with gathered:
        if rank == 0:
            _export(engine.module, tokenizer, export, t.method)
    if rank == 0:
        version = tracker.finish(export, ds_config_path)
    dist.barrier()
    return TrainResult(mlflow_run_id=run_id or "", model_name=spec.registered_model_name, model_version=version or "",
                       dataset_commit=spec.dataset_commit, reused=False, final_loss=loss, val_loss=val_loss)


def _export(model, tokenizer, export: Path, method: str) -> None:
    """adapter (LoRA) and merged full model, both loadable without this package."""
    merged_dir = export / MERGED_ARTIFACT_PATH
    if method == "lora":
        model.save_pretrained(export / ADAPTER_ARTIFACT_PATH)
        model = model.merge_and_unload()  # mutates: last use of the PEFT model
    model.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0])
    parser.add_argument("--spec", required=True, help="path of a TrainJobSpec JSON file")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # older launchers add it
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s [rank " +
                        os.environ.get("RANK", "0") + "] %(name)s: %(message)s", stream=sys.stdout)
    log.setLevel(logging.INFO)
    spec = TrainJobSpec.model_validate_json(Path(args.spec).read_text())
    train(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
