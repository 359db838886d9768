"""The whole eval gate on the tiny model versus the same lm-eval tasks run with the lm-eval CLI.

The gate sample is ``LMEvalGateOperator.execute`` end to end: resolve the version in a real MLflow
server (SQLite), write the job spec, start the eval job (fresh runtime interpreter), download the
model from MLflow, generate the tasks, run lm-eval, the safety suite, write the reports, log the
MLflow run and tags, emit the approved event. Two baselines on the same generated tasks and the
same model directory, each in a fresh interpreter: ``lm_eval`` CLI with its defaults (what a user
would run by hand) and ``lm_eval.simple_evaluate`` with the gate's own settings (so gate / API is
the gate's overhead). Samples alternate (gate, CLI, API, gate, ...) so machine noise hits all
alike; results are ratios of medians.
With ``--with-champion`` the gate also evaluates a champion (two models) and is compared with two
CLI runs. Writes bench/results/eval_gate.json (or ``--out``).

    .venv/bin/python bench/bench_eval_gate.py [--samples 3] [--limit 100] [--with-champion]

Jobs run with OMP_NUM_THREADS=1 on both sides (a shared 2-core machine: extra threads only spin).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_PYTHON = ROOT / ".venv-runtime" / "bin" / "python"
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "integration")]

from conftest import free_port, mlflow_server_cmd, running  # noqa: E402 - the test suite's server helpers
from tiny_model import build_tiny_model, register_tiny_model  # noqa: E402

COMMIT = "bench00001"


def held_out(dst: Path, source: Path) -> Path:
    """Every parseable document of ``source`` (the sample corpus has malformed lines on purpose)."""
    docs = []
    for line in source.open():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("text"), str) and doc["text"].strip():
            docs.append({"id": str(doc.get("id")), "text": doc["text"]})
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "test.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return dst


def run_gate(recipe: str, version: str, dataset: Path) -> tuple[float, dict]:
    from airflow.sdk.execution_time.context import OutletEventAccessors

    from llmops_provider.compat import Asset
    from llmops_provider.operators.evaluation import LMEvalGateOperator

    class Gate(LMEvalGateOperator):
        def dataset_dir(self, recipe, commit):
            return dataset

    approved = Asset("llmops://bench-gate/approved")
    ctx = {"triggering_asset_events": {}, "outlet_events": OutletEventAccessors()}
    op = Gate(task_id="evaluate", recipe_path=recipe, model_version=version, outlets=[approved])
    t = time.perf_counter()
    result = op.execute(ctx)
    return time.perf_counter() - t, result


def run_cli(model_dir: Path, task_dir: Path, tasks: list[str], out: Path) -> float:
    cmd = [
        str(RUNTIME_PYTHON),
        "-m",
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={model_dir},dtype=float32",
        "--tasks",
        ",".join(tasks),
        "--include_path",
        str(task_dir),
        "--batch_size",
        "4",
        "--device",
        "cpu",
        "--output_path",
        str(out),
        "--log_samples",
    ]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(out / ".hf")}
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out)
    if proc.returncode:
        raise RuntimeError(f"lm_eval CLI failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


# The gate's own lm-eval call settings (no stderr bootstrap, no built-in task index), as a script.
_API = (
    "import sys, lm_eval\n"
    "from lm_eval.tasks import TaskManager\n"
    "model, tdir, tasks = sys.argv[1], sys.argv[2], sys.argv[3].split(',')\n"
    "lm_eval.simple_evaluate(model='hf', model_args={'pretrained': model, 'dtype': 'float32'}, tasks=tasks,\n"
    "    task_manager=TaskManager(include_path=tdir, include_defaults=False), batch_size=4, device='cpu',\n"
    "    log_samples=True, bootstrap_iters=0)\n"
)


def run_api(model_dir: Path, task_dir: Path, tasks: list[str], out: Path) -> float:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(out / ".hf")}
    t = time.perf_counter()
    proc = subprocess.run(
        [str(RUNTIME_PYTHON), "-c", _API, str(model_dir), str(task_dir), ",".join(tasks)],
        capture_output=True,
        text=True,
        env=env,
        cwd=out,
    )
    if proc.returncode:
        raise RuntimeError(f"lm_eval API run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--limit", type=int, default=100, help="held-out documents (the demo recipe's limit)")
    parser.add_argument("--with-champion", action="store_true", help="gate vs champion (2 models) vs 2 CLI runs")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "eval_gate.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-eval-gate-"))
    os.environ.update(
        {
            "AIRFLOW__LLMOPS__HOME": str(work / "home"),
            "OMP_NUM_THREADS": "1",
            "AIRFLOW__LLMOPS__RUNTIME_PYTHON": str(RUNTIME_PYTHON),
        }
    )
    factory = SimpleNamespace(mktemp=lambda name: Path(tempfile.mkdtemp(prefix=name, dir=work)))
    model = build_tiny_model(factory)
    dataset = held_out(work / "dataset", ROOT / "data" / "sample" / "batch-001.jsonl")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = mlflow_server_cmd(work, port)
    os.environ["AIRFLOW_CONN_MLFLOW_DEFAULT"] = json.dumps(
        {"conn_type": "llmops_mlflow", "host": "127.0.0.1", "port": port, "schema": "http"}
    )
    os.environ["MLFLOW_TRACKING_URI"] = uri
    recipe = work / "recipe.yaml"
    recipe.write_text(
        "name: bench-gate\ndata:\n  sources: [{path: /nonexistent}]\n  dataset_repo: bench\n"
        f"evaluation:\n  limit: {args.limit}\n  thresholds:\n    perplexity: {{max: 1.0e9}}\n"
    )
    times: dict[str, list[float]] = {"gate": [], "lm_eval_cli": [], "lm_eval_api": []}
    try:
        with running(cmd, f"{uri}/health", work / "mlflow.log"):
            from mlflow import MlflowClient

            client = MlflowClient(uri)
            if args.with_champion:
                champion, _ = register_tiny_model(uri, "bench-gate", model, {"dataset_commit": COMMIT}, alias=None)
                client.set_registered_model_alias("bench-gate", "champion", champion)
            for i in range(args.samples):
                version, _ = register_tiny_model(uri, "bench-gate", model, {"dataset_commit": COMMIT})
                seconds, result = run_gate(str(recipe), version, dataset)
                times["gate"].append(round(seconds, 2))
                out_dir = Path(result["report_path"]).parent
                tasks = json.loads(Path(result["report_path"]).read_text())["tasks"]
                cli = api = 0.0
                model_dir = next((out_dir / "model").rglob("config.json")).parent  # as downloaded by the gate
                for j in range(2 if args.with_champion else 1):
                    (work / f"cli-{i}-{j}").mkdir()
                    cli += run_cli(model_dir, out_dir / "tasks", list(tasks), work / f"cli-{i}-{j}")
                    (work / f"api-{i}-{j}").mkdir()
                    api += run_api(model_dir, out_dir / "tasks", list(tasks), work / f"api-{i}-{j}")
                times["lm_eval_cli"].append(round(cli, 2))
                times["lm_eval_api"].append(round(api, 2))
                print(f"sample {i}: gate {seconds:.1f}s, lm-eval CLI {cli:.1f}s, lm-eval API {api:.1f}s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    flags = f" --samples {args.samples} --limit {args.limit}" + (" --with-champion" if args.with_champion else "")
    result = {
        "benchmark": "eval_gate_vs_lm_eval_cli",
        "command": f".venv/bin/python bench/bench_eval_gate.py{flags}",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        "OMP_NUM_THREADS=1, shared with other jobs",
        "what": "gate = LMEvalGateOperator.execute end to end (MLflow registry + artifacts, spec, job, tasks, "
        "lm-eval, safety suite, reports, MLflow run, tags, alias); lm_eval_cli = `python -m lm_eval` with its "
        "defaults on the same generated tasks and model directory (it also indexes the built-in tasks and "
        "bootstraps stderrs); lm_eval_api = lm_eval.simple_evaluate with the gate's own settings (no stderr "
        "bootstrap, no built-in index): gate / api is the gate's overhead"
        + (", baselines x2 (candidate and champion)" if args.with_champion else ""),
        "tasks": list(tasks),
        "held_out_documents": args.limit,
        "median_seconds": med,
        "samples_seconds": times,
        "ratio_gate_over_cli": round(med["gate"] / med["lm_eval_cli"], 3),
        "ratio_gate_over_api": round(med["gate"] / med["lm_eval_api"], 3),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_seconds", "ratio_gate_over_cli", "ratio_gate_over_api")}))


if __name__ == "__main__":
    main()
