"""What an alert about a lost or failed attempt says, the same on every host: the stage's
progress read from its log, and "what was kept, what was lost, what happens next"."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from ._events import Event
from ._store import CheckpointStore

__all__ = ["incident", "kept", "lost", "progress", "progress_under"]

log = logging.getLogger("faultkit.alerts")


def progress(store: CheckpointStore | None, key: str, now: float | None = None) -> dict[str, Any]:
    """What stage ``key``'s log says now: ``epoch``, ``units_done``, ``last_step``,
    ``seconds_since_last_commit``; {} when there is no store, no stage or the read fails (an
    alert must still go out when the store is unreachable)."""
    if store is None:
        return {}
    try:
        view = store.read_view(key)
    except Exception as exc:
        log.warning("could not read the progress of %s: %s", key, type(exc).__name__)
        return {}
    if not view.cursor:
        return {}
    snaps = view.live_snaps()
    now = time.time() if now is None else now
    return {
        "epoch": view.epoch,
        "units_done": len(view.units),
        "last_step": snaps[-1].step if snaps else None,
        "seconds_since_last_commit": round(max(0.0, now - view.last_commit), 3)
        if view.last_commit
        else None,
    }


def progress_under(store: CheckpointStore | None, prefix: str) -> dict[str, Any]:
    """:func:`progress` summed over every stage under ``prefix`` (a whole run): units done
    added up, the newest step, the most recent commit; {} when none can be read."""
    if store is None:
        return {}
    now = time.time()
    try:
        parts = [progress(store, k, now) for k in store.keys(prefix)]
    except Exception as exc:
        log.warning("could not list the stages under %s: %s", prefix, type(exc).__name__)
        return {}
    parts = [p for p in parts if p]
    if not parts:
        return {}
    steps = [p["last_step"] for p in parts if p.get("last_step") is not None]
    secs = [p["seconds_since_last_commit"] for p in parts if p.get("seconds_since_last_commit")]
    return {
        "stages": len(parts),
        "units_done": sum(p["units_done"] for p in parts),
        "last_step": max(steps) if steps else None,
        "seconds_since_last_commit": min(secs) if secs else None,
    }


def kept(p: Mapping[str, Any]) -> str:
    """What survives, in words."""
    if not p:
        return "progress unknown (the store could not be read)"
    parts = [f"{p.get('units_done', 0)} unit(s) done"]
    if p.get("last_step") is not None:
        parts.append(f"snapshot of step {p['last_step']}")
    return ", ".join(parts)


def lost(p: Mapping[str, Any]) -> str:
    """What is redone, in words."""
    if not p:
        return "unknown"
    secs = p.get("seconds_since_last_commit")
    if secs is None:
        return "everything this attempt did (nothing had been committed)"
    return f"work after the last commit ({secs:g} s of it at most)"


def incident(
    kind: str,
    key: str,
    *,
    subject: str,
    cause: str,
    next_step: str,
    progress_now: Mapping[str, Any],
    dedupe_key: str,
    details: Mapping[str, Any] | None = None,
) -> Event:
    """The event for "an attempt of ``subject`` did not succeed", identical from every path
    that notices it (so an alerter with a store delivers it once).

    Args:
        kind: ``worker_lost``, ``retry_scheduled`` or ``gave_up``.
        key: the stage key (what the alert is about).
        subject: who, e.g. ``"etl.load[3] (run scheduled__2024-01-01) try 2 of 4"``.
        cause: what happened, one clause (``"lost its worker"``).
        next_step: what happens now, one sentence.
        progress_now: :func:`progress` of the stage.
        dedupe_key: the same for every sender of this incident (``"try-2"``).
        details: host facts added to the event's details.
    """
    message = (
        f"{subject} {cause}. Kept: {kept(progress_now)}. Lost: {lost(progress_now)}. "
        f"Next: {next_step}."
    )
    facts = {**dict(details or {}), **{k: v for k, v in progress_now.items() if v is not None}}
    return Event(kind, key, message, facts, dedupe_key=dedupe_key)
