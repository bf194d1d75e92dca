"""``faultkit demo --engine prefect``: the example flows served by a real Prefect server,
flow-run processes SIGKILLed while they work (see :mod:`faultkit.testing` for the stack)."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..testing import PrefectStack, units_done, wait_until
from ._etl import TABLE

if TYPE_CHECKING:
    from .._events import Event
    from .._store import CheckpointStore
    from ._model import DemoConfig, StageOutcome

__all__ = ["run_demo"]


def _attempts(states: list[Any], w0: float) -> list[dict[str, Any]]:
    """One timeline entry per run of the flow run: from Running to the state that ended it."""
    out: list[dict[str, Any]] = []
    start: float | None = None
    for s in states:
        t = s.timestamp.timestamp() - w0
        kind = s.type.value
        if kind == "RUNNING":
            start = t
        elif start is not None and kind in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            out.append(
                {
                    "t": round(start, 3),
                    "event": "attempt",
                    "detail": f"run {len(out) + 1} ({kind.lower()})",
                    "end": round(t, 3),
                    "killed": kind == "CRASHED",
                }
            )
            start = None
    return out


def _progress(store: CheckpointStore, prefix: str, stage: str) -> int:
    """What the stage had made durable: units done (ETL) or the newest checkpoint step."""
    if stage == "etl":
        return sum(units_done(store, prefix).values())
    steps = [r.step for k in store.keys(prefix) for r in store.read_view(k).live_snaps()]
    return max(steps, default=0)


def _run_stage(
    stack: PrefectStack,
    cfg: DemoConfig,
    name: str,
    deployment: str,
    params: dict[str, Any],
    journal: str,
    prefix: str,
    units_total: int,
    seed: int,
    log: Callable[[str], None],
    timeout: float = 600.0,
) -> tuple[StageOutcome, str]:
    """Run one deployment to completion, SIGKILLing its flow-run process ``cfg.kills`` times.

    A kill comes after a random number of newly started units (seeded), so it always lands
    while the run works; it counts when the runner saw exit code -9 (the Crashed state says
    so). The crash-retry automation re-runs the flow run, which resumes from its stages.
    """
    import random

    from .._store import CheckpointStore
    from ._jobs import journal_count
    from ._model import StageOutcome

    store = CheckpointStore(cfg.store_url)
    store_prefix = f"prefect/faultkit-{name}"
    rnd = random.Random(seed)
    out = StageOutcome(name)
    t0, w0 = time.monotonic(), time.time()
    deadline = t0 + timeout
    run_id = stack.run(deployment, params)
    span = max(1, units_total // (cfg.kills + 1) // 2)

    def left() -> float:
        return max(1.0, deadline - time.monotonic())

    def settled() -> bool:
        st = stack.flow_run(run_id).state
        return st is not None and st.type.value in ("COMPLETED", "FAILED", "CANCELLED")

    # Poll the journal fast (a unit takes tens of ms) and the server only now and then.
    polls = {"n": 0}
    for i in range(cfg.kills):
        want = journal_count(journal, prefix) + rnd.randint(1, span)

        def working(want: int = want) -> bool:
            if journal_count(journal, prefix) >= want:
                return True
            polls["n"] += 1
            if polls["n"] % 50 == 0 and settled():
                raise _Finished
            return False

        try:
            wait_until(working, left(), f"{name} run {run_id} to start more work", interval=0.01)
        except _Finished:
            log(f"{name}: the run finished before kill {i + 1} could land")
            break
        crashes = stack.state_types(run_id).count("CRASHED")
        at = _progress(store, store_prefix, name)
        pid = stack.kill_flow_run()
        t_kill = time.monotonic()
        if pid is None:
            log(f"{name}: no flow-run process to kill (kill {i + 1}); it had just finished")
            break

        def crashed(crashes: int = crashes) -> bool:
            return stack.state_types(run_id).count("CRASHED") > crashes

        wait_until(crashed, min(120.0, left()), f"{name} run {run_id} to be marked Crashed")
        state = [s for s in stack.states(run_id) if s.type.value == "CRASHED"][-1]
        if "-9" not in (state.message or ""):
            log(f"{name}: run crashed, but not from the SIGKILL: {state.message!r}")
            continue
        out.kills += 1
        out.resumed_from.append(at)
        out.timeline.append(
            {"t": round(t_kill - t0, 3), "event": "kill", "detail": f"flow-run pid {pid}"}
        )
        log(
            f"{name}: SIGKILLed the flow-run process (pid {pid}) of run {run_id} "
            f"(kill {i + 1}); Prefect marked it Crashed: {state.message!r}"
        )
        n = journal_count(journal, prefix)
        wait_until(
            lambda n=n: journal_count(journal, prefix) > n or settled(),
            min(180.0, left()),
            f"{name} run {run_id} to be re-run after the crash",
            interval=0.05,
        )
        out.recover_seconds.append(round(time.monotonic() - t_kill, 3))

    fr = stack.wait(run_id, "COMPLETED", timeout=left())
    out.seconds = time.monotonic() - t0
    out.attempts = int(fr.run_count or 1)
    out.units_total = units_total
    out.units_redone = journal_count(journal, prefix) - units_total
    out.timeline = sorted(_attempts(stack.states(run_id), w0) + out.timeline, key=lambda e: e["t"])
    result = ""
    if name == "train":
        (key,) = store.keys(store_prefix)
        from .._resumable import recorded

        result = recorded(store, key)[1]
    return out, result


class _Finished(Exception):
    """The flow run settled before the next kill."""


def run_demo(
    cfg: DemoConfig, alert: Callable[[Event], object], log: Callable[[str], None]
) -> dict[str, Any]:
    """The ``prefect`` engine of ``faultkit demo``: flow-run processes of a real server, SIGKILLed.

    A Prefect server (SQLite) and ``flows/serve.py`` run on loopback; the ETL and training
    deployments run with ``cfg``'s sizes. Each kill ends the flow-run process with SIGKILL;
    its runner marks the run Crashed, the crash-retry automation re-runs it and its resumable
    tasks resume. Alerts come from the flows' ``alert_hooks`` (one ``worker_lost`` per crash,
    deduplicated through the store), so ``alert`` is not used.
    """
    from .. import RetryPolicy

    workdir = Path(cfg.work_dir) / "prefect"
    etl_journal = os.path.join(cfg.work_dir, "etl.journal")
    train_journal = os.path.join(cfg.work_dir, "train.journal")
    policy = RetryPolicy(
        on=ConnectionError,
        attempts=3,
        infra_attempts=cfg.kills + 2,
        wait_initial=0.2,
        wait_jitter=0.0,
    )
    log("starting a Prefect server and serving flows/ (etl, train) ...")
    try:
        with PrefectStack(
            store_url=cfg.store_url,
            alert_urls=cfg.alert_urls,
            retry=policy,
            workdir=workdir,
            zombies=False,  # only flow-run processes die: their runner reports each crash
        ) as stack:
            log(f"Prefect server at {stack.api_url}; crash-retry budget {cfg.kills + 2} runs")
            etl, _ = _run_stage(
                stack,
                cfg,
                "etl",
                "faultkit-etl/etl",
                {
                    "sink_url": cfg.sink_url,
                    "partitions": cfg.partitions,
                    "rows": cfg.rows,
                    "chunk": cfg.chunk,
                    "seed": cfg.seed,
                    "unit_delay": cfg.unit_delay,
                    "journal": etl_journal,
                    "table": TABLE,
                },
                etl_journal,
                "etl ",
                cfg.partitions * -(-cfg.rows // cfg.chunk),
                cfg.seed,
                log,
            )
            train, digest = _run_stage(
                stack,
                cfg,
                "train",
                "faultkit-train/train",
                {
                    "steps": cfg.steps,
                    "every_steps": cfg.every_steps,
                    "seed": cfg.seed,
                    "step_delay": cfg.step_delay,
                    "journal": train_journal,
                },
                train_journal,
                "step ",
                cfg.steps,
                cfg.seed + 1,
                log,
            )
    except BaseException:
        _keep_logs(workdir, cfg.out)
        raise
    return {"etl": etl, "train": train, "digest": digest}


def _keep_logs(workdir: Path, out: str) -> None:
    """Copy the server's and runners' logs to ``out/prefect-logs`` (the work dir is removed)."""
    dest = Path(out) / "prefect-logs"
    with contextlib.suppress(OSError):
        dest.mkdir(parents=True, exist_ok=True)
        for f in workdir.glob("*.log"):
            shutil.copy(f, dest / f.name)
