"""ETL flow: each partition is a resumable task that loads its rows into a SQL sink once;
then ``publish`` hands the run's summary (orders, revenue) to its readers.

When a partition gives up (its retries spent: ``outage=`` makes its source fail), ``publish``
still runs (``allow_failure``), finds the table incomplete and completes in a state named
``Degraded`` with the newest summary an earlier run published within a week, and one alert;
the flow run then fails, as its ETL did. The next healthy run publishes afresh.

Serve it (``python flows/serve.py``) or run it directly::

    python -c "from flows.etl import etl_flow; etl_flow(sink_url='sqlite:////tmp/sink.db')"

The checkpoint store, alert channels and retry policy are Prefect blocks named
``faultkit-demo`` (see ``flows/serve.py``), loaded where the tasks run.
"""

from __future__ import annotations

from typing import Any

from prefect import allow_failure, flow

from faultkit import demo, unwrap
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
    outage: int | None = None,
    table: str | None = None,
) -> dict[str, Any]:
    """Load one partition; units already in the sink are skipped on a re-run.

    ``journal`` (optional) is a file that gets an ``etl P U`` line as each unit starts, so
    ``faultkit demo`` can count the work a crash made it redo. ``outage``: the partition
    whose source is down in this run.
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
        outage=partition == outage,
        table=table_name(table),
    )


@resumable_task(store=BLOCK, retry=BLOCK, alerts=BLOCK, fallback=demo.PUBLISH_FALLBACK)
def publish(sink_url: str, expected: int, stage: Any, table: str | None = None) -> dict:
    """The run's summary, from a complete table only; else the last good one, degraded.
    Its inputs are the same in every run, so a run falls back to an earlier run's output."""
    return demo.publish(sink_url, table_name(table), expected)


def table_name(table: str | None) -> str:
    """``table``, else one table per flow run (see ``faultkit.demo.run_table``)."""
    from prefect.runtime import flow_run

    return table or demo.run_table(flow_run.id)


@flow(name="faultkit-etl", **alert_hooks(BLOCK, store=BLOCK, retry=BLOCK))
def etl_flow(
    sink_url: str,
    partitions: int = 4,
    rows: int = 500,
    seed: int = 0,
    unit_delay: float = 0.0,
    chunk: int = 50,
    journal: str | None = None,
    outage: int | None = None,
    table: str | None = None,
) -> dict[str, Any]:
    """Run every partition concurrently, then publish; returns the rows loaded and the
    summary published."""
    futures = etl_partition.map(
        list(range(partitions)),
        sink_url=sink_url,
        rows=rows,
        chunk=chunk,
        seed=seed,
        unit_delay=unit_delay,
        journal=journal,
        outage=outage,
        table=table,
    )
    expected = demo.expected_rows(partitions, rows)
    summary = publish.submit(
        sink_url, expected, table=table, wait_for=[allow_failure(f) for f in futures]
    ).result()
    results = [f.result() for f in futures]  # a partition that gave up fails the run here
    return {
        "partitions": partitions,
        "rows": sum(r["rows"] for r in results),
        "published": unwrap(summary),
    }
