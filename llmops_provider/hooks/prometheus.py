"""Prometheus HTTP API connection (conn type ``llmops_prometheus``).

stdlib ``urllib`` with a timeout on every call: no client library, nothing heavy at import.
The module-level ``prom_query`` is shared with the async trigger, which runs it in a thread.
"""

from __future__ import annotations

import base64
import json
import math
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from llmops_provider.compat import BaseHook


class PrometheusError(RuntimeError):
    """Prometheus unreachable or the query rejected; the message names the URL and the query."""


def auth_headers(login: str | None, password: str | None) -> dict[str, str]:
    if not login:
        return {}
    token = base64.b64encode(f"{login}:{password or ''}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def prom_query(base_url: str, promql: str, timeout: float = 10.0, headers: dict[str, str] | None = None) -> list[dict]:
    """Instant query; returns ``data.result`` as a list of ``{"metric": {...}, "value": [ts, "v"]}``."""
    url = f"{base_url.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as exc:  # 400/422: bad query, the body says why
        try:
            detail = json.load(exc).get("error", exc.reason)
        except ValueError:
            detail = exc.reason
        raise PrometheusError(
            f"Prometheus at {base_url} rejected query {promql!r}: HTTP {exc.code}: {detail}"
        ) from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PrometheusError(
            f"Prometheus at {base_url} unreachable ({reason}); check the connection's host/port "
            "and that Prometheus runs (locally: deploy/local/stack.sh status)"
        ) from None
    if body.get("status") != "success":
        raise PrometheusError(f"Prometheus at {base_url}: query {promql!r} failed: {body.get('error')}")
    data = body["data"]
    if data["resultType"] in ("scalar", "string"):
        return [{"metric": {}, "value": data["result"]}]
    if data["resultType"] == "matrix":
        return [{"metric": r["metric"], "value": r["values"][-1]} for r in data["result"] if r.get("values")]
    return data["result"]


def first_value(result: list[dict]) -> float | None:
    """The first sample's value as a float; ``None`` for no sample or NaN/Inf."""
    if not result:
        return None
    value = float(result[0]["value"][1])
    return None if math.isnan(value) or math.isinf(value) else value


class PrometheusHook(BaseHook):
    conn_name_attr = "prometheus_conn_id"
    default_conn_name = "prometheus_default"
    conn_type = "llmops_prometheus"
    hook_name = "Prometheus (LLMOps)"

    def __init__(self, prometheus_conn_id: str = default_conn_name, timeout: float = 10.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.prometheus_conn_id = prometheus_conn_id
        self.timeout = timeout
        self._conn = None

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {
            "hidden_fields": ["extra"],
            "relabeling": {
                "host": "Prometheus host (or full URL)",
                "schema": "Scheme (http/https)",
                "login": "Basic auth user (optional)",
                "password": "Basic auth password (optional)",
            },
            "placeholders": {"host": "127.0.0.1", "port": "9090", "schema": "http"},
        }

    @property
    def connection(self):
        if self._conn is None:
            self._conn = self.get_connection(self.prometheus_conn_id)
        return self._conn

    def base_url(self) -> str:
        conn = self.connection
        if conn.host and conn.host.startswith(("http://", "https://")):
            return conn.host.rstrip("/")
        scheme = conn.schema or "http"
        port = f":{conn.port}" if conn.port else ""
        return f"{scheme}://{conn.host or '127.0.0.1'}{port}"

    def headers(self) -> dict[str, str]:
        return auth_headers(self.connection.login, self.connection.password)

    def query(self, promql: str) -> list[dict]:
        """Instant query at now; a list of ``{"metric": {labels}, "value": [ts, "v"]}``."""
        return prom_query(self.base_url(), promql, self.timeout, self.headers())

    def query_scalar(self, promql: str) -> float | None:
        """The first series' value; ``None`` when the query has no sample (or gives NaN)."""
        result = self.query(promql)
        if len(result) > 1:
            self.log.warning(
                "query %r returned %d series; using the first. Aggregate it (sum/max) to be explicit",
                promql,
                len(result),
            )
        return first_value(result)

    def ready(self) -> bool:
        request = urllib.request.Request(f"{self.base_url()}/-/ready", headers=self.headers())
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                return resp.status == 200
        except OSError:
            return False

    def test_connection(self) -> tuple[bool, str]:
        try:
            self.query("vector(1)")
        except PrometheusError as exc:
            return False, str(exc)
        return True, f"Prometheus at {self.base_url()} answers queries"
