"""resumable(fn): a Dask task that resumes from its stage and never redoes finished work."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

from distributed.worker import get_worker, thread_state

from faultkit import CheckpointStore, Fallback, RetryPolicy, _degraded, key
from faultkit import _resumable as resumable_call
from faultkit._errors import StoreConfigError
from faultkit._storage import redact_url

from ._worker import FORWARD_TOPIC, PLUGIN_NAME, _enter_task, _exit_task

__all__ = ["Resumable", "client_scope", "resumable", "stage_key"]

log = logging.getLogger("faultkit.dask")

_scopes: dict[tuple[int, str], str] = {}
_scopes_lock = threading.Lock()


def stage_key(task_key: Any, scope: str) -> str:
    """The stage key of a Dask task: ``dask/<scope>/<task key>`` (tuple keys give one
    segment each). The default scope is the scheduler's id: one scheduler's lifetime."""
    parts = _flatten(task_key) if isinstance(task_key, tuple) else [task_key]
    return key("dask", scope, *parts)


def lineage_of(task_key: Any) -> str:
    """The task whatever the scheduler: its key (a token of the function and its inputs),
    under which results are noted for a later ``fallback=``."""
    return stage_key(task_key, "lineage")


def _flatten(t: tuple[Any, ...]) -> list[Any]:
    out: list[Any] = []
    for part in t:
        if isinstance(part, tuple):
            out.extend(_flatten(part))
        else:
            out.append(part)
    return out


def client_scope(client: Any) -> str:
    """The default scope of tasks run through ``client``: its scheduler's id."""
    return f"scheduler-{client.scheduler_info()['id']}"


def scheduler_scope(worker: Any) -> str:
    """The id of the scheduler ``worker`` serves (asked once per worker and scheduler)."""
    from distributed.utils import sync

    ident = (id(worker), str(worker.scheduler.address))
    with _scopes_lock:
        scope = _scopes.get(ident)
    if scope is None:
        info = sync(worker.loop, worker.scheduler.identity)
        scope = f"scheduler-{info['id']}"
        with _scopes_lock:
            _scopes[ident] = scope
    return scope


