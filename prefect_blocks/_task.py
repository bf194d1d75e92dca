"""``resumable_task``: a Prefect task whose function gets a fenced ``stage=`` and resumes."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import enum
import functools
import hashlib
import inspect
import json
import logging
import os
import pathlib
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from faultkit import _degraded
from faultkit import _resumable as resumable
from faultkit._errors import StaleAttemptError

from ._ephemeral import guard as _guard_server
from ._refs import AlertRef, PolicyRef, StoreRef

__all__ = ["resumable_task", "stage_key"]

log = logging.getLogger("faultkit.prefect")

# How long a fenced flow-run process keeps asking an unreachable server whether a newer run
# of its flow run exists before it stops anyway (see _stop_if_superseded).
SUPERSEDED_WAIT = 120.0


def _canonical(value: Any) -> Any:
    """``value`` as plain JSON types, the same in every process, or ``TypeError``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_canonical(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value).hex()}
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, (uuid.UUID, pathlib.PurePath, _dt.timedelta)):
        return str(value)
    if isinstance(value, enum.Enum):
        return _canonical(value.value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _canonical(dataclasses.asdict(value))
    if hasattr(value, "model_dump"):  # pydantic models (Prefect's own types included)
        return _canonical(value.model_dump(mode="json"))
    raise TypeError(
        f"cannot build a stable stage key from a {type(value).__name__} value; pass key= to "
        "resumable_task (a string like 'etl/{partition}' or a function of the inputs)"
    )


def _digest(payload: Any) -> str:
    text = json.dumps(_canonical(payload), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def stage_key(flow_name: str, flow_run_id: Any, task_name: str, inputs: Mapping[str, Any]) -> str:
    """The default stage key: ``prefect/<flow>/<flow run id>/<task>/<hash of its inputs>``.

    Scoped to the flow run, whose id stays the same through Prefect's own retries and
    faultkit's crash-retry: those resume, while the next scheduled run computes afresh.
    """
    from faultkit import key

    return key("prefect", flow_name, str(flow_run_id), task_name, _digest(inputs))


def _user_key(text: str) -> str:
    """A key the user named, used as written when valid, else built with ``faultkit.key``."""
    from faultkit import InvalidKeyError, key
    from faultkit._keys import check_key

    try:
        return check_key(text)
    except InvalidKeyError:
        return key(*text.split("/"))


def _run_context() -> tuple[str, Any, Mapping[str, Any], str]:
    """(flow name, flow run id, flow parameters, task name) of the task run in progress."""
    from prefect.context import FlowRunContext, TaskRunContext

    task_ctx = TaskRunContext.get()
    flow_ctx = FlowRunContext.get()
    task_name = task_ctx.task.name if task_ctx is not None else ""
    if not task_name:
        raise RuntimeError(
            "a resumable_task must run inside a Prefect task run (call it from a @flow, "
            "or call .fn(..., stage=...) to run the function alone)"
        )
    run_id, params, flow_name = task_ctx.task_run.flow_run_id, {}, ""
    if flow_ctx is not None and flow_ctx.flow_run is not None:
        run_id = flow_ctx.flow_run.id
        flow_name = getattr(flow_ctx.flow, "name", "") or ""
        params = dict(flow_ctx.parameters or flow_ctx.flow_run.parameters or {})
    elif run_id is not None:
        # A task on a remote runner (Dask) without the flow's context: ask the server.
        from prefect import get_client

        with get_client(sync_client=True) as client:
            fr = client.read_flow_run(run_id)
            flow_name = client.read_flow(fr.flow_id).name
        params = dict(fr.parameters or {})
    if run_id is None:  # a task called outside any flow: its own task run is the scope
        run_id = task_ctx.task_run.id
    return flow_name or "-", run_id, params, task_name


def _first_try() -> bool:
    """True on the task's first run in the flow run's first run: no older attempt of its
    stage can exist, so the claim may ride on its first commit (see ``faultkit._resumable``).
    A task retry, a flow retry and a crash-retry of the flow run all count runs above 1."""
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    tr = ctx.task_run if ctx is not None else None
    if tr is None:
        return False
    return tr.run_count <= 1 and 0 < (tr.flow_run_run_count or 0) <= 1


def _last_try(policy: PolicyRef | None) -> Callable[[BaseException], bool]:
    """Whether Prefect will not retry this task run after a failure: its ``run_count`` has
    reached ``retries + 1``, or the faultkit policy behind its ``retry_condition_fn`` would
    not retry this exception (outside ``on=``, or its class's budget spent). Outside a task
    run: always."""
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    tr = ctx.task_run if ctx is not None else None
    run_count = tr.run_count if tr is not None else 0
    retries = int(getattr(ctx.task, "retries", 0) or 0) if ctx is not None else 0

    def last(exc: BaseException) -> bool:
        if tr is None or run_count > retries:
            return True
        if policy is None:
            return False
        p = policy.get()
        # As retry_condition_fn judges: every earlier run counts against this class.
        return not p.would_retry(exc, failures={p.failure_class(exc): run_count},
                                 attempt=run_count)  # fmt: skip

    return last


def _degraded_state(served: Any, alerts: Any) -> Any:
    """The ``Completed`` state named ``Degraded`` a task returns when it served an earlier
    output; its result is the :class:`faultkit.Degraded` wrapper. Sends the one ``degraded``
    alert when the task has ``alerts=``."""
    from prefect.states import Completed

    if alerts is not None:
        from ._hooks import _send

        _send(alerts, _degraded.event_of(served))
    return Completed(
        data=served,
        name="Degraded",
        message=f"serving the output of {served.source_key}: {served.reason}"[:500],
    )


def _superseded(flow_run_id: Any, run_count: int, state_id: Any, wait: float) -> str:
    """Why the server no longer counts this process as the flow run's runner ("" while it
    does): a newer run of the flow run started, or its state is no longer the ``Running``
    state this process set. An unreachable server is asked again until ``wait`` seconds
    pass, then counts as superseded: it has stopped getting this process's heartbeats too."""
    from prefect import get_client

    deadline = time.monotonic() + wait
    pause = 0.5
    while True:
        try:
            with get_client(sync_client=True) as client:
                fr = client.read_flow_run(flow_run_id)
        except Exception as exc:  # a partition, the server down: ask again, bounded
            if time.monotonic() >= deadline:
                return f"the Prefect API was unreachable for {wait:g} s ({exc})"
            time.sleep(pause)
            pause = min(pause * 2, 5.0)
            continue
        state = fr.state.type.value if fr.state is not None else "none"
        if (fr.run_count or 0) > run_count:
            return f"run {fr.run_count} of the flow run started ({state})"
        if state != "RUNNING":
            return f"the flow run is {state}"
        if state_id is not None and fr.state is not None and fr.state.id != state_id:
            return "another process set its Running state"
        return ""


def _stop_if_superseded(err: Exception) -> None:
    """Stop a zombie flow-run process quietly, so the run that fenced it keeps its state.

    A fenced write in a process that a worker or runner started for this flow run
    (``PREFECT__FLOW_RUN_ID``) means a newer run of the *same* flow run owns its stages: the
    server declared this one crashed (its heartbeats stopped) and crash-retry ran it again
    elsewhere. Any state this process proposed now would land on the newer run (Prefect
    accepts ``Running -> Failed`` and ``Completed -> Failed`` from any client), and a
    non-zero exit would make its worker report the newer run ``Crashed``. So, once the
    server confirms it (or stays unreachable for ``SUPERSEDED_WAIT`` s), the process exits
    with status 0 without reporting anything. A fenced write while this process is still
    the flow run's runner (two tasks sharing a ``key=``) raises as usual.
    """
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    fr = ctx.flow_run if ctx is not None else None
    if fr is None or os.environ.get("PREFECT__FLOW_RUN_ID") != str(fr.id):
        return  # the flow runs in the caller's own process: never exit it
    mine = getattr(fr.state, "id", None)  # the engine keeps the state it set here
    why = _superseded(fr.id, int(fr.run_count or 0), mine, SUPERSEDED_WAIT)
    if not why:
        return
    log.error(
        "faultkit: this process is a stale run of flow run %s (%s; %s). Stopping it without "
        "reporting a state, so the newer run's state stands.",
        fr.id,
        why,
        err,
    )
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # exiting anyway
            stream.flush()
    os._exit(0)


def _logger() -> Any:
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # outside a run context
        return log


def resumable_task(
    fn: Callable[..., Any] | None = None,
    *,
    store: Any,
    retry: Any = None,
    key: str | Callable[..., str] | None = None,
    expire: _dt.timedelta | None = None,
    alerts: Any = None,
    pickle_result: bool = False,
    fallback: Any = None,
    **task_kwargs: Any,
) -> Any:
    """A Prefect ``@task`` whose function receives ``stage=`` and resumes after a crash.

    The function runs inside a claimed stage; units it marks done with ``stage.done`` are
    skipped by every later attempt (``stage.pending``), and its return value is recorded, so
    a later attempt returns it without running the body (``faultkit._resumable.call``).

    What is reused is scoped to the flow run: the key defaults to
    ``prefect/<flow>/<flow run id>/<task>/<hash of its inputs>``, so Prefect's retries and
    faultkit's crash-retry of that flow run resume, and the next run of the flow (scheduled,
    same parameters or none) runs the body again. Name a wider scope with ``key=`` to reuse
    results across flow runs, for at most ``expire=``. Prefect's ``refresh_cache=True``
    and ``cache_expiration=`` mean the same here: run afresh, and ``expire``.

    Args:
        fn: the function; it must accept a ``stage`` keyword argument.
        store: a store URL, a ``CheckpointStoreBlock`` (or its name, loaded where the task
            runs) or a ``faultkit.CheckpointStore``. For Dask or process task runners pass a
            URL or a block: a ``CheckpointStore`` object is rebuilt there from its URL alone.
        retry: a ``faultkit.RetryPolicy``, ``RetryPolicyBlock`` or its name; mapped to task
            options with ``policy.prefect()`` (explicit ``task_kwargs`` win). Nothing is
            loaded here: a block name is loaded when Prefect first reads the task's retry
            options, as the task run is created (see :class:`ResumableTask`).
        key: a wider scope than the flow run: a fixed key, a template formatted with the
            task's inputs and the flow's parameters (``"etl/{partition}"``), or a function
            of the task's inputs returning one. Used as written when it is a valid key, else
            built with ``faultkit.key``.
        expire: a recorded result older than this is not reused (default: never expires;
            ``cache_expiration=`` is taken when given).
        alerts: Apprise URLs, an ``AlertBlock`` or its name: a ``gave_up`` alert is sent when
            the task fails for good (deduplicated through ``store``).
        pickle_result: record results the codec cannot give back exactly with pickle
            (loading runs code from the store: trusted stores only).
        fallback: when the task fails on its last try (Prefect's ``retries`` spent) with a
            failure the fallback covers (infrastructure by default), it completes instead
            with the newest output the same task (same flow, task and inputs) recorded in an
            earlier flow run, within ``max_age``: a ``Completed`` state named ``Degraded``
            whose result is a :class:`faultkit.Degraded`, and one ``degraded`` alert.
            ``True``, a ``timedelta`` (the oldest output to serve) or
            :class:`faultkit.Fallback`. With no such output the task fails as before.
        **task_kwargs: passed to ``prefect.task`` (``name``, ``tags``, ``timeout_seconds``...).

    Returns:
        A :class:`ResumableTask` (a ``prefect.Task``: ``.submit()``, ``.map()``,
        ``.with_options()``), or a decorator.

    Decorating resolves nothing: ``store=``, ``retry=`` and ``alerts=`` given as block names
    are loaded when the task runs, so importing a flow module needs no Prefect API.

    A return value the codec does not accept (see ``faultkit._codec``) is returned but not
    recorded (a warning says so): a later attempt calls the function again, which skips the
    units already done.
    """
    if fn is None:
        return functools.partial(
            resumable_task,
            store=store,
            retry=retry,
            key=key,
            expire=expire,
            alerts=alerts,
            pickle_result=pickle_result,
            fallback=fallback,
            **task_kwargs,
        )
    from ._retry_task import ResumableTask

    sig = inspect.signature(fn)
    if "stage" not in sig.parameters and not any(
        p.kind is p.VAR_KEYWORD for p in sig.parameters.values()
    ):
        raise TypeError(
            f"{fn.__qualname__} must accept a 'stage' keyword argument to be a resumable_task"
        )
    public_sig = sig.replace(parameters=[p for n, p in sig.parameters.items() if n != "stage"])
    positional = [
        n
        for n, p in sig.parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    cut = positional.index("stage") if "stage" in positional else len(positional)
    after_stage = positional[cut + 1 :]

    def _around_stage(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        """Prefect passes the parameters positionally: those declared after ``stage`` go by
        name, or they would land in ``stage``'s place."""
        if len(args) <= cut:
            return args, kwargs
        extra = args[cut:]
        if len(extra) > len(after_stage):
            raise TypeError(
                f"{fn.__qualname__}: {len(extra)} positional arguments after 'stage' "
                f"({after_stage} by name); declare 'stage' after them or make it keyword-only"
            )
        return args[:cut], {**dict(zip(after_stage, extra, strict=False)), **kwargs}

    store_ref = StoreRef.of(store)
    alert_ref = AlertRef(alerts, store_ref) if alerts is not None else None
    policy = PolicyRef.of(retry)

    falls_back = _degraded.as_fallback(fallback)
    expire = expire or task_kwargs.get("cache_expiration")
    refresh = bool(task_kwargs.get("refresh_cache"))

    def _call_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        _guard_server()
        bound = public_sig.bind(*args, **kwargs)
        bound.apply_defaults()
        inputs = dict(bound.arguments)
        flow_name, run_id, params, task_name = _run_context()
        if key is None:
            k = stage_key(flow_name, run_id, task_name, inputs)
        elif callable(key):
            k = _user_key(key(**inputs))
        else:
            k = _user_key(key.format(**{**params, **inputs}) if "{" in key else key)
        if falls_back is not None:
            from faultkit import key as make_key

            extra = {
                "fallback": falls_back,
                # The task whatever the flow run: where results are noted for a fallback.
                "lineage": make_key("prefect", flow_name, task_name, _digest(inputs)),
                "last_try": _last_try(policy),
                "on_degraded": lambda served: _degraded_state(served, alert_ref),
            }
        else:
            extra = {}
        return {
            **extra,
            "store": store_ref.get(),
            "key": k,
            "first_try": _first_try(),
            "expire": expire,
            "refresh": refresh,
            "pickle_ok": pickle_result,
            "logger": _logger(),
        }

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            args, kwargs = _around_stage(args, kwargs)
            try:
                return await resumable.call_async(fn, args, kwargs, **_call_args(args, kwargs))
            except StaleAttemptError as err:
                _stop_if_superseded(err)
                raise

    else:

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            args, kwargs = _around_stage(args, kwargs)
            try:
                return resumable.call(fn, args, kwargs, **_call_args(args, kwargs))
            except StaleAttemptError as err:
                _stop_if_superseded(err)
                raise

    wrapper.__signature__ = public_sig  # type: ignore[attr-defined]
    options: dict[str, Any] = dict(task_kwargs)
    if alert_ref is not None:
        from ._hooks import task_failure_hook

        hooks = list(options.get("on_failure") or [])
        hooks.append(task_failure_hook(alert_ref))
        options["on_failure"] = hooks
    return ResumableTask(wrapper, policy=policy, **options)
