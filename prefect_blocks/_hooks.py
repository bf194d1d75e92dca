"""State hooks that turn Prefect run states into faultkit alerts.

Every alert about a flow run uses the key ``prefect/<flow>/<flow run id>`` (the prefix of the
run's stage keys) and a dedupe key that the
different senders compute the same way, so the ``Alerter``'s store delivers it once: a lost
worker is reported by the runner's ``on_crashed`` hook *and* by the re-run's ``on_running``
hook (the only one left when the runner died too), and the receiver sees one alert.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from faultkit._incident import incident, progress_under

from ._ephemeral import guard as _guard_server
from ._refs import AlertRef, PolicyRef, StoreRef

__all__ = ["alert_hooks", "crash_budget", "task_failure_hook"]

log = logging.getLogger("faultkit.prefect")

_SETTLED = frozenset({"COMPLETED", "FAILED", "CANCELLED", "CRASHED"})


def crash_budget(policy: Any) -> int:
    """Total runs of a crashed flow run, the first included.

    The policy's own ``budget("infrastructure")`` (``infra_attempts``, else ``attempts``,
    capped inside :func:`faultkit.retry_test_mode`), so the budget is the same everywhere.

    Args:
        policy: a ``faultkit.RetryPolicy``, a ``RetryPolicyBlock`` or its name (loaded now).
    """
    from faultkit._classify import INFRASTRUCTURE

    ref = PolicyRef.of(policy)
    if ref is None:
        raise TypeError("crash_budget needs a RetryPolicy, a RetryPolicyBlock or its name")
    return ref.get().budget(INFRASTRUCTURE)


def _flow_run_key(flow_name: str, flow_run: Any) -> str:
    """The flow run's place in the store: its stages' keys start with it."""
    from faultkit import key

    return key("prefect", flow_name, str(flow_run.id))


def _store(ref: AlertRef) -> Any:
    """The store the alerts deduplicate through (also where the run's stages are), or None."""
    try:
        return ref.store.get() if ref.store is not None else None
    except Exception:  # the alert must still go out
        log.warning("could not open the store to report the run's progress")
        return None


def _history(flow_run_id: Any) -> tuple[int, list[Any]]:
    """(current run count, states oldest first) of a flow run, read from the API."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        fr = client.read_flow_run(flow_run_id)
        states = client.read_flow_run_states(flow_run_id)
    states.sort(key=lambda s: s.timestamp)
    return int(fr.run_count or 0), states


def _send(alerts: AlertRef, event: Any) -> None:
    try:
        alerts.get().send(event)
    except Exception:  # an alert channel must never change the run's outcome
        log.exception("could not send the %s alert for %s", event.kind, event.key)


def alert_hooks(
    alerts: Any, *, store: Any = None, retry: Any = None
) -> dict[str, list[Callable[..., None]]]:
    """Flow state hooks that send faultkit alerts: ``@flow(**alert_hooks(...))``.

    - ``on_crashed`` (run by the runner or worker that saw the flow-run process die):
      ``worker_lost`` while the crash-retry budget lasts, ``gave_up`` once it is spent.
    - ``on_running``: when a run starts again after a crash, the same ``worker_lost`` alert
      (deduplicated, so it is delivered once even when both hooks send it).
    - ``on_failure``: ``gave_up``.

    Args:
        alerts: Apprise URLs, an ``AlertBlock`` or its name, or a ``faultkit.Alerter``.
        store: a store URL, ``CheckpointStoreBlock`` (or name) or ``CheckpointStore`` used to
            deliver each alert once across processes; strongly advised.
        retry: the ``RetryPolicy`` (or ``RetryPolicyBlock``/name) given to
            :func:`setup_crash_retry`, so the alerts can say whether a re-run follows.

    Nothing is loaded here: block names are loaded each time a hook fires, so importing the
    flow's module needs no Prefect API.

    Returns:
        ``{"on_crashed": [...], "on_running": [...], "on_failure": [...]}``.
    """
    ref = AlertRef(alerts, StoreRef.of(store) if store is not None else None)
    policy = PolicyRef.of(retry)
    budget_of: Callable[[], int | None] = (
        (lambda: crash_budget(policy)) if policy is not None else (lambda: None)
    )

    def on_crashed(flow: Any, flow_run: Any, state: Any) -> None:
        from faultkit import Event

        try:
            run_count, states = _history(flow_run.id)
        except Exception:
            log.exception("could not read the history of flow run %s", flow_run.id)
            return
        crashes = sum(1 for s in states if s.type.value == "CRASHED")
        budget = budget_of()
        details = {
            "flow": flow.name,
            "flow_run": str(flow_run.id),
            "flow_run_name": flow_run.name,
            "run_count": run_count,
            "crashes": crashes,
            "budget": budget,
            "state_message": getattr(state, "message", None),
        }
        if budget is not None and run_count >= budget:
            _send(
                ref,
                Event(
                    "gave_up",
                    _flow_run_key(flow.name, flow_run),
                    f"flow run {flow_run.name!r} of {flow.name!r} crashed on run {run_count} of "
                    f"{budget}; no runs are left, so it stays Crashed. Re-run it by hand: "
                    "finished work is skipped.",
                    details,
                    dedupe_key=f"crash-{crashes}",
                ),
            )
            return
        _send(ref, _worker_lost(flow.name, flow_run, crashes, budget, details, _store(ref)))

    def on_running(flow: Any, flow_run: Any, state: Any) -> None:
        _guard_server()
        try:
            run_count, states = _history(flow_run.id)
        except Exception:
            log.exception("could not read the history of flow run %s", flow_run.id)
            return
        settled = [s for s in states if s.type.value in _SETTLED]
        if not settled or settled[-1].type.value != "CRASHED":
            return
        crashes = sum(1 for s in settled if s.type.value == "CRASHED")
        details = {
            "flow": flow.name,
            "flow_run": str(flow_run.id),
            "flow_run_name": flow_run.name,
            "run_count": run_count,
            "crashes": crashes,
            "budget": budget_of(),
            "state_message": settled[-1].message,
        }
        _send(
            ref,
            _worker_lost(flow.name, flow_run, crashes, details["budget"], details, _store(ref)),
        )

    def on_failure(flow: Any, flow_run: Any, state: Any) -> None:
        from faultkit import Event

        _send(
            ref,
            Event(
                "gave_up",
                _flow_run_key(flow.name, flow_run),
                f"flow run {flow_run.name!r} of {flow.name!r} failed: "
                f"{getattr(state, 'message', '')}",
                {"flow": flow.name, "flow_run": str(flow_run.id), "flow_run_name": flow_run.name},
                dedupe_key="failed",
            ),
        )

    return {"on_crashed": [on_crashed], "on_running": [on_running], "on_failure": [on_failure]}


def _worker_lost(
    flow_name: str,
    flow_run: Any,
    crashes: int,
    budget: int | None,
    details: Any,
    store: Any = None,
) -> Any:
    left = "" if budget is None else f" (crash {crashes}; up to {budget} runs in all)"
    prefix = _flow_run_key(flow_name, flow_run)
    return incident(
        "worker_lost",
        prefix,
        subject=f"flow run {flow_run.name!r} of {flow_name!r}",
        cause=f"lost its worker and crashed{left}",
        next_step="it is re-run and resumes from its checkpoints; finished units are not redone",
        progress_now=progress_under(store, prefix),
        dedupe_key=f"crash-{crashes}",
        details=details,
    )


def task_failure_hook(alerts: AlertRef) -> Callable[..., None]:
    """A task ``on_failure`` hook that sends ``gave_up`` for the failed task run."""

    def on_failure(task: Any, task_run: Any, state: Any) -> None:
        from faultkit import Event, key

        _send(
            alerts,
            Event(
                "gave_up",
                key("prefect", "task-run", str(task_run.id)),
                f"task run {task_run.name!r} failed after {task_run.run_count} run(s): "
                f"{getattr(state, 'message', '')}",
                {
                    "task": task.name,
                    "task_run": str(task_run.id),
                    "flow_run": str(task_run.flow_run_id),
                    "run_count": task_run.run_count,
                },
            ),
        )

    return on_failure
