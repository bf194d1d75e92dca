"""Dask adapter on a real LocalCluster with worker processes that get SIGKILLed and SIGTERMed."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import dask
import pytest
from distributed import Client, KilledWorker, LocalCluster

from dask_plugins import (
    CheckpointPlugin,
    WorkerLossPlugin,
    client_scope,
    register_flush,
    resumable,
    stage_key,
)
from faultkit import CheckpointStore, RetryPolicy, chaos
from faultkit.demo import check_sink, etl_partition
from faultkit.demo._dask import run_etl_on_dask, run_train_on_dask
from faultkit.demo._jobs import journal_count, table_digest
from faultkit.testing import (
    AlertReceiver,
    journal_append,
    journal_lines,
    journaled_done,
    kill_worker_running,
    wait_until,
)

pytestmark = pytest.mark.timeout(300)

ROWS, CHUNK = 200, 20  # 10 units per partition
UNITS = ROWS // CHUNK


def _alerts(receiver: AlertReceiver, kind: str) -> list[dict]:
    title = f"faultkit: {kind.replace('_', ' ')} - "
    return [m for m in receiver.messages() if str(m.get("title", "")).startswith(title)]


async def _alerts_sent(dask_scheduler) -> bool:
    return await dask_scheduler.plugins[WorkerLossPlugin.name].wait_sent(30.0)


def _flush_alerts(client: Client) -> None:
    assert client.run_on_scheduler(_alerts_sent)


def _report(client: Client) -> dict:
    return client.run_on_scheduler(
        lambda dask_scheduler: dask_scheduler.plugins[WorkerLossPlugin.name].report()
    )


def _lines(path: str) -> int:
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def receiver():
    """One alert receiver for the module (tests count the alerts they add)."""
    with AlertReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def env(tmp_path_factory, receiver):
    """A LocalCluster with two worker processes and both plugins, shared by the module."""
    d = tmp_path_factory.mktemp("dask")
    store_url = f"file://{d}/store"
    # LocalCluster drops a nanny whose worker is missing lost-worker-timeout after *some*
    # earlier loss of it; with kills every few seconds that hits a restarting worker.
    with (
        dask.config.set({"distributed.deploy.lost-worker-timeout": "1h"}),
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(WorkerLossPlugin([receiver.url()], store_url))
        client.register_plugin(CheckpointPlugin(store_url))
        yield SimpleNamespace(
            client=client,
            cluster=cluster,
            store_url=store_url,
            dir=d,
            receiver=receiver,
            store=CheckpointStore(store_url),
        )


@pytest.fixture
def ready(env):
    """Both workers up (the nanny restarts a killed one) before a test starts."""
    env.client.wait_for_workers(2, timeout=120)
    return env


def _reference_digest(tmp, partition: int, seed: int) -> str:
    sink = f"sqlite:///{tmp}/ref-{partition}-{seed}.db"
    with CheckpointStore(f"memory://ref-{partition}-{seed}").stage("ref") as stage:
        etl_partition(stage, partition, sink, rows=ROWS, chunk=CHUNK, seed=seed)
    return table_digest(sink)


# -- ETL: killed mid-way, resumed on another worker, rows exactly once ----------------------


@pytest.mark.parametrize("run", [pytest.param(i, id=f"run{i}") for i in range(10)])
def test_etl_worker_killed_resumes_exactly_once(ready, faultkit_chaos, run):
    """A worker SIGKILLed mid-ETL (from outside, or inside a sink commit) loses nothing."""
    env = ready
    rnd = random.Random(1000 + run)
    kill_after = rnd.randint(1, UNITS - 3)
    # Even runs: SIGKILL from outside at a random unit; odd runs: the worker kills itself
    # at a failpoint inside the exactly-once commit (faultkit.chaos).
    point = rnd.choice(["sink.rows_written", "sink.committed"]) if run % 2 else None
    assert point is None or point in faultkit_chaos.points
    sink = f"sqlite:///{env.dir}/etl-{run}.db"
    journal = str(env.dir / f"etl-{run}.journal")
    lost_before = len(_alerts(env.receiver, "worker_lost"))

    [fut] = run_etl_on_dask(
        env.client,
        env.store_url,
        sink,
        [run],
        ROWS,
        chunk=CHUNK,
        seed=run,
        unit_delay=0.2,
        run_id=f"kill{run}",
        journal=journal,
        wait=False,
    )
    skey = stage_key(fut.key, client_scope(env.client))
    wait_until(lambda: len(env.store.read_view(skey).units) >= kill_after, 120, "ETL progress")
    if point is None:
        addr, _, key = kill_worker_running(env.client, fut.key)
    else:
        addr, _, key = kill_worker_running(env.client, fut.key, sig=0)  # find it only
        env.client.run(chaos.arm, point, "kill", 1, workers=[addr])
    assert key == fut.key
    res = fut.result(timeout=120)

    assert res["epoch"] == 2, "the kill did not land: the task never ran a second attempt"
    assert addr not in env.client.who_has([fut])[fut.key]
    assert check_sink(sink) == {"rows": ROWS, "distinct": ROWS, "duplicates": 0}
    assert table_digest(sink) == _reference_digest(env.dir, run, run)
    started = journal_count(journal, f"etl {run} ")
    assert started - UNITS <= 1, f"{started - UNITS} units redone"
    assert res["units_skipped"] >= kill_after
    assert journal_count(journal, "attempt ") == 2

    wait_until(lambda: len(_alerts(env.receiver, "worker_lost")) >= lost_before + 1, 30, "alert")
    _flush_alerts(env.client)
    new = _alerts(env.receiver, "worker_lost")[lost_before:]
    assert len(new) == 1
    assert addr in new[0]["title"] and fut.key in new[0]["message"]


# -- training: killed, resumed, bitwise-equal weights ---------------------------------------


def test_training_worker_killed_weights_bitwise_equal(ready):
    """The training stage killed mid-way on Dask ends with the weights of an unbroken run."""
    pytest.importorskip("torch")
    try:
        from faultkit.demo import reference_train
    except ImportError as exc:
        pytest.skip(f"training needs torch: pip install 'faultkit[torch]' ({exc})")
    env = ready
    journal = str(env.dir / "train.journal")
    lost_before = len(_alerts(env.receiver, "worker_lost"))
    steps, every = 30, 5
    fut = run_train_on_dask(
        env.client,
        env.store_url,
        steps=steps,
        every_steps=every,
        seed=3,
        step_delay=0.05,
        run_id="kill",
        journal=journal,
        wait=False,
    )
    skey = stage_key(fut.key, client_scope(env.client))

    def progressed() -> bool:
        if fut.status == "error":
            fut.result()  # raise the task's error here
        snaps = env.store.read_view(skey).live_snaps()
        return bool(snaps) and snaps[-1].step >= 10

    wait_until(progressed, 180, "training progress")
    kill_worker_running(env.client, fut.key)
    digest = fut.result(timeout=240)

    assert journal_count(journal, "attempt ") == 2, "the kill did not land"
    assert journal_count(journal, "step ") - steps <= every
    wait_until(lambda: len(_alerts(env.receiver, "worker_lost")) >= lost_before + 1, 30, "alert")
    _flush_alerts(env.client)
    assert len(_alerts(env.receiver, "worker_lost")) == lost_before + 1
    assert digest == reference_train(steps, 3), "weights differ from an uninterrupted run"


# -- finished work is not recomputed (Dask #7870) -------------------------------------------


def _side_effect(path: str, value: int, *, stage=None) -> dict:
    journal_append(path, f"run {value}")
    return {"value": value * 2}


def _plain_side_effect(path: str, value: int) -> dict:
    return _side_effect(path, value)


def test_finished_task_not_recomputed_after_worker_loss(ready):
    """A finished task whose worker dies before its result is fetched is not run again."""
    env = ready
    c = env.client
    addr = sorted(c.scheduler_info()["workers"])[0]
    ours, plain = str(env.dir / "fin-ours"), str(env.dir / "fin-plain")
    lost_before = len(_alerts(env.receiver, "worker_lost"))
    # Pinned to one worker (no work stealing), then let loose so the rerun can go elsewhere.
    f1 = c.submit(resumable(_side_effect), ours, 21, key="fin-ours", workers=[addr])
    f2 = c.submit(_plain_side_effect, plain, 21, key="fin-plain", workers=[addr])
    wait_until(lambda: f1.status == f2.status == "finished", 60, "both tasks finished")
    assert set(c.who_has([f1, f2]).values()) == {(addr,)}
    # A fresh run writes one record: its result, which carries its claim and the run id
    # the scheduler gave this run (what orders it against a zombie of an earlier run).
    skey = stage_key("fin-ours", client_scope(c))
    run_id = c.run_on_scheduler(lambda dask_scheduler: dask_scheduler.tasks["fin-ours"].run_id)
    view = env.store.read_view(skey)
    assert view.cursor == 1 and [e for e, _s, _t in view.claims] == [1]
    assert view.finished is not None and view.epoch_order == run_id >= 0

    def loosen(dask_scheduler, keys=("fin-ours", "fin-plain")) -> None:
        for k in keys:
            dask_scheduler.tasks[k].loose_restrictions = True

    c.run_on_scheduler(loosen)
    pid = c.run(os.getpid, workers=[addr])[addr]
    os.kill(pid, signal.SIGKILL)

    assert f1.result(timeout=120) == {"value": 42}
    assert f2.result(timeout=120) == {"value": 42}
    assert _lines(plain) == 2, "the fault did not fire: the plain task was not recomputed"
    assert _lines(ours) == 1, "the resumable task ran again"
    wait_until(lambda: len(_alerts(env.receiver, "worker_lost")) >= lost_before + 1, 30, "alert")
    _flush_alerts(c)
    [alert] = _alerts(env.receiver, "worker_lost")[lost_before:]
    assert "fin-ours" in alert["message"]


# -- allowed-failures exhausted: KilledWorker and one gave_up alert ---------------------------


def _suicide(*, stage) -> None:
    stage.done(f"attempt-{stage.epoch}")
    os.kill(os.getpid(), signal.SIGKILL)


def test_killed_worker_gives_one_gave_up_alert(ready):
    """When every allowed worker dies under a task, KilledWorker reaches the client, once."""
    env = ready
    c = env.client
    c.run_on_scheduler(lambda dask_scheduler: setattr(dask_scheduler, "allowed_failures", 1))
    lost_before = len(_alerts(env.receiver, "worker_lost"))
    gave_before = len(_alerts(env.receiver, "gave_up"))
    try:
        fut = c.submit(resumable(_suicide), key="suicide")
        with pytest.raises(KilledWorker):
            fut.result(timeout=120)
    finally:
        c.run_on_scheduler(lambda dask_scheduler: setattr(dask_scheduler, "allowed_failures", 3))
    skey = stage_key("suicide", client_scope(c))
    assert env.store.read_view(skey).epoch == 2  # both workers really died
    wait_until(lambda: len(_alerts(env.receiver, "gave_up")) >= gave_before + 1, 30, "gave_up")
    _flush_alerts(c)
    gave = _alerts(env.receiver, "gave_up")[gave_before:]
    assert len(gave) == 1 and "suicide" in gave[0]["message"]
    assert len(_alerts(env.receiver, "worker_lost")) == lost_before + 2
    counts = _report(c)["counts"]
    assert counts["tasks_gave_up"] >= 1


# -- SIGTERM: emergency checkpoint, then resume from it ---------------------------------------


def _counting(n: int, journal: str, *, stage) -> dict:
    snap = stage.latest()
    start = json.loads(snap.data)["next"] if snap else 0
    state = {"next": start}
    register_flush(
        lambda: stage.save(json.dumps(state).encode(), step=state["next"], meta={"sigterm": 1})
    )
    for i in range(start, n):
        time.sleep(0.05)
        journal_append(journal, f"step {i}")
        state["next"] = i + 1
    return {"start": start, "epoch": stage.epoch}


def test_sigterm_flushes_emergency_checkpoint(ready):
    """SIGTERM to a worker saves the running task's progress, and the rerun resumes from it."""
    env = ready
    journal = str(env.dir / "sigterm.journal")
    fut = env.client.submit(resumable(_counting), 200, journal, key="sigterm")
    wait_until(lambda: _lines(journal) >= 8, 60, "progress")
    kill_worker_running(env.client, "sigterm", sig=signal.SIGTERM)
    res = fut.result(timeout=120)
    assert res["epoch"] == 2
    assert res["start"] >= 8, "the rerun did not resume from the emergency checkpoint"
    snaps = env.store.read_view(stage_key("sigterm", client_scope(env.client))).live_snaps()
    assert any(s.meta.get("sigterm") for s in snaps)
    assert _lines(journal) - 200 <= 1


