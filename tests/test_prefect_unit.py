"""Prefect blocks and resumable tasks against Prefect's test harness (a real local server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("prefect")

from prefect import flow
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from prefect.testing.utilities import prefect_test_harness

from faultkit import CheckpointStore, RetryPolicy
from prefect_blocks import (
    AlertBlock,
    CheckpointStoreBlock,
    RetryPolicyBlock,
    resumable_task,
    stage_key,
)

pytestmark = pytest.mark.timeout(300)

FAST = RetryPolicy(on=ConnectionError, attempts=3, wait_initial=0.0, wait_jitter=0.0)


@pytest.fixture(scope="module", autouse=True)
def harness():
    """One temporary Prefect server and database for the module."""
    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


# -- blocks ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "block_cls",
    [
        pytest.param(CheckpointStoreBlock, id="store"),
        pytest.param(AlertBlock, id="alerts"),
        pytest.param(RetryPolicyBlock, id="retry"),
    ],
)
class TestBlockStandards(BlockStandardTestSuite):
    """Prefect's own block checks: description, docs URL, field descriptions, code example."""

    @pytest.fixture
    def block(self, block_cls):
        return block_cls

    def test_has_a_valid_image(self, block) -> None:
        """The logo is an https URL (fetching it would leave the loopback-only test network)."""
        assert str(block._logo_url).startswith("https://")


def test_blocks_are_registered_by_the_cli(harness):
    """``prefect block register -m prefect_blocks`` registers all three block types."""
    env = {**os.environ, "PREFECT_API_URL": harness}
    out = subprocess.run(
        [
            str(Path(sys.executable).with_name("prefect")),
            "block",
            "register",
            "-m",
            "prefect_blocks",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3" in out.stdout
    from prefect import get_client

    with get_client(sync_client=True) as client:
        for slug in ("faultkit-checkpoint-store", "faultkit-alerts", "faultkit-retry-policy"):
            assert client.read_block_type_by_slug(slug).slug == slug


def test_collection_entry_point_names_prefect_blocks():
    """The ``prefect.collections`` entry point loads this package."""
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="prefect.collections")}
    assert eps.get("faultkit") == "prefect_blocks"


def test_store_block_round_trip_masks_secrets(tmp_path):
    """A saved CheckpointStoreBlock loads back equal, works, and never shows its secrets."""
    block = CheckpointStoreBlock(
        url=f"file://{tmp_path}",
        storage_options={"auto_mkdir": True},
        key="AKIDEXAMPLE",
        secret="sup3r-s3cret",
    )
    block.save("roundtrip", overwrite=True)
    loaded = CheckpointStoreBlock.load("roundtrip")
    assert loaded.url == block.url
    assert loaded.secret.get_secret_value() == "sup3r-s3cret"
    for text in (repr(loaded), str(loaded), json.dumps(loaded.model_dump(mode="json"))):
        assert "sup3r-s3cret" not in text and "AKIDEXAMPLE" not in text
    store = CheckpointStore(loaded.url)
    with store.stage("k") as st:
        st.done(1)
    assert loaded.get_store().read_view("k").units


def test_alert_block_round_trip_masks_urls(alert_receiver):
    """A saved AlertBlock keeps its URLs secret and its Alerter delivers to them."""
    from faultkit import Event

    AlertBlock(urls=[alert_receiver.url()], dedupe_window=60).save("alerts", overwrite=True)
    loaded = AlertBlock.load("alerts")
    assert str(alert_receiver.port) not in repr(loaded)
    assert loaded.get_alerter().send(Event("gave_up", "k", "test"))
    alert_receiver.wait_for(1)


def test_retry_block_round_trip_gives_the_same_policy():
    """A saved RetryPolicyBlock gives back a RetryPolicy with the same numbers and ``on``."""
    RetryPolicyBlock(
        retry_on=["ConnectionError", "socket.timeout"],
        attempts=4,
        wait_initial=0.5,
        infra_attempts=2,
    ).save("retry", overwrite=True)
    policy = RetryPolicyBlock.load("retry").get_policy()
    assert (policy.attempts, policy.wait_initial, policy.infra_attempts) == (4, 0.5, 2)
    assert policy.matches(ConnectionResetError()) and not policy.matches(ValueError())
    with pytest.raises(ValueError, match="cannot be imported"):
        RetryPolicyBlock(retry_on=["no.such.Error"]).get_policy()


# -- resumable tasks ---------------------------------------------------------------------

CALLS: list[tuple[str, object]] = []


def test_failure_midway_is_retried_and_resumes(tmp_path):
    """A task that fails after 2 of 5 units is retried by Prefect and redoes none of them."""
    CALLS.clear()
    failed = []

    @resumable_task(store=f"file://{tmp_path}", retry=FAST)
    def load(batch: str, stage) -> dict:
        for u in stage.pending(range(5)):
            if u == 2 and not failed:
                failed.append(stage.epoch)
                raise ConnectionError("network blip")
            CALLS.append((batch, u))
            stage.done(u, result=u * 10)
        return {"total": sum(stage.results().values()), "epoch": stage.epoch}

    @flow
    def pipeline(batch: str = "b1") -> dict:
        return load(batch)

    assert pipeline() == {"total": 100, "epoch": 2}
    assert failed == [1]  # the fault fired in the first attempt
    assert CALLS == [("b1", u) for u in range(5)]  # every unit ran exactly once


