"""Worker loss on a real Prefect server: SIGKILLed runs are detected Crashed, re-run, resumed."""

from __future__ import annotations

import pytest

pytest.importorskip("prefect")

from faultkit import CheckpointStore, RetryPolicy, demo
from faultkit._resumable import recorded
from faultkit.testing import AlertReceiver, PrefectStack, units_done, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

POLICY = RetryPolicy(
    on=ConnectionError, attempts=2, infra_attempts=3, wait_initial=0.2, wait_jitter=0.0
)
ETL = {"partitions": 3, "rows": 400, "seed": 0, "unit_delay": 0.25, "table": demo.TABLE}


@pytest.fixture(scope="module")
def receiver():
    """One alert receiver for the module's server."""
    with AlertReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def stack(tmp_path_factory, receiver):
    """A Prefect server with the demo blocks and flows served (one per module)."""
    work = tmp_path_factory.mktemp("prefect")
    with PrefectStack(
        store_url=f"file://{work / 'store'}",
        alert_urls=[receiver.url()],
        retry=POLICY,
        workdir=work / "stack",
        heartbeat_grace=50.0,
    ) as s:
        yield s


def test_killed_etl_run_is_rerun_and_loads_rows_once(stack, receiver, tmp_path):
    """SIGKILL of the flow-run process: the runner marks it Crashed, it re-runs and resumes."""
    before = len(receiver.messages())
    sink = f"sqlite:///{tmp_path / 'sink.db'}"
    store = CheckpointStore(stack.store_url)
    run_id = stack.run("faultkit-etl/etl", {"sink_url": sink, **ETL})

    def some_progress() -> bool:
        done = units_done(store, "prefect/faultkit-etl")
        return len(done) == ETL["partitions"] and 1 <= max(done.values()) < 8

    wait_until(some_progress, 120, "ETL units to be committed")
    proc = stack.flow_run_process()
    assert proc is not None, "no flow-run process under the serving process"
    assert stack.kill_flow_run(proc) == proc.pid
    assert not proc.is_running()
    done_at_kill = units_done(store, "prefect/faultkit-etl")

    fr = stack.wait(run_id, "COMPLETED", timeout=180)
    types = stack.state_types(run_id)
    assert "CRASHED" in types, types  # the fault fired and was seen
    crashed = [s for s in stack.states(run_id) if s.type.value == "CRASHED"]
    assert "-9" in crashed[0].message  # the runner saw the SIGKILL
    assert fr.run_count == 2
    assert demo.check_sink(sink) == {
        "rows": demo.expected_rows(ETL["partitions"], ETL["rows"]),
        "distinct": demo.expected_rows(ETL["partitions"], ETL["rows"]),
        "duplicates": 0,
    }
    # The re-run resumed: the killed attempt's units were not redone (epoch 2 skipped them).
    resumed = [k for k, n in done_at_kill.items() if n and store.read_view(k).epoch == 2]
    assert resumed, done_at_kill
    receiver.wait_for(before + 1, timeout=30)
    alerts = receiver.messages()[before:]
    assert len(alerts) == 1, alerts
    assert "worker_lost" in str(alerts[0])

    # A new run of the flow with the same parameters is a new run: it loads afresh under its
    # own stages (into another sink here), and the first run's stages are left as they were.
    epochs = {k: store.read_view(k).epoch for k in store.keys("prefect/faultkit-etl")}
    sink2 = f"sqlite:///{tmp_path / 'sink2.db'}"
    again = stack.run("faultkit-etl/etl", {"sink_url": sink2, **ETL})
    stack.wait(again, "COMPLETED", timeout=120)
    after = {k: store.read_view(k).epoch for k in store.keys("prefect/faultkit-etl")}
    assert {k: e for k, e in after.items() if k in epochs} == epochs
    assert len(after) == 2 * len(epochs) and all(after[k] == 1 for k in after if k not in epochs)
    assert demo.check_sink(sink2)["rows"] == demo.expected_rows(ETL["partitions"], ETL["rows"])


def _published(stack, flow_run_id: str) -> tuple[bool, object]:
    """What the run's publish stage recorded (the flow's own result is not persisted)."""
    store = CheckpointStore(stack.store_url)
    [key] = store.keys(f"prefect/faultkit-etl/{flow_run_id}/publish/")
    return recorded(store, key)


