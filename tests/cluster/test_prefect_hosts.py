"""Prefect across hosts: a server on a scheduler host, a process work pool with a worker on
each of two worker hosts, the store on a SeaweedFS host, rows into a SQL sink.

The worker host running a flow run is partitioned from the server while it still reaches the
store. Its flow-run process keeps working (a zombie) but its heartbeats stop: faultkit's
heartbeat automation marks the run Crashed, crash-retry schedules it again, and the other
worker runs it; its resumable tasks claim their stages and resume. The zombie's next write
raises StaleAttemptError and lands nowhere. After the partition heals, the zombie's late
reports change nothing: the run stays Completed, every row is in the sink once, and one
alert reports the incident.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster_checks import assert_once_and_fenced, logs_on_failure, read_events, s3_report

from faultkit import RetryPolicy
from faultkit.demo import check_sink
from faultkit.testing import (
    AlertReceiver,
    PostgresServer,
    PrefectStack,
    SeaweedS3Server,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
SCRIPTS = HERE / "scripts"
PREFECT = os.path.join(os.path.dirname(sys.executable), "prefect")
BUCKET = "fk-prefect"
POOL = "fk-pool"
GRACE = 45.0  # seconds without a heartbeat (Prefect sends one every 30 s at the least)
PARTITIONS, ROWS, CHUNK = 2, 2000, 10  # 200 units per partition


def _flow_run_pids(host, run_id: str) -> list[int]:
    """Processes in ``host`` running the flow run (the process worker sets its id in their
    environment)."""
    mark = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
    out = []
    for pid in host.pids():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if mark in env:
            out.append(pid)
    return out


def test_prefect_partitioned_worker_is_fenced_and_run_resumes_on_another(net, tmp_path):
    for reason in (SeaweedS3Server.available(), PostgresServer.available()):
        if reason:
            pytest.skip(f"Prefect cluster test skipped: {reason}")
    store_host, sched = net.host("store"), net.host("sched")
    workers = [net.host(f"w{i}") for i in (1, 2)]
    policy = RetryPolicy(
        on=ConnectionError, attempts=2, infra_attempts=3, wait_initial=0.2, wait_jitter=0.0
    )
    logs = {w.name: tmp_path / f"{w.name}.log" for w in workers}
    server_log = tmp_path / "prefect" / "server.log"
    # The server's database is PostgreSQL, as in production: on SQLite a heartbeat's trigger
    # evaluation that loses the write lock four times is dropped, and a loaded machine then
    # misses the crash.
    with (
        logs_on_failure(lambda: [server_log, *logs.values()]),
        SeaweedS3Server(host=store_host) as s3,
        PostgresServer(host=sched) as pg,
        AlertReceiver(host=sched) as alerts,
        PrefectStack(
            store_url=f"s3://{BUCKET}/ck", alert_urls=[alerts.url()], retry=policy,
            workdir=tmp_path / "prefect", heartbeat_grace=GRACE, host=sched, serve=False,
            db_url=pg.url.replace("+psycopg", "+asyncpg"),
        ) as stack,
    ):  # fmt: skip
        s3.make_bucket(BUCKET)
        env = {
            **stack.env(),
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(SCRIPTS)]),
            # Every process finds the store from its URL alone, as on a real cluster.
            **s3.aws_env(),
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
        }
        setup = sched.run(
            [sys.executable, str(SCRIPTS / "prefect_setup.py"), POOL, str(GRACE)],
            capture_output=True, text=True, env=env, cwd=str(SCRIPTS),
        )  # fmt: skip
        assert setup.returncode == 0, setup.stdout[-3000:] + setup.stderr[-3000:]
        for w in workers:
            w.popen(
                [PREFECT, "worker", "start", "--pool", POOL, "--type", "process",
                 "--name", w.name, "--limit", "1"],
                stdout=open(logs[w.name], "wb"), stderr=subprocess.STDOUT,
                env={**env, "FK_HOST": w.name},
            )  # fmt: skip

        ev = tmp_path / "etl.events"
        sink = f"sqlite:///{tmp_path / 'sink.db'}"
        run_id = stack.run("fk-cluster-etl/etl", {"sink_url": sink, "events": str(ev)})
        wait_until(
            lambda: sum(e[0] == "UNIT" for e in read_events(ev)) >= 10, 240, "ten units", 0.1
        )
        zombie = next(w for w in workers if w.name == read_events(ev)[0][1])
        other = next(w for w in workers if w is not zombie)
        t_cut, wall_cut = time.monotonic(), time.time()
        net.cut(sched, zombie)
        wait_until(
            lambda: any(e[0] == "START" and e[1] == other.name for e in read_events(ev)),
            180, "the flow run to run again on the other worker", 0.1,
        )  # fmt: skip
        t_rerun = time.monotonic()
        wait_until(
            lambda: sum(e[0] == "STALE" for e in read_events(ev)) >= PARTITIONS,
            120, "the zombie's writes to be refused", 0.1,
        )  # fmt: skip
        t_fenced = time.monotonic()
        # Fenced, the zombie waits to learn from the server whether a newer run owns its
        # flow run. Heal now, while the newer run still works: the zombie must then stop
        # without reporting a state (Prefect would let its "Failed" land on the newer run,
        # and its worker would report a non-zero exit as "Crashed").
        assert _flow_run_pids(zombie, run_id), "the zombie should still be running"
        net.heal(sched, zombie)
        wait_until(lambda: not _flow_run_pids(zombie, run_id), 120, "the zombie to exit", 0.2)
        fr = stack.wait(run_id, "COMPLETED", timeout=180)
        assert fr.run_count == 2, fr.run_count
        zombie_log = logs[zombie.name].read_text()
        assert f"stale run of flow run {run_id}" in zombie_log, zombie_log[-3000:]
        assert "as crashed" not in zombie_log, zombie_log[-3000:]
        states = stack.states(run_id)
        kinds = [s.type.value for s in states]
        crashed = [s for s in states if s.type.value == "CRASHED"]
        assert len(crashed) == 1 and "heartbeat" in (crashed[0].message or ""), states
        assert "FAILED" not in kinds and kinds[-1] == "COMPLETED", kinds
        detected = crashed[0].timestamp.timestamp() - wall_cut

        events = read_events(ev)
        starts = [e for e in events if e[0] == "START"]
        assert sorted((e[1], e[3]) for e in starts) == sorted(
            [(zombie.name, "1")] * PARTITIONS + [(other.name, "2")] * PARTITIONS
        ), starts
        stale = [e for e in events if e[0] == "STALE"]
        assert sorted(e[1:] for e in stale) == [
            [zombie.name, str(p), "1"] for p in range(PARTITIONS)
        ], stale
        units_started = sum(e[0] == "UNIT" for e in events)
        redone = units_started - PARTITIONS * (ROWS // CHUNK)
        # Each partition's zombie redid at most the one unit it was writing when fenced.
        assert 0 <= redone <= PARTITIONS, redone
        assert check_sink(sink) == {"rows": PARTITIONS * ROWS, "distinct": PARTITIONS * ROWS,
                                    "duplicates": 0}  # fmt: skip

        reps = s3_report(store_host, s3, BUCKET, f"prefect/fk-cluster-etl/{run_id}/", env)
        assert len(reps) == PARTITIONS, sorted(reps)
        for rep in reps.values():
            assert_once_and_fenced(rep, ROWS // CHUNK)

        [alert] = alerts.wait_for(1, timeout=60)  # one incident, one alert
        assert "crash" in (alert["title"] + alert["message"]).lower(), alert
        assert len(alerts.messages()) == 1, alerts.messages()

    print(
        f"\nprefect partition: detected (Crashed) {detected:.1f} s after the cut, running "
        f"on the other worker after {t_rerun - t_cut:.1f} s, zombie fenced after "
        f"{t_fenced - t_cut:.1f} s, units redone {redone}, stale writes fenced {len(stale)}"
    )
