"""Events: what happened to a stage, for in-process subscribers, alerters and metrics."""

from __future__ import annotations

from ._events import KINDS, Event, emit, subscribe

__all__ = ["KINDS", "Event", "emit", "subscribe"]
