"""``faultkit demo --engine airflow``: the example DAGs on a real local deployment, task
processes SIGKILLed mid-unit (see :mod:`faultkit.testing` for the deployment)."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .._events import Event
from ..testing._airflow import TERMINAL, AirflowEnv, airflow_env, kill_task_process
from ._etl import TABLE
from ._model import DemoConfig, StageOutcome

__all__ = ["run_demo"]


def _journal_lines(path: str) -> list[list[str]]:
    try:
        with open(path) as f:
            return [line.split() for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


def _utc(value: Any) -> float | None:
    """Epoch seconds of a DB timestamp (a datetime, or SQLite's text form)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def _tries(af: AirflowEnv, run_id: str, task_id: str) -> list[dict[str, Any]]:
    """Every try of ``task_id`` in the run: earlier ones from the history table, then the last."""
    cols = "map_index, try_number, state, start_date, end_date"
    rows = af.query(
        f"SELECT {cols} FROM task_instance_history WHERE run_id = :r AND task_id = :t "
        f"UNION ALL SELECT {cols} FROM task_instance WHERE run_id = :r AND task_id = :t",
        r=run_id,
        t=task_id,
    )
    return sorted(rows, key=lambda r: (r["map_index"], r["try_number"]))


class _Killer:
    """Watches a stage's journal and SIGKILLs the process doing a unit, ``kills`` times.

    Journal lines end with the pid of the task process that started the unit, so a kill
    lands within milliseconds of the line appearing. A kill waits for a seeded number of new
    units in ``gap`` after the previous one, and never targets a unit that is the last of its
    task (the task could finish before the signal arrives).
    """

    def __init__(
        self,
        out: StageOutcome,
        journal: str,
        kills: int,
        seed: int,
        t0: float,
        gap: tuple[int, int],
        last_unit: Callable[[list[str]], bool],
        label: Callable[[list[str]], str],
        log: Callable[[str], None],
    ) -> None:
        self.out, self.journal, self.kills, self.t0, self.gap = out, journal, kills, t0, gap
        self.last_unit, self.label, self.log = last_unit, label, log
        self.rnd = random.Random(seed)
        self.target = self.rnd.randint(*gap)
        self.killed: set[int] = set()
        # (task label, pid, kill time, journal length then) of kills whose retry has not
        # started a unit yet: that first unit ends the recovery.
        self.recovering: list[tuple[str, int, float, int]] = []

    def poll(self) -> None:
        lines = _journal_lines(self.journal)
        for rec in list(self.recovering):
            lab, dead, t_kill, n = rec
            if any(self.label(ln) == lab and int(ln[-1]) != dead for ln in lines[n:]):
                self.out.recover_seconds.append(round(time.monotonic() - t_kill, 3))
                self.recovering.remove(rec)
        if self.out.kills >= self.kills or len(lines) < self.target:
            return
        line = lines[-1]
        pid = int(line[-1])
        if pid in self.killed or self.last_unit(line):
            return
        if kill_task_process(pid):
            t = time.monotonic()
            self.out.kills += 1
            self.killed.add(pid)
            self.recovering.append((self.label(line), pid, t, len(lines)))
            detail = f"{self.label(line)}: pid {pid} during {' '.join(line[:-1])}"
            self.out.timeline.append(
                {"t": round(t - self.t0, 3), "event": "kill", "detail": detail}
            )
            self.log(
                f"{self.out.name}: SIGKILLed task process {pid} of {detail.split(':')[0]} "
                f"(kill {self.out.kills} of {self.kills})"
            )
        self.target = len(lines) + self.rnd.randint(*self.gap)


def _run_stage(
    af: AirflowEnv,
    out: StageOutcome,
    dag_id: str,
    task_id: str,
    conf: dict[str, Any],
    killer_args: dict[str, Any],
    timeout: float,
) -> str:
    """Trigger ``dag_id``, kill its ``task_id`` processes while it runs; returns the run id."""
    af.wait_parsed(dag_id, timeout=240)
    t0, wall0 = time.monotonic(), time.time()
    killer = _Killer(out, conf["journal"], t0=t0, **killer_args)
    run_id = af.trigger(dag_id, conf)
    deadline = t0 + timeout
    next_state = 0.0
    while True:
        killer.poll()
        now = time.monotonic()
        if now >= next_state:
            af.check_alive()
            state = af.run_state(run_id)
            if state in TERMINAL:
                break
            next_state = now + 0.5
        if now > deadline:
            raise TimeoutError(
                f"DAG run {run_id!r} of {dag_id!r} still {state!r} after {timeout:.0f} s; "
                f"task instances: {af.task_instances(run_id)}"
            )
        time.sleep(0.005)
    out.seconds = time.monotonic() - t0
    if state != "success":
        raise RuntimeError(
            f"DAG run {run_id!r} of {dag_id!r} ended {state!r}; task instances: "
            f"{af.task_instances(run_id)}; task logs end:\n{af.task_logs(run_id)[-4000:]}"
        )
    tries = _tries(af, run_id, task_id)
    failed = sum(1 for t in tries if t["state"] != "success")
    if failed < out.kills:
        # A SIGKILL that reached a try which had already reported success ended nothing.
        af_log = f"{out.name}: {out.kills} SIGKILL(s) sent, {failed} try(s) ended by them"
        killer.log(af_log)
        out.kills = failed
    out.attempts = len(tries)
    for t in tries:
        start, end = _utc(t["start_date"]), _utc(t["end_date"])
        if start is None:
            continue
        idx = f"[{t['map_index']}]" if t["map_index"] >= 0 else ""
        out.timeline.append(
            {
                "t": round(max(0.0, start - wall0), 3),
                "event": "attempt",
                "detail": f"{task_id}{idx} try {t['try_number']}",
                "end": round((end if end is not None else time.time()) - wall0, 3),
                "killed": t["state"] != "success",
            }
        )
    out.timeline.sort(key=lambda e: e["t"])
    return run_id


def run_demo(
    cfg: DemoConfig, alert: Callable[[Event], object], log: Callable[[str], None]
) -> dict[str, Any]:
    """The ``airflow`` engine of ``faultkit demo``: the example DAGs on a real deployment.

    Starts scheduler, API server and DAG processor (LocalExecutor, SQLite) under
    ``cfg.work_dir``, runs ``faultkit_etl`` and ``faultkit_train`` with the demo's sizes and
    SIGKILLs their task processes ``cfg.kills`` times per stage; Airflow retries the tries
    and each resumes from its stage. Alerts come from the provider
    (:class:`~airflow_provider.notifications.FaultkitNotifier` and the resumed try, deduplicated
    through the store) on ``cfg.alert_urls``, so ``alert`` is not used.
    """
    del alert
    home = Path(cfg.work_dir) / "airflow"
    conn = {
        "conn_type": "faultkit",
        "extra": {"store_url": cfg.store_url, "alert_urls_secret": list(cfg.alert_urls)},
    }
    env = {
        "AIRFLOW_CONN_FAULTKIT_DEFAULT": json.dumps(conn),
        "AIRFLOW_VAR_FAULTKIT_SINK_URL": cfg.sink_url,
        "FAULTKIT_DEMO_RETRY_WAIT": "1",
        # Every kill may hit the same task instance: it needs a try more than that.
        "FAULTKIT_DEMO_ATTEMPTS": str(cfg.kills + 2),
    }
    etl_journal = str(Path(cfg.work_dir) / "etl.journal")
    train_journal = str(Path(cfg.work_dir) / "train.journal")
    units = (cfg.rows + cfg.chunk - 1) // cfg.chunk
    lo = cfg.every_steps + 1
    train_gap = (lo, max(lo, cfg.steps // (cfg.kills + 1)))
    log("airflow: migrating a fresh metadata DB and starting scheduler, API server, DAG processor")
    with airflow_env(home / "home", env=env) as af:
        log(f"airflow: API server on {af.api_url}")
        etl = StageOutcome("etl")
        _run_stage(
            af,
            etl,
            "faultkit_etl",
            "load",
            {
                "partitions": cfg.partitions,
                "rows": cfg.rows,
                "chunk": cfg.chunk,
                "seed": cfg.seed,
                "unit_delay": cfg.unit_delay,
                "table": TABLE,
                "journal": etl_journal,
            },
            {
                "kills": cfg.kills,
                "seed": cfg.seed,
                "log": log,
                "gap": (1, 4),
                "last_unit": lambda line: int(line[2]) >= units - 1,
                "label": lambda line: f"load[{line[1]}]",
            },
            timeout=900,
        )
        etl.units_total = cfg.partitions * units
        etl.units_redone = len(_journal_lines(etl_journal)) - etl.units_total

        train = StageOutcome("train")
        run_id = _run_stage(
            af,
            train,
            "faultkit_train",
            "train",
            {
                "steps": cfg.steps,
                "every_steps": cfg.every_steps,
                "seed": cfg.seed,
                "step_delay": cfg.step_delay,
                "verify": False,
                "journal": train_journal,
            },
            # Past a snapshot, so each retry has one to resume from.
            {
                "kills": cfg.kills,
                "seed": cfg.seed + 1,
                "log": log,
                "gap": train_gap,
                "last_unit": lambda line: int(line[1]) >= cfg.steps - 2,
                "label": lambda line: "train",
            },
            timeout=900,
        )
        train.units_total = cfg.steps
        train.units_redone = len(_journal_lines(train_journal)) - cfg.steps
        rows = af.query(
            "SELECT value FROM xcom WHERE run_id = :r AND task_id = 'train' "
            "AND key = 'return_value'",
            r=run_id,
        )
        digest = json.loads(rows[0]["value"]) if rows else ""
    return {"etl": etl, "train": train, "digest": digest}
