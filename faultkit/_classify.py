"""Failure classes: did the infrastructure fail (worker lost, killed, preempted) or the code?

A retry budget meant for bugs should not be burnt by a flaky cluster, so
:class:`~faultkit.RetryPolicy` can give each class its own number of attempts
(``infra_attempts=``). Orchestrator types are recognised by name, so nothing here imports
Airflow, Prefect or Dask.
"""

from __future__ import annotations

import signal
from typing import Literal

__all__ = ["CODE", "INFRASTRUCTURE", "FailureClass", "classify"]

FailureClass = Literal["infrastructure", "code"]
INFRASTRUCTURE: FailureClass = "infrastructure"
CODE: FailureClass = "code"

# Raised where the connection to a peer, worker or API broke, not where the task's logic did.
_INFRA_TYPES: tuple[type[BaseException], ...] = (
    ConnectionResetError,
    ConnectionAbortedError,
    BrokenPipeError,
)

# Orchestrator and transport exceptions, matched by class name anywhere in the MRO.
_INFRA_NAMES = frozenset(
    {
        "KilledWorker",  # distributed: a task's workers kept dying under it
        "CommClosedError",  # distributed: the scheduler/worker link broke
        "StreamClosedError",  # tornado, under distributed's comms
        "WorkerLostError",  # celery (Airflow's CeleryExecutor)
        "WorkerLost",
        "TaskRunCrashed",
        "Crashed",  # prefect: the process running the flow/task died
        "AirflowTaskTerminated",  # airflow: the task was terminated from outside
        "PodPreempted",
        "Preempted",
        "SpotInterruption",
        "StoreUnavailableError",  # faultkit: the store did not answer (partition, timeout)
    }
)

# Signals that kill a worker from outside: the OOM killer and schedulers send SIGKILL,
# preemption and node drains send SIGTERM, a hung-up session SIGHUP.
_INFRA_SIGNALS = frozenset(
    {int(signal.SIGKILL), int(signal.SIGTERM), int(signal.SIGHUP), int(signal.SIGINT)}
)

# Free-form reasons an adapter may pass (Dask's remove-worker stimulus, Prefect's crash state).
_INFRA_REASONS = (
    "worker-lost",
    "worker_lost",
    "worker lost",
    "lost worker",
    "killed",
    "sigkill",
    "sigterm",
    "oom",
    "out of memory",
    "preempt",
    "evict",
    "connection reset",
    "heartbeat",
    "zombie",
    "crash",
    "remove-worker",
    "worker-close",
    "node lost",
    "spot",
)


def _exc_is_infra(exc: BaseException) -> bool:
    if isinstance(exc, _INFRA_TYPES):
        return True
    for cls in type(exc).__mro__:
        if cls.__name__ in _INFRA_NAMES:
            return True
    return False


def classify(failure: BaseException | int | str) -> FailureClass:
    """Say whether a failure was the infrastructure's or the code's.

    Args:
        failure: an exception (its ``__cause__``/``__context__`` chain is followed), a
            process exit status (``-9`` or ``137`` for SIGKILL, as ``subprocess`` and shells
            report it), or a short reason string from an orchestrator (``"worker-lost"``,
            ``"OOMKilled"``, ``"preempted"``, ...).

    Returns:
        ``"infrastructure"`` for a lost worker, SIGKILL (the OOM killer's signal), SIGTERM
        (preemption, node drain), a reset or aborted connection or an orchestrator's
        worker-lost exception; ``"code"`` for everything else.
    """
    if isinstance(failure, BaseException):
        seen: set[int] = set()
        exc: BaseException | None = failure
        while exc is not None and id(exc) not in seen and len(seen) < 32:
            seen.add(id(exc))
            if _exc_is_infra(exc):
                return INFRASTRUCTURE
            exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        return CODE
    if isinstance(failure, bool):  # bool is an int; True/False are not exit statuses
        return CODE
    if isinstance(failure, int):
        sig = -failure if failure < 0 else failure - 128 if failure > 128 else 0
        return INFRASTRUCTURE if sig in _INFRA_SIGNALS else CODE
    if isinstance(failure, str):
        text = failure.lower()
        return INFRASTRUCTURE if any(r in text for r in _INFRA_REASONS) else CODE
    raise TypeError(
        f"classify() takes an exception, an exit status or a reason string, "
        f"not {type(failure).__name__}"
    )
