"""Shared fixtures: real services started on 127.0.0.1 for the integration tiers."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_PYTHON = ROOT / ".venv-runtime" / "bin" / "python"
CONTROL_BIN = Path(sys.executable).parent
if str(ROOT) not in sys.path:  # spark_jobs/ (the checkout entrypoint of the Spark application) is a top-level package
    sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout}s")


@contextlib.contextmanager
def running(cmd: list[str], health_url: str, log_path: Path, timeout: float = 120):
    """Run a real server process until the block ends; it must answer ``health_url`` first."""
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(health_url, timeout, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextlib.contextmanager
def prometheus_server(work: Path, targets: list[str], rule_files: list[Path] | None = None):
    """A real Prometheus (Debian's binary) scraping ``targets`` every second; yields its URL."""
    import json as _json

    binary = which("prometheus")
    if not binary:
        pytest.fail("prometheus binary not installed: run `make setup` (apt-get install prometheus)")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "vllm", "static_configs": [{"targets": targets}]}],
        "rule_files": [str(p) for p in rule_files or []],
    }
    (work / "prometheus.yml").write_text(_json.dumps(config))  # JSON is YAML
    port = free_port()
    cmd = [
        binary,
        f"--config.file={work / 'prometheus.yml'}",
        f"--storage.tsdb.path={work / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1h",
    ]
    url = f"http://127.0.0.1:{port}"
    with running(cmd, f"{url}/-/ready", work / "prometheus.log", timeout=60):
        yield url


@pytest.fixture(autouse=True, scope="session")
def _llmops_env(tmp_path_factory):
    """Point [llmops] at a scratch home and the repo's runtime venv for the whole session."""
    home = tmp_path_factory.mktemp("llmops-home")
    os.environ.setdefault("AIRFLOW__LLMOPS__HOME", str(home))
    os.environ.setdefault("AIRFLOW__LLMOPS__RUNTIME_PYTHON", str(RUNTIME_PYTHON))
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    yield


def mlflow_server_cmd(work: Path, port: int) -> list[str]:
    """``mlflow server`` on SQLite under ``work`` with proxied artifacts (tests and benchmarks)."""
    return [
        str(CONTROL_BIN / "mlflow"),
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
    ]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on SQLite with proxied artifacts; yields its URI."""
    work = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    cmd = mlflow_server_cmd(work, port)
    uri = f"http://127.0.0.1:{port}"
    with running(cmd, f"{uri}/health", work / "server.log"):
        yield uri


@pytest.fixture
def mlflow_conn(monkeypatch, mlflow_server):
    """The `mlflow_default` Airflow connection pointing at the test server."""
    host, port = mlflow_server.removeprefix("http://").split(":")
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLFLOW_DEFAULT",
        f'{{"conn_type": "llmops_mlflow", "host": "{host}", "port": {port}, "schema": "http"}}',
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return mlflow_server


def have_runtime() -> bool:
    return RUNTIME_PYTHON.exists()


def which(cmd: str) -> str | None:
    return shutil.which(cmd)
