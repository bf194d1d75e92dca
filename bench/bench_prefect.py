"""Overhead of ``resumable_task`` (file store) against a plain ``@task``: 500 tasks, one flow.

Run: ``.venv/bin/python bench/bench_prefect.py [--tasks 500] [--rounds 3]``. Five flows take
turns in ABBA order: plain ``@task``; ``resumable_task`` on a default (durable) file store
whose body only returns (``res1``: the stage's folder, a read of its log, one durable record,
the result, carrying the claim); ``resumable_task`` whose body also commits one unit
(``res``: two durable records, the unit carrying the claim, then the result); and for each of
the two, its floor: a plain ``@task`` doing the same durable work by hand (makes the task's
folder and writes one or two small files, each fsync'd with its folder: the physical cost of
those records on this disk). Each timed flow runs on a fresh temporary Prefect server after a
20-task warm-up, once the server process is idle: the server's database grows with every
run, and it works through a run's events for a while afterwards (about 20 s of a full core
after 500 tasks on 2 cores), so no flow may favour the one that happens to run first.

Three measures, each as the median and range of the rounds' ratios (resumable / plain, and
resumable / its floor, of the same round), every run printed:

- the tasks' span: from the flow's first line to the last task's result, inside the flow.
  The headline: it leaves out the flow run's own start and end, which are the same for both
  and would dilute the ratio (the target is at most 1.10);
- the whole flow call, start to end (Prefect's flow-run teardown waits on one-second ticks,
  so this moves in steps of about a second);
- the CPU time of the flow's process over the whole call.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

if not __package__:  # run as a script: bench/ is on the path, not the folder above it
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import records_by_hand


def main(tasks: int = 500, rounds: int = 3) -> dict[str, Any]:
    """Time the five flows; print and return ``{"span", "wall", "cpu", "ratio", ...}``: each
    measure's runs per flow and its ratios (median, range); ``ratio`` is the headline, the
    tasks' span of a ``resumable_task`` that only returns over plain ``@task``
    (``ratio_unit``: the one that also commits a unit)."""
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

    def make_floor(folder: str, records: int) -> Any:
        @task(name="floor")
        def floor(i: int) -> int:
            # The same durable work without faultkit: a folder for the task, then small
            # records, each written, fsync'd and its folder fsync'd (the unit, the result).
            records_by_hand(os.path.join(folder, f"t-{i}"), (True,) * records)
            return i * 2

        return floor

    def make_resumable(url: str, unit: bool) -> Any:
        if unit:

            @resumable_task(store=url, name="resumable")
            def resumable(i: int, stage: Any) -> int:
                stage.done(0)
                return i * 2

            return resumable

        @resumable_task(store=url, name="resumable1")
        def resumable1(i: int, stage: Any) -> int:
            return i * 2

        return resumable1

    def run(t: Any, n: int, tag: str, server: Any) -> tuple[float, float, float]:
        span: list[float] = []

        @flow(name=f"bench-{tag}")
        def many(n: int, run: str) -> int:
            t1 = time.perf_counter()
            total = sum(f.result() for f in t.map(list(range(n))))
            span.append(time.perf_counter() - t1)
            return total

        _wait_idle(server)
        t0, c0 = time.perf_counter(), time.process_time()
        assert many(n, tag) == n * (n - 1)
        return span[0], time.perf_counter() - t0, time.process_time() - c0

    def measure(which: str, r: int) -> tuple[float, float, float]:
        """One timed flow on a fresh server (its database grows with every run, and a
        later run on a bigger database is slower), after a small warm-up flow."""
        if which == "plain":
            t, warm = plain, plain
        elif which.startswith("floor"):
            n = 1 if which == "floor1" else 2
            t = make_floor(os.path.join(root, f"{which}-{r}"), n)
            warm = make_floor(os.path.join(root, f"warm-{which}-{r}"), n)
        else:
            # A fresh store each time: every task claims, (commits) and records.
            t = make_resumable(f"file://{root}/{which}{r}", which == "res")
            warm = make_resumable(f"file://{root}/warm-{which}{r}", which == "res")
        with prefect_test_harness(server_startup_timeout=120):
            server = _server_process()
            run(warm, 20, f"warm-{which}", server)
            return run(t, tasks, which, server)

    order = ("plain", "floor1", "res1", "floor", "res")
    runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in order}
    try:
        for r in range(rounds):
            for which in order if r % 2 == 0 else order[::-1]:
                runs[which].append(measure(which, r))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out: dict[str, Any] = {"tasks": tasks, "target": 1.10}

    def ratios(i: int, top: str, bottom: str) -> dict[str, Any]:
        rs = [b[i] / a[i] for a, b in zip(runs[bottom], runs[top], strict=True)]
        return {
            "median": round(statistics.median(rs), 3),
            "range": [round(min(rs), 3), round(max(rs), 3)],
        }

    for i, what in enumerate(("span", "wall", "cpu")):
        out[what] = {k: [round(r[i], 3) for r in v] for k, v in runs.items()}
        for res, floor in (("res1", "floor1"), ("res", "floor")):
            out[what][f"{res}_vs_plain"] = ratios(i, res, "plain")
            out[what][f"{res}_vs_floor"] = ratios(i, res, floor)
            out[what][f"{floor}_vs_plain"] = ratios(i, floor, "plain")
    out["ratio"] = out["span"]["res1_vs_plain"]["median"]
    out["ratio_unit"] = out["span"]["res_vs_plain"]["median"]

    def mr(m: dict[str, Any], name: str) -> str:
        return f"{m[name]['median']} ({m[name]['range'][0]}-{m[name]['range'][1]})"

    for what, label in (
        ("span", "tasks' span (flow start to last result)"),
        ("wall", "whole flow call"),
        ("cpu", "CPU of the flow process"),
    ):
        m = out[what]
        print(f"{tasks} tasks, {label}: plain {m['plain']} s")
        for res, floor, body in (
            ("res1", "floor1", "returns only (one durable record)"),
            ("res", "floor", "commits a unit, then returns (two durable records)"),
        ):
            print(
                f"  body {body}: floor {m[floor]} s, resumable_task {m[res]} s -> "
                f"resumable/plain {mr(m, f'{res}_vs_plain')}"
                + (" (target <= 1.10)" if what == "span" else "")
                + f", resumable/floor {mr(m, f'{res}_vs_floor')}, "
                f"floor/plain {mr(m, f'{floor}_vs_plain')}"
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
