"""The MLflow run of a training stage survives SIGKILLs: one run, each metric point once.

Against a real tracking server (``mlflow server``, SQLite backend store, local artifact root).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient

from faultkit import CheckpointStore, StaleAttemptError
from faultkit.testing import MlflowServer
from faultkit.torch import MlflowRun

ZYGOTE = os.path.join(os.path.dirname(__file__), "torch_scripts", "zygote.py")
# Long enough that the kills never use up the run: a kill at the first batch sent has nothing
# to send (so never fires) once an earlier incarnation sent the last interval's points.
STEPS, EVERY, KILLS = 150, 5, 12
FP_POINTS = ["mlflow.sent", "save.blob_written", "log.before_create"]


@pytest.fixture(scope="module")
def mlflow_server():
    reason = MlflowServer.available()
    if reason:
        pytest.skip(f"MLflow tests skipped: {reason}")
    with MlflowServer() as server:
        yield server


def _runs(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _plans(rng: random.Random) -> list[dict]:
    """At least a third of the kills land right after a batch of points reached MLflow and
    before the snapshot that should follow it (the window where points get sent twice)."""
    plans = []
    for i in range(KILLS):
        if i % 3 == 0:
            # The first batch sent: every incarnation sends one (a second may never come).
            plans.append({"kind": "fp", "point": "mlflow.sent", "nth": 1})
        elif i % 3 == 1:
            plans.append({"kind": "fp", "point": rng.choice(FP_POINTS[1:]), "nth": 1})
        else:
            plans.append({"kind": "time", "step": rng.randint(1, STEPS // 5), "after": 0.0})
    return plans


@pytest.mark.timeout(240)
def test_sigkilled_training_keeps_one_mlflow_run_and_each_point_once(mlflow_server, tmp_path):
    seed = int(os.environ.get("FK_CHAOS_SEED") or time.time_ns() % 2**32)
    rng = random.Random(seed)
    base = {"key": "train/mlp", "steps": STEPS, "every": EVERY, "seed": 0, "delay": 0.003}
    jobs = [
        {**base, "id": "ref", "store": f"file://{tmp_path}/ref", "async": True, "kills": [],
         "mlflow": {"uri": mlflow_server.url, "experiment": "ref"}},
        {**base, "id": "chaos", "store": f"file://{tmp_path}/chaos", "async": True,
         "kills": _plans(rng), "mlflow": {"uri": mlflow_server.url, "experiment": "chaos"}},
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, ZYGOTE],
        input="".join(json.dumps(j) + "\n" for j in jobs),
        capture_output=True,
        text=True,
        timeout=220,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {r["id"]: r for r in map(json.loads, proc.stdout.splitlines())}
    what = f"seed {seed}, plans {jobs[1]['kills']}"
    (ref,) = results["ref"]["incarnations"]
    assert ref["exit"] == 0, ref["events"][-3:]
    incs = results["chaos"]["incarnations"]
    for n, inc in enumerate(incs[:-1]):
        assert inc["signal"] == signal.SIGKILL, f"{what}: kill {n} did not land: {inc}"
        assert not any(e == "result" for e, _ in inc["events"]), what
    assert len(incs) - 1 >= 10
    # The kills after a batch reached MLflow but before its snapshot really happened.
    sent_kills = [
        inc for inc, plan in zip(incs, jobs[1]["kills"], strict=False)
        if plan["kind"] == "fp" and plan["point"] == "mlflow.sent" and not inc["parent_killed"]
    ]  # fmt: skip
    assert len(sent_kills) >= KILLS // 3, what
    last = incs[-1]
    assert last["exit"] == 0, f"{what}: {last['events'][-3:]}"
    assert last["events"][-1][1]["model"] == ref["events"][-1][1]["model"], what

    client = MlflowClient(mlflow_server.url)
    [ref_run] = _runs(client, "ref")
    runs = _runs(client, "chaos")
    assert len(runs) == 1, f"{what}: {len(runs)} MLflow runs for one stage"
    [run] = runs
    assert run.info.status == "FINISHED", run.info.status
    assert run.data.params == {"seed": "0", "steps": str(STEPS), "every_steps": str(EVERY)}
    # The last attempt's epoch (a kill before a claim was written leaves no epoch behind).
    assert 1 < int(run.data.tags["faultkit.attempt"]) <= len(incs), run.data.tags
    for key in ("loss", "lr"):
        got = _history(client, run.info.run_id, key)
        steps = [s for s, _ in got]
        assert steps == list(range(STEPS)), f"{what}: {key} steps {steps}"
        assert got == _history(client, ref_run.info.run_id, key), f"{what}: {key} differs"


def _stage(tmp_path, name="s"):
    return CheckpointStore(f"file://{tmp_path}/store").stage(name)


def test_a_fenced_attempt_adds_nothing_and_leaves_the_run_to_the_newer_one(mlflow_server, tmp_path):
    uri = mlflow_server.url
    old = _stage(tmp_path).claim()
    zombie = MlflowRun(old, experiment="fenced", tracking_uri=uri)
    zombie.log_metrics({"loss": 1.0}, step=0)
    zombie.flush()
    zombie.log_metrics({"loss": 2.0}, step=1)  # buffered when the newer attempt claims

    new = _stage(tmp_path).claim()
    with MlflowRun(new, experiment="fenced", tracking_uri=uri) as current:
        current.log_metrics({"loss": 1.0}, step=0)  # a replay: dropped
        assert current.run_id == zombie.run_id  # found by its tag: the same run
        with pytest.raises(StaleAttemptError):
            zombie.flush()
        with pytest.raises(StaleAttemptError), zombie:
            zombie.log_metrics({"loss": 9.0}, step=2)
            zombie.flush()
        current.log_metrics({"loss": 3.0}, step=1)
        assert current.replays_dropped == 1
        client = MlflowClient(uri)
        assert client.get_run(current.run_id).info.status == "RUNNING"
    [run] = _runs(client, "fenced")
    assert run.info.status == "FINISHED"
    assert _history(client, run.info.run_id, "loss") == [(0, 1.0), (1, 3.0)]


def test_status_follows_how_the_attempt_ended(mlflow_server, tmp_path):
    uri = mlflow_server.url
    client = MlflowClient(uri)

    steps = iter(range(3))

    def attempt(body):
        stage = _stage(tmp_path, "status").claim()
        with MlflowRun(stage, experiment="status", tracking_uri=uri) as run:
            run.log_metrics({"x": 1.0}, step=next(steps))
            body()
        return run.run_id

    def fail():
        raise RuntimeError("boom")

    def preempted():
        raise SystemExit(75)

    with pytest.raises(RuntimeError):
        attempt(fail)
    [run] = _runs(client, "status")
    rid = run.info.run_id
    assert run.info.status == "FAILED"
    with pytest.raises(SystemExit):
        attempt(preempted)
    assert client.get_run(rid).info.status == "KILLED"
    assert attempt(lambda: None) == rid
    assert client.get_run(rid).info.status == "FINISHED"
    assert len(_runs(client, "status")) == 1


def test_a_changed_param_on_resume_is_refused(mlflow_server, tmp_path):
    uri = mlflow_server.url
    stage = _stage(tmp_path, "params").claim()
    run = MlflowRun(stage, experiment="params", tracking_uri=uri)
    run.log_params({"lr": 0.1, "batch": 32})
    again = MlflowRun(_stage(tmp_path, "params").claim(), experiment="params", tracking_uri=uri)
    again.log_params({"lr": 0.1})  # the same value: nothing sent, no error
    with pytest.raises(ValueError, match=r"param 'batch' is '32'.*logs '64'"):
        again.log_params({"batch": 64})


def test_points_mlflow_could_not_take_travel_in_the_snapshot(mlflow_server, tmp_path, monkeypatch):
    """The tracking server is unreachable when a snapshot is taken: training goes on, the
    points ride in the snapshot, and the next attempt sends them."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri = mlflow_server.url
    stage = _stage(tmp_path, "offline").claim()
    run = MlflowRun(stage, experiment="offline", tracking_uri=uri)
    run.log_metrics({"loss": 0.5}, step=0)
    run._client = MlflowClient("http://127.0.0.1:9")  # the server is gone: nothing listens
    state = run.state_dict()  # the flush fails; the snapshot keeps the point
    assert state["pending"] == [["loss", 0.5, state["pending"][0][2], 0]]

    resumed = MlflowRun(_stage(tmp_path, "offline").claim(), experiment="offline",
                        tracking_uri=uri)  # fmt: skip
    resumed.load_state_dict(state)
    resumed.log_metrics({"loss": 0.25}, step=1)
    resumed.finish()
    client = MlflowClient(uri)
    [r] = _runs(client, "offline")
    assert _history(client, r.info.run_id, "loss") == [(0, 0.5), (1, 0.25)]
