"""Dask plugins: lost workers detected and alerted, tasks resumed, finished work kept.

::

    from dask_plugins import CheckpointPlugin, WorkerLossPlugin, resumable

    client.register_plugin(WorkerLossPlugin(alerts=["slack://..."], store_url=url))
    client.register_plugin(CheckpointPlugin(url))
    fut = client.submit(resumable(etl), partition, key="etl-2024-01-01-p3")

Or cluster-wide: ``dask scheduler --preload dask_plugins.preload --faultkit-store URL``.
"""

from __future__ import annotations

try:
    import distributed  # noqa: F401
except ImportError as exc:  # the adapter is optional: say which extra brings Dask
    raise ImportError(
        "dask_plugins needs Dask distributed, which is not installed: pip install 'faultkit[dask]'"
    ) from exc

from ._resumable import Resumable, client_scope, resumable, stage_key
from ._scheduler import WorkerLossPlugin
from ._worker import CheckpointPlugin, register_flush, running_tasks

__all__ = [
    "CheckpointPlugin",
    "Resumable",
    "WorkerLossPlugin",
    "client_scope",
    "register_flush",
    "resumable",
    "running_tasks",
    "stage_key",
]
