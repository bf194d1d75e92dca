"""The ETL half of the bundled pipeline: generated orders -> cleaned rows -> SqlSink."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from .._degraded import Fallback
from .._store import Stage
from ..sinks import SqlSink

__all__ = [
    "PUBLISH_FALLBACK",
    "TABLE",
    "EtlIncompleteError",
    "SourceDownError",
    "check_sink",
    "etl_partition",
    "expected_rows",
    "generate_orders",
    "publish",
    "run_table",
]


class SourceDownError(ConnectionResetError):
    """A partition's source did not answer (the example pipelines' ``outage`` parameter)."""


class EtlIncompleteError(RuntimeError):
    """The ETL did not load every row of this run: there is nothing to publish from it."""


# The publish stage of the example pipelines: when this run's table is incomplete (the ETL
# gave up) or the sink is unreachable, serve the newest summary published within a week.
PUBLISH_FALLBACK = Fallback(max_age=timedelta(days=7), on=("infrastructure", EtlIncompleteError))

TABLE = "orders"
_REGIONS = ("emea", "amer", "apac")


def generate_orders(partition: int, start: int, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """Deterministic raw orders ``start .. start+count-1`` of one partition."""
    out = []
    for i in range(start, start + count):
        rnd = random.Random(seed * 1_000_003 + partition * 100_003 + i)
        out.append(
            {
                "order_id": partition * 1_000_000 + i,
                "partition": partition,
                "customer": f"c{rnd.randrange(10_000):05d}",
                "region": rnd.choice(_REGIONS),
                "amount_cents": rnd.randrange(100, 100_000),
                "quantity": rnd.randrange(1, 10),
            }
        )
    return out


def _transform(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "order_id": r["order_id"],
            "partition": r["partition"],
            "customer": r["customer"],
            "region": r["region"].upper(),
            "total": round(r["amount_cents"] * r["quantity"] / 100.0, 2),
        }
        for r in raw
    ]


def etl_partition(
    stage: Stage,
    partition: int,
    sink_url: str,
    *,
    rows: int = 500,
    chunk: int = 50,
    seed: int = 0,
    unit_delay: float = 0.0,
    table: str = TABLE,
    on_unit: Callable[[int], None] | None = None,
    outage: bool = False,
) -> dict[str, Any]:
    """Extract, transform and load one partition, ``chunk`` rows per unit, exactly once.

    ``unit_delay`` stands in for real work per unit (so a demo has time to kill it);
    ``on_unit(u)`` is called as each unit starts (the demo counts redone work with it);
    ``outage``: the partition's source is down (every try raises :class:`SourceDownError`,
    so the task gives up and the publish stage degrades).

    Returns:
        ``{"partition", "rows", "units", "units_written", "units_skipped", "epoch"}``.
    """
    if outage:
        raise SourceDownError(f"the source of partition {partition} is down (outage)")
    sink = SqlSink(sink_url, table)
    units = list(range((rows + chunk - 1) // chunk))
    written = 0
    for u in stage.pending(units):
        if on_unit is not None:
            on_unit(u)
        start = u * chunk
        batch = _transform(generate_orders(partition, start, min(chunk, rows - start), seed))
        if unit_delay:
            time.sleep(unit_delay)
        if sink.write(stage, u, batch):
            written += 1
    return {
        "partition": partition,
        "rows": rows,
        "units": len(units),
        "units_written": written,
        "units_skipped": len(units) - written,
        "epoch": stage.epoch,
    }


def expected_rows(partitions: int, rows: int) -> int:
    """Rows an uninterrupted run of ``partitions`` partitions leaves in the sink."""
    return partitions * rows


def check_sink(sink_url: str, table: str = TABLE) -> dict[str, int]:
    """``{"rows", "distinct", "duplicates"}`` of the sink's table (by order id)."""
    sink = SqlSink(sink_url, table)
    n = sink.count()
    dup = sink.duplicates("order_id")
    return {"rows": n, "distinct": n - dup, "duplicates": dup}


def run_table(run_id: str) -> str:
    """One table per orchestrator run (``orders_<hash of the run id>``), so a second run
    into the same sink is not a duplicate load."""
    import hashlib

    return f"orders_{hashlib.sha256(str(run_id).encode()).hexdigest()[:10]}"


def publish(sink_url: str, table: str, expected: int) -> dict[str, Any]:
    """The run's summary for its readers (a dashboard, a report): rows and revenue, from a
    complete table only.

    Raises:
        EtlIncompleteError: the table misses rows or holds a duplicate (the ETL gave up).
    """
    got = check_sink(sink_url, table)
    if got["duplicates"] or got["distinct"] < expected:
        raise EtlIncompleteError(
            f"table {table!r} holds {got['distinct']} of {expected} orders "
            f"({got['duplicates']} duplicates): the ETL did not finish"
        )
    import sqlalchemy as sa

    engine = sa.create_engine(sink_url)
    try:
        with engine.connect() as c:
            revenue = c.execute(sa.text(f'SELECT SUM(total) FROM "{table}"')).scalar_one()
    finally:
        engine.dispose()
    return {"table": table, "orders": got["distinct"], "revenue": round(float(revenue), 2)}
