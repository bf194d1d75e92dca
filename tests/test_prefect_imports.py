"""Importing the Prefect adapter and flow modules: no server needed, a clear missing-extra error."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("prefect")

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent

# Block names everywhere: with import-time resolution each of these would call the API.
BLOCK_NAMES_MODULE = """
from prefect import flow

from prefect_blocks import alert_hooks, resumable_task


@resumable_task(store="blk", retry="blk", alerts="blk")
def work(stage) -> int:
    return 1


named = work.with_options(name="renamed")


@flow(**alert_hooks("blk", store="blk", retry="blk"))
def pipeline() -> int:
    return work()
"""


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _python(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    base.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]),
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        **env,
    )
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path,
        env=base,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_flow_modules_import_without_a_prefect_server(tmp_path):
    """Flow modules that name blocks import with the API unreachable (no block is loaded)."""
    (tmp_path / "named_blocks.py").write_text(BLOCK_NAMES_MODULE)
    out = _python(
        """
        import flows.etl, flows.train, named_blocks
        from prefect_blocks import ResumableTask
        assert isinstance(named_blocks.named, ResumableTask)
        print("imported")
        """,
        tmp_path,
        PREFECT_API_URL=f"http://127.0.0.1:{_closed_port()}/api",
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "imported" in out.stdout


def test_block_name_is_loaded_when_the_retry_options_are_read(tmp_path):
    """The first read of a task's retry options loads the block: with no API, that read fails."""
    (tmp_path / "named_blocks.py").write_text(BLOCK_NAMES_MODULE)
    out = _python(
        """
        import httpx
        import named_blocks
        try:
            named_blocks.work.retries
        except httpx.ConnectError:
            print("loaded on first read")
        """,
        tmp_path,
        PREFECT_API_URL=f"http://127.0.0.1:{_closed_port()}/api",
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "loaded on first read" in out.stdout


def test_import_without_prefect_names_the_extra(tmp_path):
    """Without Prefect, importing prefect_blocks raises an ImportError naming the extra."""
    out = _python(
        """
        import sys
        sys.modules["prefect"] = None
        try:
            import prefect_blocks
        except ImportError as exc:
            print(type(exc).__name__, exc)
        else:
            raise SystemExit("prefect_blocks imported without prefect")
        """,
        tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("ImportError ")
    assert "pip install 'faultkit[prefect]'" in out.stdout
