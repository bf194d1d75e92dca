"""Kill the Dask worker process that is running a given task (a lost worker, for real)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from typing import Any

__all__ = ["kill_worker_running"]


def _whoami() -> tuple[int, list[Any]]:
    from dask_plugins import running_tasks

    return os.getpid(), running_tasks()


def kill_worker_running(
    client: Any,
    keys: str | Iterable[str] | None = None,
    *,
    sig: int = signal.SIGKILL,
    timeout: float = 60.0,
) -> tuple[str, int, Any]:
    """Send ``sig`` to the worker process executing one of ``keys`` (any resumable task if None).

    Returns:
        ``(worker address, pid, task key)`` of the process that was signalled.

    Raises:
        TimeoutError: no worker ran such a task within ``timeout`` seconds.
    """
    wanted = {keys} if isinstance(keys, str) else (set(keys) if keys is not None else None)
    deadline = time.monotonic() + timeout
    while True:
        for addr, (pid, running) in client.run(_whoami, on_error="ignore").items():
            hit = [k for k in running if wanted is None or k in wanted]
            if hit:
                os.kill(pid, sig)
                return addr, pid, hit[0]
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"no worker executed any of {sorted(wanted) if wanted else 'the tasks'} within "
                f"{timeout} s; check that the tasks are resumable and still running"
            )
        time.sleep(0.05)
