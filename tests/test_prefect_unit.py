"""Prefect blocks and resumable tasks against Prefect's test harness (a real local server)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import zipfile
from importlib.resources import files
from pathlib import Path

import pytest

pytest.importorskip("prefect")

from prefect import flow, get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from prefect.testing.standard_test_suites import blocks as standard_blocks
from prefect.testing.utilities import prefect_test_harness

from faultkit import CheckpointStore, RetryPolicy, retry_test_mode
from prefect_blocks import (
    AlertBlock,
    CheckpointStoreBlock,
    ResumableTask,
    RetryPolicyBlock,
    crash_budget,
    resumable_task,
    setup_crash_retry,
    stage_key,
)

pytestmark = pytest.mark.timeout(300)

FAST = RetryPolicy(on=ConnectionError, attempts=3, wait_initial=0.0, wait_jitter=0.0)
ROOT = Path(__file__).resolve().parent.parent
# Where the blocks' logo URL points: prefect_blocks/logo.png in the source repository.
REPO_RAW = "https://raw.githubusercontent.com/faultkit/faultkit/main/"


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
    """Prefect's own block checks: description, docs URL, field descriptions, code example, logo.

    Every check runs. Only ``test_has_a_valid_image`` is wrapped (see its docstring): Prefect's
    check fetches the logo URL, and the test network is loopback-only.
    """

    @pytest.fixture
    def block(self, block_cls):
        return block_cls

    def test_has_a_valid_image(self, block, monkeypatch) -> None:
        """Prefect's logo check, offline: the URL names the PNG this package ships, which is read.

        Prefect's client accepts only an http(s) logo URL, so ``_logo_url`` names
        ``prefect_blocks/logo.png`` in the source repository. Prefect's own check (square,
        46-999 px, readable by Pillow) runs unchanged with ``urlopen`` answering that one URL
        from the installed package instead of the internet; without Pillow (Prefect's check
        would skip) the PNG header is checked here instead, so the test never skips.
        """
        url = str(block._logo_url)
        assert url.startswith(REPO_RAW + "prefect_blocks/"), url
        shipped = files("prefect_blocks").joinpath(url.removeprefix(REPO_RAW + "prefect_blocks/"))
        assert shipped.is_file(), f"{url} names no file shipped in prefect_blocks"
        data = shipped.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
        width, height = struct.unpack(">II", data[16:24])
        assert width == height and 45 < width < 1000, (width, height)

        def urlopen(requested: str):
            assert requested == url
            return shipped.open("rb")

        if standard_blocks.HAS_PIL:
            monkeypatch.setattr(standard_blocks, "urlopen", urlopen)
            super().test_has_a_valid_image(block)


def test_logo_is_in_the_built_wheel(tmp_path):
    """A wheel built from the project holds prefect_blocks/logo.png (declared package data)."""
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in ("faultkit", "airflow_provider", "prefect_blocks", "dask_plugins"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=ignore)
    pip_wheel = ["pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    out = subprocess.run(
        [sys.executable, "-m", *pip_wheel, "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = (tmp_path / "dist").glob("faultkit-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert (
            z.read("prefect_blocks/logo.png")
            == files("prefect_blocks").joinpath("logo.png").read_bytes()
        )


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


def test_fenced_write_of_the_current_run_raises_and_never_exits(tmp_path, monkeypatch):
    """A fenced write in a process that is still its flow run's runner (here two tasks
    share a key=) is an ordinary failure: asked, the server says this process's run is the
    current one, so it raises StaleAttemptError instead of stopping the process quietly as
    a superseded zombie would (tests/cluster/test_prefect_hosts.py). The flow-run id is set
    in the environment, as a worker sets it, so the server is really asked."""
    from prefect.context import FlowRunContext

    from faultkit import StaleAttemptError
    from prefect_blocks import _task

    asked = []
    real = _task._superseded
    monkeypatch.setattr(_task, "_superseded", lambda *a: asked.append(real(*a)) or asked[-1])

    def no_exit(code: int) -> None:  # a wrong verdict would end pytest itself, with 0
        raise AssertionError(f"the flow-run process would have exited ({code})")

    monkeypatch.setattr(_task.os, "_exit", no_exit)
    store = CheckpointStore(f"file://{tmp_path}")

    @resumable_task(store=f"file://{tmp_path}", key="shared/stage", retries=0)
    def work(stage) -> int:
        monkeypatch.setenv("PREFECT__FLOW_RUN_ID", str(FlowRunContext.get().flow_run.id))
        stage.done("first")
        store.stage("shared/stage").claim()  # another attempt takes the stage over
        stage.done("second")  # fenced
        return 1

    @flow
    def pipeline() -> int:
        return work()

    with pytest.raises(StaleAttemptError):
        pipeline()
    assert asked == [""]  # the server was asked, and this run was still the current one


def test_each_flow_run_runs_its_bodies_and_a_named_scope_reuses(tmp_path):
    """Results are reused within a flow run only: two runs of one flow with the same (or
    no) parameters both run their task bodies; a task given a wider scope (key=) reuses its
    result across runs until it expires."""
    import datetime as dt

    CALLS.clear()

    @resumable_task(store=f"file://{tmp_path}")
    def square(x: int, stage) -> int:
        CALLS.append(("square", x))
        return x * x

    @resumable_task(store=f"file://{tmp_path}", key="daily/{x}", expire=dt.timedelta(hours=1))
    def cube(x: int, stage) -> int:
        CALLS.append(("cube", x))
        return x**3

    @flow
    def squares(n: int = 3) -> list[int]:
        return [f.result() for f in square.map(list(range(n)))] + [cube(2)]

    assert squares() == [0, 1, 4, 8]
    assert squares() == [0, 1, 4, 8]
    assert sorted(CALLS) == sorted([("square", x) for x in range(3)] * 2 + [("cube", 2)])


def test_default_key_is_the_flow_run_and_key_override(tmp_path):
    """Default keys are scoped to the flow run and hash inputs stably; ``key=`` templates
    name a wider scope (a key that is not valid as written is built with faultkit.key)."""
    a = stage_key("f", "run-1", "t", {"x": {"b": 1, "a": 2}})
    b = stage_key("f", "run-1", "t", {"x": {"a": 2, "b": 1}})
    assert a == b and a.startswith("prefect/f/run-1/t/")
    assert stage_key("f", "run-2", "t", {"x": {"a": 2, "b": 1}}) != a
    with pytest.raises(TypeError, match="pass key="):
        stage_key("f", "run-1", "t", {"x": object()})

    @resumable_task(store=f"file://{tmp_path}", key="etl/{region}/{day}")
    def part(region: str, stage) -> str:
        return stage.key

    @resumable_task(store=f"file://{tmp_path}", key="etl/{region} x")
    def odd(region: str, stage) -> str:
        return stage.key

    @flow
    def keyed(day: str = "2024-01-01") -> tuple[str, str]:
        return part("emea"), odd("emea")

    assert keyed() == ("etl/emea/2024-01-01", "etl/emea=20x")


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


def test_task_that_gives_up_completes_degraded_with_the_last_runs_output(tmp_path, alert_receiver):
    """Run 1 of a flow publishes; in run 2 the task fails on both of its tries with an
    infrastructure failure and completes in a state named ``Degraded`` whose result is run
    1's output, wrapped, which a downstream task tells apart; one ``degraded`` alert. A code
    bug on run 3 still fails the flow."""
    from datetime import timedelta

    from prefect import task

    from faultkit import Fallback, degraded

    flag, tries = tmp_path / "fail", tmp_path / "tries"

    @resumable_task(
        store=f"file://{tmp_path / 'store'}",
        alerts=[alert_receiver.url()],
        retries=1,
        retry_delay_seconds=0,
        fallback=Fallback(max_age=timedelta(hours=1)),
    )
    def publish(day: str, stage) -> dict:
        with open(tries, "a") as f:
            f.write(f"{stage.key}\n")
        if flag.exists():
            raise {"reset": ConnectionResetError, "bug": ValueError}[flag.read_text()]("dw")
        return {"rows": 42, "day": day}

    @task
    def report(out) -> str:
        d = degraded(out)
        return f"degraded from {d.source_key}" if d else f"fresh {out['rows']}"

    @flow
    def nightly() -> tuple:
        state = publish("2026-12-01", return_state=True)
        return state.name, report(state.result())

    assert nightly() == ("Completed", "fresh 42")
    [first] = tries.read_text().splitlines()
    flag.write_text("reset")
    name, said = nightly()
    assert name == "Degraded" and said == f"degraded from {first}"
    assert len(tries.read_text().splitlines()) == 3  # both tries of run 2 ran and failed
    msgs = alert_receiver.wait_for(1)
    assert len(msgs) == 1 and "degraded" in msgs[0]["title"] and first in msgs[0]["message"]
    flag.write_text("bug")
    assert nightly(return_state=True).is_failed()
    assert len(tries.read_text().splitlines()) == 5
    assert [m for m in alert_receiver.messages() if "degraded" in m["title"]] == msgs


def test_dask_task_runner_resumes(tmp_path):
    """On the Dask task runner (worker processes) tasks run once, and a run of the flow with a
    named scope (key=) returns their recorded results without running them."""
    prefect_dask = pytest.importorskip("prefect_dask")
    marks = tmp_path / "marks"
    marks.mkdir()

    @resumable_task(store=f"file://{tmp_path / 'store'}", key="touch/{i}")
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
    # A new process starts a new flow run: the stage is named so that it resumes across runs.
    @resumable_task(store=store_url, name="write", key="chaos/write")
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


# -- retry policies given by block name: loaded at run time ------------------------------

TRIES: list[str] = []


def _unreachable_api() -> str:
    """An API URL on a loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/api"


