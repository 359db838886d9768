"""Every Airflow-version difference lives here (Airflow >= 3.1 supported).

DAG files and operators import Airflow names from this module only, so a new Airflow
release is handled in one place.
"""

from __future__ import annotations

from airflow.providers.common.compat.sdk import BaseHook, BaseOperator  # noqa: F401

try:  # Airflow >= 3.0 task SDK
    from airflow.sdk import (  # noqa: F401
        DAG,
        Asset,
        AssetWatcher,
        Context,
        Metadata,
        Param,
        Variable,
        task,
    )
    from airflow.sdk.bases.sensor import BaseSensorOperator  # noqa: F401
except ImportError as exc:  # pragma: no cover - Airflow 2 is not supported
    raise ImportError("airflow-provider-llmops needs Apache Airflow >= 3.1") from exc

try:
    from airflow.sdk.exceptions import (  # noqa: F401
        AirflowException,
        AirflowFailException,
        TaskDeferred,
    )
except ImportError:  # pragma: no cover
    from airflow.exceptions import AirflowException, AirflowFailException, TaskDeferred  # noqa: F401

from airflow.triggers.base import BaseEventTrigger, BaseTrigger, TriggerEvent  # noqa: F401

try:  # Airflow >= 3.1 exports timetables from the task SDK
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable  # noqa: F401
except ImportError:  # pragma: no cover - Airflow 3.0
    from airflow.timetables.assets import AssetOrTimeSchedule  # noqa: F401
    from airflow.timetables.trigger import CronTriggerTimetable  # noqa: F401


def dagbag_class():
    """Airflow's DagBag (moved in 3.1). A function: importing it costs ~0.2 s, which DAG files must not pay."""
    try:  # Airflow >= 3.1
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # pragma: no cover - Airflow 3.0
        from airflow.models.dagbag import DagBag
    return DagBag


# ---- the api-server's auth manager, for the LLMOps plugin app (imported on request: ~1 s) ----


def auth_manager():
    """The auth manager the api-server initialised ([core] auth_manager: simple, FAB, Keycloak, ...)."""
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager()


async def airflow_user(request):
    """The Airflow user of a request, resolved by the core API's own dependency.

    ``Authorization: Bearer <jwt>`` (from ``POST /auth/token``) first, else the UI session's JWT
    cookie; raises ``HTTPException`` 401 (no or expired token) or 403 (invalid token).
    """
    from airflow.api_fastapi.core_api.security import bearer_scheme, get_user

    return await get_user(request, None, await bearer_scheme(request))


def import_errors_view():
    """The access view that guards import errors (the invalid recipes' messages)."""
    from airflow.api_fastapi.auth.managers.models.resource_details import AccessView

    return AccessView.IMPORT_ERRORS
