"""ResumablePythonOperator: a PythonOperator whose callable gets a fenced faultkit stage."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.operators.python import PythonOperator

from faultkit import CheckpointStore, Event, Stage, StaleAttemptError, _degraded, subscribe
from faultkit import _resumable as resumable
from faultkit import key as fk_key

from .._common import POINTER, incident_event, log, resolve_store, ti_stage_key
from ..retry import FaultkitRetryPolicy

if TYPE_CHECKING:
    from airflow.sdk import Context

    from faultkit import RetryPolicy

__all__ = ["ResumablePythonOperator", "apply_retry"]

# Store-level events worth a person's attention while the stage runs. Not "stale_attempt":
# a fenced zombie is part of the incident that the try which fenced it reports (its "retry
# scheduled" alert says what was kept), and one incident is one alert; the fenced write is
# in the zombie's task log and the faultkit_fenced_writes_total counter.
_FORWARD = frozenset({"checkpoint_corrupt", "degraded"})


class _TrackedStage(Stage):
    """A Stage that keeps the task's progress pointer in Airflow's task_state_store.

    The pointer is small (epoch, units done, latest step); the data stays in the store.
    It is first written at the first commit, then at most every ``interval`` seconds, and
    only from the task's main thread (an async checkpoint writer's thread leaves it for the
    next main-thread commit). A try that commits nothing writes no pointer, so a short task
    pays nothing for it.
    """

    def __init__(self, store: CheckpointStore, key: str, pointer: _Pointer) -> None:
        super().__init__(store, key)
        self._pointer = pointer

    def done(self, unit: str | int, result: Any = None) -> bool:
        recorded = super().done(unit, result)
        self._pointer.progress(self)
        return recorded

    def save(self, data: Any, step: int, meta: Any = None) -> Any:
        snap = super().save(data, step, meta)
        self._pointer.progress(self)
        return snap


class _Pointer:
    """Writes ``{"epoch", "units_done", "step", "status", ...}`` under :data:`POINTER`."""

    def __init__(self, accessor: Any, base: dict[str, Any], interval: float) -> None:
        self._tss = accessor
        self._base = base
        self._interval = interval
        self._last = 0.0
        self.written = False
        self._main = threading.main_thread()

    def write(self, stage: Stage, status: str, **extra: Any) -> None:
        if self._tss is None:
            return
        snaps = stage.snapshots()
        value = {
            **self._base,
            "epoch": stage.epoch,
            "units_done": len(stage.results()),
            "step": snaps[-1].step if snaps else None,
            "status": status,
            "updated": datetime.now(UTC).isoformat(timespec="seconds"),
            **extra,
        }
        try:
            self._tss.set(POINTER, value)
            self.written = True
        except Exception as exc:  # the UI pointer is a convenience; never fail the task on it
            log.warning("could not record progress in task_state_store: %s", exc)
        self._last = time.monotonic()

    def progress(self, stage: Stage) -> None:
        if threading.current_thread() is not self._main:
            return
        if not self.written or time.monotonic() - self._last >= self._interval:
            self.write(stage, "running")

    def finish(self, stage: Stage, status: str, **extra: Any) -> None:
        """Record the outcome if a pointer exists (this try wrote one, or an earlier try did)."""
        # An earlier try (not stage.epoch, which would write a first try's deferred claim
        # on its way out, and could raise over the task's own error).
        if self.written or self._base.get("try_number", 1) > 1:
            self.write(stage, status, **extra)


def apply_retry(
    retry: RetryPolicy | None, kwargs: dict[str, Any], *, keep: bool = True
) -> dict[str, Any]:
    """``kwargs`` with ``retry.airflow()`` applied (it wins over ``default_args``)."""
    if retry is None:
        return kwargs
    out = {**kwargs, **retry.airflow()}
    if keep:
        out["retry"] = retry
    return out


class ResumablePythonOperator(PythonOperator):
    """Runs ``python_callable(..., stage=stage)`` so a retry resumes where the last try stopped.

    The stage is keyed ``dag_id/run_id/task_id/map_index`` (:func:`faultkit.key`): every try
    of one task instance shares it, other runs and map indexes do not. Entering it claims a
    new epoch, so a zombie of an earlier try can no longer commit. A small pointer (epoch,
    units done, latest step) is kept in Airflow's ``task_state_store`` for the UI; the data
    stays in the store.

    Args:
        python_callable: takes ``stage=`` (a :class:`faultkit.Stage`) plus the usual
            ``op_args`` / ``op_kwargs`` / context arguments.
        store_conn_id: a ``faultkit`` connection (see
            :class:`~airflow_provider.hooks.CheckpointHook`); default ``faultkit_default``.
        store_url: a store URL without credentials, instead of a connection (templated).
        retry: a :class:`faultkit.RetryPolicy`; sets ``retries``, ``retry_delay``,
            ``retry_exponential_backoff``, ``max_retry_delay`` and ``retry_policy`` (so an
            exception outside ``on=`` fails at once).
        alerts: Apprise URLs told when a try was lost without reporting (the next try
            finds the stage half-done) and about corrupt snapshots or fenced zombies.
            ``None``: the connection's ``alert_urls``. Pair it with
            :class:`~airflow_provider.notifications.FaultkitNotifier` callbacks for failures
            that are reported; both deduplicate through the store into one alert.
        progress_interval: seconds between progress-pointer updates.
        fallback: when the last try fails on a failure the fallback covers (infrastructure
            by default), succeed instead with the newest output this task (same DAG, task
            and map index) recorded in an earlier DAG run, within ``max_age``: the XCom holds
            ``faultkit.Degraded.to_dict()`` (``faultkit.degraded``/``unwrap`` read it), a
            ``faultkit_degraded`` XCom holds the facts, the log says ``FAULTKIT DEGRADED``,
            and one ``degraded`` alert goes out. ``True``, a ``timedelta`` (the oldest output
            to serve) or :class:`faultkit.Fallback`.
        no_fallback: with ``fallback=``, what a last try that has no earlier output to serve
            does: ``"fail"`` (default) or ``"skip"`` (the task and, by the default trigger
            rule, what depends on it are skipped).
        **kwargs: passed to :class:`~airflow.providers.standard.operators.python.PythonOperator`.
    """

    template_fields: Sequence[str] = (*PythonOperator.template_fields, "store_url")
    ui_color = "#e8f4ea"

    def __init__(
        self,
        *,
        python_callable: Callable[..., Any],
        store_conn_id: str | None = None,
        store_url: str | None = None,
        retry: RetryPolicy | None = None,
        alerts: Sequence[str] | None = None,
        progress_interval: float = 5.0,
        fallback: Any = None,
        no_fallback: str = "fail",
        **kwargs: Any,
    ) -> None:
        if store_conn_id and store_url:
            raise ValueError(
                f"give store_conn_id ({store_conn_id!r}) or store_url, not both: the connection "
                "already names a store"
            )
        super().__init__(python_callable=python_callable, **apply_retry(retry, kwargs, keep=False))
        if not resumable.accepts_stage(python_callable):
            raise TypeError(
                f"{getattr(python_callable, '__name__', python_callable)!r} has no 'stage' "
                "parameter; add one (def fn(..., stage): ...) to receive the faultkit stage"
            )
        self.store_conn_id = None if store_url else (store_conn_id or "faultkit_default")
        self.store_url = store_url
        self.retry = retry
        self.alerts = list(alerts) if alerts is not None else None
        self.progress_interval = float(progress_interval)
        self.fallback = _degraded.as_fallback(fallback)
        if no_fallback not in ("fail", "skip"):
            raise ValueError(
                f"no_fallback={no_fallback!r}: 'fail' (the task fails, as without fallback=) "
                "or 'skip' (the task and what depends on it are skipped)"
            )
        self.no_fallback = no_fallback

    @classmethod
    def partial(cls, *, retry: RetryPolicy | None = None, **kwargs: Any) -> Any:  # type: ignore[override]
        """As ``BaseOperator.partial``, with ``retry=`` applied where the scheduler sees it.

        A mapped task is only instantiated on the worker, so the retry settings must be in
        the partial arguments for the scheduler to know how many tries it has.
        """
        return super().partial(**apply_retry(retry, kwargs))

    # -- helpers ---------------------------------------------------------------------------

    def get_store(self) -> CheckpointStore:
        """The checkpoint store (from the connection or ``store_url``)."""
        return resolve_store(self.store_conn_id, self.store_url)

    def _alert_urls(self) -> list[str]:
        if self.alerts is not None:
            return self.alerts
        if self.store_conn_id is None:
            return []
        from ..hooks import CheckpointHook

        try:
            return CheckpointHook(self.store_conn_id).alert_urls()
        except Exception:  # the store was opened already; a bad extra must not fail the task
            log.warning("could not read alert_urls of connection %r", self.store_conn_id)
            return []

    def _alerter(self, store: CheckpointStore) -> Any:
        urls = self._alert_urls()
        if not urls:
            return None
        from faultkit import Alerter

        return Alerter(urls, store=store)

    def _report_previous_try(self, stage: Stage, ti: Any, tss: Any, alerter: Any) -> None:
        """Alert once if the previous try vanished mid-stage (killed, node lost)."""
        prev = tss.get(POINTER) if tss is not None else None
        if isinstance(prev, dict) and prev.get("status") == "done":
            return  # the task was cleared after it succeeded: nothing was lost
        info = stage.resume_info
        p = {
            "epoch": stage.epoch,
            "units_done": info.get("units_done", 0),
            "last_step": info.get("last_step"),
            "seconds_since_last_commit": info.get("seconds_since_last_commit"),
        }
        cause = (
            f"raised {prev['error']}"
            if isinstance(prev, dict) and prev.get("error")
            else "stopped without reporting (its process or worker was lost)"
        )
        alerter.post(
            incident_event(
                dag_id=ti.dag_id,
                run_id=ti.run_id,
                task_id=ti.task_id,
                map_index=ti.map_index,
                try_number=max(1, ti.try_number - 1),
                max_tries=getattr(ti, "max_tries", None),
                will_retry=True,
                cause=cause,
                progress_now=p,
                next_step=f"try {ti.try_number} resumed at epoch {stage.epoch} from the last "
                "commit; committed units are not redone",
            )
        )

    # -- execution ---------------------------------------------------------------------------

    def execute(self, context: Context) -> Any:
        ti = context["ti"]
        key = ti_stage_key(ti)
        store = self.get_store()
        tss = context.get("task_state_store")
        pointer = _Pointer(tss, {"key": key, "try_number": ti.try_number}, self.progress_interval)
        alerter = self._alerter(store)
        stages: list[Stage] = []

        def on_stage(stage: Stage) -> None:
            stages.append(stage)
            if alerter is not None and stage.resumed:
                self._report_previous_try(stage, ti, tss, alerter)
            if stage.resumed:
                self.log.info(
                    "faultkit stage %s: epoch %d, resuming (%s)",
                    key,
                    stage.epoch,
                    dict(stage.resume_info),
                )
            else:  # a first try's claim is written with its first commit
                self.log.info("faultkit stage %s: claimed, nothing to resume", key)

        def body(*, stage: Stage) -> Any:
            self.op_kwargs = {**self.op_kwargs, "stage": stage}
            return PythonOperator.execute(self, context)

        unsubscribe = None
        if alerter is not None:

            def forward(event: Event) -> None:
                if event.kind in _FORWARD and event.key == key:
                    alerter.post(event)

            unsubscribe = subscribe(forward)

        def on_degraded(served: _degraded.Degraded[Any]) -> Any:
            self.log.warning(
                "FAULTKIT DEGRADED: %s gave up (%s); serving the output of %s (%s old)",
                key,
                served.reason,
                served.source_key,
                served.age,
            )
            out = served.to_dict()
            ti.xcom_push(key=_degraded.MARK, value=out[_degraded.MARK])
            return out

        max_tries = getattr(ti, "max_tries", None)
        out_of_tries = ti.try_number > (self.retries if max_tries is None else max_tries)
        policy = getattr(self, "retry_policy", None)

        def last_try(exc: BaseException) -> bool:
            """Airflow will not retry: tries spent, or the retry policy fails this one."""
            if out_of_tries or not isinstance(policy, FaultkitRetryPolicy):
                return out_of_tries
            return not policy.would_retry(exc, ti.try_number, context)

        try:
            result = resumable.call(
                body,
                store=store,
                key=key,
                on_stage=on_stage,
                make_stage=lambda st, k: _TrackedStage(st, k, pointer),
                first_try=ti.try_number <= 1,
                logger=self.log,
                fallback=self.fallback,
                lineage=fk_key("airflow", ti.dag_id, ti.task_id, str(ti.map_index)),
                last_try=last_try,
                on_degraded=on_degraded,
            )
        except BaseException as exc:
            if stages:
                pointer.finish(stages[0], "failed", error=type(exc).__name__)
            fb = self.fallback
            if (
                fb is not None
                and self.no_fallback == "skip"
                and isinstance(exc, Exception)
                and not isinstance(exc, StaleAttemptError)  # a newer try owns the stage
                and fb.covers(exc)
                and last_try(exc)
            ):
                from airflow.sdk.exceptions import AirflowSkipException

                raise AirflowSkipException(
                    f"{key} gave up ({type(exc).__name__}: {exc}) and no earlier output "
                    "could be served: skipped, with what depends on it (no_fallback='skip')"
                ) from exc
            raise
        finally:
            if unsubscribe is not None:
                unsubscribe()
            if alerter is not None:  # sent in the background; delivered before the try ends
                alerter.flush(30.0)
        if stages:
            pointer.finish(stages[0], "done")
        else:
            self.log.info(
                "faultkit stage %s finished in an earlier try; its result is returned", key
            )
        return result
