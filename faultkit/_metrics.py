"""Prometheus metrics, fed by events so the core never depends on them.

Nothing is recorded until :func:`enable` (or :func:`start_http_server`) is called; before
that every hook is a no-op costing one attribute read. ``prometheus_client`` is imported
only then.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from ._events import Event, subscribe

__all__ = ["count_alert", "enable", "observe_save", "registry", "start_http_server"]

_lock = threading.Lock()


class _Metrics:
    """The metric objects, registered on one registry."""

    def __init__(self, reg: Any) -> None:
        try:
            from prometheus_client import Counter, Gauge, Histogram
        except ImportError as exc:  # pragma: no cover - a core dependency
            raise ImportError(
                "faultkit metrics need prometheus-client: pip install prometheus-client"
            ) from exc
        self.registry = reg
        self.events = Counter("faultkit_events", "Events emitted, by kind.", ["kind"], registry=reg)
        self.resumes = Counter(
            "faultkit_resumes",
            "Stages that resumed progress left by an earlier attempt.",
            registry=reg,
        )
        self.fenced = Counter(
            "faultkit_fenced_writes",
            "Writes refused because a newer attempt owns the stage (stale attempts).",
            registry=reg,
        )
        self.corrupt = Counter(
            "faultkit_checkpoint_corrupt",
            "Snapshots that failed verification and were skipped.",
            registry=reg,
        )
        self.retries = Counter(
            "faultkit_retries",
            "Retries scheduled by RetryPolicy, by failure class.",
            ["failure_class"],
            registry=reg,
        )
        self.gave_up = Counter(
            "faultkit_gave_up",
            "Calls that ran out of retries or hit a non-retryable error.",
            ["reason"],
            registry=reg,
        )
        self.worker_lost = Counter("faultkit_worker_lost", "Worker-lost reports.", registry=reg)
        self.degraded = Counter(
            "faultkit_degraded",
            "Stages that gave up and served an earlier run's output instead.",
            ["failure_class"],
            registry=reg,
        )
        self.save_seconds = Histogram(
            "faultkit_checkpoint_save_seconds",
            "Time to write and commit one snapshot.",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=reg,
        )
        self.save_bytes = Histogram(
            "faultkit_checkpoint_save_bytes",
            "Size of one snapshot.",
            buckets=tuple(float(1 << p) for p in range(10, 41, 3)),
            registry=reg,
        )
        self.last_save = 0.0
        self.age = Gauge(
            "faultkit_checkpoint_age_seconds",
            "Seconds since this process last committed a snapshot (0 before the first).",
            registry=reg,
        )
        self.age.set_function(lambda: time.time() - self.last_save if self.last_save else 0.0)
        self.work_lost = Histogram(
            "faultkit_work_lost_seconds",
            "Work lost to a failure: seconds since the last commit when a stage resumed "
            "(an upper bound), or as reported with a lost worker.",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400),
            registry=reg,
        )
        self.alerts_sent = Counter(
            "faultkit_alerts_sent",
            "Alerts delivered to at least one channel.",
            ["kind"],
            registry=reg,
        )
        self.alerts_suppressed = Counter(
            "faultkit_alerts_suppressed",
            "Alerts suppressed as duplicates within the window.",
            ["kind"],
            registry=reg,
        )
        self.alerts_failed = Counter(
            "faultkit_alerts_failed", "Alerts that no channel accepted.", ["kind"], registry=reg
        )

    def on_event(self, event: Event) -> None:
        kind = event.kind
        d = event.details
        self.events.labels(kind).inc()
        if kind == "resumed":
            self.resumes.inc()
            lost = d.get("seconds_since_last_commit")
            if isinstance(lost, (int, float)):
                self.work_lost.observe(float(lost))
        elif kind == "stale_attempt":
            self.fenced.inc()
        elif kind == "checkpoint_corrupt":
            self.corrupt.inc()
        elif kind == "retry_scheduled":
            self.retries.labels(str(d.get("failure_class", "code"))).inc()
        elif kind == "gave_up":
            self.gave_up.labels(str(d.get("reason", "unknown"))).inc()
        elif kind == "degraded":
            self.degraded.labels(str(d.get("failure_class", "infrastructure"))).inc()
        elif kind == "worker_lost":
            self.worker_lost.inc()
            lost = d.get("work_lost_seconds")
            if isinstance(lost, (int, float)):
                self.work_lost.observe(float(lost))


_M: _Metrics | None = None
_unsubscribe: Any = None


def enable(registry: Any = None) -> Any:
    """Start recording; returns the registry the metrics live on.

    Args:
        registry: a ``prometheus_client.CollectorRegistry``; default the process-wide
            ``prometheus_client.REGISTRY``. Only the first call's registry counts.
    """
    global _M, _unsubscribe
    with _lock:
        if _M is None:
            if registry is None:
                from prometheus_client import REGISTRY as registry
            _M = _Metrics(registry)
            _unsubscribe = subscribe(_M.on_event)
        return _M.registry


def registry() -> Any:
    """The registry faultkit's metrics are on (enables them if needed)."""
    return enable()


def start_http_server(port: int, addr: str = "127.0.0.1") -> Any:
    """Serve the metrics at ``http://addr:port/metrics`` from a daemon thread.

    Returns:
        what ``prometheus_client.start_http_server`` returns (the server and its thread).
    """
    import prometheus_client

    reg = enable()
    return prometheus_client.start_http_server(port, addr=addr, registry=reg)


def observe_save(seconds: float, nbytes: int) -> None:
    """Record one committed snapshot: how long it took and how big it was.

    Called by the store after each commit; a no-op until metrics are enabled.
    """
    m = _M
    if m is None:
        return
    m.save_seconds.observe(seconds)
    m.save_bytes.observe(nbytes)
    m.last_save = time.time()


def count_alert(kind: str, outcome: str) -> None:
    """Count one alert decision: ``outcome`` is ``"sent"``, ``"suppressed"`` or ``"failed"``."""
    m = _M
    if m is None:
        return
    {"sent": m.alerts_sent, "suppressed": m.alerts_suppressed, "failed": m.alerts_failed}[
        outcome
    ].labels(kind).inc()
