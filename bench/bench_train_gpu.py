"""Training throughput on a GPU: this runtime (DeepSpeed bf16 under the ``deepspeed`` launcher)
versus a plain transformers + PEFT loop, side by side, on a ~1B-parameter random-init Llama at
seq 2048, full fine-tuning and LoRA. Reports tokens/s and model TFLOP/s for each.

Run it in the job-runtime environment (the runtime image, or ``.venv-runtime`` with a CUDA
torch) on a machine with a GPU::

    .venv-runtime/bin/python bench/bench_train_gpu.py [--samples 2] [--steps 30] [--micro-batch 4]

``--smoke`` runs the same logic on CPU with a tiny model (fp32, seq 128, a few steps) so the
script can be checked without a GPU; it writes nothing under bench/results.

Both sides train the same model (the TinyLlama-1.1B shape: 22 layers, hidden 2048, MLP 5632,
32 heads / 4 KV heads, vocab 32000; random init from the same seed by the same function), on the
same data (random token blocks in this project's packed dataset layout, so the runtime reads
``packed/`` through its normal path), with AdamW, clipping 1.0, warmup + cosine, the same micro
batch and steps, one GPU each. The runtime: bf16 with fp32 master weights (DeepSpeed, ZeRO stage
``--zero-stage``), MLflow tracking into a local file store. The baseline: fp32 weights under
``torch.autocast(bfloat16)`` (what ``Trainer(bf16=True)`` does), fused torch AdamW, one
``loss.item()`` per step (the runtime syncs once per step too). Window: end of step 1 to end of
the last step. Samples alternate; medians; results in bench/results/train_gpu.json with the card.

Model FLOPs per token (the usual accounting; N = parameters, L = layers, d = hidden, s = seq):
full 6N + 12*L*d*s; LoRA 4N + 12*L*d*s (frozen weights get no weight-gradient GEMMs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from train_bench_common import run_checked, run_runtime

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEEPSPEED = Path(sys.executable).parent / "deepspeed"  # the launcher of this (runtime) environment

LLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "max_position_embeddings": 256,
}


def make_dataset(root: Path, vocab: int, seq_len: int, blocks: int) -> None:
    """Random token blocks in the packed layout + a word-level tokenizer of exactly ``vocab`` tokens."""
    import numpy as np
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    words = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(vocab - len(specials))])}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<unk>")),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    tok.save_pretrained(root / "tokenizer")
    (root / "packed").mkdir(parents=True)
    rng = np.random.default_rng(0)
    dtype = "uint16" if vocab <= 65535 else "uint32"
    splits = {}
    for name, n in (("train", blocks), ("validation", 8)):
        np.save(root / f"packed/{name}-00000.npy", rng.integers(4, vocab, size=(n, seq_len)).astype(dtype))
        splits[name] = {"files": [f"packed/{name}-00000.npy"], "blocks": n, "tokens": n * seq_len}
    manifest = {
        "format": "llmops-packed-v1",
        "seq_len": seq_len,
        "dtype": dtype,
        "eos_token_id": 2,
        "vocab_size": vocab,
        "tokenizer": "tokenizer",
        "splits": splits,
    }
    (root / "packed/manifest.json").write_text(json.dumps(manifest))


def make_spec(work: Path, data: Path, args, method: str, name: str) -> Path:
    from llmops_provider.recipes import Recipe
    from llmops_provider.specs.train import TrainJobSpec

    recipe = Recipe.model_validate(
        {
            "name": name,
            "data": {"sources": [{"path": str(data)}]},
            "model": {"config": TINY if args.smoke else LLAMA_1B},
            "training": {
                "method": method,
                "lora": {
                    "r": 16,
                    "alpha": 32,
                    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                },
                "seq_len": args.seq_len,
                "micro_batch_size": args.micro_batch,
                "max_steps": args.steps,
                "warmup_steps": 2,
                "learning_rate": 1e-4,
                "world_size": 1,
                "zero_stage": args.zero_stage,
                "precision": "fp32" if args.smoke else "bf16",
                "checkpoint_every": args.steps,
                "eval_every": args.steps,
                "gradient_checkpointing": args.gradient_checkpointing,
            },
        }
    )
    out = work / name
    spec = TrainJobSpec.from_recipe(
        recipe,
        dataset_dir=str(data),
        dataset_repo="bench",
        dataset_commit=name,
        output_dir=str(out),
        log_every=max(1, args.steps // 5),
        max_eval_blocks=4,
    )
    path = work / f"{name}.json"
    path.write_text(spec.model_dump_json(indent=2))
    return path


# ---------------------------------------------------------------- the baseline: a plain transformers + PEFT loop


def baseline_worker(spec_path: str, out_path: str) -> None:
    import torch
    from transformers import AutoTokenizer, get_cosine_with_min_lr_schedule_with_warmup

    from llmops_provider.runtime.train import build_model, prepare_model
    from llmops_provider.runtime.train_data import BlockSampler, load_manifest
    from llmops_provider.specs.train import TrainJobSpec

    spec = TrainJobSpec.model_validate_json(Path(spec_path).read_text())
    t = spec.training
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    manifest = load_manifest(Path(spec.dataset_dir), t.seq_len)
    blocks = manifest.split("train")
    tokenizer = AutoTokenizer.from_pretrained(manifest.tokenizer_dir)
    model = prepare_model(build_model(spec, tokenizer), t).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay, fused=cuda)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, t.warmup_steps, t.max_steps, min_lr_rate=t.min_lr_ratio)
    sampler = BlockSampler(len(blocks), t.micro_batch_size, 0, 1, t.seed)
    bf16 = t.precision == "bf16"
    model.train()
    first = last = None
    for step in range(t.max_steps):
        ids = torch.from_numpy(blocks.take(sampler.indices(step))).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # one sync per step, as the runtime's loss all-reduce
        last = time.perf_counter()
        first = first or last
    tokens = (t.max_steps - 1) * t.micro_batch_size * t.seq_len
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    Path(out_path).write_text(json.dumps({"tokens_per_s": tokens / (last - first), "peak_gib": peak}))


# ---------------------------------------------------------------- driver


def run_baseline(spec_path: Path, env: dict[str, str]) -> dict:
    out = spec_path.with_suffix(".baseline.json")
    run_checked([sys.executable, __file__, "--baseline-worker", str(spec_path), str(out)], env, "the baseline")
    return json.loads(out.read_text())


def count_params(config: dict, vocab: int) -> tuple[int, int]:
    """(parameters of the Llama, layers) computed from its config (tied embeddings off)."""
    d, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim", d // config["num_attention_heads"])
    q = d * config["num_attention_heads"] * head_dim
    kv = 2 * d * config["num_key_value_heads"] * head_dim
    per_layer = 2 * q + kv + 3 * d * inter + 2 * d  # q, o, k+v, gate/up/down, 2 norms
    return layers * per_layer + 2 * vocab * d + d, layers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, fp32: checks the logic only")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2, 3])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--methods", default="full,lora")
    parser.add_argument("--baseline-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_worker:
        baseline_worker(*args.baseline_worker)
        return
    import torch

    if args.smoke:
        args.seq_len, args.micro_batch, args.steps, args.samples = 128, 2, max(3, min(args.steps, 4)), 1
    elif not torch.cuda.is_available():
        sys.exit("no GPU visible: run with --smoke to check the logic on CPU")
    vocab = 512 if args.smoke else 32000
    config = TINY if args.smoke else LLAMA_1B
    n_params, layers = count_params(config, vocab)
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    work = Path(tempfile.mkdtemp(prefix="bench-train-gpu-"))
    data = work / "dataset"
    make_dataset(data, vocab, args.seq_len, blocks=max(64, args.micro_batch * (args.steps + 1)))
    # a local file store: the bench needs no tracking server (MLflow 3 keeps it behind this switch)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": (work / "mlruns").as_uri(),
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "PYTHONUNBUFFERED": "1",
    }
    methods = args.methods.split(",")
    rows: dict[str, dict[str, list[float]]] = {m: {"baseline": [], "runtime": []} for m in methods}
    peak: dict[str, float | None] = {}
    try:
        for i in range(args.samples):
            for method in methods:
                base = run_baseline(make_spec(work, data, args, method, f"base-{method}-{i}"), env)
                rows[method]["baseline"].append(base["tokens_per_s"])
                peak[method] = base["peak_gib"]
                spec = make_spec(work, data, args, method, f"rt-{method}-{i}")
                tracking = work / f"mlruns-{method}-{i}"
                rows[method]["runtime"].append(
                    run_runtime(spec, 1, {**env, "MLFLOW_TRACKING_URI": tracking.as_uri()}, DEEPSPEED)
                )
                for done in (work / f"rt-{method}-{i}", tracking):  # checkpoints + exports: ~25 GB for full
                    shutil.rmtree(done, ignore_errors=True)
                print(
                    f"sample {i + 1}/{args.samples} {method}: baseline {rows[method]['baseline'][-1]:,.0f} "
                    f"tokens/s, runtime {rows[method]['runtime'][-1]:,.0f} tokens/s",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)  # checkpoints of a 1B model are large

    attn = 12 * layers * config["hidden_size"] * args.seq_len
    flops_per_token = {"full": 6 * n_params + attn, "lora": 4 * n_params + attn}
    figures = {}
    for method, sides in rows.items():
        med = {side: statistics.median(v) for side, v in sides.items()}
        figures[method] = {
            "median_tokens_per_s": {k: round(v, 1) for k, v in med.items()},
            "model_tflops": {k: round(v * flops_per_token[method] / 1e12, 2) for k, v in med.items()},
            "samples_tokens_per_s": {k: [round(x, 1) for x in v] for k, v in sides.items()},
            "ratio_runtime_vs_baseline": round(med["runtime"] / med["baseline"], 3),
            "baseline_peak_memory_gib": peak.get(method),
        }
    result = {
        "benchmark": "train_tokens_per_s_gpu" + ("_smoke" if args.smoke else ""),
        "command": "python bench/bench_train_gpu.py " + " ".join(sys.argv[1:]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "card": card,
        "machine": f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}",
        "model": {"config": config, "vocab": vocab, "parameters": n_params},
        "setup": {
            "seq_len": args.seq_len,
            "micro_batch": args.micro_batch,
            "steps": args.steps,
            "zero_stage": args.zero_stage,
            "gradient_checkpointing": args.gradient_checkpointing,
            "precision": "fp32 (smoke)" if args.smoke else "bf16",
        },
        "results": figures,
    }
    print(json.dumps(result, indent=2))
    if not args.smoke:
        (ROOT / "bench" / "results" / "train_gpu.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