def _save_blocks(tmp_path: Path, name: str, **retry: object) -> None:
    policy = RetryPolicyBlock(
        retry_on=["ConnectionError"], wait_initial=0.0, wait_jitter=0.0, **retry
    )
    policy.save(name, overwrite=True)
    CheckpointStoreBlock(url=f"file://{tmp_path / 'store'}").save(name, overwrite=True)


def _flaky(mode: str, stage) -> int:
    """Fails with ConnectionError on the first two tries ("twice"), always, or a ValueError."""
    TRIES.append(mode)
    if mode == "value":
        raise ValueError("a bug, not retried by the block's policy")
    if mode == "always" or TRIES.count(mode) <= 2:
        raise ConnectionError("network blip")
    stage.done("ok")
    return len(TRIES)  # which try this is


def _task_run(state):
    with get_client(sync_client=True) as client:
        return client.read_task_run(state.state_details.task_run_id)


def test_retry_block_name_is_loaded_when_the_task_runs(tmp_path):
    """``retry=`` a block name: decorating needs no API; the task retries as the block says."""
    _save_blocks(tmp_path, "lazy-sync", attempts=3)
    TRIES.clear()
    with temporary_settings(updates={PREFECT_API_URL: _unreachable_api()}):
        flaky = resumable_task(store="lazy-sync", retry="lazy-sync", name="flaky")(_flaky)
        once = flaky.with_options(name="once", retries=0)
        renamed = flaky.with_options(name="renamed")  # still takes its retries from the block

    @flow
    def pipeline(mode: str, which: str = "flaky"):
        task = {"flaky": flaky, "once": once, "renamed": renamed}[which]
        return task(mode, return_state=True)

    state = pipeline("twice")
    assert state.result() == 3  # the third attempt succeeded
    assert TRIES == ["twice"] * 3
    run = _task_run(state)
    assert (run.run_count, run.empirical_policy.retries) == (3, 2)
    assert (flaky.retries, flaky.retry_delay_seconds) == (2, [0.0, 0.0])

    TRIES.clear()
    assert pipeline("always", return_state=True).is_failed()
    assert TRIES == ["always"] * 3  # the block's 3 attempts, not Prefect's default of 1

    TRIES.clear()
    assert pipeline("value", return_state=True).is_failed()
    assert TRIES == ["value"]  # not in the block's retry_on: not retried

    TRIES.clear()
    assert pipeline("always", "once", return_state=True).is_failed()
    assert TRIES == ["always"]  # an explicit retries=0 wins over the block
    assert isinstance(once, ResumableTask) and once.retries == 0

    TRIES.clear()
    assert pipeline("always", "renamed", return_state=True).is_failed()
    assert TRIES == ["always"] * 3


