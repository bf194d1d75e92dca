"""Exactly-once sinks on SQLite and a real PostgreSQL server, with real processes killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from faultkit import CheckpointStore, StaleAttemptError, StoreConfigError
from faultkit.demo import check_sink, etl_partition
from faultkit.sinks import FileSink, SqlSink
from faultkit.testing import wait_until

CHILD = os.path.join(os.path.dirname(__file__), "scripts", "sink_child.py")


@pytest.fixture(params=[pytest.param("sqlite", id="sqlite"), pytest.param("pg", id="postgres")])
def sink_url(request, tmp_path):
    """A SQLAlchemy URL of an empty database: SQLite file or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/sink.db"
    return request.getfixturevalue("postgres_url")


def _run(store_url, sink_url, out, *, failpoints="", rows=100, chunk=10):
    env = {**os.environ, "FAULTKIT_FAILPOINTS": failpoints}
    return subprocess.Popen(
        [
            sys.executable,
            CHILD,
            "--store",
            store_url,
            "--sink",
            sink_url,
            "--out",
            str(out),
            "--rows",
            str(rows),
            "--chunk",
            str(chunk),
        ],
        env=env,
        stderr=subprocess.PIPE,
    )


@pytest.mark.parametrize(
    "point",
    [
        pytest.param("sink.rows_written", id="before-commit"),
        pytest.param("sink.committed", id="after-commit"),
    ],
)
def test_kill_around_commit_rows_exactly_once(sink_url, tmp_path, point):
    """SIGKILL between rows and commit (or right after it): the retry lands every row once."""
    store_url = f"file://{tmp_path}/store"
    p = _run(store_url, sink_url, tmp_path / "a.json", failpoints=f"{point}=kill@4")
    p.communicate(timeout=120)
    assert p.returncode == -signal.SIGKILL
    rows_after_kill = check_sink(sink_url)["rows"]
    assert rows_after_kill == (30 if point == "sink.rows_written" else 40)
    p = _run(store_url, sink_url, tmp_path / "b.json")
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err.decode()[-2000:]
    res = json.load(open(tmp_path / "b.json"))
    assert res["epoch"] == 2 and res["units_written"] == (7 if point == "sink.rows_written" else 6)
    assert check_sink(sink_url) == {"rows": 100, "distinct": 100, "duplicates": 0}


def test_paused_zombie_and_retry_write_each_row_once(sink_url, tmp_path):
    """A zombie SIGSTOPped inside its transaction and a retry writing the same unit: rows once."""
    store_url = f"file://{tmp_path}/store"
    a = _run(store_url, sink_url, tmp_path / "a.json", failpoints="sink.rows_written=stop@3")
    try:
        wait_until(lambda: _state(a.pid) == "T", 60, "zombie paused mid-transaction")
        b = _run(store_url, sink_url, tmp_path / "b.json")
        wait_until(lambda: os.path.exists(f"{tmp_path}/b.json.claimed"), 60, "retry claimed")
        assert open(f"{tmp_path}/b.json.claimed").read() == "2"
    finally:
        os.kill(a.pid, signal.SIGCONT)
    _, err_a = a.communicate(timeout=120)
    _, err_b = b.communicate(timeout=120)
    assert a.returncode == 0 and b.returncode == 0, (err_a + err_b).decode()[-2000:]
    res_a = json.load(open(tmp_path / "a.json"))
    assert res_a == {"stale": 2, "epoch": 1}
    assert check_sink(sink_url) == {"rows": 100, "distinct": 100, "duplicates": 0}


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def test_db_fence_refuses_older_epoch(sink_url, tmp_path):
    """Once a newer epoch wrote, the database itself refuses the older epoch's writes."""
    store = CheckpointStore(f"file://{tmp_path}/store")
    sink = SqlSink(sink_url, "events")
    old = store.stage("s/a").claim()
    new = store.stage("s/a").claim()
    assert sink.write(new, 1, [{"id": 1, "v": "new"}]) is True
    old.check = lambda: None  # the zombie missed the claim: only the database can stop it now
    with pytest.raises(StaleAttemptError, match="already wrote"):
        sink.write(old, 2, [{"id": 2, "v": "zombie"}])
    assert sink.count() == 1
    assert sink.write(new, 1, [{"id": 1, "v": "again"}]) is False
    assert sink.count() == 1 and sink.is_written("s/a", 1)


def test_demo_etl_resumes_without_redoing_units(sink_url, tmp_path):
    """A partition interrupted mid-way resumes at the first unwritten unit."""
    store = CheckpointStore(f"file://{tmp_path}/store")
    with store.stage("etl/0") as st:
        sink = SqlSink(sink_url, "orders")
        for u in range(3):
            rows = [
                {
                    "order_id": u * 10 + i,
                    "partition": 0,
                    "customer": "c",
                    "region": "R",
                    "total": 1.0,
                }
                for i in range(10)
            ]
            sink.write(st, u, rows)
    with store.stage("etl/0") as st:
        res = etl_partition(st, 0, sink_url, rows=100, chunk=10)
    assert (res["units_written"], res["units_skipped"]) == (7, 3)
    assert check_sink(sink_url)["duplicates"] == 0


def test_bad_sink_url():
    """A URL that is not SQLAlchemy's is a StoreConfigError naming the fix."""
    with pytest.raises(StoreConfigError, match="SQLAlchemy URL"):
        SqlSink("not a url", "t")


@pytest.mark.parametrize("backend", [pytest.param("file", id="file"), pytest.param("s3", id="s3")])
def test_file_sink_exactly_once(backend, tmp_path, request):
    """FileSink writes each unit once; a zombie and its retry cannot both write a unit."""
    if backend == "file":
        url, opts = f"file://{tmp_path}/out", {}
    else:
        url, opts = request.getfixturevalue("s3_store_url")
    store = CheckpointStore(f"file://{tmp_path}/store")
    sink = FileSink(url, **opts)
    old = store.stage("f/a").claim()
    assert sink.write(old, "part 1", b"first") is True
    new = store.stage("f/a").claim()
    assert sink.write(new, "part 1", b"second") is False
    with pytest.raises(StaleAttemptError):
        sink.write(old, "part 2", b"zombie")
    assert sink.write(new, "part 2", b"retry") is True
    assert sink.read("f/a", "part 1") == b"first" and sink.read("f/a", "part 2") == b"retry"
