"""fallback=: a stage that gives up serves the last good output of an earlier run, marked,
with one alert; a code bug, a first run or an output past max_age still fails."""

from __future__ import annotations

import os
import pickle
import time
from datetime import timedelta

import dask
import pytest
from distributed import Client, LocalCluster

from dask_plugins import CheckpointPlugin, WorkerLossPlugin, resumable
from faultkit import (
    CheckpointStore,
    Degraded,
    Fallback,
    RetryPolicy,
    _degraded,
    degraded,
    metrics,
    unwrap,
)
from faultkit._alerts import format_alert
from faultkit._resumable import call
from faultkit.testing import AlertReceiver, wait_until

LINEAGE = "etl/nightly/publish"


def _body(rows: int, fail: type[BaseException] | None = None, calls: list | None = None):
    def fn(*, stage):
        if calls is not None:
            calls.append(stage.key)
        for u in range(3):
            stage.done(u, u)
        if fail is not None:
            raise fail("the warehouse is unreachable")
        return {"rows": rows, "at": [1, 2]}

    return fn


def _run(store, run: str, rows: int, fail=None, fallback=Fallback(), last_try=True, calls=None):
    return call(
        _body(rows, fail, calls),
        store=store,
        key=f"etl/nightly/{run}/publish",
        fallback=fallback,
        lineage=LINEAGE,
        last_try=last_try,
    )


@pytest.fixture
def store(tmp_path):
    return CheckpointStore(f"file://{tmp_path}/store")


def _degraded_events(events):
    return [e for e in events if e.kind == "degraded"]


def test_gave_up_run_serves_the_newest_earlier_output(store, events):
    """Run 2 gives up on an infrastructure failure: it returns the newest output an earlier
    run recorded (run 1b, not the older run 1a), wrapped and marked, with exactly one
    degraded event; its body did run and fail (the fault fired)."""
    metrics.enable()
    before = metrics.registry().get_sample_value(
        "faultkit_degraded_total", {"failure_class": "infrastructure"}
    )
    assert _run(store, "run-1a", rows=5) == {"rows": 5, "at": [1, 2]}
    assert _run(store, "run-1b", rows=7) == {"rows": 7, "at": [1, 2]}
    calls: list = []
    out = _run(store, "run-2", rows=9, fail=ConnectionResetError, calls=calls)
    assert calls == ["etl/nightly/run-2/publish"]  # the body ran and failed
    info = degraded(out)
    assert isinstance(out, Degraded) and info is out
    assert unwrap(out) == {"rows": 7, "at": [1, 2]}
    assert out.key == "etl/nightly/run-2/publish"
    assert out.source_key == "etl/nightly/run-1b/publish"
    assert "ConnectionResetError: the warehouse is unreachable" in out.reason
    assert 0 <= out.age.total_seconds() < 60
    [ev] = _degraded_events(events)
    assert ev.key == out.key and ev.details["source_key"] == out.source_key
    assert "gave up; serving the output of etl/nightly/run-1b/publish" in ev.message
    title, body = format_alert(ev)
    assert "degraded" in title and "Downstream tasks get the earlier output" in body
    after = metrics.registry().get_sample_value(
        "faultkit_degraded_total", {"failure_class": "infrastructure"}
    )
    assert after == (before or 0) + 1
    # The run that degraded recorded nothing: re-running it tries afresh and can succeed.
    assert _run(store, "run-2", rows=9) == {"rows": 9, "at": [1, 2]}
    assert degraded(_run(store, "run-3", rows=1)) is None


def test_degraded_survives_pickling():
    """Dask and Prefect move results by pickle: the marker and its facts survive."""
    d = Degraded({"rows": 1}, key="a/b", source_key="a/c", source_time=time.time() - 5, reason="x")
    back = pickle.loads(pickle.dumps(d))
    assert back == d and degraded(back) is not None and back.age >= timedelta(seconds=5)
    assert degraded({"rows": 1}) is None and unwrap({"rows": 1}) == {"rows": 1}


