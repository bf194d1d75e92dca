"""ETL flow: each partition is a resumable task that loads its rows into a SQL sink once.

Serve it (``python flows/serve.py``) or run it directly::

    python -c "from flows.etl import etl_flow; etl_flow(sink_url='sqlite:////tmp/sink.db')"

The checkpoint store, alert channels and retry policy are Prefect blocks named
``faultkit-demo`` (see ``flows/serve.py``), loaded where the tasks run.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from faultkit import demo
from faultkit.demo._jobs import append_journal
from prefect_blocks import alert_hooks, resumable_task

BLOCK = "faultkit-demo"


@resumable_task(store=BLOCK, retry=BLOCK, alerts=BLOCK)
def etl_partition(
    partition: int,
    sink_url: str,
    rows: int,
    chunk: int,
    seed: int,
    unit_delay: float,
    journal: str | None,
    stage: Any,
) -> dict[str, Any]:
    """Load one partition; units already in the sink are skipped on a re-run.

    ``journal`` (optional) is a file that gets an ``etl P U`` line as each unit starts, so
    ``faultkit demo`` can count the work a crash made it redo.
    """
    return demo.etl_partition(
        stage,
        partition,
        sink_url,
        rows=rows,
        chunk=chunk,
        seed=seed,
        unit_delay=unit_delay,
        on_unit=lambda u: append_journal(journal, f"etl {partition} {u}"),
    )


@flow(name="faultkit-etl", **alert_hooks(BLOCK, store=BLOCK, retry=BLOCK))
def etl_flow(
    sink_url: str,
    partitions: int = 4,
    rows: int = 500,
    seed: int = 0,
    unit_delay: float = 0.0,
    chunk: int = 50,
    journal: str | None = None,
) -> dict[str, Any]:
    """Run every partition concurrently; returns the rows each partition loaded."""
    futures = etl_partition.map(
        list(range(partitions)),
        sink_url=sink_url,
        rows=rows,
        chunk=chunk,
        seed=seed,
        unit_delay=unit_delay,
        journal=journal,
    )
    results = [f.result() for f in futures]
    return {"partitions": partitions, "rows": sum(r["rows"] for r in results)}
