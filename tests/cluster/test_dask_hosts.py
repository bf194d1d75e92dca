"""Dask across hosts: `dask scheduler --preload dask_plugins.preload` on a scheduler host,
`dask worker` (with its Nanny) on three worker hosts, the store on a SeaweedFS host.

(b) A worker host is partitioned from the scheduler while it still reaches the store: the
scheduler declares it lost (a short worker TTL) and reruns its task elsewhere, which resumes;
the cut-off worker keeps running, a zombie, and its next write raises StaleAttemptError and
lands nowhere. (a) A whole worker host is lost (every process in it SIGKILLed) in the middle of
training: the task resumes on another host from its last checkpoint and ends with weights
bitwise equal to an uninterrupted run. Every unit is recorded exactly once; one alert per
incident reaches a receiver on the scheduler host.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster_checks import assert_once_and_fenced, read_events, s3_report

from faultkit import CheckpointStore
from faultkit.testing import AlertReceiver, SeaweedS3Server, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
SCRIPTS = HERE / "scripts"
sys.path.insert(0, str(SCRIPTS))
import dask_tasks  # noqa: E402  (the task bodies the workers run)

DASK = os.path.join(os.path.dirname(sys.executable), "dask")
BUCKET = "fk-dask"


def _wait_for_rerun(events: Path, away_from) -> None:
    """Wait until the task started again on a host other than ``away_from``."""
    wait_until(
        lambda: any(e[0] == "START" and e[1] != away_from.name for e in read_events(events)),
        120,
        "the task to run again on another host",
        0.05,
    )


def test_dask_partitioned_worker_is_fenced_and_lost_host_resumes(net, tmp_path):
    reason = SeaweedS3Server.available()
    if reason:
        pytest.skip(f"S3 tests skipped: {reason}")
    store_host, sched = net.host("store"), net.host("sched")
    workers = [net.host(f"w{i}") for i in (1, 2, 3)]
    addr = f"tcp://{sched.ip}:8786"
    with SeaweedS3Server(host=store_host) as s3, AlertReceiver(host=sched) as alerts:
        s3.make_bucket(BUCKET)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(SCRIPTS)]),
            "PYTHONUNBUFFERED": "1",
            # Every process finds the store from its URL alone, as on a real cluster.
            **s3.aws_env(),
            # A silent partition is noticed when the worker's heartbeats stop (TTL) and its
            # connection times out (TCP_USER_TIMEOUT): the scheduler first asks the
            # unreachable Nanny to restart its worker, then drops it at the comm timeout.
            "DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL": "4s",
            "DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP": "12s",
        }
        url = f"s3://{BUCKET}/ck"
        log = open(tmp_path / "cluster.log", "wb")
        sched.popen(
            [DASK, "scheduler", "--host", sched.ip, "--port", "8786", "--no-dashboard",
             "--preload", "dask_plugins.preload", "--faultkit-store", url,
             "--faultkit-alert", alerts.url()],
            stdout=log, stderr=subprocess.STDOUT, env={**env, "FK_HOST": "sched"},
        )  # fmt: skip
        for w in workers:
            w.popen(
                [DASK, "worker", addr, "--host", w.ip, "--nthreads", "1", "--no-dashboard",
                 "--name", w.name],
                stdout=log, stderr=subprocess.STDOUT, env={**env, "FK_HOST": w.name},
            )  # fmt: skip

        def run(key: str, n: int, pause: float, events: Path, fn: str = "units"):
            out = open(tmp_path / f"{key}.out", "wb")
            proc = sched.popen(
                [sys.executable, str(SCRIPTS / "dask_job.py"), addr, str(events), key, str(n),
                 str(pause), fn],
                stdout=out, stderr=subprocess.STDOUT, env={**env, "FK_HOST": "client"},
            )  # fmt: skip
            return proc, tmp_path / f"{key}.out"

        def result(proc, out: Path) -> dict:
            assert proc.wait(300) == 0, out.read_text()[-4000:]
            [line] = [ln for ln in out.read_text().splitlines() if ln.startswith("RESULT ")]
            return json.loads(line.split(" ", 1)[1])

        def scope(out: Path) -> str:
            wait_until(lambda: "SCOPE " in out.read_text(), 120, "the client", 0.05)
            return out.read_text().split("SCOPE ", 1)[1].split()[0]

        # -- (b) a partition between the scheduler and the worker running the task ------
        n = 300  # 30 s: the task must outlast the detection, or its zombie just finishes
        ev = tmp_path / "etl.events"
        proc, out = run("etl", n, 0.1, ev)
        wait_until(
            lambda: sum(e[0] == "UNIT" for e in read_events(ev)) >= 10, 180, "ten units", 0.02
        )
        zombie = next(w for w in workers if w.name == read_events(ev)[0][1])
        t_cut = time.monotonic()
        net.cut(sched, zombie)
        _wait_for_rerun(ev, away_from=zombie)
        t_rerun = time.monotonic()
        wait_until(lambda: any(e[0] == "STALE" for e in read_events(ev)), 60, "the zombie", 0.05)
        t_fenced = time.monotonic()
        got = result(proc, out)
        net.heal(sched, zombie)
        key = f"dask/{scope(out)}/etl"
        events = read_events(ev)
        starts = [e for e in events if e[0] == "START"]
        assert [s[2] for s in starts] == ["1", "2"], events
        assert got["epoch"] == 2 and got["host"] != zombie.name
        assert got["sum"] == sum(u * u for u in range(n))
        stale = [e for e in events if e[0] == "STALE"]
        assert [s[1:3] for s in stale] == [[zombie.name, "1"]]  # one write tried, refused
        assert_once_and_fenced(s3_report(store_host, s3, BUCKET, key, env), n)
        redone_b = sum(e[0] == "UNIT" for e in events) - n
        assert redone_b == 0  # the rerun skipped every unit the zombie had recorded
        [alert] = alerts.wait_for(1, timeout=60)  # one incident, one alert
        assert zombie.ip in alert["title"] and "etl" in alert["message"], alert

        # -- (a) a whole worker host lost in the middle of training ---------------------
        steps = 200
        ev2 = tmp_path / "train.events"
        proc, out = run("train", steps, 0.05, ev2, "train")
        # Past the second checkpoint (every 20 steps), between two checkpoints.
        wait_until(
            lambda: any(e[0] == "STEP" and int(e[3]) >= 50 for e in read_events(ev2)),
            180,
            "training past its second checkpoint",
            0.02,
        )
        lost = next(w for w in workers if w.name == read_events(ev2)[0][1])
        t_kill = time.monotonic()
        killed = lost.kill_all()
        assert killed  # the Nanny and its worker at least
        _wait_for_rerun(ev2, away_from=lost)
        t_rerun_a = time.monotonic()
        got = result(proc, out)
        assert got["epoch"] == 2 and got["host"] != lost.name
        starts = [e for e in read_events(ev2) if e[0] == "START"]
        assert len(starts) == 2 and starts[0][2:] == ["1", "0"], starts
        resumed_at = int(starts[1][3])  # the step after its last checkpoint
        assert 40 <= resumed_at <= 200, starts
        done_before = max(int(e[3]) for e in read_events(ev2) if e[0] == "STEP" and e[2] == "1")
        redone_a = done_before - resumed_at  # steps after the last checkpoint, run twice
        # Bitwise equal to the same training run uninterrupted, in this process.
        clean = dask_tasks.train(
            str(tmp_path / "clean.events"), steps, 0.0,
            stage=CheckpointStore(f"file://{tmp_path}/clean").stage("train").claim(),
        )  # fmt: skip
        assert got["sha256"] == clean["sha256"]
        alert = alerts.wait_for(2, timeout=60)[1]
        assert lost.ip in alert["title"] and "train" in alert["message"], alert
        assert len(alerts.messages()) == 2, alerts.messages()
        log.close()

    print(
        f"\ndask partition: rerun on another host {t_rerun - t_cut:.2f} s after the cut, "
        f"zombie fenced after {t_fenced - t_cut:.2f} s, units redone {redone_b}, stale "
        f"writes fenced {len(stale)}; host lost: rerun after {t_rerun_a - t_kill:.2f} s, "
        f"steps redone {redone_a} (bitwise-equal weights)"
    )
