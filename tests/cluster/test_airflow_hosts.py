"""Airflow across hosts: the CeleryExecutor with a Redis broker and a PostgreSQL metadata
database on a scheduler host (scheduler, API server, DAG processor there too), a Celery
worker on each of two worker hosts, the store on a SeaweedFS host.

The worker host running a resumable task is partitioned from the scheduler host while it
still reaches the store. Its task keeps working (a zombie) but its supervisor's heartbeats
stop: the scheduler's heartbeat timeout fails the try, the retry goes to the other worker
through the broker and resumes from the stage. The zombie's next write raises
StaleAttemptError and lands nowhere; healed, its late reports are refused by the API server.
Every unit is recorded once, and one alert reports the incident.
"""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from cluster_checks import assert_once_and_fenced, read_events, s3_report

from faultkit.testing import (
    AlertReceiver,
    PostgresServer,
    SeaweedS3Server,
    airflow_env,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
SCRIPTS = HERE / "scripts"
BUCKET = "fk-airflow"
HEARTBEAT_TIMEOUT = 10
N, PAUSE = 400, 0.1  # 40 s of work: it must outlast detection and the retry's start


def test_airflow_partitioned_celery_worker_is_fenced_and_retry_resumes(net, tmp_path):
    for reason in (SeaweedS3Server.available(), PostgresServer.available()):
        if reason:
            pytest.skip(reason)
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (the Celery broker)")
    pytest.importorskip("airflow.providers.celery", reason="apache-airflow-providers-celery")
    from airflow_provider._common import stage_key

    store_host, sched = net.host("store"), net.host("sched")
    workers = [net.host(f"w{i}") for i in (1, 2)]
    with (
        SeaweedS3Server(host=store_host) as s3,
        AlertReceiver(host=sched) as alerts,
        PostgresServer(host=sched) as pg,
    ):
        s3.make_bucket(BUCKET)
        sched.popen(
            ["redis-server", "--bind", sched.ip, "--port", "6379", "--save", "",
             "--appendonly", "no", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        conn = {
            "conn_type": "faultkit",
            "extra": {"store_url": f"s3://{BUCKET}/ck", "alert_urls_secret": alerts.url()},
        }
        env = {
            "AIRFLOW_CONN_FAULTKIT_DEFAULT": json.dumps(conn),
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(SCRIPTS)]),
            "PYTHONUNBUFFERED": "1",
            # Every process finds the store from its URL alone, as on a real cluster.
            **s3.aws_env(),
        }
        with airflow_env(
            tmp_path / "home", env=env, dags_folder=SCRIPTS / "airflow_dags", db_url=pg.url,
            heartbeat_timeout=HEARTBEAT_TIMEOUT, host=sched,
            celery_broker=f"redis://{sched.ip}:6379/0",
        ) as af:  # fmt: skip
            for w in workers:
                af.celery_worker(w, w.name, env={"FK_HOST": w.name})
            ev = tmp_path / "units.events"
            run_id = af.trigger("fk_cluster", {"events": str(ev), "n": N, "pause": PAUSE})
            wait_until(
                lambda: sum(e[0] == "UNIT" for e in read_events(ev)) >= 10, 300, "ten units", 0.1
            )
            zombie = next(w for w in workers if w.name == read_events(ev)[0][1])
            other = next(w for w in workers if w is not zombie)
            t_cut, wall_cut = time.monotonic(), time.time()
            net.cut(sched, zombie)
            wait_until(
                lambda: any(e[0] == "START" and e[1] == other.name for e in read_events(ev)),
                180, "the retry to start on the other worker", 0.1,
            )  # fmt: skip
            t_rerun = time.monotonic()
            wait_until(
                lambda: any(e[0] == "STALE" for e in read_events(ev)), 120, "the zombie", 0.1
            )
            t_fenced = time.monotonic()
            assert af.wait(run_id, timeout=240) == "success"
            net.heal(sched, zombie)
            [ti] = af.task_instances(run_id)
            assert ti["state"] == "success" and ti["try_number"] == 2, ti
            [timeout_at] = af.query(
                "SELECT dttm FROM log WHERE run_id = :r AND event = 'heartbeat timeout'",
                r=run_id,
            )
            detected = timeout_at["dttm"].timestamp() - wall_cut

            events = read_events(ev)
            starts = [e for e in events if e[0] == "START"]
            assert [(e[1], e[2]) for e in starts] == [(zombie.name, "1"), (other.name, "2")]
            stale = [e for e in events if e[0] == "STALE"]
            assert [s[1:3] for s in stale] == [[zombie.name, "1"]], stale
            redone = sum(e[0] == "UNIT" for e in events) - N
            assert redone == 0, redone  # the retry skipped every unit the zombie recorded

            key = stage_key("fk_cluster", run_id, "units", -1)
            rep = s3_report(store_host, s3, BUCKET, key, {**os.environ, **env})
            assert_once_and_fenced(rep, N)

            got_alerts = alerts.wait_for(1, timeout=60)  # one incident, one alert
            assert len(got_alerts) == 1, json.dumps(got_alerts, indent=1)[-4000:]
            [alert] = got_alerts
            assert zombie.ip in json.dumps(alert) or "units" in json.dumps(alert), alert
            wait_until(
                lambda: "shouldn't be running anymore" in af.component_log(f"worker-{zombie.name}")
                or "Task killed" in af.component_log(f"worker-{zombie.name}")
                or not _zombie_alive(zombie),
                120, "the healed zombie to be stopped", 0.5,
            )  # fmt: skip
            assert len(alerts.messages()) == 1, alerts.messages()
            assert af.task_instances(run_id)[0]["state"] == "success"

    print(
        f"\nairflow partition: detected (heartbeat timeout, {HEARTBEAT_TIMEOUT} s) "
        f"{detected:.1f} s after the cut, retry running on the other worker after "
        f"{t_rerun - t_cut:.1f} s, zombie fenced after {t_fenced - t_cut:.1f} s, units redone "
        f"{redone}, stale writes fenced {len(stale)}"
    )


def _zombie_alive(host) -> bool:
    for pid in host.pids():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"airflow worker --" in cmd.replace(b"\0", b" "):
            return True
    return False
