"""Graceful degradation: when a stage gives up, serve the last good output, and say so.

A serving system whose live model is down answers with the last good one and says so; a
pipeline can do the same. A resumable call given ``fallback=`` remembers, each time it
records a result, where that result lives (a small pointer under its *lineage*: the same
task of the same DAG, flow or graph, whatever the run). When the stage gives up, on a
failure class the fallback covers (infrastructure by default, so a code bug is never
hidden), the newest result an earlier run recorded within ``max_age`` is returned wrapped in
:class:`Degraded`, and one ``degraded`` event says whose output is served and why. With no
such result the stage fails as it would have.

Pointers are kept under ``@good/<digest of the lineage>/`` in the store, named by time, so
the newest is found with one listing; a pointer whose stage was deleted since (``faultkit
gc``) is skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Generic, TypeVar

from . import _codec
from ._classify import classify
from ._events import Event, emit
from ._store import CheckpointStore

__all__ = [
    "MARK",
    "Degraded",
    "Fallback",
    "as_fallback",
    "degraded",
    "event_of",
    "expire_notes",
    "remember",
    "serve",
    "unwrap",
]

log = logging.getLogger("faultkit.degraded")

T = TypeVar("T")
_CLASSES = ("infrastructure", "code")
_GOOD = "@good"
# Pointers read per lookup at most: a lineage's newest results come first, and older ones
# than a few dozen runs back are rarely what anyone wants served.
_LOOKBACK = 32


@dataclass(frozen=True)
class Fallback:
    """What ``fallback=`` of a resumable call does when the stage gives up.

    Args:
        max_age: serve only a result recorded at most this long ago (None: any age).
        on: what the fallback covers: failure classes (:func:`faultkit.classify`) and
            exception types. ``("infrastructure",)`` by default (a lost worker, a store that
            does not answer, a reset connection), so a bug in the task's code still fails
            it; add the errors of the service the task depends on
            (``on=("infrastructure", ConnectionError, TimeoutError)``), or ``"code"`` to
            serve the last good output whatever the failure.
    """

    max_age: timedelta | None = None
    on: tuple[str | type[BaseException], ...] = ("infrastructure",)

    def __post_init__(self) -> None:
        if self.max_age is not None and (
            not isinstance(self.max_age, timedelta) or self.max_age <= timedelta(0)
        ):
            raise ValueError(
                f"Fallback(max_age=...) must be a positive timedelta, not {self.max_age!r}; "
                "e.g. max_age=timedelta(days=2)"
            )
        on = (self.on,) if isinstance(self.on, str | type) else tuple(self.on)
        bad = [
            c
            for c in on
            if c not in _CLASSES and not (isinstance(c, type) and issubclass(c, BaseException))
        ]
        if bad or not on:
            raise ValueError(
                f"Fallback(on=...) takes failure classes {list(_CLASSES)} and exception "
                f"types, not {bad or list(on)!r}"
            )
        object.__setattr__(self, "on", on)

    def covers(self, exc: BaseException) -> bool:
        """True if a stage that gave up on ``exc`` may serve its last good output."""
        types = tuple(c for c in self.on if isinstance(c, type))
        return classify(exc) in self.on or (bool(types) and isinstance(exc, types))


def as_fallback(value: Any) -> Fallback | None:
    """``fallback=`` as given to an adapter: None/False (off), True (the defaults), a
    timedelta (``max_age``) or a :class:`Fallback`."""
    if value is None or value is False:
        return None
    if value is True:
        return Fallback()
    if isinstance(value, timedelta):
        return Fallback(max_age=value)
    if isinstance(value, Fallback):
        return value
    raise TypeError(
        f"fallback= takes True, a timedelta (the oldest output to serve) or "
        f"faultkit.Fallback(max_age=..., on=...), not {type(value).__name__}: {value!r}"
    )


@dataclass(frozen=True)
class Degraded(Generic[T]):
    """An earlier run's output, served because this run's stage gave up.

    Plain data that pickles (Dask, Prefect results) and that downstream code tells apart
    with :func:`degraded`; :func:`unwrap` gives the value either way.

    Attributes:
        value: the output served.
        key: the stage that gave up.
        source_key: the stage (of an earlier run) that recorded ``value``.
        source_time: when it was recorded (seconds since the epoch).
        reason: the error the stage gave up on.
        failure_class: ``classify()`` of that error.
        served_at: when the output was served.
    """

    value: T
    key: str
    source_key: str
    source_time: float
    reason: str = ""
    failure_class: str = "infrastructure"
    served_at: float = field(default_factory=time.time)

    @property
    def age(self) -> timedelta:
        """How old the served output was when it was served."""
        return timedelta(seconds=max(0.0, self.served_at - self.source_time))

    def to_dict(self) -> dict[str, Any]:
        """Plain data for hosts that pass results as JSON (Airflow's XCom deserializes only
        allowed classes): a dict under the key ``"faultkit_degraded"`` that
        :func:`degraded` and :func:`unwrap` recognise."""
        return {
            MARK: {
                "key": self.key,
                "source_key": self.source_key,
                "source_time": self.source_time,
                "reason": self.reason,
                "failure_class": self.failure_class,
                "served_at": self.served_at,
            },
            "value": self.value,
        }


MARK = "faultkit_degraded"


def degraded(result: Any) -> Degraded[Any] | None:
    """The :class:`Degraded` wrapper if ``result`` is an earlier run's output served in
    place of this run's (as the wrapper, or as its :meth:`Degraded.to_dict` form, which is
    what an Airflow task receives through XCom), else None."""
    if isinstance(result, Degraded):
        return result
    if isinstance(result, dict) and set(result) == {MARK, "value"}:
        facts = result[MARK]
        if isinstance(facts, dict):
            try:
                return Degraded(result["value"], **facts)
            except TypeError:
                return None
    return None


def unwrap(result: Any) -> Any:
    """The value of ``result``, whether it is fresh or a degraded one (either form)."""
    served = degraded(result)
    return served.value if served is not None else result


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts))


def event_of(served: Degraded[Any]) -> Event:
    """The one ``degraded`` event of a stage that served ``served``: deduplicated per
    stage, so retries and reruns of the same run's stage alert once."""
    return Event(
        "degraded",
        served.key,
        f"stage {served.key} gave up; serving the output of {served.source_key} from "
        f"{_when(served.source_time)}, because {served.reason[:300]}",
        {
            "source_key": served.source_key,
            "source_time": served.source_time,
            "age_seconds": round(served.age.total_seconds(), 1),
            "reason": served.reason[:500],
            "failure_class": served.failure_class,
        },
        dedupe_key="degraded",
    )


