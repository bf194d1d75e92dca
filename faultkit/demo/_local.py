"""The ``local`` engine: each stage runs in a child process that faultkit.chaos SIGKILLs.

The demo itself plays the orchestrator: it notices the SIGKILL, reports ``worker_lost``
and starts the next attempt at once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from .. import chaos
from .._events import Event
from ._jobs import etl_job, journal_count, train_job
from ._model import DemoConfig, StageOutcome

__all__ = ["run_local"]


def _ready_after(journal: str, prefix: str) -> Callable[[], bool]:
    """True once the attempt now running has started some new work."""
    state = {"base": journal_count(journal, prefix)}

    def ready() -> bool:
        n = journal_count(journal, prefix)
        if n > state["base"]:
            state["base"] = n + 1
            return True
        return False

    return ready


def _stage(
    cfg: DemoConfig,
    name: str,
    fn: Any,
    args: tuple,
    journal: str,
    prefix: str,
    alert: Callable[[Event], object],
    seed: int,
    max_delay: float,
    log: Callable[[str], None],
) -> tuple[StageOutcome, Any]:
    out = StageOutcome(name)
    t_start = time.monotonic()

    def on_kill(attempt: int, seconds: float) -> None:
        t = time.monotonic() - t_start
        out.timeline.append({"t": round(t, 3), "event": "kill", "detail": f"attempt {attempt}"})
        log(f"{name}: worker process of attempt {attempt} SIGKILLed after {seconds:.1f} s")
        alert(
            Event(
                "worker_lost",
                f"demo/{name}",
                f"the worker running {name} (attempt {attempt}) was SIGKILLed; "
                "the stage is retried and resumes from its last commit",
                {"attempt": attempt, "engine": "local"},
                dedupe_key=str(attempt),
            )
        )

    report = chaos.run_with_kills(
        fn,
        *args,
        kills=cfg.kills,
        seed=seed,
        ready=_ready_after(journal, prefix),
        max_delay=max_delay,
        on_kill=on_kill,
        timeout=900,
    )
    out.kills = report.kills
    out.attempts = len(report.attempts)
    out.seconds = time.monotonic() - t_start
    t = 0.0
    for i, a in enumerate(report.attempts, 1):
        out.timeline.append(
            {
                "t": round(t, 3),
                "event": "attempt",
                "detail": f"attempt {i}",
                "end": round(t + a.seconds, 3),
                "killed": a.killed,
            }
        )
        t += a.seconds
    return out, report.result


def run_local(
    cfg: DemoConfig, alert: Callable[[Event], object], log: Callable[[str], None]
) -> dict[str, Any]:
    """Run both stages with kills; returns outcomes plus what verification needs."""
    etl_journal = os.path.join(cfg.work_dir, "etl.journal")
    train_journal = os.path.join(cfg.work_dir, "train.journal")
    etl, _ = _stage(
        cfg,
        "etl",
        etl_job,
        (
            cfg.store_url,
            cfg.sink_url,
            list(range(cfg.partitions)),
            cfg.rows,
            cfg.chunk,
            cfg.unit_delay,
            etl_journal,
            cfg.seed,
        ),
        etl_journal,
        "etl ",
        alert,
        cfg.seed,
        0.6,
        log,
    )
    etl.units_total = cfg.partitions * ((cfg.rows + cfg.chunk - 1) // cfg.chunk)
    etl.units_redone = journal_count(etl_journal, "etl ") - etl.units_total
    train, digest = _stage(
        cfg,
        "train",
        train_job,
        (cfg.store_url, cfg.steps, cfg.every_steps, cfg.seed, cfg.step_delay, train_journal),
        train_journal,
        "step ",
        alert,
        cfg.seed + 1,
        0.6,
        log,
    )
    train.units_total = cfg.steps
    train.units_redone = journal_count(train_journal, "step ") - cfg.steps
    return {"etl": etl, "train": train, "digest": digest}
