"""``faultkit demo --engine dask --hosts N``: the demo pipeline on a Dask cluster of test hosts.

The hosts are network namespaces on this machine (:class:`faultkit.testing.Network`; root and
iproute2): a store host running SeaweedFS (the ``s3://`` store), a scheduler host running
``dask scheduler --preload dask_plugins.preload`` (with the alert receiver, and this process
as the client), and ``N`` worker hosts running ``dask worker`` with its Nanny. During the ETL
stage the worker host running a partition is cut off from the scheduler while it still reaches
the store: the scheduler declares it lost and reruns its task elsewhere, and the cut-off
worker, still running (a zombie), is fenced at its next write. During training a whole worker
host is lost: every process in it is SIGKILLed. The timeline PNG has one row per host.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

from .._events import Event
from ..testing import (
    AlertReceiver,
    Network,
    SeaweedS3Server,
    journal_lines,
    netns_unavailable,
    wait_until,
)
from ._dask import run_etl_on_dask, run_train_on_dask
from ._jobs import journal_count
from ._model import DemoConfig, StageOutcome

__all__ = ["prepare", "run_demo", "unavailable"]

BUCKET = "faultkit-demo"
# A partition must outlast the detection of a silent partition (worker TTL, then the comm
# timeout: about 11-14 s here), or its zombie simply finishes before anyone claims it.
UNIT_DELAY = 2.5
CUT_AFTER_UNITS = 2


def unavailable(cfg: DemoConfig) -> str | None:
    """Why ``--hosts`` cannot run here (None when it can)."""
    if cfg.engine != "dask":
        return (
            f"--hosts runs the Dask scenario; the {cfg.engine} scenarios across hosts are "
            "tests/cluster/test_airflow_hosts.py and test_prefect_hosts.py"
        )
    if cfg.hosts < 2:
        return "--hosts needs at least 2 worker hosts: one is cut off, another takes over"
    reason = netns_unavailable()
    if reason:
        return f"test hosts cannot be made here ({reason}); run as root on Linux with iproute2"
    reason = SeaweedS3Server.available()
    if reason:
        return f"the store host needs SeaweedFS: {reason}"
    return None


def prepare(cfg: DemoConfig) -> None:
    """Sizes for hosts: a partition on every worker host but one (which takes over the
    cut-off host's partition as soon as the scheduler notices), slow enough to outlast the
    detection."""
    cfg.partitions = cfg.hosts - 1
    cfg.rows, cfg.chunk = 10 * cfg.chunk, cfg.chunk  # ten units per partition
    cfg.unit_delay = max(cfg.unit_delay, UNIT_DELAY)
    cfg.step_delay = max(cfg.step_delay, 0.1)
    cfg.kills = 1


def _attempt_bars(path: str, stage: str, t0: float) -> list[dict[str, Any]]:
    """Timeline bars from a journal's ``attempt``/``end``/``fenced`` lines (see
    ``faultkit.demo._dask._attempt``)."""
    open_: dict[tuple[str, str], dict[str, Any]] = {}
    bars = []
    for ln in journal_lines(path):
        if ln[0] not in ("attempt", "end", "fenced") or len(ln) < 5:
            continue
        what, epoch, host, t = ln[1], ln[2], ln[3], float(ln[4]) - t0
        if ln[0] == "attempt":
            open_[(what, epoch)] = {
                "event": "attempt", "t": round(t, 3), "end": None, "host": host,
                "stage": stage, "detail": f"{stage} {what} epoch {epoch}",
            }  # fmt: skip
            bars.append(open_[(what, epoch)])
        elif (what, epoch) in open_:
            bar = open_.pop((what, epoch))
            bar["end"] = round(t, 3)
            bar["fenced"] = ln[0] == "fenced"
    return bars


def run_demo(
    cfg: DemoConfig, alert: Callable[[Event], object], log: Callable[[str], None]
) -> dict[str, Any]:
    """The hosts engine; returns the stages, the weights' digest and the alerts received."""
    dask = os.path.join(os.path.dirname(sys.executable), "dask")
    with Network() as net:
        store_host, sched = net.host("store"), net.host("sched")
        workers = [net.host(f"w{i}") for i in range(1, cfg.hosts + 1)]
        log(
            f"test hosts: store {store_host.ip} (SeaweedFS), scheduler {sched.ip}, workers "
            + ", ".join(f"{w.name} {w.ip}" for w in workers)
        )
        with SeaweedS3Server(host=store_host) as s3, AlertReceiver(host=sched) as receiver:
            s3.make_bucket(BUCKET)
            store_url = f"s3://{BUCKET}/store"
            env = {
                **os.environ,
                **s3.aws_env(),  # the workers open the store from its URL alone
                # A silent partition is noticed when heartbeats stop (TTL) and the connection
                # times out; the defaults (5 min, 30 s) are for real networks.
                "DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL": "4s",
                "DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP": "12s",
                "DASK_LOGGING__DISTRIBUTED": "error",
            }
            addr = f"tcp://{sched.ip}:8786"
            with open(os.path.join(cfg.work_dir, "cluster.log"), "wb") as out:
                sched.popen(
                    [dask, "scheduler", "--host", sched.ip, "--port", "8786", "--no-dashboard",
                     "--preload", "dask_plugins.preload", "--faultkit-store", store_url,
                     "--faultkit-alert", receiver.url()],
                    stdout=out, stderr=out, env=env,
                )  # fmt: skip
                for w in workers:
                    w.popen(
                        [dask, "worker", addr, "--host", w.ip, "--nthreads", "1",
                         "--no-dashboard", "--name", w.name],
                        stdout=out, stderr=out, env={**env, "FAULTKIT_DEMO_HOST": w.name},
                    )  # fmt: skip
            result = sched.call(lambda: _drive(cfg, net, sched, workers, addr, store_url, log))
            try:
                receiver.wait_for(2, timeout=60)
            except TimeoutError:
                pass
            result["alerts"] = receiver.messages()
    return result


