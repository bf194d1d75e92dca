"""Overhead of ``resumable_task`` (file store) against a plain ``@task``: 500 tasks, one flow.

Run: ``.venv/bin/python bench/bench_prefect.py [--tasks 500] [--rounds 3]``. The two flows,
plain ``@task`` and ``resumable_task`` on a default (durable) file store, take turns in ABBA
order. Each timed flow runs on a fresh temporary Prefect server after a 20-task warm-up, once
the server process is idle: the server's database grows with every run, and it works through a
run's events for a while afterwards (about 20 s of a full core after 500 tasks on 2 cores), so
neither may favour the flow that happens to run first. The best run of each is compared; the
target is at most 1.10. Each resumable task claims its stage, commits one unit and records its
result.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from typing import Any


def main(tasks: int = 500, rounds: int = 3) -> dict[str, Any]:
    """Time both flows; print and return ``{"plain_s", "resumable_s", "ratio", ...}``."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect import flow, task
    from prefect.testing.utilities import prefect_test_harness

    from prefect_blocks import resumable_task

    logging.getLogger("prefect").setLevel(logging.WARNING)
    root = tempfile.mkdtemp(prefix="faultkit-bench-prefect-")

    @task
    def plain(i: int) -> int:
        return i * 2

    def make_resumable(url: str) -> Any:
        @resumable_task(store=url, name="resumable")
        def resumable(i: int, stage: Any) -> int:
            stage.done(0)
            return i * 2

        return resumable

    def run(t: Any, n: int, tag: str, server: Any) -> tuple[float, float]:
        @flow(name=f"bench-{tag}")
        def many(n: int, run: str) -> int:
            return sum(f.result() for f in t.map(list(range(n))))

        _wait_idle(server)
        t0, c0 = time.perf_counter(), time.process_time()
        assert many(n, tag) == n * (n - 1)
        return time.perf_counter() - t0, time.process_time() - c0

    def measure(which: str, r: int) -> tuple[float, float]:
        """One timed flow on a fresh server (its database grows with every run, and a
        later run on a bigger database is slower), after a small warm-up flow."""
        if which == "plain":
            t, warm = plain, plain
        else:
            # A fresh store each time: every task claims, commits and records.
            t = make_resumable(f"file://{root}/{which}{r}")
            warm = make_resumable(f"file://{root}/warm-{which}{r}")
        with prefect_test_harness(server_startup_timeout=120):
            server = _server_process()
            run(warm, 20, f"warm-{which}", server)
            return run(t, tasks, which, server)

    runs: dict[str, list[tuple[float, float]]] = {"plain": [], "res": []}
    try:
        for r in range(rounds):
            for which in ("plain", "res") if r % 2 == 0 else ("res", "plain"):
                runs[which].append(measure(which, r))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    # Best wall time and best CPU time of each, taken separately.
    best_plain = tuple(map(min, zip(*runs["plain"], strict=True)))
    best_res = tuple(map(min, zip(*runs["res"], strict=True)))
    out = {
        "tasks": tasks,
        "plain_s": round(best_plain[0], 3),
        "resumable_s": round(best_res[0], 3),
        "ratio": round(best_res[0] / best_plain[0], 3),
        "plain_cpu_s": round(best_plain[1], 3),
        "resumable_cpu_s": round(best_res[1], 3),
        "cpu_ratio": round(best_res[1] / best_plain[1], 3),
        "target": 1.10,
        "plain_runs_s": [round(w, 2) for w, _ in runs["plain"]],
        "resumable_runs_s": [round(w, 2) for w, _ in runs["res"]],
    }
    print(
        f"{tasks} tasks in one flow: plain @task {out['plain_s']} s, resumable_task (file "
        f"store) {out['resumable_s']} s -> wall ratio {out['ratio']} (target <= 1.10); "
        f"CPU of the flow process {out['plain_cpu_s']} s vs {out['resumable_cpu_s']} s -> "
        f"{out['cpu_ratio']}; every run (s): plain {out['plain_runs_s']}, resumable "
        f"{out['resumable_runs_s']}"
    )
    return out


def _server_process() -> Any:
    """The harness's server process (psutil), to watch its CPU use."""
    import psutil
    from prefect.server.api.server import SubprocessASGIServer

    proc = SubprocessASGIServer._instances[None].server_process
    return psutil.Process(proc.pid)


def _wait_idle(proc: Any, busy: float = 0.05, window: float = 1.0, deadline: float = 240) -> None:
    """Block until ``proc`` used under ``busy`` of a core over ``window`` seconds."""
    end = time.monotonic() + deadline
    last = sum(proc.cpu_times()[:2])
    while time.monotonic() < end:
        time.sleep(window)
        now = sum(proc.cpu_times()[:2])
        if now - last < busy * window:
            return
        last = now
    print(f"warning: the Prefect server was still busy after {deadline} s; timing anyway")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    main(a.tasks, a.rounds)
