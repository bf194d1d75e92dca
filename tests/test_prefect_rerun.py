"""A flow process SIGKILLed inside a resumable task, then run again: the re-run resumes.

On Prefect's ephemeral server (no ``PREFECT_API_URL``) and on a real ``prefect server``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("prefect")

from faultkit import CheckpointStore
from faultkit._resumable import recorded
from faultkit.testing import wait_until
from prefect_blocks._ephemeral import ephemeral_servers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

SCRIPT = Path(__file__).parent / "scripts" / "prefect_rerun.py"
KEY = "demo/load/2024-01-01"
HOLD = 5  # the first attempt is killed after unit 5


def _env(tmp_path: Path, api_url: str | None, home: Path) -> dict[str, str]:
    env = dict(os.environ)
    for name in list(env):
        if name.startswith("PREFECT_API_"):
            del env[name]
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "FK_STORE": f"file://{tmp_path / 'store'}",
        }
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _units_by_epoch(store: CheckpointStore) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for rec in store.read_view(KEY).units.values():
        out.setdefault(rec.epoch, []).append(rec.unit)
    return {e: sorted(u) for e, u in out.items()}


def _servers_of(home: Path) -> list[int]:
    return [s.pid for s in ephemeral_servers() if s.home == str(home)]


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    """``prefect server start`` on a free loopback port (SQLite, temp home)."""
    from faultkit.testing import PrefectStack

    stack = PrefectStack(store_url="memory://unused", workdir=tmp_path_factory.mktemp("server"))
    try:
        stack.start_server(timeout=180)
        yield stack.api_url
    finally:
        stack.close()


def _kill_then_rerun(tmp_path: Path, api_url: str | None) -> tuple[str, str]:
    """Run the flow, SIGKILL it after unit ``HOLD``, run it again; returns both outputs."""
    home = tmp_path / "prefect-home"
    env = _env(tmp_path, api_url, home)
    store = CheckpointStore(env["FK_STORE"])
    first = subprocess.Popen(
        [sys.executable, str(SCRIPT)],
        env={**env, "FK_HOLD_AFTER": str(HOLD)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(
            lambda: first.poll() is not None or len(store.read_view(KEY).units) > HOLD,
            240,
            f"the first attempt to mark units 0..{HOLD} done",
            interval=0.1,
        )
        assert first.poll() is None, first.communicate()[0].decode()
        os.kill(first.pid, signal.SIGKILL)
        # Whoever reads the killed run's output gets EOF: no orphaned server holds the pipe.
        out1 = first.communicate(timeout=60)[0].decode()
    finally:
        with contextlib.suppress(ProcessLookupError):
            first.kill()
    assert first.returncode == -signal.SIGKILL  # the fault fired
    wait_until(lambda: not _servers_of(home), 30, "the killed run's ephemeral server to stop")
    assert _units_by_epoch(store) == {1: list(range(HOLD + 1))}

    second = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300
    )
    out2 = second.stdout + second.stderr
    assert second.returncode == 0, out2
    resumed = list(range(HOLD + 1, 15))
    assert _units_by_epoch(store) == {1: list(range(HOLD + 1)), 2: resumed}
    assert f"RESULT {resumed}" in second.stdout
    assert recorded(store, KEY) == (True, resumed)
    return out1, out2


def test_rerun_after_kill_resumes_on_the_ephemeral_server(tmp_path):
    """No server configured: the killed run's output ends, the re-run runs units 6..14 only."""
    out1, _ = _kill_then_rerun(tmp_path, None)
    assert f"UNIT 1 {HOLD}" in out1


def test_rerun_after_kill_resumes_on_a_real_server(tmp_path, real_server):
    """With a ``prefect server``: the re-run (a new flow run) resumes from unit 6."""
    out1, _ = _kill_then_rerun(tmp_path, real_server)
    assert f"UNIT 1 {HOLD}" in out1


def test_orphaned_ephemeral_server_is_named_with_the_fix(tmp_path):
    """A server left by a run killed before faultkit ran is named, with how to stop it."""
    home = tmp_path / "prefect-home"
    env = _env(tmp_path, None, home)
    early = tmp_path / "early.py"
    early.write_text(
        "import os\nfrom prefect import flow\n\n@flow\ndef f():\n    os._exit(137)\n\nf()\n"
    )
    subprocess.run(
        [sys.executable, str(early)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=240,
    )
    orphans = _servers_of(home)
    try:
        assert len(orphans) == 1, orphans  # Prefect left its server behind
        rerun = subprocess.run(
            [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300
        )
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        out = rerun.stdout + rerun.stderr
        assert f"kill {orphans[0]}" in out, out
        assert "RESULT [0, 1, 2" in rerun.stdout
    finally:
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
