"""`dask scheduler --preload dask_plugins.preload`: real scheduler and worker subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import dask
import pytest
from distributed import Client, LocalCluster

from dask_plugins import (
    CheckpointPlugin,
    WorkerLossPlugin,
    client_scope,
    register_flush,
    resumable,
    stage_key,
)
from faultkit import CheckpointStore
from faultkit.testing import (
    free_port,
    journal_append,
    journal_lines,
    journaled_done,
    kill_worker_running,
    process_state,
    wait_until,
)

pytestmark = pytest.mark.timeout(300)

DASK = os.path.join(os.path.dirname(sys.executable), "dask")


def _steps(n: int, *, stage) -> dict:
    for u in stage.pending(range(n)):
        time.sleep(0.1)
        stage.done(u)
    return {"epoch": stage.epoch}


def _lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def _flush_then_block(marker: str, *, stage) -> dict:
    """First attempt: register an emergency checkpoint, then block; a rerun reports it."""
    snap = stage.latest()
    if snap is not None:
        return {"resumed_from": json.loads(snap.data), "epoch": stage.epoch}
    state = {"step": 0}

    def flush() -> None:
        stage.save(json.dumps(state).encode(), step=state["step"], meta={"sigterm": 1})
        journal_append(marker, f"flushed {state['step']}")

    register_flush(flush)
    for i in range(1, 6):
        state["step"] = i
    journal_append(marker, "running")
    time.sleep(600)  # only the worker's end stops this attempt
    return {}


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie nobody reaps counts as gone)."""
    return process_state(pid) not in ("", "Z")


def _report(client: Client) -> dict:
    return client.run_on_scheduler(
        lambda dask_scheduler: dask_scheduler.plugins[WorkerLossPlugin.name].report()
    )


