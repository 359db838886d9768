"""A stdlib stand-in for one vLLM replica in tests that exercise routing, not generation.

    python tests/integration/openai_stub.py --port 8123 --model m --text v1 [--delay 0.05]

Answers what the platform asks a replica: ``/health``, ``/v1/models``, ``/v1/completions`` (the
completion text is ``--text``, so a test can tell which version answered through the router)
and ``/metrics`` (vLLM's in-flight gauges, which the drain reads; the request counter is real).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--delay", type=float, default=0.05)
    args = parser.parse_args()
    lock, running = threading.Lock(), [0]

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802
            if self.path == "/health":
                self._send(200, b"")
            elif self.path == "/v1/models":
                self._send(200, json.dumps({"data": [{"id": args.model}]}).encode())
            elif self.path == "/metrics":
                with lock:
                    text = f'vllm:num_requests_running{{model_name="{args.model}"}} {running[0]}\n'
                text += f'vllm:num_requests_waiting{{model_name="{args.model}"}} 0\n'
                self._send(200, text.encode(), "text/plain")
            else:
                self._send(404, b"{}")

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with lock:
                running[0] += 1
            try:
                time.sleep(args.delay)
                body = {"choices": [{"text": args.text, "finish_reason": "length"}], "model": args.model}
                self._send(200, json.dumps(body).encode())
            finally:
                with lock:
                    running[0] -= 1

        def log_message(self, *a):
            pass

    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
