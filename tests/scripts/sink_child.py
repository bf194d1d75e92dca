"""Child process for the sink tests: one attempt at a stage writing units through a sink.

Claims the stage, writes ``.claimed`` (the epoch) beside ``--out``, writes every pending
unit through ``SqlSink`` (``chunk`` rows per unit, each row naming its unit and epoch) or
``FileSink`` (bytes ``b"<unit>:<epoch>"``), and writes a JSON report to ``--out``:
``{"epoch", "written", "skipped", "stale", "error", "message", "claimed_at", "claim_s",
"total_s"}``. Exits 0 when the attempt ran (stale or not), 3 when the claim or a write
raised ``SinkBusyError``. Failpoints come from ``FAULTKIT_FAILPOINTS``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from faultkit import CheckpointStore, StaleAttemptError
from faultkit.sinks import FileSink, SinkBusyError, SqlSink


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True)
    p.add_argument("--sink", required=True)
    p.add_argument("--kind", choices=("sql", "file"), default="sql")
    p.add_argument("--key", default="etl/p0")
    p.add_argument("--table", default="orders")
    p.add_argument("--units", type=int, default=10)
    p.add_argument("--chunk", type=int, default=10)
    p.add_argument("--window", type=float, default=1.0)
    p.add_argument("--lock-wait", type=float, default=30.0)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    t0 = time.monotonic()
    res: dict = {"epoch": None, "written": [], "skipped": [], "stale": None, "error": None}

    def finish(code: int) -> None:
        res["total_s"] = time.monotonic() - t0
        with open(a.out + ".tmp", "w") as f:
            json.dump(res, f)
        os.replace(a.out + ".tmp", a.out)
        os._exit(code)

    store = CheckpointStore(a.store)
    try:
        stage = store.stage(a.key).claim()
    except SinkBusyError as exc:
        res.update(error="SinkBusyError", message=str(exc), claim_s=time.monotonic() - t0)
        finish(3)
    res.update(epoch=stage.epoch, claimed_at=time.time(), claim_s=time.monotonic() - t0)
    with open(a.out + ".claimed", "w") as f:
        f.write(str(stage.epoch))
    if a.kind == "sql":
        sink = SqlSink(a.sink, a.table, commit_window=a.window, lock_wait=a.lock_wait)
    else:
        sink = FileSink(a.sink)
    try:
        for u in stage.pending(range(a.units)):
            if a.kind == "sql":
                rows = [
                    {"order_id": u * a.chunk + i, "unit": str(u), "epoch": stage.epoch}
                    for i in range(a.chunk)
                ]
                ok = sink.write(stage, u, rows)
            else:
                ok = sink.write(stage, u, f"{u}:{stage.epoch}".encode())
            (res["written"] if ok else res["skipped"]).append(u)
    except StaleAttemptError as exc:
        res["stale"] = exc.current
    except SinkBusyError as exc:
        res.update(error="SinkBusyError", message=str(exc))
        finish(3)
    finish(0)


if __name__ == "__main__":
    main()
