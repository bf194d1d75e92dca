"""The ETL flow of the Prefect cluster test, deployed to a work pool from this directory.

Each partition is the example ETL job (``faultkit.demo.etl_partition``, rows into a SQL sink
exactly once) as a ``resumable_task``. It appends what it does to the shared events file
(the hosts share this machine's file system): ``START host partition run``, ``UNIT host
partition unit run``, ``STALE host partition run``. The first run of the flow run works
slowly (``delay`` per unit) so that it outlasts Prefect's heartbeat detection; a re-run
works at full speed.
"""

import os
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from faultkit import StaleAttemptError, demo
from prefect_blocks import alert_hooks, resumable_task

BLOCK = "faultkit-demo"


def _event(path: str, *parts: object) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (" ".join(str(p) for p in parts) + "\n").encode())
    finally:
        os.close(fd)


@resumable_task(store=BLOCK, retry=BLOCK, alerts=BLOCK)
def partition(
    p: int, sink_url: str, rows: int, chunk: int, delay: float, events: str, stage: Any
) -> dict[str, Any]:
    host, run = os.environ.get("FK_HOST", "?"), flow_run.run_count
    _event(events, "START", host, p, run)
    try:
        return demo.etl_partition(
            stage,
            p,
            sink_url,
            rows=rows,
            chunk=chunk,
            unit_delay=delay if run <= 1 else 0.0,
            on_unit=lambda u: _event(events, "UNIT", host, p, u, run),
        )
    except StaleAttemptError:
        _event(events, "STALE", host, p, run)
        raise


@flow(name="fk-cluster-etl", **alert_hooks(BLOCK, store=BLOCK, retry=BLOCK))
def etl(
    sink_url: str, events: str, partitions: int = 2, rows: int = 2000, chunk: int = 10,
    delay: float = 0.5,
) -> dict[str, Any]:  # fmt: skip
    futures = partition.map(
        list(range(partitions)), sink_url=sink_url, rows=rows, chunk=chunk, delay=delay,
        events=events,
    )  # fmt: skip
    results = [f.result() for f in futures]
    return {"rows": sum(r["rows"] for r in results), "epochs": [r["epoch"] for r in results]}
