"""faultkit for Prefect 3: blocks, resumable tasks, alerts, re-runs of crashed flow runs.

Register the blocks with ``prefect block register -m prefect_blocks``, then::

    from prefect import flow
    from prefect_blocks import alert_hooks, resumable_task, setup_crash_retry

    @resumable_task(store="my-store", retry="my-policy")   # block names, or a URL
    def load(partition: int, stage) -> dict:
        for unit in stage.pending(range(10)):
            ...
            stage.done(unit)
        return {"partition": partition}

    @flow(**alert_hooks("my-alerts", store="my-store", retry="my-policy"))
    def etl(day: str) -> None:
        load.map(range(4))

    setup_crash_retry("my-policy")   # once: Crashed runs are re-run, up to the budget
    serve(etl.to_deployment(name="etl"), heartbeat_seconds=30)   # from prefect import serve

Tested with Prefect 3.7.7 (the newest 3.x that installs beside Airflow 3.3).
"""

from __future__ import annotations

from ._blocks import AlertBlock, CheckpointStoreBlock, RetryPolicyBlock
from ._crash import RETRY_AUTOMATION, ZOMBIE_AUTOMATION, setup_crash_retry
from ._hooks import alert_hooks, crash_budget
from ._retry_task import ResumableTask
from ._task import resumable_task, stage_key

__all__ = [
    "RETRY_AUTOMATION",
    "ZOMBIE_AUTOMATION",
    "AlertBlock",
    "CheckpointStoreBlock",
    "ResumableTask",
    "RetryPolicyBlock",
    "alert_hooks",
    "crash_budget",
    "resumable_task",
    "setup_crash_retry",
    "stage_key",
]
