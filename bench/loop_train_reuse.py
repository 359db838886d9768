"""The training job's reuse path, run many times in a row: every run must exit cleanly.

Issue #16: on the reuse path (same recipe and dataset commit: no training), a rank once died
after its result with ``terminate called without an active exception`` (SIGABRT, launcher exit
250). This drives the real ``DeepSpeedTrainOperator`` on the local backend (the deepspeed
launcher, 2 CPU ranks on gloo, the runtime venv) against a real MLflow server and the real
local dataset store: one training run registers version 1, then ``--runs`` re-runs must each
reuse it and exit 0. Not a timed test: it counts clean exits.

    .venv/bin/python bench/loop_train_reuse.py --runs 30      # writes bench/results/train_reuse_exit.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
NAME = "reuse-loop"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"{url} not healthy after {timeout}s")


def dataset(work: Path) -> Path:
    staged = work / "staged"
    staged.mkdir()
    docs = []
    for line in (ROOT / "data" / "sample" / "batch-002.jsonl").open():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc.get("text"), str) and doc["text"].strip():
            docs.append({"id": str(doc.get("id")), "text": doc["text"]})
    (staged / "validation.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[:20]))
    (staged / "train.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[20:]))
    (staged / "test.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[:5]))
    return staged


def recipe(work: Path) -> str:
    raw = yaml.safe_load((ROOT / "dags" / "recipes" / "tiny-llama.yaml").read_text())
    raw["name"] = NAME
    raw["training"].update(max_steps=4, warmup_steps=1, seq_len=64, micro_batch_size=4, checkpoint_every=4,
                           world_size=2, backend="local")  # fmt: skip
    path = work / f"{NAME}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def run(recipe_path: str, commit: str, attempt: int) -> dict:
    from airflow.sdk.execution_time.context import OutletEventAccessors

    from llmops_provider.operators.training import DeepSpeedTrainOperator

    run_id = f"manual__loop-{attempt:03d}"
    ti = SimpleNamespace(dag_id=f"{NAME}_train", task_id="train", run_id=run_id, try_number=1, map_index=-1)
    ctx = {"ti": ti, "run_id": run_id, "triggering_asset_events": {}, "outlet_events": OutletEventAccessors()}
    op = DeepSpeedTrainOperator(task_id="train", recipe_path=recipe_path, dataset_commit=commit)
    return op.execute(ctx)


def _dirty() -> bool:
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                            text=True)  # fmt: skip
    return bool(status.stdout.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="reuse runs after the first (training) run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_reuse_exit.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="reuse-loop-"))
    os.environ["AIRFLOW__LLMOPS__HOME"] = str(work / "home")
    os.environ["AIRFLOW__LLMOPS__RUNTIME_PYTHON"] = str(ROOT / ".venv-runtime" / "bin" / "python")
    os.environ["AIRFLOW__LLMOPS__DATASET_STORE"] = "local"
    port = free_port()
    os.environ["AIRFLOW_CONN_MLFLOW_DEFAULT"] = json.dumps(
        {"conn_type": "llmops_mlflow", "host": "127.0.0.1", "port": port, "schema": "http"}
    )
    os.environ["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{port}"
    log_path = work / "operator.log"
    logging.basicConfig(filename=log_path, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    mlflow = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{work}/mlflow.db", "--artifacts-destination", str(work / "artifacts"),
         "--workers", "1"],
        stdout=open(work / "mlflow.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    outcomes: list[dict] = []
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 120)
        from llmops_provider.datasets import get_store

        commit = get_store().commit("tiny-corpus", "main", dataset(work), {"airflow_run_id": "loop"}).commit_id
        path = recipe(work)
        first = run(path, commit, 0)
        print(f"run 0 (training): version {first['model_version']} reused={first['reused']}", flush=True)
        for attempt in range(1, args.runs + 1):
            started = time.monotonic()
            try:
                result = run(path, commit, attempt)
                ok = result["reused"] is True and result["model_version"] == first["model_version"]
                outcome = {"run": attempt, "ok": ok, "reused": result["reused"], "version": result["model_version"]}
            except Exception as exc:  # noqa: BLE001 - counted, with the reason
                outcome = {"run": attempt, "ok": False, "error": str(exc)[-500:]}
            outcome["seconds"] = round(time.monotonic() - started, 1)
            outcomes.append(outcome)
            print(json.dumps(outcome), flush=True)
    finally:
        mlflow.terminate()
        mlflow.wait(20)
    clean = sum(o["ok"] for o in outcomes)
    code = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    summary = {
        "command": f".venv/bin/python bench/loop_train_reuse.py --runs {args.runs}",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code": code.stdout.strip() + (" + uncommitted changes" if _dirty() else ""),
        "runs": len(outcomes),
        "clean_exits": clean,
        "failures": len(outcomes) - clean,
        "outcomes": outcomes,
    }
    print(f"operator log: {log_path}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{clean}/{len(outcomes)} clean exits; written to {args.out}")
    return 0 if clean == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
