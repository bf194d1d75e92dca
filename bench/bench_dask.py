"""Dask adapter: the resumable wrapper's overhead, and how fast a killed task runs again.

1. 5,000 tiny tasks on a LocalCluster with two worker processes: ``client.map(fn)`` against
   ``client.map(resumable(fn))`` on ``memory://`` (each worker process has its own) and on
   ``file://``, and two plain tasks doing the same durable work by hand: the floor (a
   folder, one record fsync'd with its folder), and that work laid out and created as the
   ``file://`` store does (a second folder; the record linked into place whole). Targets:
   ``file://`` (a store that can resume) <= 1.25, ``memory://`` <= 1.05. The tasks run in
   batches of ``n / 5``, the variants taking turns in each batch in ABBA order; each ratio
   is the median, and the range, of the batches' ratios (this machine's noise is several
   per cent per batch).
2. SIGKILL the worker running a task; seconds until the task runs again on the other worker,
   plain against resumable (the start of ``fn``, after the stage is claimed). Target:
   resumable <= plain + 0.5 s.

``python -m bench dask`` (``BENCH_DASK_TASKS`` and ``BENCH_DASK_ROUNDS`` to change sizes).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import statistics
import tempfile
import time
import uuid
from typing import Any

from bench import records_by_hand
from dask_plugins import resumable
from faultkit.testing import journal_lines, wait_until


def tiny(x: int, tag: str) -> int:
    return x + 1


def tiny_r(x: int, tag: str, *, stage: Any) -> int:
    return x + 1


def tiny_floor(x: int, tag: str, root: str) -> int:
    """``tiny`` plus the durable work a fresh resumable task does, by hand: a folder for the
    task, then one record (the result, which carries the claim) written, fsync'd and its
    folder fsync'd."""
    records_by_hand(os.path.join(root, tag, f"t-{x}"), (True,))
    return x + 1


def tiny_layout(x: int, tag: str, root: str) -> int:
    """``tiny_floor`` laid out and created as the ``file://`` store does (see
    :func:`bench.records_by_hand`)."""
    records_by_hand(os.path.join(root, tag, f"t-{x}"), (True,), layout=True)
    return x + 1


def spin(path: str, stop: str) -> int:
    with open(path, "a") as f:
        f.write(f"{time.time()} {os.getpid()}\n")
    deadline = time.monotonic() + 60
    while not os.path.exists(stop) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()


def spin_r(path: str, stop: str, *, stage: Any) -> int:
    return spin(path, stop)


def _starts(path: str) -> list[tuple[float, int]]:
    return [(float(t), int(p)) for t, p in journal_lines(path)]


