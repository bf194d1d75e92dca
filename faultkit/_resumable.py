"""The resumable call every adapter makes, once: find the stage, replay a finished result,
else claim, run the body with ``stage=``, record the result.

An adapter maps its host's context onto :func:`call` — which store, which key (built from
the orchestrator's run: the Airflow DAG run, the Prefect flow run, the Dask scheduler, or a
scope the user named), whether to expire or ignore an earlier result, a logger — and adds
nothing else. The sequence:

1. read the stage's log (no claim): a finished stage whose recorded result is still valid
   returns it without running anything;
2. an expired result (older than ``expire``) or ``refresh=True`` deletes the stage first, so
   the body runs afresh above every old epoch;
3. claim the stage (fencing every older attempt; on the host's first try of the task the
   claim rides on its first commit), check again (another attempt may have finished
   meanwhile), run ``fn(*args, stage=stage, **kwargs)``;
4. record what it returned with the one codec (``faultkit._codec``), and, with a
   ``fallback``, note it as the newest good output of its ``lineage``;
5. if the body raised on the host's last try and the fallback covers the failure, return
   the lineage's newest earlier output instead, wrapped in ``Degraded``
   (``faultkit._degraded``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Any

from . import _codec, _degraded
from ._degraded import Degraded, Fallback
from ._errors import StaleAttemptError
from ._store import CheckpointStore, Stage

__all__ = ["accepts_stage", "call", "call_async", "recorded", "store_for"]

log = logging.getLogger("faultkit.resumable")

_stores: dict[tuple[str, bytes], CheckpointStore] = {}  # by URL and a digest of options
_stores_lock = threading.Lock()
_warned: set[str] = set()


def store_for(url: str, options: Mapping[str, Any] | None = None) -> CheckpointStore:
    """The store for ``url`` and ``options``, built once per process (stores cache folder
    descriptors and connections; a task per second must not rebuild them)."""
    opts = (
        hashlib.sha256(json.dumps(dict(options), sort_keys=True, default=str).encode()).digest()
        if options
        else b""
    )
    ident = (url, opts)
    store = _stores.get(ident)  # found: no lock (a task per call may run in hundreds of threads)
    if store is not None:
        return store
    with _stores_lock:
        store = _stores.get(ident)
        if store is None:
            store = _stores[ident] = CheckpointStore(url, **dict(options or {}))
        return store


def recorded(store: CheckpointStore, key: str, *, pickle_ok: bool = False) -> tuple[bool, Any]:
    """``(True, result)`` if a resumable call of ``key`` finished and recorded its result,
    else ``(False, None)``; claims nothing (for inspection and tests)."""
    stage = store.stage(key)
    stage.refresh()
    return _codec.replay(stage, pickle_ok=pickle_ok)


def accepts_stage(fn: Callable[..., Any]) -> bool:
    """True if ``fn`` takes a ``stage`` keyword argument (or ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True  # a builtin or C callable: let the call decide
    return any(p.name == "stage" or p.kind is p.VAR_KEYWORD for p in params)


def _expired(stage: Stage, expire: timedelta | None) -> bool:
    fin = stage._view.finished
    return bool(expire is not None and fin and time.time() - fin.ts > expire.total_seconds())


def _prepare(
    store: CheckpointStore,
    key: str,
    expire: timedelta | None,
    refresh: bool,
    pickle_ok: bool,
    logger: logging.Logger,
    make_stage: Callable[[CheckpointStore, str], Stage] | None = None,
    first_try: bool = False,
    order: int | None = None,
) -> tuple[Stage, bool, Any]:
    """Steps 1-3 up to the claim: ``(stage, True, result)`` when a recorded result stands,
    else ``(claimed stage, False, None)``."""
    make = make_stage or (lambda st, k: st.stage(k))
    stage = make(store, key)
    stage.refresh()
    if refresh or _expired(stage, expire):
        if stage.finished:
            why = "refresh asked" if refresh else f"its result is older than {expire}"
            logger.info("stage %s runs afresh (%s)", key, why)
            store.delete(key)
            stage = make(store, key)
    else:
        found, value = _codec.replay(stage, pickle_ok=pickle_ok)
        if found:
            logger.info("stage %s finished earlier; returning its recorded result", key)
            return stage, True, value
    stage.claim(lazy=first_try, order=order)
    if not refresh and not _expired(stage, expire):
        found, value = _codec.replay(stage, pickle_ok=pickle_ok)
        if found:  # another attempt finished between our read and our claim
            return stage, True, value
    return stage, False, None


def _record(stage: Stage, value: Any, pickle_ok: bool, name: str, logger: logging.Logger) -> None:
    if _codec.record(stage, value, pickle_ok=pickle_ok):
        return
    if name not in _warned:
        _warned.add(name)
        logger.warning(
            "%s returned a %s, which faultkit cannot record exactly: a re-run calls it again "
            "(its finished units are still skipped). Return plain data (numbers, strings, "
            "lists, tuples, dicts, bytes, datetimes), or pass pickle_result=True if you trust "
            "the store",
            name,
            type(value).__name__,
        )


def call(
    fn: Callable[..., Any],
    args: tuple[Any, ...] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    store: CheckpointStore,
    key: str,
    expire: timedelta | None = None,
    refresh: bool = False,
    pickle_ok: bool = False,
    on_stage: Callable[[Stage], object] | None = None,
    make_stage: Callable[[CheckpointStore, str], Stage] | None = None,
    first_try: bool = False,
    order: int | None = None,
    logger: logging.Logger | None = None,
    fallback: Fallback | None = None,
    lineage: str | None = None,
    last_try: bool | Callable[[BaseException], bool] = True,
    on_degraded: Callable[[Degraded[Any]], Any] | None = None,
) -> Any:
    """Run ``fn(*args, stage=stage, **kwargs)`` as a resumable call of stage ``key``.

    Args:
        fn: the body; it takes ``stage=``.
        store: where the stage lives (see :func:`store_for`).
        key: the stage key; it decides what is reused: the host's run, or a scope the user
            named.
        expire: a recorded result older than this is not reused (the stage runs afresh).
        refresh: never reuse a recorded result (the stage runs afresh).
        pickle_ok: record results the codec does not accept with pickle (trusted stores).
        on_stage: called with the claimed stage before the body runs (host bookkeeping).
        make_stage: builds the Stage (a host's Stage subclass), default ``store.stage``.
        first_try: the host says this is the task's first try in its run (Airflow try 1,
            Prefect's first run of the task and the flow run), so no older attempt can race
            it: the claim then rides on the first commit (``Stage.claim(lazy=True)``),
            saving one record. Leave it False when unsure: that is always correct.
        order: with ``first_try``, for a host that cannot rule out an older attempt still
            running but numbers its runs of the task in the order it started them (Dask's
            run id): the claim then rides on the first commit only on an empty log, and if
            an older run's first commit got there first, this one claims above it (see
            ``Stage.claim``).
        logger: the host's logger (default ``faultkit.resumable``).
        fallback: serve the newest earlier output of ``lineage`` when the body fails on
            the last try with a failure the fallback covers (see ``faultkit.Fallback``).
        lineage: the task whatever the run (the host's DAG/flow/graph and task, map index
            or inputs): where results are noted for a later fallback.
        last_try: the host will not retry this task after a failure (so a fallback may be
            served), or a function of the failure that says so (a host whose retry policy
            fails some exceptions at once, or within a per-class budget); a host that decides
            later (Dask's policy loop) passes False and calls :func:`faultkit._degraded.serve`
            itself.
        on_degraded: what to return for a served fallback, given the ``Degraded`` (the
            host's own marking, e.g. a Prefect state named ``Degraded``); default: it.

    Returns:
        What ``fn`` returned, the recorded result of an earlier attempt that finished, or
        (with ``fallback``) a ``Degraded`` earlier output.
    """
    logger = logger or log
    stage, done, value = _prepare(
        store, key, expire, refresh, pickle_ok, logger, make_stage, first_try, order
    )
    if done:
        return value
    if on_stage is not None:
        on_stage(stage)
    try:
        value = fn(*args, stage=stage, **dict(kwargs or {}))
    except Exception as exc:
        served = _fall_back(store, key, lineage, fallback, exc, pickle_ok, logger, last_try)
        if served is None:
            raise
        return on_degraded(served) if on_degraded is not None else served
    _record(stage, value, pickle_ok, getattr(fn, "__qualname__", repr(fn)), logger)
    if fallback is not None and lineage:
        _degraded.remember(store, lineage, key)
    return value


def _fall_back(
    store: CheckpointStore,
    key: str,
    lineage: str | None,
    fallback: Fallback | None,
    exc: BaseException,
    pickle_ok: bool,
    logger: logging.Logger,
    last_try: bool | Callable[[BaseException], bool] = True,
) -> Any:
    """The ``Degraded`` output to return for a body that raised ``exc``, or None to let
    the failure stand. Looking for one never hides the failure: if the lookup itself
    fails, the original error is raised."""
    if fallback is None or not lineage or isinstance(exc, StaleAttemptError):
        return None  # a fenced attempt did not give up: a newer one owns the stage
    if callable(last_try):
        try:
            last_try = bool(last_try(exc))
        except Exception:  # cannot tell whether the host retries: let the failure stand
            logger.exception("stage %s: could not tell whether this was the last try", key)
            return None
    if not last_try:
        return None
    try:
        return _degraded.serve(
            store,
            key=key,
            lineage=lineage,
            fallback=fallback,
            error=exc,
            pickle_ok=pickle_ok,
            logger=logger,
        )
    except Exception as lookup:
        logger.warning("stage %s: no fallback could be looked up (%s)", key, lookup)
        return None


async def call_async(
    fn: Callable[..., Awaitable[Any]],
    args: tuple[Any, ...] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    store: CheckpointStore,
    key: str,
    expire: timedelta | None = None,
    refresh: bool = False,
    pickle_ok: bool = False,
    on_stage: Callable[[Stage], object] | None = None,
    first_try: bool = False,
    order: int | None = None,
    logger: logging.Logger | None = None,
    fallback: Fallback | None = None,
    lineage: str | None = None,
    last_try: bool | Callable[[BaseException], bool] = True,
    on_degraded: Callable[[Degraded[Any]], Any] | None = None,
) -> Any:
    """:func:`call` for a coroutine function (the store's I/O runs in a worker thread)."""
    import asyncio

    logger = logger or log
    stage, done, value = await asyncio.to_thread(
        _prepare, store, key, expire, refresh, pickle_ok, logger, None, first_try, order
    )
    if done:
        return value
    if on_stage is not None:
        on_stage(stage)
    try:
        value = await fn(*args, stage=stage, **dict(kwargs or {}))
    except Exception as exc:
        served = await asyncio.to_thread(
            _fall_back, store, key, lineage, fallback, exc, pickle_ok, logger, last_try
        )
        if served is None:
            raise
        return on_degraded(served) if on_degraded is not None else served
    await asyncio.to_thread(
        _record, stage, value, pickle_ok, getattr(fn, "__qualname__", repr(fn)), logger
    )
    if fallback is not None and lineage:
        await asyncio.to_thread(_degraded.remember, store, lineage, key)
    return value