def _start(args: list[str], log, **env: str) -> subprocess.Popen:
    # Workers unpickle this module's task functions by reference: let them import it.
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    return subprocess.Popen(
        [DASK, *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": path, **env},
    )


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait(timeout=30)


def _scheduler_args(port: int, *extra: str) -> list[str]:
    return [
        "scheduler",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-dashboard",
        "--preload",
        "dask_plugins.preload",
        *extra,
    ]


def test_preloaded_scheduler_alerts_on_killed_worker(tmp_path, alert_receiver):
    """A preloaded scheduler gives workers the store and alerts once per killed worker."""
    port = free_port()
    url = f"file://{tmp_path}/store"
    addr = f"tcp://127.0.0.1:{port}"
    log = open(tmp_path / "cluster.log", "wb")
    procs = [
        _start(
            _scheduler_args(
                port, "--faultkit-store", url, "--faultkit-alert", alert_receiver.url()
            ),
            log,
        )
    ]
    try:
        for _ in range(2):
            procs.append(_start(["worker", addr, "--nthreads", "1", "--no-dashboard"], log))
        with Client(addr, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
            assert (
                client.run_on_scheduler(
                    lambda dask_scheduler: sorted(dask_scheduler.plugins)
                ).count(WorkerLossPlugin.name)
                == 1
            )
            # The preload adds the plugin and Scheduler.start starts it: once.
            assert _report(client)["counts"]["starts"] == 1
            fut = client.submit(resumable(_steps), 40, key="preloaded")  # the plugin's store
            store = CheckpointStore(url)
            wait_until(
                lambda: (
                    len(store.read_view(stage_key("preloaded", client_scope(client))).units) >= 3
                ),
                120,
                "progress on a worker",
            )
            worker, _, _ = kill_worker_running(client, "preloaded")
            assert fut.result(timeout=120) == {"epoch": 2}
            [alert] = alert_receiver.wait_for(1, timeout=30)
            assert worker in alert["title"] and "preloaded" in alert["message"]

            # A retired worker is not an alert.
            client.wait_for_workers(2, timeout=120)
            victim = sorted(client.scheduler_info()["workers"])[0]
            client.retire_workers([victim])
            wait_until(lambda: victim not in client.scheduler_info()["workers"], 60, "retired")
            report = _report(client)
            assert report["counts"].get("workers_retired", 0) >= 1
            assert report["counts"]["starts"] == 1
            assert len(alert_receiver.messages()) == 1
    finally:
        _stop(procs)
        log.close()


def test_preload_from_dask_config(tmp_path):
    """The distributed.scheduler.preload config installs both plugins cluster-wide."""
    url = f"file://{tmp_path}/store"
    cfg = {
        "distributed.scheduler.preload": ["dask_plugins.preload"],
        "distributed.scheduler.preload-argv": ["--faultkit-store", url],
    }
    with (
        dask.config.set(cfg),
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        assert WorkerLossPlugin.name in cluster.scheduler.plugins
        assert CheckpointPlugin.name in cluster.scheduler.worker_plugins
        assert _report(client)["counts"]["starts"] == 1, "the plugin was started twice"
        assert client.submit(resumable(_steps), 3, key="configured").result(60) == {"epoch": 1}
        scope = client_scope(client)
    assert CheckpointStore(url).keys() == [stage_key("configured", scope)]


def test_sigterm_to_dask_worker_cli_flushes_under_the_nanny(tmp_path):
    """`kill -TERM` of a plain `dask worker` (a Nanny) saves the emergency checkpoint first."""
    port = free_port()
    url = f"file://{tmp_path}/store"
    addr = f"tcp://127.0.0.1:{port}"
    marker = str(tmp_path / "marker")
    log = open(tmp_path / "cluster.log", "wb")
    procs = [_start(_scheduler_args(port, "--faultkit-store", url), log)]
    try:
        nanny = _start(["worker", addr, "--nthreads", "1", "--no-dashboard"], log)
        procs.append(nanny)
        with Client(addr, timeout=60) as client:
            client.wait_for_workers(1, timeout=120)
            fut = client.submit(resumable(_flush_then_block), marker, key="nanny-sigterm")
            wait_until(lambda: "running" in _lines(marker), 60, "the task to run")
            [worker_pid] = client.run(os.getpid).values()
            scope = client_scope(client)
            assert worker_pid != nanny.pid  # the task runs in the Nanny's child process

            t0 = time.monotonic()
            os.kill(nanny.pid, signal.SIGTERM)
            store = CheckpointStore(url)
            wait_until(
                lambda: any(
                    s.meta.get("sigterm")
                    for s in store.read_view(stage_key("nanny-sigterm", scope)).live_snaps()
                ),
                30,
                "the emergency checkpoint",
            )
            assert _lines(marker) == ["running", "flushed 5"]
            nanny.wait(timeout=30)
            wait_until(lambda: not _alive(worker_pid), 30, "the worker process to exit")
            stopped = time.monotonic() - t0
            assert stopped < 30, f"the worker took {stopped:.1f} s to stop"

            # The rerun, on a fresh worker, starts from the emergency checkpoint.
            procs.append(_start(["worker", addr, "--nthreads", "1", "--no-dashboard"], log))
            assert fut.result(timeout=120) == {"resumed_from": {"step": 5}, "epoch": 2}
    finally:
        _stop(procs)
        log.close()


def _two_units(journal: str, *, stage) -> int:
    """Commits units 0 and 1, noting each outcome (and a refusal) in ``journal``."""
    from distributed import get_worker
    from distributed.worker import thread_state

    me = os.getpid()
    journal_append(journal, f"START {me} {get_worker().state.tasks[thread_state.key].run_id}")
    for unit in (0, 1):
        journaled_done(journal, stage, unit, me)
    return me


@pytest.mark.parametrize("commit", [1, 2], ids=["first-commit", "second-commit"])
def test_worker_paused_mid_commit_is_fenced_by_the_rerun(tmp_path, commit):
    """A real `dask worker` (no Nanny, so nothing kills it) is paused with SIGSTOP at the
    worst instruction of a commit: its record written and fsync'd, not yet linked into the
    log, its fencing check passed. The scheduler stops hearing from it, drops it, and runs
    the task again on another worker, which finishes. Then the paused worker goes on: its
    record must not land. Paused in its first commit (which carries its claim: the log was
    empty) or its second (unit 0 is in the log under its claim)."""
    port = free_port()
    url = f"file://{tmp_path}/store"
    addr = f"tcp://127.0.0.1:{port}"
    journal = str(tmp_path / "journal")
    log = open(tmp_path / "cluster.log", "wb")
    worker = ["worker", addr, "--nthreads", "1", "--no-dashboard", "--no-nanny"]
    # Heartbeats every 0.5 s; a worker silent for 5 s is dropped (checked every 1 s).
    ttl = {"DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL": "1s"}
    sched = ["scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"]
    procs = [_start(sched, log, **ttl)]
    try:
        zombie = _start(worker, log, FAULTKIT_FAILPOINTS=f"storage.tmp_written=stop@{commit}")
        procs.append(zombie)
        with Client(addr, timeout=60) as client:
            client.wait_for_workers(1, timeout=120)
            fut = client.submit(resumable(_two_units, store=url), journal, key="paused")
            wait_until(
                lambda: process_state(zombie.pid) == "T", 60, "the worker to pause mid-commit"
            )
            procs.append(_start(worker, log))
            rerun = fut.result(timeout=120)
            assert rerun != zombie.pid
            assert process_state(zombie.pid) == "T"  # it was still paused when the rerun finished
            os.kill(zombie.pid, signal.SIGCONT)
            wait_until(
                lambda: ["STALE", str(zombie.pid), str(commit - 1)] in journal_lines(journal),
                60,
                "the resumed worker to be refused",
            )
            skey = stage_key("paused", client_scope(client))
        starts = {int(e[1]): int(e[2]) for e in journal_lines(journal) if e[0] == "START"}
        assert starts[rerun] > starts[zombie.pid]
        view = CheckpointStore(url).read_view(skey)
        assert not view.damaged
        units = {r.unit: (r.result, r.epoch) for r in view.units.values()}
        if commit == 1:  # the rerun found an empty log: its first commit claimed epoch 1
            assert units == {0: (rerun, 1), 1: (rerun, 1)}
            assert view.epoch_order == starts[rerun]
        else:  # the rerun claimed above the paused worker's unit 0 and skipped it
            assert units == {0: (zombie.pid, 1), 1: (rerun, 2)}
            assert [e for e, _s, _t in view.claims] == [1, 2]
        assert view.finished is not None and view.finished.result == {"v": rerun}
        assert ["DONE", str(zombie.pid), str(commit - 1)] not in [
            e[:3] for e in journal_lines(journal)
        ]
    finally:
        _stop(procs)
        log.close()