# -- client.map, dask.delayed, annotations and the retry policy -----------------------------


def _flaky(x: int, tag: str, *, stage) -> list:
    for u in stage.pending([0, 1]):
        if u == 1 and stage.epoch == 1:
            raise ConnectionError(f"flaky backend for {x}")
        stage.done(u, x * 10 + u)
    return [stage.results()[0], stage.results()[1], stage.epoch]


def test_map_delayed_and_retry_policy(ready):
    """resumable works with client.map, dask.delayed + annotate, and RetryPolicy's retries."""
    env = ready
    rf = resumable(_flaky, retry=RetryPolicy(on=ConnectionError, attempts=2, wait_initial=0))
    assert rf.dask_options() == {}  # the wrapper retries itself; Dask's retries would add up
    futs = rf.map(env.client, [1, 2, 3], tag="map")
    assert env.client.gather(futs) == [[10, 11, 2], [20, 21, 2], [30, 31, 2]]
    with dask.annotate(priority=1):
        d = dask.delayed(rf)(4, "delayed")
    assert env.client.compute(d).result(timeout=60) == [40, 41, 2]
    # Without retries the same code error fails the task; the committed unit stays.
    bare = env.client.submit(resumable(_flaky), 5, "bare", key="flaky-bare")
    with pytest.raises(ConnectionError):
        bare.result(timeout=60)
    view = env.store.read_view(stage_key("flaky-bare", client_scope(env.client)))
    assert [r.unit for r in view.units.values()] == [0]


