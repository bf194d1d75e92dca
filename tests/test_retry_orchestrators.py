"""RetryPolicy translations obeyed by real Airflow, Prefect and Dask runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from faultkit import RetryPolicy

pytestmark = pytest.mark.slow

# -- Airflow ----------------------------------------------------------------------------

DAG_FILE = textwrap.dedent(
    """
    from __future__ import annotations

    import os
    from datetime import datetime

    from airflow.sdk import DAG, task

    from faultkit import RetryPolicy

    COUNTS = os.environ["FK_COUNT_DIR"]
    policy = RetryPolicy(on=ConnectionError, attempts=4, wait_initial=0.0, wait_jitter=0.0)
    split = RetryPolicy(on=ValueError, attempts=2, infra_attempts=3, wait_initial=0.0,
                        wait_jitter=0.0)


    def count(name: str) -> int:
        path = os.path.join(COUNTS, name)
        with open(path, "a") as f:
            f.write("x\\n")
        with open(path) as f:
            return len(f.read().splitlines())


    with DAG("fk_retry", schedule=None, start_date=datetime(2024, 1, 1), catchup=False) as dag:

        @task(**policy.airflow())
        def not_retried():
            count("not_retried")
            raise ValueError("a bug: retrying cannot help")

        @task(**{**policy.airflow(), "retry_policy": None})
        def control():
            count("control")
            raise ValueError("without the policy Airflow retries anything")

        @task(**policy.airflow())
        def flaky():
            n = count("flaky")
            if n < 3:
                raise ConnectionError(f"network blip on try {n}")
            return n

        @task(**split.airflow())
        def split_budget():
            n = count("split_budget")
            if n <= 2:
                raise ConnectionResetError(f"worker connection reset on try {n}")
            if n == 3:
                raise ValueError("one code failure")
            return n

        not_retried()
        control()
        flaky()
        split_budget()
    """
)

RUNNER = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    from fk_retry_dag import dag, policy
    from airflow.serialization.serialized_objects import DagSerialization
    from airflow_provider.retry import FaultkitRetryPolicy

    data = json.loads(json.dumps(DagSerialization.to_dict(dag)))
    back = DagSerialization.from_dict(data).task_dict["flaky"]
    rp = dag.task_dict["flaky"].retry_policy
    again = FaultkitRetryPolicy.deserialize(json.loads(json.dumps(rp.serialize())))
    out = {
        "serialized": {
            "retries": back.retries,
            "retry_delay": back.retry_delay.total_seconds(),
            "has_retry_policy": bool(getattr(back, "has_retry_policy", False)),
            "policy_round_trip": again == rp and again.policy == policy,
        }
    }
    dr = dag.test()
    out["states"] = {ti.task_id: [str(ti.state), ti.try_number] for ti in dr.get_task_instances()}
    print("RESULT " + json.dumps(out), flush=True)
    """
)


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory):
    """A temporary AIRFLOW_HOME with a migrated SQLite metadata DB and a dags folder."""
    home = tmp_path_factory.mktemp("airflow")
    dags = home / "dags"
    dags.mkdir()
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    }
    airflow = Path(sys.executable).with_name("airflow")
    proc = subprocess.run(
        [str(airflow), "db", "migrate"], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return env, home, dags


def test_airflow_policy_serializes_and_is_obeyed_by_dag_test(airflow_env, tmp_path):
    """In a real dag.test() run, errors outside ``on`` fail at once and matching ones retry."""
    env, _home, dags = airflow_env
    counts = tmp_path / "counts"
    counts.mkdir()
    (dags / "fk_retry_dag.py").write_text(DAG_FILE)
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    proc = subprocess.run(
        [sys.executable, str(runner)],
        env={**env, "FK_COUNT_DIR": str(counts)},
        capture_output=True,
        text=True,
        timeout=400,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-3000:], proc.stderr[-5000:])
    result = json.loads(lines[-1][len("RESULT ") :])

    assert result["serialized"] == {
        "retries": 3,
        "retry_delay": 0.0,
        "has_retry_policy": True,
        "policy_round_trip": True,
    }

    def calls(name: str) -> int:
        return len((counts / name).read_text().splitlines())

    states = result["states"]
    assert states["not_retried"][0] == "failed" and calls("not_retried") == 1
    assert states["control"][0] == "failed" and calls("control") == 4  # the fault really retries
    assert states["flaky"][0] == "success" and calls("flaky") == 3
    # Two infrastructure failures did not spend the two attempts meant for code failures.
    assert states["split_budget"][0] == "success" and calls("split_budget") == 4


# -- Prefect ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_harness():
    """A real temporary Prefect server and database for this module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=120):
            yield


def test_prefect_task_retries_what_the_policy_names(prefect_harness):
    """A Prefect task built with policy.prefect() retries ``on`` errors and fails others at once."""
    from prefect import flow, task

    policy = RetryPolicy(on=ConnectionError, attempts=4, wait_initial=0.0, wait_jitter=0.0)
    calls = {"flaky": 0, "bug": 0, "control": 0, "exhausted": 0}

    @task(**policy.prefect())
    def flaky() -> int:
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise ConnectionError("network blip")
        return calls["flaky"]

    @task(**policy.prefect())
    def bug() -> None:
        calls["bug"] += 1
        raise ValueError("a bug")

    @task(**{**policy.prefect(), "retry_condition_fn": None})
    def control() -> None:
        calls["control"] += 1
        raise ValueError("retried without the condition")

    @task(**policy.prefect())
    def exhausted() -> None:
        calls["exhausted"] += 1
        raise ConnectionError("always down")

    @flow
    def run(which: str) -> object:
        return {"flaky": flaky, "bug": bug, "control": control, "exhausted": exhausted}[which]()

    assert run("flaky") == 3 and calls["flaky"] == 3
    with pytest.raises(ValueError):
        run("bug")
    assert calls["bug"] == 1
    with pytest.raises(ValueError):
        run("control")
    assert calls["control"] == 4
    with pytest.raises(ConnectionError):
        run("exhausted")
    assert calls["exhausted"] == 4


# -- Dask -------------------------------------------------------------------------------


def _count_and_fail(path: str, fail_until: int) -> int:
    with open(path, "a") as f:
        f.write("x\n")
    with open(path) as f:
        n = len(f.read().splitlines())
    if n < fail_until:
        raise ConnectionError(f"blip {n}")
    return n


def test_dask_retries_drive_a_real_cluster(tmp_path):
    """policy.dask() gives Client.submit the retries that let a flaky task finish."""
    from distributed import Client, LocalCluster

    policy = RetryPolicy(on=ConnectionError, attempts=3)
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            host="127.0.0.1",
        ) as cluster,
        Client(cluster) as c,
    ):
        ok = c.submit(_count_and_fail, str(tmp_path / "ok"), 3, pure=False, **policy.dask())
        assert ok.result(timeout=120) == 3
        bad = c.submit(_count_and_fail, str(tmp_path / "bad"), 10, pure=False, **policy.dask())
        with pytest.raises(ConnectionError):
            bad.result(timeout=120)
    assert len((tmp_path / "bad").read_text().splitlines()) == 3