def test_async_task_loads_its_blocks_by_name(tmp_path):
    """An async resumable task with store and retry block names loads both and retries."""
    _save_blocks(tmp_path, "lazy-async", attempts=4)
    TRIES.clear()

    with temporary_settings(updates={PREFECT_API_URL: _unreachable_api()}):

        @resumable_task(store="lazy-async", retry="lazy-async")
        async def flaky(mode: str, stage) -> int:
            await asyncio.sleep(0)
            return _flaky(mode, stage)

    @flow
    async def pipeline(mode: str):
        return await flaky(mode, return_state=True)

    state = asyncio.run(pipeline("twice"))
    assert state.result() == 3
    assert TRIES == ["twice"] * 3
    assert _task_run(state).empirical_policy.retries == 3
    assert CheckpointStore(f"file://{tmp_path / 'store'}").keys("prefect")


# -- crash budget --------------------------------------------------------------------------


def test_crash_budget_is_the_policys_infrastructure_budget():
    """``crash_budget`` is ``RetryPolicy.budget("infrastructure")``, test-mode cap included."""
    both = RetryPolicy(on=ConnectionError, attempts=5, infra_attempts=4)
    code_only = RetryPolicy(on=ConnectionError, attempts=3)
    block = RetryPolicyBlock(attempts=3, infra_attempts=6)
    assert crash_budget(both) == both.budget("infrastructure") == 4
    assert crash_budget(code_only) == code_only.budget("infrastructure") == 3
    assert crash_budget(block) == 6
    with retry_test_mode(attempts=2):
        assert crash_budget(both) == both.budget("infrastructure") == 2
        assert crash_budget(code_only) == 2
        assert crash_budget(block) == 2
    with pytest.raises(TypeError, match="retry= takes"):
        crash_budget(3)