def _fails_first(path: str, fails: int, exc_type: str, x: int, *, stage) -> dict:
    journal_append(path, f"epoch {stage.epoch}")
    if _lines(path) <= fails:
        raise {"ConnectionError": ConnectionError, "ValueError": ValueError}[exc_type](path)
    return {"x": x, "epoch": stage.epoch}


def test_client_map_retries_by_the_policy(ready):
    """client.map(resumable(fn, retry=policy)) retries what the policy names, and only that."""
    env = ready
    c = env.client
    policy = RetryPolicy(on=ConnectionError, attempts=3, wait_initial=0.05, wait_jitter=0)
    fn = resumable(_fails_first, retry=policy)
    paths = [str(env.dir / f"calls-{x}") for x in range(3)]
    futs = c.map(
        fn,
        paths,
        [2] * 3,
        ["ConnectionError"] * 3,
        range(3),
        key=[f"retry-ok-{x}" for x in range(3)],
    )
    assert c.gather(futs) == [{"x": x, "epoch": 3} for x in range(3)]
    for path in paths:  # two ConnectionErrors, then success; each attempt claimed anew
        with open(path) as f:
            assert f.read().splitlines() == ["epoch 1", "epoch 2", "epoch 3"]

    # Out of attempts: the last ConnectionError reaches the client, unwrapped.
    spent = str(env.dir / "calls-spent")
    [fut] = c.map(fn, [spent], [5], ["ConnectionError"], [0], key=["retry-spent"])
    with pytest.raises(ConnectionError):
        fut.result(timeout=60)
    assert _lines(spent) == 3

    # An exception outside on= fails at once.
    other = str(env.dir / "calls-other")
    [fut] = c.map(fn, [other], [2], ["ValueError"], [0], key=["retry-not-on"])
    with pytest.raises(ValueError):
        fut.result(timeout=60)
    assert _lines(other) == 1