def _overhead(client: Any, n: int, rounds: int, tmp: str) -> dict[str, list[float]]:
    """Seconds per variant for each batch of ``n / 5`` tasks, scaled to ``n``: the variants
    take turns within a batch, in reversed order every other batch (ABBA), so load drift on
    a shared machine hits every variant alike."""
    batches = max(1, rounds) * 5
    size = max(1, n // 5)
    variants = {
        "plain": lambda tag: client.map(tiny, range(size), tag=tag),
        "memory": lambda tag: client.map(
            resumable(tiny_r, store=f"memory://bench-{tag}"), range(size), tag=tag
        ),
        "file": lambda tag: client.map(
            resumable(tiny_r, store=f"file://{tmp}/store-{tag}"), range(size), tag=tag
        ),
        "floor": lambda tag: client.map(tiny_floor, range(size), tag=tag, root=f"{tmp}/floor"),
        "layout": lambda tag: client.map(tiny_layout, range(size), tag=tag, root=f"{tmp}/layout"),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    client.gather(variants["memory"]("warm"))  # imports and first connections on workers
    client.gather(variants["file"]("warm"))
    for b in range(batches):
        for name in list(variants) if b % 2 == 0 else list(variants)[::-1]:
            tag = uuid.uuid4().hex[:8]
            t0 = time.perf_counter()
            futs = variants[name](tag)
            client.gather(futs)
            times[name].append((time.perf_counter() - t0) * n / size)
            client.cancel(futs)
            del futs
    return times


def _ratio(top: list[float], bottom: list[float]) -> tuple[float, float, float]:
    """Median, lowest and highest of the batches' ratios ``top / bottom``."""
    rs = [a / b for a, b in zip(top, bottom, strict=True)]
    return round(statistics.median(rs), 3), round(min(rs), 3), round(max(rs), 3)


def _reschedule(client: Any, fn: Any, tmp: str, tries: int) -> list[float]:
    out = []
    for _ in range(tries):
        client.wait_for_workers(2, timeout=120)
        tag = uuid.uuid4().hex[:8]
        path, stop = f"{tmp}/starts-{tag}", f"{tmp}/stop-{tag}"
        fut = client.submit(fn, path, stop, key=f"spin-{tag}")
        first = wait_until(lambda path=path: _starts(path), 60, "the task to start", 0.005)
        pid = first[0][1]
        t_kill = time.time()
        os.kill(pid, signal.SIGKILL)
        again = wait_until(lambda path=path: _starts(path)[1:], 60, "the task to run again", 0.005)
        out.append(again[0][0] - t_kill)
        open(stop, "w").close()
        fut.result(timeout=60)
    return out


def main() -> dict[str, Any]:
    import dask
    from distributed import Client, LocalCluster

    # Worker restarts are expected here; their log lines would bury the numbers.
    logging.getLogger("distributed").setLevel(logging.ERROR)
    n = int(os.environ.get("BENCH_DASK_TASKS", "5000"))
    rounds = int(os.environ.get("BENCH_DASK_ROUNDS", "2"))
    tmp = tempfile.mkdtemp(prefix="bench-dask-")
    try:
        with (
            dask.config.set({"distributed.deploy.lost-worker-timeout": "1h"}),
            LocalCluster(
                n_workers=2,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            ) as cluster,
            Client(cluster) as client,
        ):
            t = _overhead(client, n, rounds, tmp)
            plain_r, ours_r = [], []
            for _ in range(3):  # alternate, so both see the same machine load
                plain_r += _reschedule(client, spin, tmp, 1)
                ours_r += _reschedule(client, resumable(spin_r, store=f"file://{tmp}/ck"), tmp, 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in t.items()}
    res: dict[str, Any] = {
        "tasks": n,
        "batches": len(t["plain"]),
        "plain_s": round(med["plain"], 3),
        "resumable_memory_s": round(med["memory"], 3),
        "resumable_file_s": round(med["file"], 3),
        "floor_s": round(med["floor"], 3),
        "layout_s": round(med["layout"], 3),
        "reschedule_plain_s": round(statistics.median(plain_r), 3),
        "reschedule_resumable_s": round(statistics.median(ours_r), 3),
    }
    for name, top, bottom in (
        ("ratio_memory", "memory", "plain"),
        ("ratio_file", "file", "plain"),
        ("ratio_file_floor", "file", "floor"),
        ("ratio_floor", "floor", "plain"),
        ("ratio_layout", "layout", "plain"),
        ("ratio_file_layout", "file", "layout"),
    ):
        res[name], lo, hi = _ratio(t[top], t[bottom])
        res[f"{name}_range"] = [lo, hi]
    res["reschedule_extra_s"] = round(res["reschedule_resumable_s"] - res["reschedule_plain_s"], 3)

    def r(name: str) -> str:
        lo, hi = res[f"{name}_range"]
        return f"x{res[name]} ({lo}-{hi})"

    print(
        f"   {n} tiny tasks, medians of {res['batches']} interleaved batches (ratios: median "
        f"and range of the batches' ratios): plain {res['plain_s']} s, resumable memory:// "
        f"{res['resumable_memory_s']} s ({r('ratio_memory')}, target <= 1.05), file:// "
        f"{res['resumable_file_s']} s ({r('ratio_file')}, target <= 1.25); the same durable "
        f"work by hand in a plain task (the floor) {res['floor_s']} s ({r('ratio_floor')} "
        f"plain): file:// is {r('ratio_file_floor')} the floor"
    )
    print(
        f"   the floor laid out and created as the file:// store does (a second folder, the "
        f"record linked into place whole) {res['layout_s']} s ({r('ratio_layout')} plain): "
        f"file:// is {r('ratio_file_layout')} that"
    )
    print(
        f"   SIGKILL -> running again: plain {res['reschedule_plain_s']} s, resumable "
        f"{res['reschedule_resumable_s']} s (+{res['reschedule_extra_s']} s, target <= 0.5 s)"
    )
    return res


if __name__ == "__main__":
    main()
