"""faultkit_etl: load partitions into a SQL table exactly once, resuming after worker loss.

Each mapped ``load`` task extracts, transforms and loads one partition in chunks; a chunk's
rows and its done-record commit in one transaction (``faultkit.sinks.SqlSink``), so a retry
after a SIGKILL, a lost node or a heartbeat timeout skips the chunks already loaded and no
row lands twice. ``check`` verifies the table. ``publish`` hands the run's summary (orders,
revenue) to its readers; when the ETL gave up (a partition's retries spent), it runs anyway
(``trigger_rule="all_done"``), finds the table incomplete and serves the newest summary an
earlier run published within a week, marked degraded (``fallback=``), with one alert and a
``FAULTKIT DEGRADED`` log line. The next healthy run publishes afresh.

Configuration:

* connection ``faultkit_default`` (type ``faultkit``): the checkpoint store and alert URLs,
  e.g. ``AIRFLOW_CONN_FAULTKIT_DEFAULT='{"conn_type": "faultkit", "extra": {"store_url":
  "file:///shared/ck", "alert_urls_secret": "json://alerts.example/hook"}}'``;
* the sink: param ``sink_url``, else Variable ``faultkit_sink_url``, else env
  ``FAULTKIT_SINK_URL``, else SQLite in the temp folder;
* the table: param ``table``, else ``orders_<hash of the run id>`` (so each run loads its
  own table and re-running the DAG is not a duplicate load);
* params ``partitions``, ``rows`` (per partition), ``chunk`` (rows per unit), ``seed`` (of
  the generated orders), ``unit_delay`` (seconds per chunk), ``journal`` (a file to which each
  unit start appends ``etl <partition> <unit> <pid>``, so redone work can be counted),
  ``outage`` (a partition whose source is down for this run: its load gives up, and
  ``publish`` degrades);
* env ``FAULTKIT_DEMO_RETRY_WAIT``: seconds before a retry (default 5);
  ``FAULTKIT_DEMO_ATTEMPTS``: tries per task (default 3).
"""

from __future__ import annotations

import os
from datetime import datetime

from airflow.sdk import DAG, Param, task

from airflow_provider.notifications import FaultkitNotifier
from faultkit import RetryPolicy
from faultkit.demo import PUBLISH_FALLBACK, run_table

# Parse-time work stays tiny: no DB, no store. (faultkit.demo is imported for the publish
# stage's fallback and its error types; it loads SQLAlchemy, which Airflow has loaded.)
RETRY = RetryPolicy(
    on=(ConnectionError, TimeoutError),
    attempts=int(os.environ.get("FAULTKIT_DEMO_ATTEMPTS", "3")),
    wait_initial=float(os.environ.get("FAULTKIT_DEMO_RETRY_WAIT", "5")),
    wait_max=60.0,
    wait_jitter=0.0,
)
NOTIFY = FaultkitNotifier()


def sink_url(params: dict) -> str:
    """The sink: param, Variable, env, or a SQLite file in the temp folder."""
    from airflow.sdk import Variable

    url = params.get("sink_url") or Variable.get("faultkit_sink_url", default=None)
    if not url:
        import tempfile

        url = os.environ.get("FAULTKIT_SINK_URL") or (
            f"sqlite:///{os.path.join(tempfile.gettempdir(), 'faultkit_demo_sink.db')}"
        )
    return url


def note(path: str | None, line: str) -> None:
    """Append ``line`` to the journal file ``path`` (if one is set)."""
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def table_name(params: dict, run_id: str) -> str:
    """The param, else one table per DAG run."""
    return params.get("table") or run_table(run_id)


with DAG(
    dag_id="faultkit_etl",
    schedule=None,
    start_date=datetime(2024, 1, 1),
    catchup=False,
    params={
        "partitions": Param(4, type="integer", minimum=1),
        "rows": Param(200, type="integer", minimum=1),
        "chunk": Param(50, type="integer", minimum=1),
        "seed": Param(0, type="integer"),
        "unit_delay": Param(0.0, type="number", minimum=0),
        "sink_url": Param(None, type=["null", "string"]),
        "table": Param(None, type=["null", "string"]),
        "journal": Param(None, type=["null", "string"]),
        "outage": Param(None, type=["null", "integer"]),
    },
    default_args={"on_retry_callback": NOTIFY, "on_failure_callback": NOTIFY},
    on_failure_callback=NOTIFY,
    tags=["faultkit", "example"],
    doc_md=__doc__,
) as dag:

    @task
    def partitions(params: dict | None = None) -> list[int]:
        """One mapped load per partition."""
        return list(range(int(params["partitions"])))

    @task.resumable(retry=RETRY, map_index_template="partition {{ partition }}")
    def load(
        partition: int, *, stage, params: dict | None = None, run_id: str | None = None
    ) -> dict:
        """Load one partition, chunk by chunk; finished chunks are skipped on a retry."""
        from airflow.sdk import get_current_context

        from faultkit.demo import etl_partition

        get_current_context()["partition"] = partition
        pid = os.getpid()
        return etl_partition(
            stage,
            partition,
            sink_url(params),
            rows=int(params["rows"]),
            chunk=int(params["chunk"]),
            seed=int(params["seed"]),
            unit_delay=float(params["unit_delay"]),
            table=table_name(params, run_id),
            on_unit=lambda u: note(params["journal"], f"etl {partition} {u} {pid}"),
            outage=partition == params["outage"],
        )

    @task
    def check(results: list[dict], params: dict | None = None, run_id: str | None = None) -> dict:
        """Fail the run if the table is missing rows or holds a duplicate."""
        from faultkit.demo import check_sink, expected_rows

        got = check_sink(sink_url(params), table_name(params, run_id))
        want = expected_rows(int(params["partitions"]), int(params["rows"]))
        if got["duplicates"] or got["distinct"] < want:
            raise ValueError(f"sink holds {got}, expected {want} distinct rows and no duplicate")
        return {**got, "expected": want, "epochs": sorted({r["epoch"] for r in results})}

    @task.resumable(retry=RETRY, fallback=PUBLISH_FALLBACK, trigger_rule="all_done")
    def publish(*, stage, params: dict | None = None, run_id: str | None = None) -> dict:
        """The run's summary, from a complete table only; else the last good one, degraded."""
        from faultkit.demo import expected_rows, publish

        want = expected_rows(int(params["partitions"]), int(params["rows"]))
        return publish(sink_url(params), table_name(params, run_id), want)

    check(load.expand(partition=partitions())) >> publish()
