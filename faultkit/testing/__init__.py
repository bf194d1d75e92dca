"""Real local components for tests, demos and benchmarks: an alert receiver, S3 (SeaweedFS,
moto), PostgreSQL and MLflow servers, a local Airflow deployment, a Prefect stack, a way to kill
the Dask worker running a task, and test hosts (network namespaces) to partition.

Importing this package imports no orchestrator: the Airflow, Prefect and Dask helpers load
their module (and framework) on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from ._netns import Host, Network, netns_unavailable
from ._receiver import AlertReceiver
from ._seaweed import SeaweedS3Server
from ._services import (
    MlflowServer,
    MotoS3Server,
    PostgresServer,
    free_port,
    journal_append,
    journal_lines,
    journaled_done,
    process_state,
    wait_until,
)

__all__ = [
    "AirflowEnv",
    "AlertReceiver",
    "Host",
    "MlflowServer",
    "MotoS3Server",
    "Network",
    "PostgresServer",
    "PrefectStack",
    "SeaweedS3Server",
    "airflow_env",
    "flows_dir",
    "free_port",
    "journal_append",
    "journal_lines",
    "journaled_done",
    "kill_task_process",
    "kill_worker_running",
    "local_airflow",
    "netns_unavailable",
    "process_state",
    "units_done",
    "wait_until",
]

_LAZY = {
    "AirflowEnv": "._airflow",
    "airflow_env": "._airflow",
    "kill_task_process": "._airflow",
    "local_airflow": "._airflow",
    "PrefectStack": "._prefect",
    "flows_dir": "._prefect",
    "units_done": "._prefect",
    "kill_worker_running": "._dask",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
