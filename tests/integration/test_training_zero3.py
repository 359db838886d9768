"""ZeRO-3 for real on 2 CPU ranks (gloo): parameters sharded across ranks, the final checkpoint
consolidated with DeepSpeed's zero_to_fp32, LoRA merged and exported.

The check is independent of the runtime: a fresh process loads the exported ``model/merged``
with plain transformers and recomputes the validation loss the job reported; only a correctly
consolidated model (every shard, the trained LoRA weights) gives the same number.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, RUNTIME_PYTHON, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

# runs in the runtime venv: mean loss of the merged model over the validation blocks
_CHECK = r"""
import json, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmops_provider.runtime.train_data import pack, read_texts
merged, data, seq_len, limit = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(merged)
model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
blocks = torch.from_numpy(pack(tok, read_texts(data / "validation.jsonl"), seq_len)[:limit])
with torch.no_grad():
    losses = [model(input_ids=b[None], labels=b[None]).loss.item() for b in blocks]
print(json.dumps({"val_loss": sum(losses) / len(losses), "blocks": len(losses)}))
"""


def test_zero3_shards_are_consolidated_into_the_exported_model(tmp_path, mlflow_server):
    import yaml
    from mlflow import MlflowClient

    from llmops_provider.recipes import Recipe
    from llmops_provider.runtime.train import launch_command
    from llmops_provider.specs.train import TrainJobSpec

    data = tmp_path / "dataset"
    data.mkdir()
    docs = []
    for line in (ROOT / "data" / "sample" / "batch-002.jsonl").open():
        try:
            doc = json.loads(line)
        except ValueError:
            continue  # the sample corpus has malformed lines on purpose
        if isinstance(doc, dict) and isinstance(doc.get("text"), str) and doc["text"].strip():
            docs.append({"id": str(doc.get("id")), "text": doc["text"]})
    (data / "validation.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[:20]))
    (data / "train.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[20:]))

    raw = yaml.safe_load((ROOT / "dags" / "recipes" / "tiny-llama.yaml").read_text())
    raw["name"] = "tiny-zero3"
    raw["training"].update(
        max_steps=4, warmup_steps=1, seq_len=64, micro_batch_size=4, checkpoint_every=2, world_size=2, zero_stage=3
    )
    spec = TrainJobSpec.from_recipe(
        Recipe.model_validate(raw),
        dataset_dir=str(data),
        dataset_repo="tiny-corpus",
        dataset_commit="z3" * 20,
        output_dir=str(tmp_path / "job"),
        max_eval_blocks=8,
    )
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(spec.model_dump_json())
    cmd = launch_command(str(spec_path), 2, launcher=str(RUNTIME_PYTHON.parent / "deepspeed"), master_port=free_port())
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout[-4000:]
    assert "with zero_to_fp32" in done.stdout
    result = json.loads(spec.result_file.read_text())

    ckpt = spec.checkpoints / "step0000004"
    shards = sorted(p.name for p in ckpt.glob("*optim_states.pt"))
    assert len(shards) == 2, f"one ZeRO-3 optimizer shard per rank: {shards}"
    params = MlflowClient(mlflow_server).get_run(result["mlflow_run_id"]).data.params
    assert params["ds.zero_optimization.stage"] == "3"

    merged = Path(spec.output_dir) / "export" / "model" / "merged"
    check = subprocess.run(
        [str(RUNTIME_PYTHON), "-c", _CHECK, str(merged), str(data), "64", "8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 0, check.stderr[-3000:]
    recomputed = json.loads(check.stdout.strip().splitlines()[-1])
    assert recomputed["blocks"] == 8
    assert recomputed["val_loss"] == pytest.approx(result["val_loss"], rel=1e-4), (recomputed, result)
