"""The demo's last act: three nightly runs of ETL + publish, the second with a source down.

Run 1 loads its table and publishes a summary. In run 2 one partition's source is down: its
load retries, then gives up; the publish stage finds the table incomplete and, given
``fallback=``, serves run 1's summary, marked degraded, with one ``degraded`` alert. Run 3
is healthy again and publishes afresh. The example DAG and flow have the same publish stage
(``dags/faultkit_etl.py``, ``flows/etl.py``; their tests run this on Airflow and Prefect);
here it runs through the core resumable call that their adapters translate to, so it is the
same on every engine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import _resumable
from .._alerts import Alerter
from .._degraded import degraded, unwrap
from .._events import Event, subscribe
from .._keys import key
from .._retry import RetryPolicy
from .._store import CheckpointStore
from ._etl import PUBLISH_FALLBACK, SourceDownError, etl_partition, expected_rows, publish
from ._model import DemoConfig

__all__ = ["run_nightly"]

PARTITIONS, ROWS, CHUNK = 3, 60, 20


def run_nightly(
    cfg: DemoConfig, alert_urls: list[str], log: Callable[[str], object]
) -> dict[str, Any]:
    """Three runs; returns each run's outcome, the degraded alerts' count and ``ok``."""
    store = CheckpointStore(cfg.store_url)
    sink = f"sqlite:///{cfg.work_dir}/nightly.db"
    policy = RetryPolicy(on=ConnectionError, attempts=2, wait_initial=0.0, wait_jitter=0.0)
    alerter = Alerter(alert_urls, store=store, dedupe_window=600)
    sent: list[Event] = []

    def forward(event: Event) -> None:
        if event.kind == "degraded":
            sent.append(event)
            alerter.post(event)

    unsubscribe = subscribe(forward)
    runs = []
    try:
        for n, outage in ((1, None), (2, 1), (3, None)):
            run = f"nightly-{n}"
            table = f"orders_{n}"
            gave_up = []
            for p in range(PARTITIONS):

                def load(stage: Any, p: int = p, outage: Any = outage, table: str = table) -> Any:
                    return etl_partition(
                        stage, p, sink, rows=ROWS, chunk=CHUNK, table=table, outage=p == outage
                    )

                try:
                    policy.call(
                        _resumable.call, load, store=store, key=key("demo", run, "load", str(p))
                    )
                except SourceDownError:
                    gave_up.append(p)
            out = _resumable.call(
                lambda stage, t=table: publish(sink, t, expected_rows(PARTITIONS, ROWS)),
                store=store,
                key=key("demo", run, "publish"),
                fallback=PUBLISH_FALLBACK,
                lineage=key("demo", "nightly", "publish"),
            )
            d = degraded(out)
            runs.append(
                {
                    "run": run,
                    "partitions_gave_up": gave_up,
                    "published": "degraded" if d else "fresh",
                    "served_from": d.source_key if d else None,
                    "table": unwrap(out)["table"],
                }
            )
            log(
                f"{run}: {len(gave_up)} partition(s) gave up; published "
                + (f"DEGRADED (run {d.source_key.split('/')[1]}'s summary)" if d else "fresh")
            )
        alerter.flush(30.0)
    finally:
        unsubscribe()
    ok = (
        [r["published"] for r in runs] == ["fresh", "degraded", "fresh"]
        and runs[1]["served_from"] == key("demo", "nightly-1", "publish")
        and runs[1]["table"] == "orders_1"
        and runs[2]["table"] == "orders_3"
        and len(sent) == 1
    )
    return {"runs": runs, "degraded_alerts": len(sent), "ok": ok}
