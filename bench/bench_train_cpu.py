"""Training throughput on CPU: this runtime (DeepSpeed engine under the ``deepspeed`` launcher,
MLflow tracking on) versus a plain Hugging Face ``Trainer`` loop, side by side in the same run.

Fair by construction: the same tiny Llama (the demo recipe's config, the same seeded random
init, built by the same function), the same LoRA config, the same BPE tokenizer and packed
blocks (seq_len 128), global batch 8, the same number of optimizer steps, AdamW, clipping 1.0,
warmup + cosine, and the same processes and threads on each side:

- ``1x1``: one process, one torch thread (micro batch 8): the like-for-like headline ratio;
- ``2x1``: two data-parallel ranks over gloo, one thread each (micro batch 4): this runtime's
  local default versus the Trainer under ``torchrun`` (DDP, gloo).

One thread per process (``OMP_NUM_THREADS=1``, which both honour) because on a shared machine a
2-thread OpenMP process degrades by 3-18x whenever a core is taken (measured on this box), which
would measure the neighbours, not the trainers. Throughput is tokens/s from the end of step 1 to
the end of the last step (step 1 pays for lazy init in both); no evaluation or checkpoint falls
inside that window for either (the runtime saves its one checkpoint after the last step). The
runtime still logs every step's metrics to a real MLflow server; the Trainer logs nothing.
Samples alternate so machine noise hits all alike; the result is the ratio of medians. Writes
bench/results/train_cpu.json.

    .venv/bin/python bench/bench_train_cpu.py [--samples 3] [--steps 40]

(The control-plane venv runs the MLflow server; both trainers run in the job-runtime venv.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from train_bench_common import ROOT, run_checked, run_runtime

RUNTIME_PYTHON = ROOT / ".venv-runtime" / "bin" / "python"
RECIPE = ROOT / "dags" / "recipes" / "tiny-llama.yaml"
SEQ_LEN, GLOBAL_BATCH = 128, 8


# ---------------------------------------------------------------- worker: the plain Trainer loop (runtime venv)


def trainer_worker(spec_path: str, out_path: str) -> None:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from llmops_provider.runtime.train import build_model, build_tokenizer, prepare_model
    from llmops_provider.runtime.train_data import pack, read_texts
    from llmops_provider.specs.train import TrainJobSpec

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    world = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun: DDP over gloo
    spec = TrainJobSpec.model_validate_json(Path(spec_path).read_text())
    t = spec.training
    texts = read_texts(Path(spec.dataset_dir) / "train.jsonl")
    tokenizer = build_tokenizer(spec, texts, Path(spec.output_dir) / "tokenizer")
    blocks = torch.from_numpy(pack(tokenizer, texts, t.seq_len))
    dataset = [{"input_ids": b, "labels": b} for b in blocks]
    model = prepare_model(build_model(spec, tokenizer), t)

    class Clock(TrainerCallback):
        first = last = None
        steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if state.global_step == 1:
                self.first = now
            self.last, self.steps = now, state.global_step

    clock = Clock()
    args = TrainingArguments(
        output_dir=str(Path(spec.output_dir) / "trainer"),
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        max_grad_norm=t.grad_clip,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": t.min_lr_ratio},
        optim="adamw_torch",
        seed=t.seed,
        use_cpu=True,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        ddp_backend="gloo" if world > 1 else None,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[clock])
    trainer.train()
    if trainer.is_world_process_zero():
        tokens = (clock.steps - 1) * t.micro_batch_size * world * t.grad_accum * t.seq_len
        Path(out_path).write_text(
            json.dumps({"tokens_per_s": tokens / (clock.last - clock.first), "steps": clock.steps, "world": world})
        )


# ---------------------------------------------------------------- driver (control-plane venv)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dataset(work: Path) -> Path:
    """The sample corpus as a dataset version: train.jsonl + validation.jsonl."""
    docs = []
    for path in sorted((ROOT / "data" / "sample").glob("*.jsonl")):
        for line in path.open():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict) and isinstance(doc.get("text"), str) and len(doc["text"]) >= 40:
                docs.append({"id": str(doc.get("id")), "text": doc["text"]})
    out = work / "dataset"
    out.mkdir()
    (out / "validation.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[:20]))
    (out / "train.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[20:]))
    return out


def write_spec(work: Path, data: Path, name: str, ranks: int, steps: int, commit: str) -> Path:
    import yaml

    from llmops_provider.recipes import Recipe
    from llmops_provider.specs.train import TrainJobSpec

    raw = yaml.safe_load(RECIPE.read_text())
    raw["name"] = name
    raw["training"].update(
        max_steps=steps,
        seq_len=SEQ_LEN,
        micro_batch_size=GLOBAL_BATCH // ranks,
        world_size=ranks,
        checkpoint_every=steps,
        eval_every=steps,
        backend="local",
    )
    out = work / f"{name}-{commit}"
    spec = TrainJobSpec.from_recipe(
        Recipe.model_validate(raw),
        dataset_dir=str(data),
        dataset_repo="bench",
        dataset_commit=commit,
        output_dir=str(out),
        log_every=max(1, steps // 4),
    )
    path = work / f"{name}-{commit}.json"
    path.write_text(spec.model_dump_json(indent=2))
    return path


def run_trainer(spec_path: Path, ranks: int, env: dict[str, str]) -> float:
    out = spec_path.with_suffix(".trainer.json")
    launcher = [str(RUNTIME_PYTHON)]
    if ranks > 1:
        launcher = [
            str(RUNTIME_PYTHON.parent / "torchrun"),
            "--nproc_per_node",
            str(ranks),
            "--master_port",
            str(free_port()),
        ]
    run_checked([*launcher, __file__, "--trainer-worker", str(spec_path), str(out)], env, "the Trainer baseline")
    return json.loads(out.read_text())["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--trainer-worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trainer_worker:
        trainer_worker(*args.trainer_worker)
        return

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{work}/mlflow.db",
            "--artifacts-destination",
            str(work / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit("MLflow server did not start")
                time.sleep(0.5)
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        data = dataset(work)
        rows: dict[str, list[float]] = {"trainer_1x1": [], "runtime_1x1": [], "trainer_2x1": [], "runtime_2x1": []}
        for i in range(args.samples):
            commit = f"sample{i}"
            for ranks in (1, 2):
                spec = write_spec(work, data, f"bench-trainer{ranks}", ranks, args.steps, commit)
                rows[f"trainer_{ranks}x1"].append(run_trainer(spec, ranks, env))
                spec = write_spec(work, data, f"bench-runtime{ranks}", ranks, args.steps, commit)
                rows[f"runtime_{ranks}x1"].append(run_runtime(spec, ranks, env, RUNTIME_PYTHON.parent / "deepspeed"))
            print(
                f"sample {i + 1}/{args.samples}: " + ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rows.items()), flush=True
            )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:  # its job runner can outlive SIGTERM
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(15)
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in rows.items()}
    versions = (
        subprocess.run(
            [
                str(RUNTIME_PYTHON),
                "-c",
                "import torch, transformers, peft, deepspeed; print(torch.__version__, "
                "transformers.__version__, peft.__version__, deepspeed.__version__)",
            ],
            capture_output=True,
            text=True,
        )
        .stdout.splitlines()[-1]
        .split()
    )  # the last line: importing deepspeed logs to stdout first
    result = {
        "benchmark": "train_tokens_per_s_cpu",
        "command": f".venv/bin/python bench/bench_train_cpu.py --samples {args.samples} --steps {args.steps}",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "versions": dict(zip(["torch", "transformers", "peft", "deepspeed"], versions, strict=False)),
        "setup": {
            "model": "demo recipe tiny Llama (random init, seed 1234), LoRA r=8 + embed_tokens/lm_head",
            "seq_len": SEQ_LEN,
            "global_batch": GLOBAL_BATCH,
            "optimizer_steps": args.steps,
            "window": "end of step 1 to end of the last step",
            "threads": "OMP_NUM_THREADS=1 for every process",
            "trainer_1x1": "transformers Trainer, 1 process, micro batch 8, no logging/eval/save",
            "runtime_1x1": "this runtime, deepspeed launcher, 1 rank, micro batch 8, MLflow per-step metrics",
            "trainer_2x1": "transformers Trainer under torchrun, 2 DDP ranks (gloo), micro batch 4",
            "runtime_2x1": "this runtime, deepspeed launcher, 2 gloo ranks (the local default), micro batch 4",
        },
        "median_tokens_per_s": {k: round(v, 1) for k, v in med.items()},
        "samples_tokens_per_s": {k: [round(x, 1) for x in v] for k, v in rows.items()},
        "ratio_1x1_runtime_vs_trainer": round(med["runtime_1x1"] / med["trainer_1x1"], 3),
        "ratio_2x1_runtime_vs_trainer": round(med["runtime_2x1"] / med["trainer_2x1"], 3),
    }
    out = ROOT / "bench" / "results" / "train_cpu.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: result[k]
                for k in ("median_tokens_per_s", "ratio_1x1_runtime_vs_trainer", "ratio_2x1_runtime_vs_trainer")
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
