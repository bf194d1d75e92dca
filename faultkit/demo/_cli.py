"""``faultkit demo``: run the bundled pipeline, kill its workers, prove nothing was lost."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from typing import Any

from rich.console import Console

from .._events import Event
from .._store import CheckpointStore
from ..testing import AlertReceiver
from ._model import DemoConfig, StageOutcome
from ._report import print_tables, write_report, write_timeline

__all__ = ["add_arguments", "run"]

ENGINES = ("dask", "airflow", "prefect", "local")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="dask",
        help="orchestrator to run on (default: an embedded Dask LocalCluster)",
    )
    p.add_argument("--kills", type=int, default=3, help="worker SIGKILLs per stage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="demo-out", help="folder for report.json and timeline.png")
    p.add_argument("--partitions", type=int, default=48)
    p.add_argument("--rows", type=int, default=200, help="rows per partition")
    p.add_argument("--steps", type=int, default=60, help="training steps")
    p.add_argument("--quick", action="store_true", help="a reduced size, for tests")
    p.add_argument(
        "--hosts",
        type=int,
        default=0,
        help="run on N worker hosts (network namespaces on this machine; needs root): one is "
        "cut off from the scheduler during ETL, another lost during training (dask only)",
    )


def _config(a: argparse.Namespace) -> DemoConfig:
    cfg = DemoConfig(
        engine=a.engine,
        kills=a.kills,
        seed=a.seed,
        out=a.out,
        partitions=a.partitions,
        rows=a.rows,
        steps=a.steps,
        hosts=a.hosts,
    )
    if a.quick:
        cfg.partitions, cfg.rows, cfg.chunk, cfg.steps = min(cfg.partitions, 6), 60, 10, 30
        cfg.every_steps = 5
        # 36 units must outlast a kill, the worker's restart and a second kill.
        cfg.unit_delay = max(cfg.unit_delay, 0.25)
    return cfg


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - t0


def _engine(name: str, hosts: int = 0) -> Any:
    if hosts:
        from ._hosts import run_demo

        return run_demo
    if name == "local":
        from ._local import run_local

        return run_local
    if name == "dask":
        from ._dask import run_demo
    elif name == "airflow":
        from ._airflow import run_demo
    else:
        from ._prefect import run_demo
    return run_demo


def run(a: argparse.Namespace, console: Console) -> int:
    """Run the demo; returns the exit status (0 only if every check passed)."""
    cfg = _config(a)
    if cfg.hosts:
        from ._hosts import prepare, unavailable

        reason = unavailable(cfg)
        if reason:
            console.print(f"[red]faultkit demo --hosts {cfg.hosts}:[/red] {reason}")
            return 2
        prepare(cfg)
    work = tempfile.mkdtemp(prefix="faultkit-demo-")
    cfg.work_dir = work
    cfg.store_url = f"file://{work}/store"
    cfg.sink_url = f"sqlite:///{work}/sink.db"
    try:
        return _run(cfg, console)
    finally:
        from ._train import MLFLOW_ENV

        os.environ.pop(MLFLOW_ENV, None)
        shutil.rmtree(work, ignore_errors=True)


def _run(cfg: DemoConfig, console: Console) -> int:
    from . import check_sink, expected_rows, reference_train
    from ._jobs import etl_job, plain_etl, table_digest
    from ._publish import run_nightly

    log = console.log
    t_all = time.monotonic()
    console.rule(
        f"faultkit demo: {cfg.partitions} ETL partitions x {cfg.rows} rows, "
        f"{cfg.steps} training steps, {cfg.kills} kills per stage, engine {cfg.engine}"
        + (f" on {cfg.hosts} worker hosts" if cfg.hosts else "")
    )
    with console.status("reference runs (uninterrupted)..."):
        ref_sink = f"sqlite:///{cfg.work_dir}/reference.db"
        _, plain_s = _timed(
            plain_etl,
            f"sqlite:///{cfg.work_dir}/plain.db",
            cfg.partitions,
            cfg.rows,
            cfg.chunk,
            cfg.seed,
        )
        _, resumable_s = _timed(
            etl_job,
            f"file://{cfg.work_dir}/ref-store",
            ref_sink,
            list(range(cfg.partitions)),
            cfg.rows,
            cfg.chunk,
            0.0,
            None,
            cfg.seed,
        )
        ref_digest = reference_train(cfg.steps, cfg.seed)
        ref_table = table_digest(ref_sink)
    log(
        f"reference: plain ETL {plain_s:.2f} s, resumable ETL {resumable_s:.2f} s, "
        f"weights {ref_digest[:12]}"
    )

    tracking = _mlflow_store(cfg)
    with AlertReceiver() as receiver:
        cfg.alert_urls = [receiver.url()]
        alerter = _alerter(cfg)
        result = _engine(cfg.engine, cfg.hosts)(cfg, alerter, log)
        etl: StageOutcome = result["etl"]
        train: StageOutcome = result["train"]
        rows = check_sink(cfg.sink_url)
        etl.rows_expected = expected_rows(cfg.partitions, cfg.rows)
        etl.rows_present = rows["rows"]
        etl.duplicates = rows["duplicates"]
        etl.content_equal = table_digest(cfg.sink_url) == ref_table
        train.weights_equal = result["digest"] == ref_digest
        stages = [etl, train]
        kills = sum(s.kills for s in stages)
        if "alerts" in result:  # the engine's own receiver, on its hosts
            alerts = result["alerts"]
        else:
            try:
                receiver.wait_for(kills, timeout=30)
            except TimeoutError:
                pass
            alerts = receiver.messages()
        seen = len(receiver.messages())
        nightly = run_nightly(cfg, [receiver.url()], log)
        try:
            receiver.wait_for(seen + nightly["degraded_alerts"], timeout=30)
        except TimeoutError:
            pass
        got = [m for m in receiver.messages()[seen:] if "degraded" in (m.get("title") or "")]
        nightly["degraded_alerts_received"] = len(got)
        nightly["ok"] = nightly["ok"] and len(got) == 1

    ok = all(s.ok for s in stages) and kills >= 1 and len(alerts) == kills and nightly["ok"]
    mlflow: dict[str, Any] = {"skipped": tracking} if tracking.startswith("no ") else {}
    if not mlflow:
        from ._train import mlflow_summary

        mlflow = mlflow_summary(tracking, cfg.steps)
        ok = ok and mlflow["ok"]
    report = {
        "engine": cfg.engine,
        "ok": ok,
        "alerts_received": len(alerts),
        "alerts": [{"title": m.get("title"), "message": m.get("message")} for m in alerts],
        "stages": [{**s.to_dict(), "weights_equal": s.weights_equal} for s in stages],
        "mlflow": mlflow,
        "nightly": nightly,
        "overhead": {"plain_etl_s": plain_s, "resumable_etl_s": resumable_s},
        "seconds": round(time.monotonic() - t_all, 2),
        "config": {k: v for k, v in vars(cfg).items() if k not in ("alert_urls", "work_dir")},
    }
    print_tables(console, stages, report)
    path = write_report(cfg.out, report)
    png = write_timeline(cfg.out, stages)
    console.print(f"report: {path}" + (f", timeline: {png}" if png else ""))
    return 0 if ok else 1


def _mlflow_store(cfg: DemoConfig) -> str:
    """The demo's MLflow tracking store (a SQLite file in its work dir), created here so the
    training processes find it ready; they inherit its URI. A string starting with "no " says
    why tracking is skipped."""
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore  # noqa: F401
        from mlflow.tracking import MlflowClient
    except ImportError:
        return "no MLflow tracking store installed: pip install 'mlflow>=3.4,<4'"
    from ._train import MLFLOW_ENV

    uri = f"sqlite:///{cfg.work_dir}/mlflow.db"
    MlflowClient(uri).search_experiments()  # creates the schema
    os.environ[MLFLOW_ENV] = uri
    return uri


def _alerter(cfg: DemoConfig) -> Any:
    """A callable that sends one event to the demo's receiver, deduplicated via the store."""
    from .. import Alerter

    alerter = Alerter(cfg.alert_urls, store=CheckpointStore(cfg.store_url), dedupe_window=600)

    def send(event: Event) -> object:
        return alerter.send(event)

    return send


# Used by the engines to locate their scratch space.
def scratch(cfg: DemoConfig, name: str) -> str:
    path = os.path.join(cfg.work_dir, name)
    os.makedirs(path, exist_ok=True)
    return path