def test_missing_distributed_names_the_extra():
    """Importing dask_plugins without distributed says which extra to pip install."""
    code = "import sys; sys.modules['distributed'] = None; import dask_plugins"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "ImportError" in r.stderr
    assert "pip install 'faultkit[dask]'" in r.stderr, r.stderr[-2000:]


def test_keys_are_stable_across_sessions(ready):
    """A resumable task's key depends on its function and arguments only, not the session."""
    from faultkit.demo._dask import etl_task, train_task

    a = dask.base.tokenize(resumable(etl_task), 1)
    assert a == dask.base.tokenize(pickle.loads(pickle.dumps(resumable(etl_task))), 1)
    assert a != dask.base.tokenize(resumable(train_task), 1)
    f = ready.client.submit(resumable(_side_effect, store=ready.store_url), "/dev/null", 1)
    assert f.key.startswith("_side_effect-")
    assert f.result(timeout=60) == {"value": 2}


# -- no cluster: the plugin never breaks the scheduler, secrets stay out of reprs ------------


def test_plugin_hook_errors_are_contained():
    """A malformed scheduler event is logged and counted, never raised into the scheduler."""
    plugin = WorkerLossPlugin()
    plugin.log_event("all", {"action": "remove-worker", "worker": "w", "processing-tasks": 5})
    assert plugin.report()["counts"]["plugin_errors"] == 1


