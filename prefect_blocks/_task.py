"""``resumable_task``: a Prefect task whose function gets a fenced ``stage=`` and resumes."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import functools
import hashlib
import inspect
import json
import logging
import pathlib
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from ._ephemeral import guard as _guard_server
from ._refs import AlertRef, PolicyRef, StoreRef

__all__ = ["resumable_task", "stage_key"]

log = logging.getLogger("faultkit.prefect")

# The unit that records a finished task and its (JSON) return value.


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


def stage_key(
    flow_name: str, parameters: Mapping[str, Any], task_name: str, inputs: Mapping[str, Any]
) -> str:
    """The default stage key: flow name, a hash of the flow's parameters, task name, inputs.

    The same flow run again with the same parameters gets the same keys, so it resumes; the
    flow run id is deliberately not part of it.
    """
    from faultkit import key

    return key("prefect", flow_name, task_name, _digest({"flow": parameters, "task": inputs}))


def _run_context() -> tuple[str, Mapping[str, Any], str]:
    """(flow name, flow parameters, task name) of the task run in progress."""
    from prefect.context import FlowRunContext, TaskRunContext

    task_ctx = TaskRunContext.get()
    flow_ctx = FlowRunContext.get()
    task_name = task_ctx.task.name if task_ctx is not None else ""
    flow_name, params = "", {}
    if flow_ctx is not None:
        flow_name = getattr(flow_ctx.flow, "name", "") or ""
        params = dict(flow_ctx.parameters or {})
        if not params and flow_ctx.flow_run is not None:
            params = dict(flow_ctx.flow_run.parameters or {})
    elif task_ctx is not None and task_ctx.task_run.flow_run_id is not None:
        # A task on a remote runner (Dask) without the flow's context: ask the server.
        from prefect import get_client

        with get_client(sync_client=True) as client:
            fr = client.read_flow_run(task_ctx.task_run.flow_run_id)
            flow = client.read_flow(fr.flow_id)
        flow_name, params = flow.name, dict(fr.parameters or {})
    if not task_name:
        raise RuntimeError(
            "a resumable_task must run inside a Prefect task run (call it from a @flow, "
            "or call .fn(..., stage=...) to run the function alone)"
        )
    return flow_name, params, task_name


def _json_ok(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def resumable_task(
    fn: Callable[..., Any] | None = None,
    *,
    store: Any,
    retry: Any = None,
    key: str | Callable[..., str] | None = None,
    alerts: Any = None,
    **task_kwargs: Any,
) -> Any:
    """A Prefect ``@task`` whose function receives ``stage=`` and resumes after a crash.

    The function runs inside ``with store.stage(key) as stage:``; units it marks done with
    ``stage.done`` are skipped by every later attempt (``stage.pending``), and its JSON return
    value is recorded, so a later run with the same key returns it without running the body.

    The key defaults to ``prefect/<flow>/<task>/<hash of flow parameters and task inputs>``:
    running the same flow with the same parameters again resumes and skips finished work,
    whatever the flow run. Two calls with the same inputs in one flow share a stage (the
    second returns the first's result); give them different inputs or a ``key=``.

    Args:
        fn: the function; it must accept a ``stage`` keyword argument.
        store: a store URL, a ``CheckpointStoreBlock`` (or its name, loaded where the task
            runs) or a ``faultkit.CheckpointStore``. For Dask or process task runners pass a
            URL or a block: a ``CheckpointStore`` object is rebuilt there from its URL alone.
        retry: a ``faultkit.RetryPolicy``, ``RetryPolicyBlock`` or its name; mapped to task
            options with ``policy.prefect()`` (explicit ``task_kwargs`` win). Nothing is
            loaded here: a block name is loaded when Prefect first reads the task's retry
            options, as the task run is created (see :class:`ResumableTask`).
        key: a fixed key, a template formatted with the task's inputs and the flow's
            parameters (``"etl/{partition}"``), or a function of the task's inputs returning one.
        alerts: Apprise URLs, an ``AlertBlock`` or its name: a ``gave_up`` alert is sent when
            the task fails for good (deduplicated through ``store``).
        **task_kwargs: passed to ``prefect.task`` (``name``, ``tags``, ``timeout_seconds``...).

    Returns:
        A :class:`ResumableTask` (a ``prefect.Task``: ``.submit()``, ``.map()``,
        ``.with_options()``), or a decorator.

    Decorating resolves nothing: ``store=``, ``retry=`` and ``alerts=`` given as block names
    are loaded when the task runs, so importing a flow module needs no Prefect API.

    A return value that is not JSON-serialisable is returned but not recorded (a warning
    says so): a later run then calls the function again, which skips the units already done.
    """
    if fn is None:
        return functools.partial(
            resumable_task, store=store, retry=retry, key=key, alerts=alerts, **task_kwargs
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
    store_ref = StoreRef.of(store)
    alert_ref = AlertRef(alerts, store_ref) if alerts is not None else None
    policy = PolicyRef.of(retry)

    def _key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        bound = public_sig.bind(*args, **kwargs)
        bound.apply_defaults()
        inputs = dict(bound.arguments)
        flow_name, params, task_name = _run_context()
        if key is None:
            return stage_key(flow_name, params, task_name, inputs), inputs
        if callable(key):
            return key(**inputs), inputs
        if "{" in key:
            return key.format(**{**params, **inputs}), inputs
        return key, inputs

    def _open(k: str) -> tuple[Any, bool, Any]:
        """(stage, finished?, recorded result); reading the log does not claim the stage."""
        stage = store_ref.get().stage(k)
        stage.refresh()
        if stage.finished:
            return stage, True, stage.final_result
        return stage, False, None

    def _record(stage: Any, value: Any) -> None:
        if _json_ok(value):
            stage.finish(value)
        else:
            log.warning(
                "%s returned a %s, which is not JSON: its completion is not recorded, so a "
                "re-run calls it again (finished units are still skipped). Return a small "
                "JSON summary to let re-runs skip it entirely.",
                fn.__qualname__,
                type(value).__name__,
            )

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            _guard_server()
            k, _ = _key(args, kwargs)
            stage, done, result = _open(k)
            if done:
                log.info("stage %s already finished; returning its recorded result", k)
                return result
            with stage:
                value = await fn(*args, stage=stage, **kwargs)
                _record(stage, value)
            return value

    else:

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            _guard_server()
            k, _ = _key(args, kwargs)
            stage, done, result = _open(k)
            if done:
                log.info("stage %s already finished; returning its recorded result", k)
                return result
            with stage:
                value = fn(*args, stage=stage, **kwargs)
                _record(stage, value)
            return value

    wrapper.__signature__ = public_sig  # type: ignore[attr-defined]
    options: dict[str, Any] = dict(task_kwargs)
    if alert_ref is not None:
        from ._hooks import task_failure_hook

        hooks = list(options.get("on_failure") or [])
        hooks.append(task_failure_hook(alert_ref))
        options["on_failure"] = hooks
    return ResumableTask(wrapper, policy=policy, **options)
