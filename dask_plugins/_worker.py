"""CheckpointPlugin: the checkpoint store on every worker, and an emergency flush on SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from faultkit import CheckpointStore
from faultkit._storage import redact_url

__all__ = ["PLUGIN_NAME", "CheckpointPlugin", "register_flush", "running_tasks"]

log = logging.getLogger("faultkit.dask")

PLUGIN_NAME = "faultkit-checkpoint"

# Tasks of this process that run inside a resumable wrapper: thread id -> [task key, callbacks].
_running: dict[int, list[Any]] = {}
_running_lock = threading.Lock()


def _enter_task(task_key: Any) -> None:
    with _running_lock:
        _running[threading.get_ident()] = [task_key, []]


def _exit_task() -> None:
    with _running_lock:
        _running.pop(threading.get_ident(), None)


def running_tasks() -> list[Any]:
    """Keys of the resumable tasks this process is running now."""
    with _running_lock:
        return [entry[0] for entry in _running.values()]


def register_flush(callback: Callable[[], object]) -> Callable[[], None]:
    """Call ``callback()`` if this worker receives SIGTERM while the current task runs.

    Call it from inside a :func:`~dask_plugins.resumable` task, e.g. with a function that
    saves a snapshot of the task's progress. The callback runs in another thread than the
    task, so it must be safe to call at any point of the task (save the last consistent state,
    not the one being built). Callbacks are dropped when the task ends.

    Returns:
        A function that unregisters the callback.

    Raises:
        RuntimeError: when called outside a resumable task.
    """
    tid = threading.get_ident()
    with _running_lock:
        entry = _running.get(tid)
        if entry is None:
            raise RuntimeError(
                "register_flush() was called outside a resumable task; call it from the "
                "function wrapped with dask_plugins.resumable(...)"
            )
        entry[1].append(callback)

    def unregister() -> None:
        with _running_lock:
            e = _running.get(tid)
            if e is not None and callback in e[1]:
                e[1].remove(callback)

    return unregister


class _SigtermFlusher:
    """Process-wide SIGTERM handler: flush every running task, then let the old handler act."""

    def __init__(self) -> None:
        self.installed = False
        self.previous: Any = None
        self.timeout = 20.0
        self.flushed = 0
        self._lock = threading.Lock()

    def install(self, timeout: float) -> bool:
        with self._lock:
            self.timeout = timeout
            if self.installed:
                return True
            if threading.current_thread() is not threading.main_thread():
                # Workers sharing a process with the client (processes=False) run their
                # event loop in a side thread, where Python cannot set signal handlers.
                log.debug("SIGTERM flush not installed: not in the main thread")
                return False
            self.previous = signal.signal(signal.SIGTERM, self._handle)
            self.installed = True
            return True

    def uninstall(self) -> None:
        with self._lock:
            if not self.installed or threading.current_thread() is not threading.main_thread():
                return
            if signal.getsignal(signal.SIGTERM) == self._handle:
                signal.signal(signal.SIGTERM, self.previous)
            self.installed = False

    def flush(self) -> int:
        """Run every registered callback (each in its own thread), bounded by the timeout."""
        with _running_lock:
            work = [(entry[0], cb) for entry in _running.values() for cb in entry[1]]
        if not work:
            return 0
        done = []

        def run(task_key: Any, cb: Callable[[], object]) -> None:
            try:
                cb()
                done.append(task_key)
            except Exception:
                log.exception("emergency checkpoint of task %r failed", task_key)

        threads = [
            threading.Thread(target=run, args=w, name="faultkit-flush", daemon=True) for w in work
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + self.timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.flushed += len(done)
        return len(done)

    def _handle(self, signum: int, frame: Any) -> None:
        try:
            n = self.flush()
            if n:
                log.warning("SIGTERM: flushed an emergency checkpoint for %d task(s)", n)
        except Exception:  # the process is going down: never let the flush stop that
            log.exception("SIGTERM flush failed")
        prev = self.previous
        if callable(prev):
            prev(signum, frame)
        elif prev != signal.SIG_IGN:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)


_flusher = _SigtermFlusher()


class CheckpointPlugin(WorkerPlugin):
    """Open the checkpoint store on every worker, including workers that join later.

    Register it once (``client.register_plugin(CheckpointPlugin(url))``); the scheduler hands
    it to every current and future worker. :func:`~dask_plugins.resumable` tasks without an
    explicit store use this one. On SIGTERM (node drain, preemption) the worker first calls
    the flush callbacks of its running resumable tasks (:func:`~dask_plugins.register_flush`),
    then shuts down as it would have.

    Args:
        store_url: ``file:///path``, ``s3://bucket/prefix`` or ``memory://name`` (per process).
        flush_timeout: seconds the SIGTERM flush may take in all.
        **storage_options: passed to fsspec (credentials, endpoint). They travel to the
            workers pickled, like any plugin; prefer credentials from the workers' environment.
    """

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self, store_url: str, *, flush_timeout: float = 20.0, **storage_options: Any):
        CheckpointStore(store_url, **storage_options)  # fail here, not on every worker
        self.store_url = store_url
        self.flush_timeout = float(flush_timeout)
        self.storage_options = storage_options
        self.store: CheckpointStore | None = None

    def __repr__(self) -> str:
        return f"CheckpointPlugin({redact_url(self.store_url)!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["store"] = None  # a store is opened where the plugin runs, never pickled
        return state

    def setup(self, worker: Any) -> None:
        """Open the store on ``worker`` and install the SIGTERM flush."""
        self.store = CheckpointStore(self.store_url, **self.storage_options)
        _flusher.install(self.flush_timeout)
        log.info("worker %s: checkpoint store %s", worker.address, self.store)

    def teardown(self, worker: Any) -> None:
        """Remove the SIGTERM flush."""
        _flusher.uninstall()