def test_reprs_hide_credentials():
    """Plugin reprs and pickles keep channel and store secrets out of logs."""
    p = WorkerLossPlugin(["json://user:hunter2secret@127.0.0.1:9/hook"])
    c = CheckpointPlugin("memory://x", secret="s3cr3t-key")
    assert "hunter2secret" not in repr(p) and "s3cr3t-key" not in repr(c)
    assert pickle.loads(pickle.dumps(p)).alerts == p.alerts  # the plugin itself travels


def test_resumable_outside_a_worker_says_what_to_do():
    """Calling a resumable task directly explains that it needs a Dask task key."""
    with pytest.raises(RuntimeError, match="Dask task key"):
        resumable(_side_effect, store="memory://x")("/dev/null", 1)
    assert "resumable" in repr(resumable(_side_effect))


def _count_run(path: str, x: int, *, stage) -> int:
    journal_append(path, f"ran {x}")
    stage.done(0)
    return x * 2


def test_results_are_scoped_to_the_scheduler_unless_named(tmp_path):
    """The same graph on a new cluster runs again (results live as long as the scheduler);
    with scope= a finished result is reused by the next cluster, until it expires."""
    import datetime as dt

    url = f"file://{tmp_path}/store"
    runs = str(tmp_path / "runs")
    for _ in range(2):
        with (
            LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster,
            Client(cluster) as client,
        ):
            default = resumable(_count_run, store=url)
            named = resumable(_count_run, store=url, scope="nightly", expire=dt.timedelta(hours=1))
            assert client.submit(default, runs, 1, key="same-key").result(60) == 2
            assert client.submit(named, runs, 2, key="named-key").result(60) == 4
    assert _lines(runs) == 3  # the default-scoped task twice, the named one once
    assert len(CheckpointStore(url).keys("dask/nightly")) == 1
    with pytest.raises(ValueError, match="scope"):
        resumable(_count_run, expire=dt.timedelta(hours=1))


# -- a fresh task's claim rides on its first commit; a zombie of an earlier run is ordered ----


