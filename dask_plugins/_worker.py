"""CheckpointPlugin: the checkpoint store on every worker, and an emergency flush on SIGTERM.

A worker stops in one of two ways, and both flush:

1. SIGTERM reaches the worker process itself (``dask worker --no-nanny``, or a signal to the
   whole process group): the handler installed by :meth:`CheckpointPlugin.setup` flushes,
   then hands the signal on.
2. SIGTERM reaches the Nanny (plain ``dask worker``, Kubernetes, Helm): the Nanny asks its
   worker process to close through a queue, never with a signal, and kills it 0.8 x its
   close timeout later (8 s for ``dask worker``). ``Worker.close`` removes the plugins
   before it stops the task threads, so :meth:`CheckpointPlugin.teardown` flushes there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from distributed.core import Status
from distributed.diagnostics.plugin import WorkerPlugin

from faultkit import CheckpointStore
from faultkit._storage import redact_url

__all__ = ["PLUGIN_NAME", "CheckpointPlugin", "register_flush", "running_tasks"]

log = logging.getLogger("faultkit.dask")

PLUGIN_NAME = "faultkit-checkpoint"
# Events a task emits on a worker that the scheduler's WorkerLossPlugin alerts on
# (``worker.log_event``): it holds the channels and the cross-process dedupe.
FORWARD_TOPIC = "faultkit-events"

# Tasks of this process that run inside a resumable wrapper:
# thread id -> [task key, flush callbacks, id() of the Worker running it].
_running: dict[int, list[Any]] = {}
_running_lock = threading.Lock()

# Worker states in which a plugin's teardown means the worker is going away (not an
# unregister_worker_plugin on a running worker).
_STOPPING = (Status.closing, Status.closing_gracefully, Status.closed)


def _enter_task(task_key: Any, worker: int | None = None) -> None:
    with _running_lock:
        _running[threading.get_ident()] = [task_key, [], worker]


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
    not the one being built). It runs at most once, also when the worker is stopped by its
    Nanny (``dask worker`` on SIGTERM, ``client.restart()``, ``retire_workers``, cluster
    shutdown); keep it short: the Nanny kills the worker 8 s after a SIGTERM. Callbacks are
    dropped when the task ends.

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

    def flush(self, worker: int | None = None) -> int:
        """Run the registered callbacks (each once, in its own thread), bounded by the timeout.

        Args:
            worker: ``id()`` of the Worker whose tasks to flush (several may share a
                process); default: every task of the process.
        """
        with _running_lock:
            work = []
            for entry in _running.values():
                if worker is None or entry[2] in (None, worker):
                    work.extend((entry[0], cb) for cb in entry[1])
                    entry[1] = []  # once: a flush on SIGTERM is not repeated on close
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
    then shuts down as it would have. Under a Nanny (plain ``dask worker``) the signal goes
    to the Nanny, which closes its worker: the flush then runs when the worker closes, and
    so also on ``client.restart()``, ``retire_workers`` and cluster shutdown.

    Args:
        store_url: ``file:///path``, ``s3://bucket/prefix`` or ``memory://name`` (per process).
        flush_timeout: seconds the flush may take in all. Under a Nanny the worker process is
            killed 8 s after SIGTERM reaches ``dask worker``, whatever this says.
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

    async def setup(self, worker: Any) -> None:
        """Open the store on ``worker`` (off its event loop) and install the SIGTERM flush."""
        self.store = await asyncio.to_thread(
            CheckpointStore, self.store_url, **self.storage_options
        )
        _flusher.install(self.flush_timeout)
        log.info("worker %s: checkpoint store %s", worker.address, self.store)

    async def teardown(self, worker: Any) -> None:
        """Flush the running tasks if ``worker`` is closing, then remove the SIGTERM flush.

        Under a Nanny this is where SIGTERM's flush happens: the Nanny closes its worker
        (``Worker.close``), which tears the plugins down while the task threads still run.
        """
        try:
            if worker.status in _STOPPING:
                n = await asyncio.to_thread(_flusher.flush, id(worker))
                if n:
                    log.warning(
                        "worker %s closing: flushed an emergency checkpoint for %d task(s)",
                        worker.name,
                        n,
                    )
        finally:
            _flusher.uninstall()