def test_a_code_bug_is_not_hidden(store, events):
    """A failure outside the fallback's classes (a bug: ValueError) fails the stage, unless
    the fallback was told to cover code failures too."""
    _run(store, "run-1", rows=5)
    with pytest.raises(ValueError, match="warehouse"):
        _run(store, "run-2", rows=9, fail=ValueError)
    assert _degraded_events(events) == []
    out = _run(store, "run-3", rows=9, fail=ValueError, fallback=Fallback(on=("code",)))
    assert unwrap(out) == {"rows": 5, "at": [1, 2]}
    assert _degraded_events(events)[0].details["failure_class"] == "code"
    # The errors of a service the task depends on, named by type.
    with pytest.raises(ConnectionRefusedError):  # a ConnectionError: "code" to classify()
        _run(store, "run-4", rows=9, fail=ConnectionRefusedError)
    named = Fallback(on=("infrastructure", ConnectionError))
    out = _run(store, "run-5", rows=9, fail=ConnectionRefusedError, fallback=named)
    assert unwrap(out) == {"rows": 5, "at": [1, 2]}


def test_no_earlier_output_fails_as_before(store, events):
    """A first run (nothing recorded), a host that will retry (not the last try), and a run
    without fallback= all fail with the original error."""
    with pytest.raises(ConnectionResetError):
        _run(store, "run-1", rows=5, fail=ConnectionResetError)
    _run(store, "run-2", rows=5, fallback=None)  # recorded, but never noted as a fallback
    with pytest.raises(ConnectionResetError):
        _run(store, "run-3", rows=5, fail=ConnectionResetError)
    _run(store, "run-4", rows=5)
    with pytest.raises(ConnectionResetError):
        _run(store, "run-5", rows=5, fail=ConnectionResetError, last_try=False)
    with pytest.raises(ConnectionResetError):
        _run(store, "run-6", rows=5, fail=ConnectionResetError, fallback=None)
    assert _degraded_events(events) == []


def test_a_fenced_attempt_never_serves_a_fallback(store, events):
    """A zombie whose write was fenced did not give up (a newer attempt owns the stage):
    StaleAttemptError passes through even with a fallback that covers every failure."""
    from faultkit import StaleAttemptError

    _run(store, "run-1", rows=5)
    newer = store.stage("etl/nightly/run-2/publish")

    def zombie(*, stage):
        stage.done(0, 0)
        newer.claim()  # a newer attempt claims while this one still runs
        stage.done(1, 1)

    with pytest.raises(StaleAttemptError):
        call(
            zombie,
            store=store,
            key="etl/nightly/run-2/publish",
            fallback=Fallback(on=("infrastructure", "code")),
            lineage=LINEAGE,
        )
    assert _degraded_events(events) == []


def test_output_older_than_max_age_is_not_served(store, events, monkeypatch):
    """max_age bounds what is served: an hour later, a 30-minute fallback finds nothing."""
    _run(store, "run-1", rows=5)
    fresh = _run(store, "run-2", rows=9, fail=ConnectionResetError, fallback=Fallback(timedelta(1)))
    assert unwrap(fresh) == {"rows": 5, "at": [1, 2]}
    later = time.time() + 3600
    monkeypatch.setattr(_degraded.time, "time", lambda: later)
    with pytest.raises(ConnectionResetError):
        _run(
            store,
            "run-3",
            rows=9,
            fail=ConnectionResetError,
            fallback=Fallback(timedelta(minutes=30)),
        )
    assert len(_degraded_events(events)) == 1


def test_deleted_or_forged_earlier_outputs_are_skipped(store, events):
    """A pointer whose stage was deleted since (gc) is skipped for an older one; a forged
    pointer naming another lineage, or a damaged one, is ignored."""
    _run(store, "run-1", rows=5)
    _run(store, "run-2", rows=7)
    store.delete("etl/nightly/run-2/publish")
    folder = _degraded._folder(LINEAGE)
    store._storage.create(f"{folder}/{'9' * 20}-forged00", b'{"key": "secret/stage", "ts": 1}')
    store._storage.create(f"{folder}/{'9' * 19}8-damaged0", b"\x00not json")
    out = _run(store, "run-3", rows=9, fail=ConnectionResetError)
    assert out.source_key == "etl/nightly/run-1/publish" and unwrap(out)["rows"] == 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_age": timedelta(0)}, "positive timedelta"),
        ({"max_age": 3600}, "positive timedelta"),
        ({"on": ("network",)}, "failure classes"),
        ({"on": (int,)}, "failure classes"),
        ({"on": ()}, "failure classes"),
    ],
)
def test_fallback_options_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Fallback(**kwargs)


def test_fallback_argument_forms():
    assert _degraded.as_fallback(None) is None and _degraded.as_fallback(False) is None
    assert _degraded.as_fallback(True) == Fallback()
    assert _degraded.as_fallback(timedelta(hours=2)) == Fallback(max_age=timedelta(hours=2))
    with pytest.raises(TypeError, match="fallback= takes True"):
        _degraded.as_fallback("yes")