def _runs_of(stack, flow_run_id: str, task: str) -> list:
    """The flow run's task runs of ``task`` (Prefect names them ``<task>-<3 hex digits>``)."""
    return [r for n, r in stack.task_runs(flow_run_id).items() if n.rsplit("-", 1)[0] == task]


def test_publish_degrades_when_the_etl_gives_up_and_recovers_on_the_next_run(
    stack, receiver, tmp_path
):
    """faultkit-etl: a healthy run publishes; a run whose partition source is down gives up
    on it, and publish completes as ``Degraded`` with the healthy run's summary (one degraded
    alert), the flow run failing as its ETL did; the next healthy run publishes afresh."""
    # One sink, as in production: each flow run loads its own table.
    small = {"sink_url": f"sqlite:///{tmp_path / 'sink.db'}", "partitions": 2, "rows": 100}
    good = stack.run("faultkit-etl/etl", small)
    stack.wait(good, "COMPLETED", timeout=120)
    done, first = _published(stack, good)
    assert done and first["orders"] == 200
    [pub] = _runs_of(stack, good, "publish")
    assert pub.state.name == "Completed"

    before = len(receiver.messages())
    down = stack.run("faultkit-etl/etl", {**small, "outage": 1})
    stack.wait(down, "FAILED", timeout=120, fail_on=("CANCELLED", "COMPLETED"))
    parts = _runs_of(stack, down, "etl_partition")
    failed = [r for r in parts if r.state.type.value == "FAILED"]
    assert len(parts) == 2 and len(failed) == 1, [r.state for r in parts]
    assert "partition 1 is down" in failed[0].state.message
    # A reset connection is an infrastructure failure: its class's budget is spent.
    assert failed[0].run_count == POLICY.infra_attempts
    [pub] = _runs_of(stack, down, "publish")
    assert pub.state.type.value == "COMPLETED" and pub.state.name == "Degraded", pub.state
    degraded = [
        m for m in receiver.wait_for(before + 1, timeout=30)[before:] if "degraded" in m["title"]
    ]
    assert len(degraded) == 1 and good in degraded[0]["message"], degraded

    again = stack.run("faultkit-etl/etl", small)
    stack.wait(again, "COMPLETED", timeout=120)
    [pub] = _runs_of(stack, again, "publish")
    assert pub.state.name == "Completed"
    done, published = _published(stack, again)
    assert done and published["orders"] == 200 and published["revenue"] > 0
    assert published["table"] != first["table"]  # its own run's table
    assert [m for m in receiver.messages()[before:] if "degraded" in m["title"]] == degraded


TRAIN = {"steps": 60, "every_steps": 10, "seed": 0, "step_delay": 0.25}


def test_lost_worker_training_run_is_detected_by_heartbeats_and_resumes(stack, receiver):
    """SIGKILL of the runner and the flow run: missing heartbeats mark it Crashed; it resumes."""
    before = len(receiver.messages())
    store = CheckpointStore(stack.store_url)
    run_id = stack.run("faultkit-train/train", TRAIN)

    def snapshot_saved() -> bool:
        keys = store.keys("prefect/faultkit-train")
        return bool(keys) and any(s.step >= 10 for s in store.read_view(keys[0]).live_snaps())

    wait_until(snapshot_saved, 120, "a training checkpoint at step 10 or later")
    killed = stack.kill_serving()
    assert len(killed) >= 2  # the runner and the flow-run process
    assert stack.flow_run(run_id).state.type.value == "RUNNING"  # nobody saw it die yet

    crashed = stack.wait_history(run_id, "CRASHED", timeout=150)
    assert "heartbeat" in crashed.message  # the zombie automation fired
    stack.start_serving()  # a replacement worker
    fr = stack.wait(run_id, "COMPLETED", timeout=180)
    assert fr.run_count == 2
    (k,) = store.keys("prefect/faultkit-train")
    view = store.read_view(k)
    assert view.epoch == 2
    assert recorded(store, k) == (True, demo.reference_train(TRAIN["steps"], TRAIN["seed"]))
    receiver.wait_for(before + 1, timeout=30)
    alerts = receiver.messages()[before:]
    assert len(alerts) == 1, alerts
    assert "worker_lost" in str(alerts[0])
