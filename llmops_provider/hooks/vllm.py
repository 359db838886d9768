"""An OpenAI-compatible serving endpoint (vLLM) (conn type ``llmops_vllm``).

host/port/schema make the base URL (a host that already starts with http(s):// is used as
is); the optional password is the API key, sent as a Bearer token. Stdlib HTTP only.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from llmops_provider.compat import BaseHook


class VLLMError(RuntimeError):
    pass


class VLLMHook(BaseHook):
    conn_name_attr = "vllm_conn_id"
    default_conn_name = "vllm_default"
    conn_type = "llmops_vllm"
    hook_name = "vLLM endpoint (LLMOps)"

    def __init__(
        self,
        vllm_conn_id: str = default_conn_name,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        **kwargs: Any,
    ) -> None:
        """``base_url`` (e.g. from a deployment record) skips the connection lookup."""
        super().__init__(**kwargs)
        self.vllm_conn_id = vllm_conn_id
        self._base_url = base_url.rstrip("/") if base_url else None
        self._api_key = api_key
        self.timeout = timeout

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {
            "hidden_fields": ["extra", "login"],
            "relabeling": {"host": "Endpoint host", "schema": "Scheme (http/https)", "password": "API key (optional)"},
            "placeholders": {"host": "127.0.0.1", "port": "8011", "schema": "http", "password": "sk-..."},
        }

    def base_url(self) -> str:
        if self._base_url is None:
            conn = self.get_connection(self.vllm_conn_id)
            if conn.host and conn.host.startswith(("http://", "https://")):
                url = conn.host
            else:
                port = f":{conn.port}" if conn.port else ""
                url = f"{conn.schema or 'http'}://{conn.host or '127.0.0.1'}{port}"
            self._base_url = url.rstrip("/")
            if self._api_key is None:
                self._api_key = conn.password or ""
        return self._base_url

    def _request(self, method: str, path: str, body: dict | None = None, timeout: float | None = None) -> bytes:
        url = self.base_url() + path
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise VLLMError(f"{method} {url} -> HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise VLLMError(f"{method} {url} failed: {exc}") from None

    def health(self, timeout: float = 5.0) -> bool:
        """True when ``/health`` answers 200 (the engine is up, not necessarily serving well)."""
        try:
            self._request("GET", "/health", timeout=timeout)
        except VLLMError:
            return False
        return True

    def models(self) -> list[str]:
        """Served model names (``/v1/models``)."""
        data = json.loads(self._request("GET", "/v1/models"))
        return [m["id"] for m in data.get("data", [])]

    def complete(
        self, prompt: str, max_tokens: int = 16, model: str | None = None, temperature: float = 0.0, **params: Any
    ) -> str:
        """Text of one completion (``/v1/completions``); ``model`` defaults to the first served."""
        model = model or self.models()[0]
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, **params}
        data = json.loads(self._request("POST", "/v1/completions", body))
        choices = data.get("choices") or []
        if not choices:
            raise VLLMError(f"completion from {self.base_url()} has no choices: {data}")
        return choices[0].get("text") or ""

    def metrics_text(self) -> str:
        """The Prometheus exposition of ``/metrics`` (``vllm:`` series)."""
        return self._request("GET", "/metrics").decode()

    def test_connection(self) -> tuple[bool, str]:
        try:
            return True, f"serving {self.models()} at {self.base_url()}"
        except Exception as exc:  # noqa: BLE001 - reported to the UI
            return False, str(exc)
