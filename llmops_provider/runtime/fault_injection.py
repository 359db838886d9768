"""Fault injection for serving drills: run vLLM's OpenAI server with every model step slowed down.

    python -m llmops_provider.runtime.fault_injection --latency-ms 200 -- \
        --model /path/to/model --host 127.0.0.1 --port 8011 ...

Everything after ``--`` is passed to ``vllm.entrypoints.openai.api_server`` unchanged. The
delay is added inside the engine, before each forward pass of the model runner, so vLLM's own
Prometheus series (``vllm:time_to_first_token_seconds``, ``vllm:inter_token_latency_seconds``,
``vllm:e2e_request_latency_seconds``) show it - exactly what a slow GPU, a noisy neighbour or
a bad kernel would look like to the canary analysis and the monitoring watchers. A proxy in
front of the server could not do that: vLLM starts its clocks when the engine sees a request.

How the delay reaches the engine: on CPU vLLM starts its engine-core process with the
``spawn`` start method, and a spawned child re-imports the parent's ``__main__`` module by
name. This module is that ``__main__`` (run with ``-m``), so the child imports it again as
``__mp_main__``; the import sees ``LLMOPS_INJECT_LATENCY_MS`` in the inherited environment
and patches the model runner there too. With ``fork`` the patch is inherited directly.

For drills and tests only: it is never on unless a deployment asks for it explicitly.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

ENV = "LLMOPS_INJECT_LATENCY_MS"
log = logging.getLogger("llmops.fault_injection")
_installed = False


def latency_ms() -> float:
    """The configured delay per model step, in milliseconds (0 when off)."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{ENV}={raw!r} is not a number: set it to the delay per model step in milliseconds") from None
    if value < 0:
        raise ValueError(f"{ENV}={raw!r} is negative: set it to 0 (off) or a positive number of milliseconds")
    return value


def install() -> bool:
    """Patch vLLM's model runner so each ``execute_model`` call sleeps first; idempotent.

    Returns True when a delay is active in this process.
    """
    global _installed
    delay = latency_ms() / 1000.0
    if delay <= 0 or _installed:
        return _installed
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # CPUModelRunner inherits execute_model

    original = GPUModelRunner.execute_model

    def execute_model(self, *args, **kwargs):
        time.sleep(delay)
        return original(self, *args, **kwargs)

    execute_model.__wrapped__ = original  # type: ignore[attr-defined]
    GPUModelRunner.execute_model = execute_model
    _installed = True
    print(
        f"[llmops fault injection] pid {os.getpid()}: +{delay * 1000:.0f} ms per model step",
        file=sys.stderr,
        flush=True,
    )
    return True


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        cut = argv.index("--")
        own, vllm_args = argv[:cut], argv[cut + 1 :]
    else:
        own, vllm_args = argv, []
    parser = argparse.ArgumentParser(
        prog="python -m llmops_provider.runtime.fault_injection", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--latency-ms", type=float, required=True, help="delay added before every model step")
    args = parser.parse_args(own)
    if args.latency_ms < 0:
        parser.error("--latency-ms must be >= 0")
    if not vllm_args:
        parser.error("pass the vLLM server arguments after '--', e.g. -- --model /path --port 8011")
    os.environ[ENV] = str(args.latency_ms)  # inherited by vLLM's engine-core process
    install()
    sys.argv = ["vllm.entrypoints.openai.api_server", *vllm_args]
    from vllm.entrypoints.launchers.api_server.entry import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
elif __name__ == "__mp_main__" and latency_ms() > 0:  # vLLM's spawned engine-core process
    install()