def _folder(lineage: str) -> str:
    return f"{_GOOD}/{hashlib.sha256(lineage.encode()).hexdigest()[:40]}"


def remember(store: CheckpointStore, lineage: str, key: str) -> None:
    """Note that stage ``key`` recorded a result for ``lineage`` (best effort: a result
    that could not be noted is only unavailable as a later fallback)."""
    now = time.time()
    body = json.dumps({"key": key, "ts": now, "lineage": lineage}).encode()
    name = f"{int(now * 1e6):020d}-{uuid.uuid4().hex[:8]}"
    try:
        store._storage.create(f"{_folder(lineage)}/{name}", body)
    except Exception as exc:
        log.warning("could not note %s as the last good output of %s: %s", key, lineage, exc)


def expire_notes(store: CheckpointStore, older_than: float) -> int:
    """Remove the notes of results recorded more than ``older_than`` seconds ago (with
    ``faultkit gc --older-than``, which removes their stages); returns how many."""
    cutoff = time.time() - older_than
    gone = 0
    for lineage in store._storage.subdirs(_GOOD):
        for name in store._storage.list(f"{_GOOD}/{lineage}"):
            stamp = name.split("-", 1)[0]
            if stamp.isdigit() and int(stamp) / 1e6 < cutoff:
                store._storage.delete(f"{_GOOD}/{lineage}/{name}")
                gone += 1
    return gone


def _candidates(store: CheckpointStore, lineage: str, oldest: float) -> list[tuple[str, float]]:
    """``(key, ts)`` of the lineage's recorded results, newest first, not older than
    ``oldest``."""
    folder = _folder(lineage)
    try:
        names = store._storage.list(folder)
    except FileNotFoundError:
        return []
    out = []
    for name in sorted(names, reverse=True)[:_LOOKBACK]:
        stamp = name.split("-", 1)[0]
        if not stamp.isdigit() or int(stamp) / 1e6 < oldest:
            break
        try:
            body = json.loads(store._storage.read(f"{folder}/{name}"))
        except (FileNotFoundError, ValueError):
            continue  # a pointer is only a shortcut: a damaged one is skipped
        if isinstance(body, dict) and body.get("lineage") == lineage and body.get("key"):
            out.append((str(body["key"]), float(body.get("ts") or 0)))
    return out


def serve(
    store: CheckpointStore,
    *,
    key: str,
    lineage: str,
    fallback: Fallback,
    error: BaseException,
    pickle_ok: bool = False,
    logger: logging.Logger | None = None,
) -> Degraded[Any] | None:
    """The newest earlier result of ``lineage`` (not stage ``key``'s own) within the
    fallback's ``max_age``, wrapped, with one ``degraded`` event; None if there is none or
    the fallback does not cover ``error`` (the stage then fails as it would have)."""
    logger = logger or log
    if not fallback.covers(error):
        return None
    oldest = time.time() - fallback.max_age.total_seconds() if fallback.max_age else 0.0
    for source, ts in _candidates(store, lineage, oldest):
        if source == key:
            continue
        stage = store.stage(source)
        try:
            stage.refresh()
            found, value = _codec.replay(stage, pickle_ok=pickle_ok)
        except Exception as exc:  # a damaged or deleted earlier stage: try an older one
            logger.warning("the output of %s cannot be served: %s", source, exc)
            continue
        if not found:
            continue
        reason = f"{type(error).__name__}: {error}"
        out = Degraded(
            value,
            key=key,
            source_key=source,
            source_time=ts,
            reason=reason,
            failure_class=classify(error),
        )
        logger.warning(
            "stage %s gave up (%s); DEGRADED: serving the output of %s from %s",
            key,
            reason,
            source,
            _when(ts),
        )
        emit(event_of(out))
        return out
    logger.info("stage %s gave up and no earlier output of %s can be served", key, lineage)
    return None
