"""The demo's units of work, importable so child processes and workers can run them."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import sqlalchemy as sa

from .._store import CheckpointStore
from ._etl import TABLE, etl_partition, generate_orders

__all__ = [
    "append_journal",
    "etl_job",
    "etl_key",
    "journal_count",
    "plain_etl",
    "table_digest",
    "train_job",
]


def etl_key(partition: int) -> str:
    return f"demo/etl/p{partition:03d}"


def append_journal(path: str | None, line: str) -> None:
    """Append one line to the demo's work journal (O_APPEND: lines from processes never mix)."""
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)


def journal_count(path: str, prefix: str) -> int:
    """Lines of the journal starting with ``prefix`` (units or steps started)."""
    try:
        with open(path) as f:
            return sum(1 for line in f if line.startswith(prefix))
    except FileNotFoundError:
        return 0


def etl_job(
    store_url: str,
    sink_url: str,
    partitions: list[int],
    rows: int,
    chunk: int,
    unit_delay: float,
    journal: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the ETL of ``partitions`` one after another, each its own stage."""
    store = CheckpointStore(store_url)
    written = 0
    for p in partitions:
        with store.stage(etl_key(p)) as stage:
            res = etl_partition(
                stage,
                p,
                sink_url,
                rows=rows,
                chunk=chunk,
                seed=seed,
                unit_delay=unit_delay,
                on_unit=lambda u, p=p: append_journal(journal, f"etl {p} {u}"),
            )
            written += res["units_written"]
    return {"units_written": written}


def train_job(
    store_url: str,
    steps: int,
    every_steps: int,
    seed: int,
    step_delay: float,
    journal: str | None = None,
    key: str = "demo/train",
) -> str:
    """Run the training stage; returns the digest of the final weights."""
    from ._train import train

    store = CheckpointStore(store_url)
    with store.stage(key) as stage:
        append_journal(journal, f"attempt {stage.epoch}")
        return train(
            stage,
            steps=steps,
            every_steps=every_steps,
            seed=seed,
            step_delay=step_delay,
            on_step=lambda s: append_journal(journal, f"step {s}"),
        )


def plain_etl(sink_url: str, partitions: int, rows: int, chunk: int, seed: int = 0) -> None:
    """The same ETL without faultkit (plain inserts), to measure faultkit's overhead."""
    from ._etl import _transform

    eng = sa.create_engine(sink_url)
    table = None
    for p in range(partitions):
        for start in range(0, rows, chunk):
            batch = _transform(generate_orders(p, start, min(chunk, rows - start), seed))
            if table is None:
                md = sa.MetaData()
                table = sa.Table(TABLE, md, *[sa.Column(k, sa.Text) for k in batch[0]])
                md.create_all(eng)
            with eng.begin() as conn:
                conn.execute(sa.insert(table), [{k: str(v) for k, v in r.items()} for r in batch])
    eng.dispose()


def table_digest(sink_url: str, table: str = TABLE) -> str:
    """sha256 of the table's rows in order-id order: equal iff the contents are equal."""
    eng = sa.create_engine(sink_url)
    h = hashlib.sha256()
    with eng.connect() as conn:
        for row in conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY order_id")):
            h.update(repr(tuple(row)).encode())
    eng.dispose()
    return h.hexdigest()
