"""The demo pipeline on Dask: ETL partitions and the training stage as resumable tasks.

Workers are real processes; :func:`faultkit.testing.kill_worker_running` SIGKILLs the one
executing a task, the scheduler reschedules the task and it resumes from its stage.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .._errors import StaleAttemptError
from .._events import Event
from ..testing._dask import kill_worker_running
from ._etl import etl_partition
from ._jobs import append_journal, journal_count
from ._model import DemoConfig, StageOutcome

__all__ = [
    "etl_task",
    "run_demo",
    "run_etl_on_dask",
    "run_train_on_dask",
    "train_task",
]


def etl_task(
    partition: int,
    sink_url: str,
    rows: int,
    chunk: int,
    seed: int,
    unit_delay: float,
    journal: str | None,
    *,
    stage: Any,
) -> dict[str, Any]:
    """One ETL partition as a Dask task (wrapped with ``resumable``)."""
    with _attempt(journal, str(partition), stage):
        return etl_partition(
            stage,
            partition,
            sink_url,
            rows=rows,
            chunk=chunk,
            seed=seed,
            unit_delay=unit_delay,
            on_unit=lambda u: append_journal(journal, f"etl {partition} {u}"),
        )


@contextlib.contextmanager
def _attempt(journal: str | None, what: str, stage: Any) -> Iterator[None]:
    """Journal one attempt: ``attempt``, then ``end`` or ``fenced``, each with the epoch, the
    host (``FAULTKIT_DEMO_HOST``, set on test hosts) and the wall-clock time."""
    host = os.environ.get("FAULTKIT_DEMO_HOST", "-")
    epoch = stage.epoch
    append_journal(journal, f"attempt {what} {epoch} {host} {time.time():.3f}")
    try:
        yield
    except StaleAttemptError:
        append_journal(journal, f"fenced {what} {epoch} {host} {time.time():.3f}")
        raise
    append_journal(journal, f"end {what} {epoch} {host} {time.time():.3f}")


def train_task(
    steps: int,
    every_steps: int,
    seed: int,
    step_delay: float,
    journal: str | None,
    *,
    stage: Any,
) -> str:
    """The training stage as a Dask task; returns the sha256 of the final weights."""
    from ._train import train

    extra: dict[str, Any] = {}
    if journal:
        extra["on_step"] = lambda s: append_journal(journal, f"step {s}")
    with _attempt(journal, "train", stage):
        return train(
            stage, steps=steps, every_steps=every_steps, seed=seed, step_delay=step_delay, **extra
        )


def run_etl_on_dask(
    client: Any,
    store_url: str,
    sink_url: str,
    partitions: int | Iterable[int],
    rows: int,
    *,
    chunk: int = 50,
    seed: int = 0,
    unit_delay: float = 0.0,
    run_id: str = "demo",
    journal: str | None = None,
    wait: bool = True,
) -> Any:
    """Submit one resumable ETL task per partition (key ``etl-<run_id>-p<NNN>``).

    Returns:
        the partitions' result dicts in order, or their futures when ``wait`` is False.
    """
    from dask_plugins import resumable

    parts = list(range(partitions)) if isinstance(partitions, int) else list(partitions)
    task = resumable(etl_task, store=store_url)
    futures = [
        client.submit(
            task, p, sink_url, rows, chunk, seed, unit_delay, journal, key=f"etl-{run_id}-p{p:03d}"
        )
        for p in parts
    ]
    return client.gather(futures) if wait else futures


def run_train_on_dask(
    client: Any,
    store_url: str,
    *,
    steps: int = 60,
    every_steps: int = 10,
    seed: int = 0,
    step_delay: float = 0.0,
    run_id: str = "demo",
    journal: str | None = None,
    wait: bool = True,
) -> Any:
    """Submit the training stage as a resumable task (key ``train-<run_id>``).

    Returns:
        the sha256 of the final weights, or the future when ``wait`` is False.
    """
    from dask_plugins import resumable

    fut = client.submit(
        resumable(train_task, store=store_url),
        steps,
        every_steps,
        seed,
        step_delay,
        journal,
        key=f"train-{run_id}",
    )
    return fut.result() if wait else fut


def _kills(
    client: Any,
    keys: list[str],
    journal: str,
    prefix: str,
    kills: int,
    seed: int,
    out: StageOutcome,
    t0: float,
    log: Callable[[str], None],
    done: Callable[[], bool],
    workers: int,
) -> None:
    rnd = random.Random(seed)
    for i in range(kills):
        base = journal_count(journal, prefix)
        want = base + rnd.randint(1, 4)
        deadline = time.monotonic() + 120
        while journal_count(journal, prefix) < want and not done():
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        if done():
            return
        try:
            addr, pid, key = kill_worker_running(client, keys, timeout=30)
        except TimeoutError:
            return
        t_kill = time.monotonic()
        out.kills += 1
        out.timeline.append(
            {"t": round(t_kill - t0, 3), "event": "kill", "detail": f"{key} on pid {pid}"}
        )
        log(f"{out.name}: SIGKILLed worker {addr} (pid {pid}) running {key} (kill {i + 1})")
        n = journal_count(journal, prefix)
        while journal_count(journal, prefix) <= n and not done():
            if time.monotonic() - t_kill > 120:
                break
            time.sleep(0.02)
        out.recover_seconds.append(round(time.monotonic() - t_kill, 3))
        # The nanny restarts the killed worker; kill again only once it is back.
        client.wait_for_workers(workers, timeout=120)


def run_demo(
    cfg: DemoConfig, alert: Callable[[Event], object], log: Callable[[str], None]
) -> dict[str, Any]:
    """The ``dask`` engine of ``faultkit demo``: a LocalCluster whose workers get SIGKILLed.

    Alerts come from :class:`~dask_plugins.WorkerLossPlugin` (one per lost worker) on
    ``cfg.alert_urls``, so ``alert`` is not used.
    """
    from distributed import Client, LocalCluster

    from dask_plugins import CheckpointPlugin, WorkerLossPlugin

    etl_journal = os.path.join(cfg.work_dir, "etl.journal")
    train_journal = os.path.join(cfg.work_dir, "train.journal")
    import dask

    # LocalCluster drops a nanny whose worker is missing lost-worker-timeout after an
    # earlier loss of it: repeated kills would shrink the cluster.
    # The demo prints its own account of each kill; Dask's warnings about the same events
    # would only repeat it.
    quiet = {"distributed.deploy.lost-worker-timeout": "1h", "logging.distributed": "error"}
    for name in ("distributed", "distributed.scheduler", "distributed.nanny"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with (
        dask.config.set(quiet),
        LocalCluster(
            n_workers=cfg.workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(WorkerLossPlugin(cfg.alert_urls, cfg.store_url))
        client.register_plugin(CheckpointPlugin(cfg.store_url))

        etl = StageOutcome("etl")
        t0 = time.monotonic()
        futs = run_etl_on_dask(
            client,
            cfg.store_url,
            cfg.sink_url,
            cfg.partitions,
            cfg.rows,
            chunk=cfg.chunk,
            seed=cfg.seed,
            unit_delay=cfg.unit_delay,
            journal=etl_journal,
            wait=False,
        )
        keys = [f.key for f in futs]
        _kills(
            client,
            keys,
            etl_journal,
            "etl ",
            cfg.kills,
            cfg.seed,
            etl,
            t0,
            log,
            lambda: all(f.done() for f in futs),
            cfg.workers,
        )
        client.gather(futs)
        etl.seconds = time.monotonic() - t0
        etl.units_total = cfg.partitions * ((cfg.rows + cfg.chunk - 1) // cfg.chunk)
        etl.units_redone = journal_count(etl_journal, "etl ") - etl.units_total
        etl.attempts = journal_count(etl_journal, "attempt ")

        train = StageOutcome("train")
        t0 = time.monotonic()
        fut = run_train_on_dask(
            client,
            cfg.store_url,
            steps=cfg.steps,
            every_steps=cfg.every_steps,
            seed=cfg.seed,
            step_delay=cfg.step_delay,
            journal=train_journal,
            wait=False,
        )
        _kills(
            client,
            [fut.key],
            train_journal,
            "step ",
            cfg.kills,
            cfg.seed + 1,
            train,
            t0,
            log,
            fut.done,
            cfg.workers,
        )
        digest = fut.result()
        train.seconds = time.monotonic() - t0
        train.units_total = cfg.steps
        train.units_redone = journal_count(train_journal, "step ") - cfg.steps
        train.attempts = journal_count(train_journal, "attempt ")
        client.run_on_scheduler(_flush_alerts)
    return {"etl": etl, "train": train, "digest": digest}


def _flush_alerts(dask_scheduler: Any) -> bool:
    from dask_plugins import WorkerLossPlugin

    plugin = dask_scheduler.plugins.get(WorkerLossPlugin.name)
    return plugin.flush(30.0) if plugin is not None else True
