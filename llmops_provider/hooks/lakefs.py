"""lakeFS connection (conn type ``llmops_lakefs``): host = endpoint URL, login/password = access keys.

lakefs-sdk sets no timeout on its requests, so a silent server would hang a worker slot
forever: every call made through this hook passes ``request_timeout``.
"""

from __future__ import annotations

from typing import Any

from llmops_provider.compat import BaseHook

DEFAULT_TIMEOUT: tuple[float, float] = (5.0, 60.0)  # (connect, read) seconds


def _parse_timeout(value: Any) -> tuple[float, float]:
    """``"5,60"``, ``[5, 60]`` or ``30`` (both) -> (connect, read); falls back to the default."""
    if value in (None, ""):
        return DEFAULT_TIMEOUT
    if isinstance(value, (int, float)):
        return float(value), float(value)
    parts = value.split(",") if isinstance(value, str) else value
    try:
        nums = [float(p) for p in parts]
        if not 1 <= len(nums) <= 2:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(
            f"lakeFS connection extra request_timeout={value!r} is not a number or 'connect,read' pair, e.g. '5,60'"
        ) from None
    return (nums[0], nums[0]) if len(nums) == 1 else (nums[0], nums[1])


class LakeFSHook(BaseHook):
    """Builds a ``lakefs_sdk`` API client from an Airflow connection.

    :param lakefs_conn_id: connection id of type ``llmops_lakefs``. Host is the endpoint URL
        (``https://lakefs.example.com``; ``/api/v1`` is appended when missing), login the access
        key id, password the secret access key. Extra ``request_timeout`` (``"connect,read"``
        seconds) overrides the default (5, 60).
    """

    conn_name_attr = "lakefs_conn_id"
    default_conn_name = "lakefs_default"
    conn_type = "llmops_lakefs"
    hook_name = "lakeFS (LLMOps)"

    def __init__(self, lakefs_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lakefs_conn_id = lakefs_conn_id
        self._client = None
        self._timeout: tuple[float, float] | None = None

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        try:  # only the webserver has wtforms; nowhere else needs the form
            from wtforms import StringField
        except ImportError:
            return {}
        return {
            "request_timeout": StringField(
                "Request timeout (connect,read seconds)",
                description="lakefs-sdk has no default timeout; default 5,60",
                default="5,60",
            )
        }

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {
            "hidden_fields": ["schema", "port"],
            "relabeling": {"host": "Endpoint URL", "login": "Access key ID", "password": "Secret access key"},
            "placeholders": {
                "host": "https://lakefs.example.com",
                "login": "AKIAIOSFODNN7EXAMPLE",
                "extra": '{"request_timeout": "5,60"}',
            },
        }

    @property
    def request_timeout(self) -> tuple[float, float]:
        """``_request_timeout`` for every lakefs-sdk call: (connect, read) seconds."""
        if self._timeout is None:
            conn = self.get_connection(self.lakefs_conn_id)
            self._timeout = _parse_timeout(conn.extra_dejson.get("request_timeout"))
        return self._timeout

    @request_timeout.setter
    def request_timeout(self, value: tuple[float, float] | float | str) -> None:
        self._timeout = _parse_timeout(value)

    def endpoint(self) -> str:
        conn = self.get_connection(self.lakefs_conn_id)
        if not conn.host:
            raise ValueError(
                f"connection {self.lakefs_conn_id!r} has no host; set it to the lakeFS endpoint URL, "
                "e.g. https://lakefs.example.com"
            )
        host = conn.host if "://" in conn.host else f"{conn.schema or 'http'}://{conn.host}"
        if conn.port and host.count(":") == 1:
            host = f"{host}:{conn.port}"
        host = host.rstrip("/")
        return host if host.endswith("/api/v1") else f"{host}/api/v1"

    def get_client(self):
        """The ``lakefs_sdk.ApiClient`` (built once per hook)."""
        if self._client is None:
            import lakefs_sdk  # heavy: only when a task talks to lakeFS

            conn = self.get_connection(self.lakefs_conn_id)
            configuration = lakefs_sdk.Configuration(host=self.endpoint(), username=conn.login, password=conn.password)
            configuration.retries = False  # urllib3's own retries would multiply every timeout
            self._client = lakefs_sdk.ApiClient(configuration)
        return self._client

    def get_conn(self):
        return self.get_client()

    def version(self) -> str:
        import lakefs_sdk

        info = lakefs_sdk.InternalApi(self.get_client()).get_lake_fs_version(_request_timeout=self.request_timeout)
        return info.version

    def test_connection(self) -> tuple[bool, str]:
        try:
            import lakefs_sdk

            lakefs_sdk.HealthCheckApi(self.get_client()).health_check(_request_timeout=self.request_timeout)
            version = self.version()
        except Exception as exc:  # noqa: BLE001 - reported to the UI
            return False, f"lakeFS at {self._safe_endpoint()} not reachable: {exc}"
        return True, f"lakeFS {version} reachable at {self._safe_endpoint()}"

    def _safe_endpoint(self) -> str:
        try:
            return self.endpoint()
        except Exception:  # noqa: BLE001
            return "<no endpoint>"
