"""A seeded load generator: replays held-out prompts against an OpenAI-compatible endpoint.

    python -m llmops_provider.loadgen --url http://127.0.0.1:8011 --model tiny-llama \\
        --prompts <dataset version>/test.jsonl --rate 2 --duration 60 --seed 0

Prompts are the first words of each held-out document (the dataset version's test split),
drawn in a seeded order; requests go out at a fixed rate from a few worker threads. Every
response is counted: HTTP status, the upstream that served it (the router's
``X-LLMOps-Upstream`` header), latency and, for a failure, the reason. Stdlib only, so it
runs in either environment and in the demo.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


def load_prompts(path: str | Path, words: int = 8, limit: int | None = None) -> list[str]:
    """Prompts from a JSONL split (``{"text": ...}`` per line): the first ``words`` words of each."""
    prompts = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        text = json.loads(line).get("text") or ""
        prompt = " ".join(text.split()[:words])
        if prompt:
            prompts.append(prompt)
        if limit and len(prompts) >= limit:
            break
    if not prompts:
        raise ValueError(f"{path}: no prompts (expected JSONL lines with a non-empty `text`)")
    return prompts


@dataclass
class Result:
    started: float  # time.time()
    latency_s: float
    status: int | None
    upstream: str | None
    error: str | None = None


@dataclass
class LoadGenerator:
    """Send completions of ``prompts`` to ``url`` at ``rate`` requests/s until stopped or ``duration_s``.

    Use as a context manager (runs in background threads) or call :meth:`run` to block.
    """

    url: str
    model: str
    prompts: list[str]
    rate: float = 2.0
    max_tokens: int = 16
    seed: int = 0
    concurrency: int = 4
    timeout_s: float = 120.0
    results: list[Result] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._next = 0

    def _request(self, prompt: str, seed: int) -> Result:
        body = json.dumps(
            {
                "model": self.model,
                "prompt": prompt,
                "max_tokens": self.max_tokens,
                "temperature": 0.0,
                "seed": seed,
                "ignore_eos": True,
            }
        ).encode()
        req = urllib.request.Request(
            f"{self.url.rstrip('/')}/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        started, t0 = time.time(), time.monotonic()
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                data = json.loads(resp.read())
                upstream = resp.headers.get("X-LLMOps-Upstream")
                if not data.get("choices"):
                    return Result(started, time.monotonic() - t0, resp.status, upstream, "no choices in the response")
                return Result(started, time.monotonic() - t0, resp.status, upstream)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:200]
            return Result(
                started,
                time.monotonic() - t0,
                exc.code,
                exc.headers.get("X-LLMOps-Upstream"),
                f"HTTP {exc.code}: {detail}",
            )
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return Result(started, time.monotonic() - t0, None, None, f"{type(exc).__name__}: {exc}")

    def _worker(self, deadline: float | None) -> None:
        interval = self.concurrency / self.rate
        while not self._stop.is_set() and (deadline is None or time.monotonic() < deadline):
            with self._lock:
                n = self._next
                self._next += 1
                prompt = self._rng.choice(self.prompts)
            t0 = time.monotonic()
            result = self._request(prompt, n)
            with self._lock:
                self.results.append(result)
            self._stop.wait(max(0.0, interval - (time.monotonic() - t0)))

    def start(self, duration_s: float | None = None) -> LoadGenerator:
        deadline = time.monotonic() + duration_s if duration_s else None
        for i in range(self.concurrency):
            thread = threading.Thread(target=self._worker, args=(deadline,), name=f"loadgen-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
            time.sleep(self.concurrency / self.rate / self.concurrency)  # spread the workers over one interval
        return self

    def stop(self) -> dict:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout_s + 5)
        self._threads = []
        return self.summary()

    def run(self, duration_s: float) -> dict:
        self.start(duration_s)
        for thread in self._threads:
            thread.join()
        return self.summary()

    def __enter__(self) -> LoadGenerator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def summary(self, since: float | None = None) -> dict:
        """Counts (optionally only for requests started at or after ``since``, a ``time.time()``)."""
        with self._lock:
            results = [r for r in self.results if since is None or r.started >= since]
        errors = [r for r in results if r.error]
        latencies = sorted(r.latency_s for r in results if not r.error)
        return {
            "sent": len(results),
            "errors": len(errors),
            "first_error": errors[0].error if errors else None,
            "by_upstream": dict(Counter(r.upstream or "-" for r in results)),
            "latency_p50_s": latencies[len(latencies) // 2] if latencies else None,
            "latency_max_s": latencies[-1] if latencies else None,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmops_provider.loadgen", description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="the router (or any OpenAI-compatible endpoint)")
    parser.add_argument("--model", required=True, help="served model name, e.g. the recipe name")
    parser.add_argument(
        "--prompts", required=True, help="JSONL with a `text` field: the test split of a dataset version"
    )
    parser.add_argument("--rate", type=float, default=2.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    gen = LoadGenerator(
        args.url,
        args.model,
        load_prompts(args.prompts),
        rate=args.rate,
        max_tokens=args.max_tokens,
        seed=args.seed,
        concurrency=args.concurrency,
    )
    summary = gen.run(args.duration)
    print(json.dumps(summary, indent=2))
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