def test_crash_retry_automation_uses_the_test_mode_budget():
    """Inside ``retry_test_mode(attempts=2)`` the crash-retry automation re-runs at most once."""
    policy = RetryPolicy(on=ConnectionError, attempts=5, infra_attempts=4)
    with retry_test_mode(attempts=2):
        ids = setup_crash_retry(policy, zombies=False, suffix=" (budget test)")
    try:
        with get_client(sync_client=True) as client:
            automation = client.read_automation(ids["retry"])
        assert automation.trigger.match.root["prefect.run-count"] == ["0", "1"]
    finally:
        with get_client(sync_client=True) as client:
            client.delete_automation(ids["retry"])


def test_a_failure_the_retry_policy_will_not_retry_serves_the_fallback_at_once(tmp_path):
    """With retry=, a failure outside the policy's on= is not retried by Prefect (its
    retry_condition_fn): that first run is the last, so the fallback is served then."""
    from datetime import timedelta

    from faultkit import Fallback, RetryPolicy, degraded

    flag, tries = tmp_path / "fail", tmp_path / "tries"

    @resumable_task(
        store=f"file://{tmp_path / 'store'}",
        retry=RetryPolicy(on=ConnectionError, attempts=3, wait_initial=0.0, wait_jitter=0.0),
        fallback=Fallback(max_age=timedelta(hours=1), on=("infrastructure", LookupError)),
    )
    def publish(stage) -> dict:
        with open(tries, "a") as f:
            f.write(f"{stage.key}\n")
        if flag.exists():
            raise LookupError("the partition index is gone")
        return {"rows": 7}

    @flow
    def nightly() -> tuple:
        state = publish(return_state=True)
        return state.name, state.result()

    name, out = nightly()
    assert name == "Completed" and out == {"rows": 7}
    [first] = tries.read_text().splitlines()
    flag.write_text("x")
    name, out = nightly()
    assert name == "Degraded" and degraded(out).source_key == first
    assert len(tries.read_text().splitlines()) == 2  # one run: the policy retries no LookupError


def test_parameters_declared_after_stage_reach_the_task(tmp_path):
    """Prefect passes parameters positionally; one declared after ``stage`` must not land in
    its place."""

    @resumable_task(store=f"file://{tmp_path}")
    def load(part: int, stage, outage: int | None = None, scale: int = 1) -> tuple:
        return part * scale, outage, stage.key.startswith("prefect/")

    @flow
    def f() -> list:
        return [load(2, outage=5, scale=10), load(3), load.submit(4, 7).result()]

    assert f() == [(20, 5, True), (3, None, True), (4, 7, True)]
