"""Named failpoints: places in faultkit's own code where a test can inject a fault.

Activated with ``FAULTKIT_FAILPOINTS="name=action[@n],..."`` in the environment (read when
this module is imported, so a child process inherits it) or :func:`arm` in-process.
Actions: ``kill`` (SIGKILL this process), ``stop`` (SIGSTOP it: a paused zombie until
someone sends SIGCONT), ``raise`` (raise :class:`InjectedFault`), ``exit`` (``os._exit(75)``).
``@n`` fires on the n-th hit only (default: the first).
:func:`watch` calls a function at every hit (how ``faultkit.chaos`` sees a child's progress).
When nothing is armed or watched, :func:`hit` is two falsy checks.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

__all__ = ["POINTS", "InjectedFault", "arm", "disarm", "hit", "watch"]

POINTS = (
    "log.before_create",  # a record is encoded, nothing written yet
    "storage.tmp_written",  # local: temp file written and fsync'd, not yet linked
    "storage.linked",  # local: linked into place, parent folder not yet fsync'd
    "log.created",  # the record exists; the caller has not been told yet
    "stage.claimed",  # a claim's record exists; claim() has not returned yet
    "save.blob_partial",  # a snapshot's bytes are half written
    "save.blob_written",  # a snapshot's bytes are durable, its record not yet written
    "save.committed",  # the snapshot's record exists
    "done.committed",  # the unit's done record exists
    "sink.declared",  # SqlSink: the sink is declared in the log, no transaction yet
    "sink.rows_written",  # SqlSink: rows inserted, transaction not yet committed
    "sink.checked",  # SqlSink: the log checked (deadline stamped), COMMIT not yet sent
    "sink.committed",  # SqlSink: transaction committed, stage not yet told
    "filesink.staged",  # FileSink: bytes in a staging object, unit not yet recorded done
    "filesink.committed",  # FileSink: unit recorded done, final object not yet published
    "filesink.published",  # FileSink: final object created, staging object not yet removed
    "mlflow.sent",  # MlflowRun: a batch of metric points is in MLflow, not yet noted as sent
)


class InjectedFault(RuntimeError):
    """Raised by a failpoint armed with ``raise``."""


_lock = threading.Lock()
_armed: dict[str, tuple[str, int]] = {}
_hits: dict[str, int] = {}
_watchers: list[Callable[[str], object]] = []


def _parse(spec: str) -> dict[str, tuple[str, int]]:
    out: dict[str, tuple[str, int]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, action = item.partition("=")
        action = action or "kill"
        nth = 1
        if "@" in action:
            action, _, n = action.partition("@")
            nth = int(n)
        if action not in ("kill", "stop", "raise", "exit"):
            raise ValueError(f"failpoint action {action!r} is not kill, stop, raise or exit")
        out[name] = (action, nth)
    return out


_armed.update(_parse(os.environ.get("FAULTKIT_FAILPOINTS", "")))


def arm(name: str, action: str = "raise", nth: int = 1) -> None:
    """Arm failpoint ``name`` in this process."""
    with _lock:
        _armed.update(_parse(f"{name}={action}@{nth}"))
        _hits.pop(name, None)


def disarm(name: str | None = None) -> None:
    """Disarm one failpoint, or all."""
    with _lock:
        if name is None:
            _armed.clear()
            _hits.clear()
        else:
            _armed.pop(name, None)
            _hits.pop(name, None)


def watch(fn: Callable[[str], object]) -> Callable[[], None]:
    """Call ``fn(name)`` at every failpoint hit in this process; returns an unwatch."""
    with _lock:
        _watchers.append(fn)

    def unwatch() -> None:
        with _lock:
            if fn in _watchers:
                _watchers.remove(fn)

    return unwatch


def hit(name: str) -> None:
    """Fire failpoint ``name`` if it is armed and this is its n-th hit."""
    if _watchers:
        for fn in list(_watchers):
            fn(name)
    if not _armed or name not in _armed:
        return
    with _lock:
        action, nth = _armed[name]
        _hits[name] = _hits.get(name, 0) + 1
        if _hits[name] != nth:
            return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stop":
        # At this instruction: sent to this thread, the stop takes it before its next
        # instruction. Sent to the process, any thread may take it, and this one runs on
        # (seen: a record linked into place) until the stop reaches it.
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
        return
    elif action == "exit":
        os._exit(75)
    raise InjectedFault(f"failpoint {name!r} fired")