# -- Dask: a new scheduler's run gives up and serves the previous scheduler's output -------


def _publish(flag: str, attempts: str, *, stage) -> dict:
    with open(attempts, "a") as f:
        f.write(f"{os.getpid()}\n")
    for u in range(2):
        stage.done(u, u)
    if os.path.exists(flag):
        with open(flag) as f:
            kind = f.read().strip()
        raise {"ConnectionResetError": ConnectionResetError, "ValueError": ValueError}[kind](kind)
    return {"published": 42}


def _cluster(store_url: str, receiver: AlertReceiver):
    cluster = LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
    )
    client = Client(cluster)
    client.register_plugin(WorkerLossPlugin([receiver.url()], store_url))
    client.register_plugin(CheckpointPlugin(store_url))
    return cluster, client


def test_dask_task_that_gives_up_serves_the_last_scheduler_output(tmp_path):
    """Scheduler 1 publishes; under scheduler 2 the same task fails on the infrastructure
    through every attempt of its policy and returns scheduler 1's output as Degraded; the
    scheduler's plugin sends exactly one degraded alert. A code bug still fails the task."""
    store_url = f"file://{tmp_path}/store"
    flag, attempts = str(tmp_path / "fail"), str(tmp_path / "attempts")
    policy = RetryPolicy(on=ConnectionError, attempts=2, wait_initial=0.05, wait_jitter=0)
    task = resumable(_publish, retry=policy, fallback=Fallback(max_age=timedelta(hours=1)))
    with AlertReceiver() as receiver, dask.config.set({"distributed.scheduler.work-stealing": 0}):
        cluster, client = _cluster(store_url, receiver)
        with cluster, client:
            assert client.submit(task, flag, attempts, key="publish").result(60) == {
                "published": 42
            }
        with open(flag, "w") as f:
            f.write("ConnectionResetError")
        cluster, client = _cluster(store_url, receiver)
        with cluster, client:
            fut = client.submit(task, flag, attempts, key="publish")
            out = fut.result(60)
            assert isinstance(out, Degraded) and out.value == {"published": 42}
            assert out.source_key.startswith("dask/scheduler-") and out.source_key != out.key
            with open(attempts) as f:
                assert len(f.read().splitlines()) == 3  # 1 success, then 2 failed attempts
            wait_until(
                lambda: len([m for m in receiver.messages() if "degraded" in m["title"]]) >= 1,
                30,
                "the degraded alert",
            )
            # The same incident again (the task rerun on this scheduler): no second alert.
            del fut
            wait_until(
                lambda: (
                    not client.run_on_scheduler(
                        lambda dask_scheduler: "publish" in dask_scheduler.tasks
                    )
                ),
                30,
                "the scheduler to forget the task",
            )
            out2 = client.submit(task, flag, attempts, key="publish").result(60)
            assert isinstance(out2, Degraded)
            with open(attempts) as f:
                assert len(f.read().splitlines()) == 5  # it did run again
            with open(flag, "w") as f:
                f.write("ValueError")
            with pytest.raises(ValueError):
                client.submit(task, flag, attempts, key="publish-bug").result(60)
            assert client.run_on_scheduler(
                lambda dask_scheduler: dask_scheduler.plugins["faultkit-worker-loss"].flush(30)
            )
        alerts = [m for m in receiver.messages() if "degraded" in m["title"]]
        assert len(alerts) == 1, alerts
        assert "serving the output of dask/scheduler-" in alerts[0]["message"]


def test_gc_older_than_removes_old_notes_too(store, monkeypatch):
    """``faultkit gc --older-than`` (store.expire) removes old finished stages and the notes
    that named them as fallbacks; newer ones stay and are still served."""
    _run(store, "run-1", rows=5)
    later = time.time() + 7200
    real = time.time
    monkeypatch.setattr(_degraded.time, "time", lambda: later)
    _run(store, "run-2", rows=7)
    monkeypatch.setattr(_degraded.time, "time", real)
    folder = _degraded._folder(LINEAGE)
    assert len(store._storage.list(folder)) == 2
    import faultkit._store as store_mod

    monkeypatch.setattr(store_mod.time, "time", lambda: later + 10)
    monkeypatch.setattr(_degraded.time, "time", lambda: later + 10)
    gone = store.expire(3600)
    assert gone == ["etl/nightly/run-1/publish"]
    assert len(store._storage.list(folder)) == 1
    out = _run(store, "run-3", rows=9, fail=ConnectionResetError)
    assert out.source_key == "etl/nightly/run-2/publish"
