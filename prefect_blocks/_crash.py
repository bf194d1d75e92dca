"""Crashed flow runs are re-run: two Prefect automations, created through the API.

How it works, on an open-source Prefect server (3.7 and later 3.x):

1. **Zombie detection.** A flow-run process sends a ``prefect.flow-run.heartbeat`` event every
   ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (at least 30). Set it in the environment of
   the runner or worker, or serve with ``prefect.serve(*deployments, heartbeat_seconds=30)``
   (``Flow.serve`` has no such argument in 3.7).
   A *proactive* automation expects, after each heartbeat, another heartbeat or a final state
   within ``heartbeat_grace`` seconds; when none comes (the process and its worker were
   SIGKILLed, the node vanished) it sets the run ``Crashed``. When only the flow-run process
   dies, its runner or worker sees the exit code and sets ``Crashed`` at once.
2. **Re-run.** A *reactive* automation on ``prefect.flow-run.Crashed`` whose
   ``prefect.run-count`` label is below the budget sets the same flow run to
   ``Scheduled``/``AwaitingRetry``; any runner or worker serving its deployment picks it up
   and runs it again. Its ``resumable_task`` stages resume: finished tasks return their
   recorded results, a half-done task skips its finished units.
3. **Budget.** ``RetryPolicy.infra_attempts`` (else ``attempts``) counts runs of the flow run,
   the first included; Prefect's ``run_count`` also counts the flow's own retries. Once spent,
   the run stays ``Crashed`` and :func:`alert_hooks` reports ``gave_up``.

On a **SQLite** Prefect server, the proactive (heartbeat) automation can stall re-runs of a
run that crashes more than once: its read-then-write transaction fails at once with
"database is locked" under concurrent writes, Prefect drops the event after four tries and
then holds back that run's later events for up to 15 minutes. Use PostgreSQL for the server,
or ``zombies=False`` when runners survive (they report a SIGKILLed flow-run process
themselves).

Only flow runs of deployments can be rescheduled (Prefect refuses ``Crashed -> Scheduled``
for a run without one). Alerts come from :func:`alert_hooks`, not from the automations, so
they are deduplicated through the checkpoint store like every other faultkit alert.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable
from typing import Any
from uuid import UUID

from ._hooks import crash_budget
from ._refs import policy_of

__all__ = ["RETRY_AUTOMATION", "ZOMBIE_AUTOMATION", "setup_crash_retry"]

ZOMBIE_AUTOMATION = "faultkit: mark flow runs without heartbeats crashed"
RETRY_AUTOMATION = "faultkit: re-run crashed flow runs"

# Events that end a heartbeat window without a crash.
_ALIVE = (
    "heartbeat",
    "Completed",
    "Failed",
    "Cancelled",
    "Cancelling",
    "Crashed",
    "Paused",
    "Suspended",
    "Scheduled",
    "AwaitingRetry",
)
MIN_HEARTBEAT = 30  # prefect.flow_engine.MINIMUM_HEARTBEAT_INTERVAL in 3.7


def _deployment_ids(client: Any, deployments: Iterable[Any]) -> list[str]:
    out = []
    for d in deployments:
        if isinstance(d, UUID):
            out.append(str(d))
        elif isinstance(d, str) and "/" in d:
            out.append(str(client.read_deployment_by_name(d).id))
        elif isinstance(d, str):
            out.append(str(UUID(d)))
        else:
            out.append(str(d.id))  # a Deployment / RunnerDeployment-like object
    return out


def _replace(client: Any, automation: Any) -> UUID:
    """Create ``automation`` or update the one of the same name in place (idempotent).

    Updating in place, rather than delete-and-create, leaves no moment without the
    automation, so a crash reported while a second runner starts up is not missed.
    """
    existing = client.read_automations_by_name(automation.name)
    if not existing:
        return client.create_automation(automation)
    keep, *extra = existing
    for old in extra:
        client.delete_automation(old.id)
    client.update_automation(keep.id, automation)
    return keep.id


def setup_crash_retry(
    retry: Any = None,
    *,
    attempts: int | None = None,
    deployments: Iterable[Any] | None = None,
    heartbeat_grace: float = 90.0,
    zombies: bool = True,
    suffix: str = "",
) -> dict[str, UUID]:
    """Create (or replace) the automations that mark lost runs Crashed and re-run them.

    Args:
        retry: a ``faultkit.RetryPolicy``, ``RetryPolicyBlock`` or its name; the budget is its
            ``infra_attempts`` (else ``attempts``): total runs, the first included.
        attempts: the budget, when no ``retry`` is given.
        deployments: deployment ids, ``"flow/deployment"`` names or deployment objects to
            cover; None covers every deployment.
        heartbeat_grace: seconds without a heartbeat after which a running flow run is
            declared Crashed; must exceed the heartbeat frequency (30 s at least).
        zombies: also create the heartbeat (zombie) automation.
        suffix: appended to the automation names, to keep several setups apart.

    Returns:
        ``{"retry": id, "zombies": id}`` (``"zombies"`` only when created).

    Raises:
        ValueError: no budget given, or a grace not above the minimum heartbeat interval.
    """
    from prefect import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    policy = policy_of(retry)
    if policy is not None:
        budget = crash_budget(policy)
    elif attempts is not None:
        budget = max(1, int(attempts))
    else:
        raise ValueError("setup_crash_retry needs retry= (a RetryPolicy) or attempts=")
    if heartbeat_grace <= MIN_HEARTBEAT:
        raise ValueError(
            f"heartbeat_grace={heartbeat_grace!r} s is not above Prefect's minimum heartbeat "
            f"interval ({MIN_HEARTBEAT} s): live runs would be declared crashed; use e.g. 90"
        )
    out: dict[str, UUID] = {}
    with get_client(sync_client=True) as client:
        related: dict[str, Any] = {}
        if deployments is not None:
            ids = _deployment_ids(client, deployments)
            related = {
                "prefect.resource.role": "deployment",
                "prefect.resource.id": [f"prefect.deployment.{i}" for i in ids],
            }
        out["retry"] = _replace(
            client,
            AutomationCore(
                name=RETRY_AUTOMATION + suffix,
                description=(
                    f"Re-runs a crashed flow run (its worker was lost) up to {budget} runs in "
                    "all; faultkit resumable tasks resume from their checkpoints."
                ),
                trigger=EventTrigger(
                    expect={"prefect.flow-run.Crashed"},
                    match={
                        "prefect.resource.id": "prefect.flow-run.*",
                        "prefect.run-count": [str(i) for i in range(budget)],
                    },
                    match_related=related,
                    for_each={"prefect.resource.id"},
                    posture=Posture.Reactive,
                    threshold=1,
                    within=_dt.timedelta(0),
                ),
                actions=[
                    ChangeFlowRunState(
                        state=StateType.SCHEDULED,
                        name="AwaitingRetry",
                        message=(
                            f"faultkit: the run crashed (worker lost); re-running it, up to "
                            f"{budget} runs in all"
                        ),
                    )
                ],
            ),
        )
        if zombies:
            out["zombies"] = _replace(
                client,
                AutomationCore(
                    name=ZOMBIE_AUTOMATION + suffix,
                    description=(
                        f"Marks a running flow run Crashed when no heartbeat came for "
                        f"{heartbeat_grace:g} s (its process and worker are gone)."
                    ),
                    trigger=EventTrigger(
                        after={"prefect.flow-run.heartbeat"},
                        expect={f"prefect.flow-run.{e}" for e in _ALIVE},
                        match={"prefect.resource.id": "prefect.flow-run.*"},
                        match_related=related,
                        for_each={"prefect.resource.id"},
                        posture=Posture.Proactive,
                        threshold=1,
                        within=_dt.timedelta(seconds=heartbeat_grace),
                    ),
                    actions=[
                        ChangeFlowRunState(
                            state=StateType.CRASHED,
                            message=(
                                f"faultkit: no heartbeat for {heartbeat_grace:g} s; the flow "
                                "run's process is gone"
                            ),
                        )
                    ],
                ),
            )
    return out
