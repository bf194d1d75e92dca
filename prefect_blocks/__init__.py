"""faultkit for Prefect 3: blocks, resumable tasks, alerts, re-runs of crashed flow runs.

Register the blocks with ``prefect block register -m prefect_blocks``.
"""

from __future__ import annotations

from ._blocks import AlertBlock, CheckpointStoreBlock, RetryPolicyBlock
from ._crash import RETRY_AUTOMATION, ZOMBIE_AUTOMATION, setup_crash_retry
from ._hooks import alert_hooks, crash_budget
from ._task import resumable_task, stage_key

__all__ = [
    "RETRY_AUTOMATION",
    "ZOMBIE_AUTOMATION",
    "AlertBlock",
    "CheckpointStoreBlock",
    "RetryPolicyBlock",
    "alert_hooks",
    "crash_budget",
    "resumable_task",
    "setup_crash_retry",
    "stage_key",
]