class Resumable:
    """A picklable task function that runs ``fn(*args, stage=..., **kwargs)`` on a Dask worker.

    Built by :func:`resumable`; see there.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        store: str | CheckpointStore | None = None,
        retry: RetryPolicy | None = None,
        scope: str | None = None,
        expire: timedelta | None = None,
        pickle_result: bool = False,
        fallback: Fallback | timedelta | bool | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"resumable() needs a function, got {type(fn).__name__}: {fn!r}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise TypeError(
                f"retry= must be a faultkit.RetryPolicy, got {type(retry).__name__}: {retry!r}; "
                "e.g. retry=RetryPolicy(on=ConnectionError, attempts=3)"
            )
        if isinstance(store, CheckpointStore):
            self._store: CheckpointStore | None = store
            self.store_url: str | None = store.url
        elif store is None or isinstance(store, str):
            self._store = None
            self.store_url = store
            if store is not None:
                CheckpointStore(store)  # a bad URL fails here, not on a worker
        else:
            raise StoreConfigError(
                f"store must be a URL or a CheckpointStore, got {type(store).__name__}"
            )
        if expire is not None and scope is None:
            raise ValueError(
                "expire= applies to results reused across schedulers; name that scope too "
                "(resumable(fn, scope='nightly-etl', expire=timedelta(days=1)))"
            )
        self.fn = fn
        self.retry = retry
        self.scope = scope
        self.expire = expire
        self.pickle_result = bool(pickle_result)
        self.fallback = _degraded.as_fallback(fallback)
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)
        self.__doc__ = getattr(fn, "__doc__", None)
        self._token: str | None = None

    # -- Dask integration --------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_store"] = None  # stores hold credentials and are opened where the task runs
        # Every task carries a copy: keep it small (the docstring and token are client-side).
        state.pop("__doc__", None)
        state.pop("_token", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_token", None)

    def __dask_tokenize__(self) -> tuple[Any, ...]:
        # Keys must be stable across client sessions, so that a resubmitted task finds its
        # stage; the function's token is cached because tokenizing it dominates submit().
        if self._token is None:
            from dask.base import tokenize

            self._token = tokenize(self.fn)
        return ("faultkit.resumable", self._token, self.store_url, self.scope, self.pickle_result)

    def dask_options(self) -> dict[str, Any]:
        """Keyword arguments for ``client.submit``/``map``: none, as the policy retries here.

        Kept for callers that spread it into ``submit``; Dask's own ``retries`` would retry
        every exception, outside ``on=`` too, and multiply the policy's attempts.
        """
        return {}

    def submit(self, client: Any, *args: Any, **kwargs: Any) -> Any:
        """``client.submit(self, *args, **kwargs)``."""
        return client.submit(self, *args, **kwargs)

    def map(self, client: Any, *iterables: Iterable[Any], **kwargs: Any) -> Any:
        """``client.map(self, *iterables, **kwargs)``."""
        return client.map(self, *iterables, **kwargs)

    def __repr__(self) -> str:
        where = redact_url(self.store_url) if self.store_url else "the CheckpointPlugin's store"
        return f"resumable({self.__name__}, store={where!r})"

    # -- running ----------------------------------------------------------------------

    def _resolve_store(self) -> tuple[Any, CheckpointStore]:
        """The worker running this task (None outside one) and the store to use."""
        try:
            worker = get_worker()
        except ValueError:
            worker = None
        if self._store is not None:
            return worker, self._store
        plugin = worker.plugins.get(PLUGIN_NAME) if worker is not None else None
        if plugin is not None and plugin.store is not None:
            if self.store_url is None or self.store_url in (plugin.store_url, plugin.store.url):
                return worker, plugin.store
        if self.store_url is not None:
            return worker, resumable_call.store_for(self.store_url)
        raise StoreConfigError(
            f"task {self.__name__!r} has no checkpoint store: register "
            "dask_plugins.CheckpointPlugin(url) with the client (or start the scheduler with "
            "--preload dask_plugins.preload --faultkit-store URL), or pass "
            "resumable(fn, store=url)"
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        task_key = getattr(thread_state, "key", None)
        if task_key is None:
            raise RuntimeError(
                f"resumable task {self.__name__!r} is keyed by its Dask task key, and none is "
                "set: run it on a distributed Client (client.submit, client.map, "
                "dask.delayed(...).compute()), not directly or on the local scheduler"
            )
        worker, store = self._resolve_store()
        skey = stage_key(task_key, self._scope(worker))
        order = self._run_order(worker, task_key)
        if self.retry is None:
            try:
                return self._attempt(store, worker, task_key, skey, args, kwargs, order)
            except Exception as exc:
                return self._give_up(store, worker, task_key, skey, exc)
        # The policy decides (on=, attempts, timeout, waits, events); each new attempt
        # claims the stage again, so it fences the failed one and resumes its units.
        t0, attempt, failures = time.monotonic(), 0, collections.Counter[str]()
        while True:
            attempt += 1
            try:
                first = order if attempt == 1 else None
                return self._attempt(store, worker, task_key, skey, args, kwargs, first)
            except Exception as exc:
                failures[self.retry.failure_class(exc)] += 1
                wait = self.retry.decide(
                    exc,
                    failures=failures,
                    elapsed=time.monotonic() - t0,
                    attempt=attempt,
                    key=str(task_key),
                )
                if wait is None:
                    return self._give_up(store, worker, task_key, skey, exc)
            time.sleep(wait)

    def _give_up(
        self, store: CheckpointStore, worker: Any, task_key: Any, skey: str, exc: Exception
    ) -> Any:
        """The task gives up on ``exc``: serve an earlier output if ``fallback=`` allows,
        else raise ``exc``."""
        if self.fallback is None:
            raise exc
        served = resumable_call._fall_back(
            store,
            skey,
            lineage_of(task_key),
            self.fallback,
            exc,
            self.pickle_result,
            log,
        )
        if served is None:
            raise exc
        if worker is not None:  # the scheduler's WorkerLossPlugin sends the alert
            event = _degraded.event_of(served)
            worker.log_event(FORWARD_TOPIC, {"action": "faultkit-event", **event.to_dict()})
        return served

    def _run_order(self, worker: Any, task_key: Any) -> int | None:
        """The scheduler's run id of this run of the task: it numbers a task's runs in the
        order they started, so a rerun after a worker loss is above the lost worker's run
        (which may still be running: a zombie). Only comparable within one scheduler, so
        None for a named scope (shared across schedulers), and outside a worker."""
        if worker is None or self.scope is not None:
            return None
        ts = worker.state.tasks.get(task_key)
        rid = getattr(ts, "run_id", None)
        return rid if isinstance(rid, int) and not isinstance(rid, bool) and rid >= 0 else None

    def _scope(self, worker: Any) -> str:
        return self.scope or (scheduler_scope(worker) if worker is not None else "local")

    def _attempt(
        self,
        store: CheckpointStore,
        worker: Any,
        task_key: Any,
        skey: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        order: int | None = None,
    ) -> Any:
        """One attempt. ``order`` (the run id, on the run's first attempt) lets the claim
        ride on the first commit when the stage's log is empty (see ``Stage.claim``)."""
        wid = id(worker) if worker is not None else None

        def body(*a: Any, stage: Any, **kw: Any) -> Any:
            _enter_task(task_key, wid)
            try:
                return self.fn(*a, stage=stage, **kw)
            finally:
                _exit_task()

        body.__qualname__ = self.__name__
        return resumable_call.call(
            body,
            args,
            kwargs,
            store=store,
            key=skey,
            expire=self.expire,
            pickle_ok=self.pickle_result,
            logger=log,
            fallback=self.fallback,
            lineage=lineage_of(task_key) if self.fallback is not None else None,
            first_try=order is not None,
            order=order,
            last_try=False,  # the policy decides in __call__, which serves the fallback
        )


def resumable(
    fn: Callable[..., Any],
    *,
    store: str | CheckpointStore | None = None,
    retry: RetryPolicy | None = None,
    scope: str | None = None,
    expire: timedelta | None = None,
    pickle_result: bool = False,
    fallback: Fallback | timedelta | bool | None = None,
) -> Resumable:
    """Wrap ``fn`` so that, run as a Dask task, it resumes after its worker is lost.

    ``client.submit(resumable(fn), *args, key=...)`` runs ``fn(*args, stage=stage)`` where
    ``stage`` is the :class:`faultkit.Stage` of the task's key within a scope
    (``dask/<scope>/<task key>``). The scope defaults to the scheduler's lifetime (its id):
    the same graph computed again on a new cluster runs afresh, while on the same scheduler
    a task rerun after its worker died resumes. Name a wider scope to reuse finished results
    across schedulers, for at most ``expire``. When the worker dies the scheduler reruns
    the task elsewhere; the rerun claims the stage (fencing the lost attempt) and skips the
    units already done. A run that finds the stage empty claims with its first commit,
    ordered by the scheduler's run id: if the lost worker is still running (a zombie) and
    commits first, the rerun claims above it at that point. A task that had finished before
    its worker died (its result lost with the worker's memory) returns its recorded result
    without running ``fn`` again. Works with ``client.submit``, ``client.map``,
    ``dask.delayed`` and annotations.

    With ``retry=policy`` the task retries itself, on the worker, however it was submitted:
    an exception that ``policy`` retries (``on=``) starts a new attempt after the policy's
    wait, up to its ``attempts`` and ``timeout``, and the new attempt claims the stage again
    and resumes its committed units; any other exception fails the task at once, and when
    the attempts run out the last exception is raised unwrapped. The waits hold the worker
    thread. Do not add Dask's ``retries=`` as well (it retries every exception and multiplies
    the attempts); a lost worker is not an exception here: Dask reruns the task
    (``distributed.scheduler.allowed-failures``) and it resumes from its stage.

    Args:
        fn: the task; it takes ``stage=`` as a keyword argument.
        store: a store URL or :class:`faultkit.CheckpointStore`; default: the store of the
            worker's :class:`~dask_plugins.CheckpointPlugin`. A ``CheckpointStore`` travels
            as its URL; its credentials are not pickled (the plugin's store is used when the
            URLs match).
        retry: a :class:`faultkit.RetryPolicy` the task retries itself by (see above).
        scope: reuse results across schedulers under this name (default: this scheduler).
        expire: with ``scope``, a recorded result older than this runs afresh.
        pickle_result: record results that JSON cannot hold with pickle (loading runs code
            from the store, so only for trusted stores).
        fallback: when the task gives up (its policy's attempts run out, or it fails with no
            policy) on a failure the fallback covers (infrastructure by default), return the
            newest output the same task (same function and inputs) recorded under an
            earlier scheduler, within ``max_age``, wrapped in :class:`faultkit.Degraded`,
            with one ``degraded`` event. ``True``, a ``timedelta`` (the oldest output to
            serve) or :class:`faultkit.Fallback`. With no such output the task fails.

    Returns:
        A picklable callable; keys derived from it are stable across client sessions, so a
        task resubmitted to the same scheduler finds its stage.
    """
    return Resumable(
        fn,
        store=store,
        retry=retry,
        scope=scope,
        expire=expire,
        pickle_result=pickle_result,
        fallback=fallback,
    )
