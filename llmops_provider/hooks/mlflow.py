"""MLflow tracking server / model registry connection (conn type ``llmops_mlflow``).

The connection's host/port/schema make the tracking URI; login/password become
MLFLOW_TRACKING_USERNAME/PASSWORD for jobs, passed through the environment only (never in
job specs, logs or MLflow params).
"""

from __future__ import annotations

from typing import Any

from llmops_provider.compat import BaseHook


class MLflowHook(BaseHook):
    conn_name_attr = "mlflow_conn_id"
    default_conn_name = "mlflow_default"
    conn_type = "llmops_mlflow"
    hook_name = "MLflow (LLMOps)"

    def __init__(self, mlflow_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mlflow_conn_id = mlflow_conn_id

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {
            "hidden_fields": ["extra"],
            "relabeling": {"host": "Tracking server host", "schema": "Scheme (http/https)"},
            "placeholders": {"host": "127.0.0.1", "port": "5000", "schema": "http"},
        }

    def tracking_uri(self) -> str:
        conn = self.get_connection(self.mlflow_conn_id)
        if conn.host and conn.host.startswith(("http://", "https://", "file:", "sqlite:")):
            return conn.host
        scheme = conn.schema or "http"
        port = f":{conn.port}" if conn.port else ""
        return f"{scheme}://{conn.host or '127.0.0.1'}{port}"

    def job_env(self) -> dict[str, str]:
        """Environment for a job process/pod: where to track, and credentials if any."""
        conn = self.get_connection(self.mlflow_conn_id)
        env = {"MLFLOW_TRACKING_URI": self.tracking_uri()}
        if conn.login:
            env["MLFLOW_TRACKING_USERNAME"] = conn.login
        if conn.password:
            env["MLFLOW_TRACKING_PASSWORD"] = conn.password
        return env

    def get_client(self):
        import mlflow  # heavy: only when a task runs
        from mlflow import MlflowClient

        for key, value in self.job_env().items():
            import os

            os.environ[key] = value
        mlflow.set_tracking_uri(self.tracking_uri())
        return MlflowClient(tracking_uri=self.tracking_uri())

    def test_connection(self) -> tuple[bool, str]:
        try:
            self.get_client().search_experiments(max_results=1)
        except Exception as exc:  # noqa: BLE001 - reported to the UI
            return False, str(exc)
        return True, "MLflow tracking server reachable"
