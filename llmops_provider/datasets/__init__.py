"""Dataset versioning: ``get_store()`` returns the backend chosen by ``[llmops] dataset_store``."""

from __future__ import annotations

from llmops_provider import config
from llmops_provider.datasets.base import (
    CommitInfo,
    CommitNotFound,
    DatasetStore,
    DatasetStoreError,
    tree_hash,
)

__all__ = [
    "CommitInfo",
    "CommitNotFound",
    "DatasetStore",
    "DatasetStoreError",
    "DatasetStoreNotAvailable",
    "get_store",
    "tree_hash",
]

BACKENDS = ("local", "lakefs")


class DatasetStoreNotAvailable(DatasetStoreError, NotImplementedError):
    """The configured backend is known but not implemented yet."""


def get_store(name: str | None = None) -> DatasetStore:
    """The dataset store named ``name``, default ``[llmops] dataset_store``."""
    name = (name or config.get("dataset_store")).strip().lower()
    if name == "local":
        from llmops_provider.datasets.local import LocalDatasetStore

        return LocalDatasetStore(config.home() / "datasets")
    if name == "lakefs":
        from llmops_provider.datasets.lakefs import LakeFSDatasetStore

        try:
            return LakeFSDatasetStore.from_hook("lakefs_default")
        except Exception as exc:
            # airflow.exceptions and airflow.sdk.exceptions each define one; match both by name
            if not any(cls.__name__ == "AirflowNotFoundException" for cls in type(exc).__mro__):
                raise
            raise DatasetStoreNotAvailable(
                "[llmops] dataset_store = lakefs needs the Airflow connection 'lakefs_default' (type llmops_lakefs); "
                "define it (AIRFLOW_CONN_LAKEFS_DEFAULT) or set [llmops] dataset_store = local "
                "(AIRFLOW__LLMOPS__DATASET_STORE=local)"
            ) from None
    raise DatasetStoreError(
        f"unknown [llmops] dataset_store {name!r}; use one of {', '.join(BACKENDS)} (AIRFLOW__LLMOPS__DATASET_STORE)"
    )