def _host_running(client: Any, keys: list[str], workers: list[Any], what: str) -> Any:
    """The worker host processing one of ``keys``, waited for up to 60 s."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for addr, running in client.processing().items():
            if set(keys) & set(running):
                host = next((w for w in workers if f"//{w.ip}:" in addr), None)
                if host is not None:
                    return host
        time.sleep(0.05)
    raise RuntimeError(f"no worker host was running {what}")


def _attempts(out: StageOutcome, journal: str, t0_wall: float, t_fault: float, host: Any) -> None:
    """Add the stage's attempts (from its journal) to its timeline, and how long after the
    fault at ``t_fault`` (seconds into the stage) it ran again on a host other than ``host``."""
    bars = _attempt_bars(journal, out.name, t0_wall)
    rerun = [b["t"] for b in bars if b["host"] != host.name and b["t"] > t_fault]
    if rerun:
        out.recover_seconds.append(round(min(rerun) - t_fault, 3))
    out.attempts = journal_count(journal, "attempt ")
    out.timeline += bars


def _drive(
    cfg: DemoConfig, net: Any, sched: Any, workers: list[Any], addr: str, store_url: str,
    log: Callable[[str], None],
) -> dict[str, Any]:  # fmt: skip
    from distributed import Client

    etl_journal = os.path.join(cfg.work_dir, "etl.journal")
    train_journal = os.path.join(cfg.work_dir, "train.journal")
    with Client(addr, timeout=60) as client:
        client.wait_for_workers(len(workers), timeout=120)
        t0_wall, t0 = time.time(), time.monotonic()

        # -- ETL: cut the host running a partition off from the scheduler --------------
        etl = StageOutcome("etl")
        futs = run_etl_on_dask(
            client, store_url, cfg.sink_url, cfg.partitions, cfg.rows, chunk=cfg.chunk,
            seed=cfg.seed, unit_delay=cfg.unit_delay, journal=etl_journal, wait=False,
        )  # fmt: skip
        wait_until(
            lambda: journal_count(etl_journal, "etl ") >= CUT_AFTER_UNITS * cfg.partitions,
            180, "the ETL partitions to start", 0.05,
        )  # fmt: skip
        victim = _host_running(client, [f.key for f in futs], workers, "an ETL partition")
        t_cut = time.monotonic()
        net.cut(sched, victim)
        etl.kills += 1
        etl.timeline.append(
            {"t": round(t_cut - t0, 3), "event": "cut", "host": victim.name,
             "detail": f"{victim.name} cut off from the scheduler"}
        )  # fmt: skip
        log(
            f"etl: cut worker host {victim.name} ({victim.ip}) off from the scheduler; it "
            "still reaches the store and keeps running (a zombie)"
        )
        client.gather(futs)
        etl.seconds = time.monotonic() - t0
        net.heal(sched, victim)
        etl.timeline.append(
            {"t": round(time.monotonic() - t0, 3), "event": "heal", "host": victim.name,
             "detail": "partition healed"}
        )  # fmt: skip
        etl.units_total = cfg.partitions * ((cfg.rows + cfg.chunk - 1) // cfg.chunk)
        etl.units_redone = journal_count(etl_journal, "etl ") - etl.units_total
        etl.fenced = journal_count(etl_journal, "fenced ")
        _attempts(etl, etl_journal, t0_wall, t_cut - t0, victim)
        again = f"{etl.recover_seconds[0]} s" if etl.recover_seconds else "?"
        log(f"etl: rerun on another host {again} after the cut; zombie writes fenced: {etl.fenced}")

        # -- training: lose a whole worker host ----------------------------------------
        train = StageOutcome("train")
        t0_wall, t0 = time.time(), time.monotonic()
        fut = run_train_on_dask(
            client, store_url, steps=cfg.steps, every_steps=cfg.every_steps, seed=cfg.seed,
            step_delay=cfg.step_delay, journal=train_journal, wait=False,
        )  # fmt: skip
        wait_until(
            lambda: journal_count(train_journal, "step ") >= cfg.every_steps + 3,
            300, "training past its first checkpoint", 0.05,
        )  # fmt: skip
        lost = _host_running(client, [fut.key], workers, "the training task")
        t_kill = time.monotonic()
        killed = lost.kill_all()
        train.kills += 1
        train.timeline.append(
            {"t": round(t_kill - t0, 3), "event": "kill", "host": lost.name,
             "detail": f"every process of {lost.name} SIGKILLed ({len(killed)})"}
        )  # fmt: skip
        log(f"train: host {lost.name} lost: {len(killed)} processes SIGKILLed (Nanny and worker)")
        digest = fut.result()
        train.seconds = time.monotonic() - t0
        train.units_total = cfg.steps
        train.units_redone = journal_count(train_journal, "step ") - cfg.steps
        _attempts(train, train_journal, t0_wall, t_kill - t0, lost)
    return {"etl": etl, "train": train, "digest": digest}
