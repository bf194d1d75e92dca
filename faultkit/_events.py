"""Events: what happened to a stage, delivered to in-process subscribers and alerters."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["KINDS", "Event", "emit", "subscribe"]

log = logging.getLogger("faultkit.events")

KINDS = frozenset(
    {
        "attempt_failed",
        "retry_scheduled",
        "gave_up",
        "worker_lost",
        "resumed",
        "checkpoint_corrupt",
        "stale_attempt",
        "degraded",
    }
)


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened to a stage.

    Attributes:
        kind: one of :data:`KINDS`.
        key: the stage key (or another stable name such as a worker address).
        message: one human-readable sentence.
        details: JSON-serialisable facts (units redone, seconds lost, epoch, ...).
        dedupe_key: events with the same kind, key and dedupe_key are one alert.
        time: when it happened (seconds since the epoch).
    """

    kind: str
    key: str
    message: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)
    dedupe_key: str | None = None
    time: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown event kind {self.kind!r}; expected one of {sorted(KINDS)}")
        object.__setattr__(self, "details", MappingProxyType(dict(self.details)))

    @property
    def identity(self) -> str:
        """What makes two events the same alert: kind, key and dedupe key."""
        return f"{self.kind}\x00{self.key}\x00{self.dedupe_key or ''}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return {
            "kind": self.kind,
            "key": self.key,
            "message": self.message,
            "details": dict(self.details),
            "dedupe_key": self.dedupe_key,
            "time": self.time,
        }


_lock = threading.Lock()
_subscribers: list[Callable[[Event], object]] = []


def subscribe(fn: Callable[[Event], object]) -> Callable[[], None]:
    """Call ``fn(event)`` for every event emitted in this process; returns an unsubscribe."""
    with _lock:
        _subscribers.append(fn)

    def unsubscribe() -> None:
        with _lock:
            if fn in _subscribers:
                _subscribers.remove(fn)

    return unsubscribe


def emit(event: Event) -> None:
    """Deliver ``event`` to every subscriber; a failing subscriber is logged, never raised."""
    log.info("%s %s: %s", event.kind, event.key, event.message)
    with _lock:
        subs = list(_subscribers)
    for fn in subs:
        try:
            fn(event)
        except Exception:  # a broken subscriber must never change the task's outcome
            log.exception("event subscriber %r failed on %s", fn, event.kind)
