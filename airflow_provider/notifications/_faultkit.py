"""FaultkitNotifier: one alert per failed try, whichever Airflow component reports it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseNotifier

from faultkit import CheckpointStore, Event, key

from .._common import incident_event, log, progress, resolve_store, store_config_of, ti_stage_key

if TYPE_CHECKING:
    from airflow.sdk import Context

__all__ = ["FaultkitNotifier"]

_RETRY_STATES = {"up_for_retry"}
_FAILED_STATES = {"failed", "upstream_failed"}


def _state(ti: Any) -> str | None:
    s = getattr(ti, "state", None)
    return None if s is None else str(getattr(s, "value", s))


def _will_retry(ti: Any) -> bool:
    """Whether Airflow retries this try (the callback type is not in the context)."""
    state = _state(ti)
    if state in _RETRY_STATES:
        return True
    if state in _FAILED_STATES:
        return False
    # The DAG processor runs heartbeat-timeout callbacks with the TI as it was (running);
    # the scheduler chose the callback type with this same rule.
    max_tries = getattr(ti, "max_tries", 0) or 0
    return max_tries > 0 and ti.try_number <= max_tries


class FaultkitNotifier(BaseNotifier):
    """Alerts for ``on_failure_callback`` / ``on_retry_callback`` of tasks and DAGs.

    The message names the DAG, task, try, what was lost and kept (read from the stage's
    log) and what happens next. Alerts are deduplicated through the checkpoint store, so
    the same failed try reported by the worker, by the DAG processor (heartbeat timeout)
    and by the next try finding the stage half-done gives one alert; a try that will be
    retried is reported as ``retry_scheduled``, never as a final failure.

    ``urls``, ``conn_id`` and ``store_url`` are templated (rendered with the callback's
    context, e.g. ``store_url="s3://ck/{{ ds_nodash }}"``).

    Args:
        urls: Apprise URLs. Default: the ``alert_urls_secret`` of connection ``conn_id``.
        conn_id: a ``faultkit`` connection giving URLs and the store used for dedupe.
        store_url: the store for dedupe and progress, instead of the connection's; by
            default also the task's own store when the task is resumable.
        dedupe_window: seconds in which one alert is sent once (default: the connection's,
            else 600).
    """

    template_fields: Sequence[str] = ("urls", "conn_id", "store_url")

    def __init__(
        self,
        urls: Sequence[str] | None = None,
        *,
        conn_id: str | None = "faultkit_default",
        store_url: str | None = None,
        dedupe_window: float | None = None,
    ) -> None:
        super().__init__()
        self.urls = list(urls) if urls is not None else None
        self.conn_id = conn_id
        self.store_url = store_url
        self.dedupe_window = dedupe_window
        self._templates = {name: getattr(self, name) for name in self.template_fields}

    def render_template_fields(self, context: Context, jinja_env: Any = None) -> None:
        """Render the templated fields from the values given, not from the last rendering.

        ``BaseNotifier`` renders in place, and one notifier serves many callbacks (it sits
        in ``default_args``; the DAG processor runs several callbacks per parse): without
        this the first callback's run would fix the URLs and store of all later ones.
        """
        for name, value in self._templates.items():
            setattr(self, name, value)
        super().render_template_fields(context, jinja_env)

    def __repr__(self) -> str:
        n = "conn" if self.urls is None else f"{len(self.urls)} url(s)"
        return f"FaultkitNotifier({n}, conn_id={self.conn_id!r})"

    # -- resolution --------------------------------------------------------------------

    def _settings(self) -> Any:
        if not self.conn_id:
            return None
        from ..hooks import CheckpointHook

        try:
            return CheckpointHook(self.conn_id).settings()
        except Exception as exc:
            if self.urls is None:
                raise
            log.info(
                "connection %r not used (%s); using the given URLs",
                self.conn_id,
                type(exc).__name__,
            )
            return None

    def _store(self, settings: Any, context: Context, task: Any) -> CheckpointStore | None:
        try:
            if self.store_url:
                return CheckpointStore(self.store_url)
            # The task's own store, its URL rendered: in the DAG processor the task's
            # template fields are not (see store_config_of).
            cfg = store_config_of(task, context) if task is not None else None
            if cfg is not None:
                return resolve_store(*cfg)
            if settings is not None:
                return CheckpointStore(settings.store_url, **settings.storage_options)
        except Exception as exc:
            log.warning("no store for alert dedupe (%s); alerting without it", type(exc).__name__)
        return None

    # -- notify ------------------------------------------------------------------------

    def notify(self, context: Context) -> None:
        """Build the event for this callback and send it (deduplicated)."""
        from faultkit import Alerter

        settings = self._settings()
        urls = self.urls if self.urls is not None else (settings.alert_urls if settings else [])
        if not urls:
            log.warning(
                "FaultkitNotifier has no alert URLs (give urls= or set the connection's "
                "alert_urls); nothing sent"
            )
            return
        ti = context.get("ti")
        store = self._store(settings, context, context.get("task") if ti is not None else None)
        window = self.dedupe_window
        if window is None:
            window = settings.dedupe_window if settings is not None else 600.0
        event = self._task_event(context, ti, store) if ti is not None else self._dag_event(context)
        if event is None:
            return
        Alerter(urls, store=store, dedupe_window=window).send(event)

    def _task_event(self, context: Context, ti: Any, store: CheckpointStore | None) -> Event:
        will_retry = _will_retry(ti)
        exc = context.get("exception")
        if exc is not None:
            text = str(exc).splitlines()[0][:200] if str(exc) else ""
            cause = f"raised {type(exc).__name__}" + (f": {text}" if text else "")
        else:
            # Reported by the scheduler/DAG processor: the task process ended without a
            # result (SIGKILL, OOM) or its supervisor stopped heartbeating.
            cause = "was lost: its process or worker stopped without reporting a result"
        k = ti_stage_key(ti)
        return incident_event(
            dag_id=ti.dag_id,
            run_id=ti.run_id,
            task_id=ti.task_id,
            map_index=ti.map_index,
            try_number=ti.try_number,
            max_tries=getattr(ti, "max_tries", None),
            will_retry=will_retry,
            cause=cause,
            progress_now=progress(store, k),
        )

    def _dag_event(self, context: Context) -> Event | None:
        dag_run = context.get("dag_run")
        dag = context.get("dag")
        dag_id = getattr(dag_run, "dag_id", None) or getattr(dag, "dag_id", None)
        if dag_id is None:
            log.warning("FaultkitNotifier called without a task or DAG run; nothing sent")
            return None
        run_id = getattr(dag_run, "run_id", None) or "unknown-run"
        state = getattr(dag_run, "state", None)
        state = str(getattr(state, "value", state)) if state is not None else "failed"
        reason = context.get("reason") or ""
        if state == "success":
            return None  # a DAG success callback: nothing went wrong
        return Event(
            "gave_up",
            key(dag_id, run_id),
            f"DAG {dag_id} run {run_id} failed{': ' + str(reason) if reason else ''}. Kept: "
            "every committed unit and snapshot of its resumable tasks. Next: clear the failed "
            "tasks (or re-run the DAG run) once the cause is fixed; they resume from their "
            "last commit.",
            {"dag_id": dag_id, "run_id": run_id, "reason": str(reason)},
            dedupe_key="dag-run",
        )