def test_rerun_with_same_parameters_runs_no_body(tmp_path):
    """Re-running a completed flow with the same parameters skips every task body."""
    CALLS.clear()

    @resumable_task(store=f"file://{tmp_path}")
    def square(x: int, stage) -> int:
        CALLS.append(("square", x))
        return x * x

    @flow
    def squares(n: int = 3) -> list[int]:
        return [f.result() for f in square.map(list(range(n)))]

    assert squares() == [0, 1, 4]
    assert squares() == [0, 1, 4]
    assert sorted(CALLS) == [("square", 0), ("square", 1), ("square", 2)]
    assert squares(n=2) == [0, 1]  # other parameters: other stages
    assert len(CALLS) == 5


def test_default_key_is_stable_and_key_override(tmp_path):
    """Keys hash flow parameters and inputs stably; ``key=`` templates override them."""
    a = stage_key("f", {"n": 1, "m": [1, 2]}, "t", {"x": {"b": 1, "a": 2}})
    b = stage_key("f", {"m": [1, 2], "n": 1}, "t", {"x": {"a": 2, "b": 1}})
    assert a == b and a.startswith("prefect/f/t/")
    assert stage_key("f", {"n": 2, "m": [1, 2]}, "t", {"x": {"a": 2, "b": 1}}) != a
    with pytest.raises(TypeError, match="pass key="):
        stage_key("f", {}, "t", {"x": object()})

    @resumable_task(store=f"file://{tmp_path}", key="etl/{region}/{day}")
    def part(region: str, stage) -> str:
        return stage.key

    @flow
    def keyed(day: str = "2024-01-01") -> str:
        return part("emea")

    assert keyed() == "etl/emea/2024-01-01"


def test_a_task_without_stage_is_refused():
    """Decorating a function without a ``stage`` parameter fails with a clear message."""
    with pytest.raises(TypeError, match="'stage' keyword"):
        resumable_task(lambda x: x, store="memory://x")


def test_gave_up_alert_when_a_task_fails_for_good(tmp_path, alert_receiver):
    """A task that fails without retries sends one ``gave_up`` alert."""

    @resumable_task(store=f"file://{tmp_path}", alerts=[alert_receiver.url()])
    def broken(stage) -> None:
        raise ValueError("bad input")

    @flow
    def doomed() -> None:
        broken()

    state = doomed(return_state=True)
    assert state.is_failed()
    msgs = alert_receiver.wait_for(1)
    assert len(msgs) == 1 and "gave_up" in json.dumps(msgs[0])


def test_dask_task_runner_resumes(tmp_path):
    """On the Dask task runner (worker processes) tasks run once and re-runs skip them."""
    prefect_dask = pytest.importorskip("prefect_dask")
    marks = tmp_path / "marks"
    marks.mkdir()

    @resumable_task(store=f"file://{tmp_path / 'store'}")
    def touch(i: int, stage) -> int:
        (marks / f"{i}-{os.getpid()}-{stage.epoch}").touch()
        return i + 1

    runner = prefect_dask.DaskTaskRunner(
        cluster_kwargs={
            "n_workers": 1,
            "threads_per_worker": 2,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": "127.0.0.1:0",
        }
    )

    @flow(task_runner=runner)
    def on_dask(n: int = 3) -> list[int]:
        return [f.result() for f in touch.map(list(range(n)))]

    assert on_dask() == [1, 2, 3]
    assert on_dask() == [1, 2, 3]
    names = sorted(p.name for p in marks.iterdir())
    assert [n.split("-")[0] for n in names] == ["0", "1", "2"]  # each body ran once
    assert all(int(n.split("-")[1]) != os.getpid() for n in names)  # in a worker process


def _child_flow(api_url: str, store_url: str, out: str) -> dict:
    """Run a resumable flow in a child process (for the chaos test)."""
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        return _chaos_flow(store_url, out)


def _chaos_flow(store_url: str, out: str) -> dict:
    @resumable_task(store=store_url, name="write")
    def write(stage) -> dict:
        for u in stage.pending(range(6)):
            with open(out, "a") as f:
                f.write(f"{u}\n")
            stage.done(u)
        return {"epoch": stage.epoch}

    @flow(name="chaos-flow")
    def chaos_flow(store_url: str) -> dict:
        return write()

    return chaos_flow(store_url)


def test_killed_flow_process_resumes_with_the_chaos_fixture(harness, tmp_path, faultkit_chaos):
    """A flow process SIGKILLed at the 3rd unit commit resumes in a new process from unit 3."""
    store_url = f"file://{tmp_path / 'store'}"
    out = str(tmp_path / "out.txt")
    first = faultkit_chaos.run_in_child(
        _child_flow,
        harness,
        store_url,
        out,
        env={"FAULTKIT_FAILPOINTS": "done.committed=kill@3"},
        timeout=120,
    )
    assert first.killed  # the fault fired
    assert Path(out).read_text().split() == ["0", "1", "2"]
    assert _chaos_flow(store_url, out) == {"epoch": 2}
    assert Path(out).read_text().split() == ["0", "1", "2", "3", "4", "5"]