def _gated(journal: str, gates: str, *, stage) -> int:
    """Two units, each waiting for its gate file (named by this process's pid), so the test
    decides which run of the task commits first."""
    from distributed import get_worker
    from distributed.worker import thread_state

    me = os.getpid()
    run_id = get_worker().state.tasks[thread_state.key].run_id
    journal_append(journal, f"START {me} {run_id}")
    for unit in (0, 1):
        gate = os.path.join(gates, f"{me}-{unit}")
        deadline = time.monotonic() + 120
        while not os.path.exists(gate):
            if time.monotonic() > deadline:
                raise TimeoutError(f"gate {gate} never opened")
            time.sleep(0.01)
        journaled_done(journal, stage, unit, me)
    return me


@pytest.mark.parametrize("first", ["zombie", "rerun"])
def test_zombie_of_an_earlier_run_is_ordered_below_the_rerun(tmp_path, first):
    """A fresh task claims with its first commit, and the scheduler's run id decides a race
    with a zombie. The worker running it is dropped by the scheduler while its task keeps
    running (as after a partition); the rerun elsewhere starts on the same empty log. If the
    zombie commits first, the rerun's first commit claims above it (fencing it) and skips its
    unit; if the rerun commits first, the zombie's first commit is refused. Either way the
    rerun's result is the task's, every unit is recorded once, and the zombie stops."""
    url = f"file://{tmp_path}/store"
    journal, gates = str(tmp_path / "journal"), tmp_path / "gates"
    gates.mkdir()

    def line(kind: str, pid: int | None = None, *rest: str):
        for e in journal_lines(journal):
            if (
                e[0] == kind
                and (pid is None or e[1] == str(pid))
                and e[2 : 2 + len(rest)] == [*rest]
            ):
                return e
        return None

    def open_gate(pid: int, unit: int) -> None:
        (gates / f"{pid}-{unit}").touch()

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as c,
    ):
        fut = c.submit(resumable(_gated, store=url), journal, str(gates), key="gated")
        start = wait_until(lambda: line("START"), 60, "the first run to start")
        zombie, zombie_run = int(start[1]), int(start[2])
        [addr] = [a for a, pid in c.run(os.getpid).items() if pid == zombie]

        async def drop(dask_scheduler, address=addr) -> None:
            # What a lost heartbeat does, without stopping the process: its task runs on.
            await dask_scheduler.remove_worker(address, close=False, stimulus_id="test-drop")

        c.run_on_scheduler(drop)
        rerun_start = wait_until(
            lambda: next(
                (e for e in journal_lines(journal) if e[0] == "START" and e[1] != start[1]), None
            ),
            60,
            "the rerun to start",
        )
        rerun, rerun_run = int(rerun_start[1]), int(rerun_start[2])
        assert rerun_run > zombie_run  # the scheduler numbers runs in the order they start
        if first == "zombie":
            open_gate(zombie, 0)
            wait_until(lambda: line("DONE", zombie, "0", "True", "1"), 60, "the zombie's unit 0")
            open_gate(rerun, 0)
            wait_until(lambda: line("DONE", rerun, "0", "False", "2"), 60, "the takeover")
            open_gate(rerun, 1)
            assert fut.result(timeout=60) == rerun
            open_gate(zombie, 1)
            wait_until(lambda: line("STALE", zombie, "1"), 60, "the zombie to be fenced")
        else:
            open_gate(rerun, 0)
            open_gate(rerun, 1)
            assert fut.result(timeout=60) == rerun
            open_gate(zombie, 0)
            wait_until(lambda: line("STALE", zombie, "0"), 60, "the zombie to be fenced")
        skey = stage_key("gated", client_scope(c))
    view = CheckpointStore(url).read_view(skey)
    units = {r.unit: (r.result, r.epoch) for r in view.units.values()}
    if first == "zombie":
        assert units == {0: (zombie, 1), 1: (rerun, 2)}
        assert [e for e, _s, _t in view.claims] == [1, 2]
    else:
        assert units == {0: (rerun, 1), 1: (rerun, 1)}
        assert [e for e, _s, _t in view.claims] == [1] and view.epoch_order == rerun_run
    assert view.finished is not None and view.finished.result == {"v": rerun}
    assert not line("DONE", zombie, "1")  # the zombie wrote nothing after it was fenced
