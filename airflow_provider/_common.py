"""What the operator, the decorator and the notifier share: stage keys, stores, incident alerts.

An *incident* is "try N of a task did not succeed". Every path that can notice one — the
task's own ``on_retry_callback`` / ``on_failure_callback`` in the worker, the DAG processor
running those callbacks after a heartbeat timeout, and the next try finding the stage left
half-done — builds the same :class:`faultkit.Event` identity for it (kind ``retry_scheduled``
while a retry remains, ``gave_up`` when none does; key = the stage key; dedupe key =
``try-N``), so an :class:`~faultkit.Alerter` with the stage's store delivers it once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from faultkit import CheckpointStore, Event, _incident, key
from faultkit._resumable import store_for

__all__ = [
    "POINTER",
    "incident_event",
    "progress",
    "resolve_store",
    "stage_key",
    "store_config_of",
    "task_label",
    "ti_stage_key",
]

log = logging.getLogger("airflow_provider.faultkit")

#: The task_state_store key holding the small progress pointer of a resumable task.
POINTER = "faultkit"


def stage_key(dag_id: str, run_id: str, task_id: str, map_index: int | None) -> str:
    """The stage key of one task instance: the same for every try, distinct across runs."""
    return key(dag_id, run_id, task_id, -1 if map_index is None else int(map_index))


def ti_stage_key(ti: Any) -> str:
    """:func:`stage_key` of a (runtime) task instance."""
    return stage_key(ti.dag_id, ti.run_id, ti.task_id, getattr(ti, "map_index", -1))


def resolve_store(store_conn_id: str | None, store_url: str | None) -> CheckpointStore:
    """The store named by a ``faultkit`` connection or by a URL (exactly one of them)."""
    if store_url:
        return store_for(store_url)
    from .hooks import CheckpointHook

    return CheckpointHook(store_conn_id).get_store()


def store_config_of(
    task: Any, context: Mapping[str, Any] | None = None
) -> tuple[str | None, str | None] | None:
    """``(store_conn_id, store_url)`` of a resumable task (mapped or not), else None.

    With ``context``, a templated ``store_url`` is rendered in it. A callback that the DAG
    processor runs (heartbeat timeout) gets the task as parsed, its template unrendered,
    and Airflow 3.3 gives it no way to read what the try rendered: the DAG processor has no
    DB access (so no ``rendered_task_instance_fields``) and answers no ``task_state_store``
    read (so not the pointer the operator writes either). Its context carries what the try
    rendered from, the DAG run (logical date, conf, run id) and params, so the template is
    rendered again with it; a template that reads the clock or other changing state can
    render differently and is not supported for ``store_url``. In the worker the task is
    already rendered and rendering is a no-op.
    """
    for source in (task, getattr(task, "partial_kwargs", None)):
        if source is None:
            continue
        get = source.get if isinstance(source, Mapping) else lambda n, s=source: getattr(s, n, None)
        conn, url = get("store_conn_id"), get("store_url")
        if isinstance(url, str) and context is not None and hasattr(task, "render_template"):
            url = task.render_template(url, context)
        if conn or url:
            return conn, url
    return None


def task_label(dag_id: str, task_id: str, map_index: int | None) -> str:
    """``dag.task`` or ``dag.task[3]`` for a mapped instance."""
    suffix = f"[{map_index}]" if map_index is not None and int(map_index) >= 0 else ""
    return f"{dag_id}.{task_id}{suffix}"


def progress(store: CheckpointStore | None, stage: str) -> dict[str, Any]:
    """What the stage's log says right now (:func:`faultkit._incident.progress`)."""
    return _incident.progress(store, stage)


def incident_event(
    *,
    dag_id: str,
    run_id: str,
    task_id: str,
    map_index: int | None,
    try_number: int,
    max_tries: int | None,
    will_retry: bool,
    cause: str,
    progress_now: Mapping[str, Any],
    next_step: str | None = None,
) -> Event:
    """The alert for "try ``try_number`` did not succeed", identical from every path.

    Args:
        cause: what happened, one short clause ("raised ConnectionError: ...",
            "lost its worker (no heartbeat for 30 s)").
        progress_now: :func:`progress` of the stage.
        next_step: what happens next; a default is derived from ``will_retry``.
    """
    label = task_label(dag_id, task_id, map_index)
    total = f" of {max_tries + 1}" if max_tries is not None and max_tries >= 0 else ""
    if next_step is None:
        next_step = (
            f"Airflow retries it as try {try_number + 1}, which resumes from the last commit"
            if will_retry
            else "no retry remains: the task has failed; committed progress is kept, so "
            "clearing the task resumes it"
        )
    return _incident.incident(
        "retry_scheduled" if will_retry else "gave_up",
        stage_key(dag_id, run_id, task_id, map_index),
        subject=f"{label} (run {run_id}) try {try_number}{total}",
        cause=cause,
        next_step=next_step,
        progress_now=progress_now,
        dedupe_key=f"try-{try_number}",
        details={
            "dag_id": dag_id,
            "run_id": run_id,
            "task_id": task_id,
            "map_index": -1 if map_index is None else int(map_index),
            "try_number": try_number,
            "max_tries": max_tries,
            "will_retry": will_retry,
            "cause": cause,
        },
    )
