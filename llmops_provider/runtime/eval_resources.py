"""Resource benchmark of the eval gate: serve a model with vLLM, send a fixed seeded load, measure.

For each model (candidate, then champion, in the same job and with the same load) it starts vLLM
through the serving launcher's public functions (``runtime.serve.start`` / ``stop``, on a free
port, under its own replica name so a live deployment is never touched), streams
``/v1/completions`` requests (prompts: the first words of the held-out documents, seeded order,
``max_tokens`` generated with ``ignore_eos``, ``concurrency`` in flight) and records:

- ``ttft_p50_s`` / ``ttft_p95_s``: time to the first streamed token;
- ``tpot_mean_s``: time per output token after the first ((last - first) / (tokens - 1));
- ``throughput_tok_s``: output tokens over the wall time of the whole load;
- ``peak_rss_mb``: the largest resident memory of the server's process group, sampled every
  0.2 s while the load runs (vLLM's API server, engine core and workers together).
"""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
import time
import urllib.request
from pathlib import Path

log = logging.getLogger("llmops.evaluate.resources")

COLUMNS = ("ttft_p50_s", "ttft_p95_s", "tpot_mean_s", "throughput_tok_s", "peak_rss_mb", "requests")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def summarize(records: list[dict], wall_s: float, peak_rss_mb: float) -> dict[str, float]:
    """Aggregate per-request ``{"ttft", "tokens", "last"}`` (seconds from the request's start)."""
    if not records:
        raise ValueError("no successful request: nothing to measure")
    ttft = [r["ttft"] for r in records]
    tpot = [(r["last"] - r["ttft"]) / (r["tokens"] - 1) for r in records if r["tokens"] > 1]
    return {
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "tpot_mean_s": sum(tpot) / len(tpot) if tpot else 0.0,
        "throughput_tok_s": sum(r["tokens"] for r in records) / wall_s,
        "peak_rss_mb": peak_rss_mb,
        "requests": float(len(records)),
    }


def group_rss_mb(pgid: int) -> float:
    """Resident memory of every process in group ``pgid`` (Linux /proc), MiB."""
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1024


def stream_one(endpoint: str, model: str, prompt: str, max_tokens: int, timeout: float = 300) -> dict:
    body = json.dumps(
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "ignore_eos": True,
        }
    ).encode()
    req = urllib.request.Request(f"{endpoint}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first = last = None
    tokens = 0
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                now = time.perf_counter() - start
                first = now if first is None else first
                last = now
                tokens += 1
    if first is None:
        raise RuntimeError("the server streamed no token")
    return {"ttft": first, "last": last, "tokens": tokens}


def run_load(
    endpoint: str,
    model: str,
    prompts: list[str],
    *,
    requests: int,
    concurrency: int,
    max_tokens: int,
    seed: int,
    pgid: int | None,
) -> dict[str, float]:
    rng = random.Random(seed)
    order = [prompts[rng.randrange(len(prompts))] for _ in range(requests)]
    records, errors, lock = [], [], threading.Lock()
    peak = [0.0]
    done = threading.Event()

    def sample_memory() -> None:
        while not done.is_set():
            if pgid is not None:
                peak[0] = max(peak[0], group_rss_mb(pgid))
            time.sleep(0.2)

    def worker() -> None:
        while True:
            with lock:
                if not order:
                    return
                prompt = order.pop()
            try:
                rec = stream_one(endpoint, model, prompt, max_tokens)
                with lock:
                    records.append(rec)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(str(exc)[:200])

    sampler = threading.Thread(target=sample_memory, daemon=True)
    sampler.start()
    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {requests} benchmark requests failed, e.g. {errors[0]}")
    return summarize(records, wall, peak[0])


def benchmark(role: str, model_dir: Path, spec, prompts: list[str]) -> dict[str, float]:
    """Serve ``model_dir`` on a free port, run the load, stop the server (always)."""
    from llmops_provider.runtime import serve
    from llmops_provider.specs.serve import ServeSpec

    res = spec.resources
    name = f"{spec.model_name}-evalbench"
    sspec = ServeSpec(
        name=name,
        replica=f"{name}-{role}",
        model_name=spec.model_name,
        model_version=f"{spec.model_version}-{role}",
        model_dir=str(model_dir),
        port=_free_port(),
        max_model_len=res.max_model_len,
        startup_timeout_s=res.startup_timeout_s,
    )
    log.info("resource benchmark (%s): serving %s on %s", role, model_dir, sspec.endpoint)
    try:
        state = serve.start(sspec)
        return run_load(
            sspec.endpoint,
            name,
            prompts,
            requests=res.requests,
            concurrency=res.concurrency,
            max_tokens=res.max_tokens,
            seed=res.seed,
            pgid=state.get("pid"),
        )
    finally:
        serve.stop(sspec.instance)
