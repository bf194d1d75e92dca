"""WorkerLossPlugin: the scheduler's view of lost workers, turned into events and alerts."""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from faultkit import Alerter, CheckpointStore, Event
from faultkit._alerts import alert_urls
from faultkit._events import emit
from faultkit._incident import progress
from faultkit._storage import redact_url

from ._resumable import stage_key
from ._worker import FORWARD_TOPIC

__all__ = ["PLUGIN_NAME", "WorkerLossPlugin"]

log = logging.getLogger("faultkit.dask")

PLUGIN_NAME = "faultkit-worker-loss"
# Lost tasks whose progress an alert looks up in the store (each is a small read).
MAX_PROGRESS = 20
MAX_LISTED = 100


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A scheduler hook that logs its own errors: the plugin never breaks the scheduler."""

    @functools.wraps(fn)
    def hook(self: WorkerLossPlugin, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except Exception:
            log.exception("faultkit WorkerLossPlugin.%s failed; the scheduler goes on", fn.__name__)
            self._counts["plugin_errors"] += 1
            return None

    return hook


class WorkerLossPlugin(SchedulerPlugin):
    """Turn every unexpectedly lost Dask worker into one ``worker_lost`` event and alert.

    The tasks the worker was running are read from the scheduler's ``remove-worker`` event
    (its plugin hook ``remove_worker`` runs after that state is gone). Each lost worker gives
    one grouped alert: which tasks were rescheduled (they resume from their stage), which
    finished results were lost with it (recomputed from their records), and how much work
    since the last commit was lost. A task that hits ``allowed-failures`` and fails with
    ``KilledWorker`` gives one ``gave_up`` alert. Retired workers (``retire_workers``, or a
    worker that shut itself down with no task running) are counted, not alerted.

    Events are emitted in the scheduler process (``faultkit.events.subscribe``) and counted
    by ``faultkit.metrics`` (served on the scheduler's ``/metrics``). The scheduler's event
    loop never waits on the store or a channel: the hooks only read the scheduler's state and
    queue a report; one background thread opens the store and the channels, reads the lost
    tasks' progress and sends the alerts. A store that cannot be opened costs the progress
    and the cross-process dedupe, not the alert.

    Args:
        alerts: Apprise URLs of the channels to alert.
        store_url: a store shared with the workers: alerts are deduplicated through it across
            processes, and they report the lost tasks' progress from it.
        dedupe_window: seconds during which the same alert is not sent again.
        **storage_options: passed to fsspec for ``store_url``.
    """

    name = PLUGIN_NAME
    idempotent = True

    def __init__(
        self,
        alerts: str | Iterable[Any] = (),
        store_url: str | None = None,
        *,
        dedupe_window: float = 600.0,
        **storage_options: Any,
    ) -> None:
        self.alerts = alert_urls(alerts)
        self.store_url = store_url
        self.dedupe_window = float(dedupe_window)
        self.storage_options = storage_options
        if self.alerts:
            Alerter(self.alerts, dedupe_window=self.dedupe_window)  # bad URLs fail here
        if store_url is not None:
            CheckpointStore(store_url, **storage_options)
        self._init_runtime()

    def _init_runtime(self) -> None:
        self.scheduler: Any = None
        self._counts: collections.Counter[str] = collections.Counter()
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=200)
        self._closing: set[str] = set()
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()  # held for Thread.start only, never for I/O
        self._opened = False  # store and channels: touched by the sender thread only
        self._alerter: Alerter | None = None
        self._store: CheckpointStore | None = None
        self._stopped = False

    def __getstate__(self) -> dict[str, Any]:
        return {
            "alerts": self.alerts,
            "store_url": self.store_url,
            "dedupe_window": self.dedupe_window,
            "storage_options": self.storage_options,
        }

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def __repr__(self) -> str:
        store = redact_url(self.store_url) if self.store_url else None
        return f"WorkerLossPlugin({len(self.alerts)} channel(s), store_url={store!r})"

    # -- scheduler hooks ---------------------------------------------------------------

    async def start(self, scheduler: Any) -> None:
        """Remember the scheduler, enable the metrics and start the sender thread.

        The store and the channels are opened by that thread, so a store that hangs (an NFS
        mount, an S3 endpoint) never holds up the scheduler.
        """
        try:
            self.scheduler = scheduler
            self._counts["starts"] += 1
            from faultkit import metrics

            metrics.enable()
            self._sender()
        except Exception:
            log.exception("faultkit WorkerLossPlugin could not start; alerts are disabled")

    async def before_close(self) -> None:
        """Workers leaving with the scheduler are not lost."""
        self._stopped = True

    async def close(self) -> None:
        """Send what is queued (bounded), then stop the sender thread."""
        self._stopped = True
        await self.wait_sent(10.0)
        self._queue.put(None)

    @_guarded
    def add_worker(self, scheduler: Any, worker: str) -> None:
        """Keep a handle on the scheduler (plugins added without ``start``)."""
        self.scheduler = scheduler

    @_guarded
    def log_event(self, topic: str, msg: Any) -> None:
        """Watch ``remove-worker`` (which tasks were lost) and status changes (retirement)."""
        if not isinstance(msg, dict):
            return
        action = msg.get("action")
        if action == "worker-status-change":
            if msg.get("status") in ("closing", "closing_gracefully"):
                self._closing.add(topic)
            elif msg.get("status") == "running":
                self._closing.discard(topic)
        elif action == "remove-worker" and topic == "all":
            self._on_remove(msg)
        elif action == "faultkit-event" and topic == FORWARD_TOPIC:
            fields = {k: msg[k] for k in ("kind", "key", "message", "details", "dedupe_key")}
            self._queue.put(("event", Event(**fields, time=float(msg.get("time") or 0))))
            self._sender()

    # -- what a lost worker means ------------------------------------------------------

    def _on_remove(self, msg: dict[str, Any]) -> None:
        worker = str(msg.get("worker"))
        processing = list(msg.get("processing-tasks") or ())
        lost_results = list(msg.get("lost-computed-tasks") or ())
        closing = worker in self._closing
        self._closing.discard(worker)
        if self._stopped or msg.get("expected") or (closing and not processing):
            self._counts["workers_retired"] += 1
            log.info("worker %s retired (%d task(s) handed back)", worker, len(processing))
            return
        sched = self.scheduler
        allowed = getattr(sched, "allowed_failures", None)
        rescheduled, gave_up = [], []
        for k in processing:
            ts = sched.tasks.get(k) if sched is not None else None
            # remove_worker moves a task past allowed-failures to "erred" before it logs
            # the event; every other processing task is released and rescheduled.
            if ts is not None and ts.state == "erred":
                gave_up.append((k, ts.suspicious))
            else:
                rescheduled.append((k, ts.suspicious if ts is not None else None))
        self._counts["workers_lost"] += 1
        self._counts["tasks_rescheduled"] += len(rescheduled)
        self._counts["tasks_gave_up"] += len(gave_up)
        self._counts["results_lost"] += len(lost_results)
        info = {
            "worker": worker,
            "rescheduled": rescheduled,
            "gave_up": gave_up,
            "lost_results": lost_results,
            "allowed_failures": allowed,
            "stimulus_id": msg.get("stimulus_id"),
            "time": time.time(),
        }
        self._submit(info)

    def _submit(self, info: dict[str, Any]) -> None:
        self._sender()
        self._queue.put(info)

    def _sender(self) -> None:
        """Start the sender thread once (cheap; safe from the event loop)."""
        if self._thread is not None:
            return
        with self._thread_lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="faultkit-worker-loss", daemon=True
                )
                self._thread.start()

    def _open(self) -> None:
        """Open the store and the channels (in the sender thread: both may block)."""
        if self._opened:
            return
        self._opened = True
        if self.store_url is not None:
            try:
                self._store = CheckpointStore(self.store_url, **self.storage_options)
            except Exception as exc:
                log.warning(
                    "faultkit WorkerLossPlugin cannot open its store %s (%s: %s); alerts go "
                    "out without progress, deduplicated in this process only",
                    redact_url(self.store_url),
                    type(exc).__name__,
                    exc,
                )
        if self.alerts:
            self._alerter = Alerter(
                self.alerts,
                store=self._store,
                dedupe_window=self.dedupe_window,
                kinds=("worker_lost", "gave_up", "degraded"),
            )

    def _run(self) -> None:
        try:
            self._open()
        except Exception:
            log.exception("faultkit WorkerLossPlugin could not open its alert channels")
        while True:
            info = self._queue.get()
            try:
                if info is None:
                    return
                if isinstance(info, tuple):  # ("event", an event a task forwarded)
                    self._counts[info[1].kind] += 1
                    self._deliver(info[1])
                    continue
                for event in self._events(info):
                    self._deliver(event)
            except Exception:
                log.exception("faultkit WorkerLossPlugin could not report a lost worker")
            finally:
                self._queue.task_done()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued report was sent; True if it finished within ``timeout``.

        This blocks: on the scheduler's event loop use :meth:`wait_sent` instead.
        """
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    async def wait_sent(self, timeout: float = 10.0) -> bool:
        """:meth:`flush` without blocking the event loop.

        Example, from a client::

            async def sent(dask_scheduler):
                return await dask_scheduler.plugins["faultkit-worker-loss"].wait_sent(30)

            client.run_on_scheduler(sent)
        """
        return await asyncio.to_thread(self.flush, timeout)

    def _stage_key(self, key: Any) -> str:
        """The stage of a task run with the default scope (this scheduler's lifetime)."""
        return stage_key(key, f"scheduler-{self.scheduler.id}")

    def _progress(self, key: Any, now: float) -> dict[str, Any] | None:
        if self._store is None or self.scheduler is None:
            return None
        p = progress(self._store, self._stage_key(key), now)
        return {"stage": self._stage_key(key), **p} if p else None

    def _events(self, info: dict[str, Any]) -> list[Event]:
        worker = info["worker"]
        now = info["time"]
        resched = info["rescheduled"]
        gave_up = info["gave_up"]
        results = info["lost_results"]
        allowed = info["allowed_failures"]
        keys = [k for k, _ in resched] + [k for k, _ in gave_up]
        progress = {}
        for k in keys[:MAX_PROGRESS]:
            p = self._progress(k, now)
            if p is not None:
                progress[str(k)] = p
        lost_secs = [
            p["seconds_since_last_commit"]
            for p in progress.values()
            if "seconds_since_last_commit" in p
        ]
        shown = ", ".join(repr(k) for k in keys[:10]) + (
            f" (+{len(keys) - 10} more)" if len(keys) > 10 else ""
        )
        parts = [f"Dask worker {worker} was lost"]
        parts.append(f"while running {len(keys)} task(s): {shown}" if keys else "while idle")
        msg = " ".join(parts) + "."
        if resched:
            msg += f" {len(resched)} task(s) were rescheduled and resume from their last commit."
        if gave_up:
            msg += (
                f" {len(gave_up)} task(s) failed with KilledWorker: more than "
                f"{allowed} worker(s) died running them."
            )
        if results:
            msg += (
                f" {len(results)} finished result(s) held by the worker were lost; resumable "
                "tasks return them from their records instead of running again."
            )
        details: dict[str, Any] = {
            "worker": worker,
            "tasks_lost": len(keys),
            "tasks": [str(k) for k in keys[:MAX_LISTED]],
            "rescheduled": [str(k) for k, _ in resched[:MAX_LISTED]],
            "gave_up": [str(k) for k, _ in gave_up[:MAX_LISTED]],
            "lost_results": [str(k) for k in results[:MAX_LISTED]],
            "attempts": {str(k): n for k, n in (resched + gave_up)[:MAX_LISTED] if n is not None},
            "allowed_failures": allowed,
            "stimulus_id": info["stimulus_id"],
        }
        if progress:
            details["progress"] = progress
        if lost_secs:
            details["work_lost_seconds"] = max(lost_secs)
        events = [
            Event("worker_lost", worker, msg, details, dedupe_key=info["stimulus_id"], time=now)
        ]
        for k, n in gave_up:
            events.append(
                Event(
                    "gave_up",
                    self._stage_key(k),
                    f"Dask gave up on task {k!r}: {n} worker(s) died while running it, over "
                    f"allowed-failures={allowed}, so it failed with KilledWorker. Its "
                    "committed progress is kept; resubmit it to resume.",
                    {
                        "task": str(k),
                        "reason": "KilledWorker",
                        "workers_died": n,
                        "allowed_failures": allowed,
                        "last_worker": worker,
                        **({"progress": progress[str(k)]} if str(k) in progress else {}),
                    },
                    dedupe_key="KilledWorker",
                    time=now,
                )
            )
        return events

    def _deliver(self, event: Event) -> None:
        record = event.to_dict()
        emit(event)
        if self._alerter is not None:
            sent = self._alerter.send(event)
            record["alerted"] = sent
            self._counts["alerts_sent" if sent else "alerts_not_sent"] += 1
        self._recent.append(record)

    # -- inspection ----------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """Counters and the most recent events (``client.run_on_scheduler`` friendly)."""
        return {"counts": dict(self._counts), "events": list(self._recent)}
