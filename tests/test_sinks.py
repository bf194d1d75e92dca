"""Exactly-once sinks on SQLite, a real PostgreSQL server and files, with real processes
killed (SIGKILL) and paused (SIGSTOP/SIGCONT) at named failpoints inside their writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from faultkit import (
    CheckpointStore,
    CorruptCheckpointError,
    FaultkitError,
    StaleAttemptError,
    StoreConfigError,
    _failpoints,
)
from faultkit.demo import check_sink, etl_partition
from faultkit.sinks import FileSink, SinkBusyError, SinkInputError, SqlSink
from faultkit.testing import process_state, wait_until

CHILD = os.path.join(os.path.dirname(__file__), "scripts", "sink_child.py")
KEY = "etl/p0"
UNITS = 10
CHUNK = 10
W = 2.0  # commit window of the PostgreSQL zombie tests
SLACK = 6.0  # seconds a child may spend starting up and writing ten units


@pytest.fixture(params=[pytest.param("sqlite", id="sqlite"), pytest.param("pg", id="postgres")])
def sink_url(request, tmp_path):
    """A SQLAlchemy URL of an empty database: a SQLite file or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/sink.db"
    return request.getfixturevalue("postgres_url")


# -- helpers -------------------------------------------------------------------------------


class Child:
    """One attempt in a child process (tests/scripts/sink_child.py)."""

    def __init__(self, tmp_path, name, sink, *, kind="sql", failpoints="", **opts):
        self.out = tmp_path / f"{name}.json"
        args = [sys.executable, CHILD, "--store", f"file://{tmp_path}/store", "--sink", sink]
        args += ["--kind", kind, "--out", str(self.out), "--units", str(UNITS)]
        args += ["--chunk", str(CHUNK)]
        for k, v in opts.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        self.err = tmp_path / f"{name}.err"
        env = {**os.environ, "FAULTKIT_FAILPOINTS": failpoints}
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=err)
        self.pid = self.proc.pid

    def wait_stopped(self, what: str) -> None:
        wait_until(lambda: process_state(self.pid) in ("T", "Z", ""), 60, what)
        assert process_state(self.pid) == "T", f"{what}: the child exited instead\n{self.stderr()}"

    def stderr(self) -> str:
        return self.err.read_text()[-3000:]

    def finish(self, timeout: float = 90) -> dict:
        self.proc.wait(timeout)
        return json.loads(self.out.read_text()) if self.out.exists() else {}

    def opened(self, path: str) -> bool:
        try:
            fds = os.listdir(f"/proc/{self.pid}/fd")
        except FileNotFoundError:
            return False
        for fd in fds:
            try:
                if os.readlink(f"/proc/{self.pid}/fd/{fd}") == path:
                    return True
            except OSError:
                continue
        return False


def _query(url: str, sql: str) -> list[tuple]:
    eng = sa.create_engine(url)
    try:
        with eng.connect() as c:
            return [tuple(r) for r in c.execute(sa.text(sql))]
    finally:
        eng.dispose()


def _rows_by_unit(url: str) -> dict[str, list[int]]:
    """unit -> sorted epochs of its rows in the destination table."""
    out: dict[str, list[int]] = {}
    for unit, epoch in _query(url, "SELECT unit, epoch FROM orders"):
        out.setdefault(unit, []).append(int(epoch))
    return {u: sorted(e) for u, e in out.items()}


def _ledger(url: str) -> dict[str, tuple[int, int]]:
    """unit_ref -> (epoch, rows) of the sink's ledger."""
    return {
        r: (int(e), int(n))
        for r, e, n in _query(url, "SELECT unit_ref, epoch, rows FROM faultkit_units")
    }


def _assert_exactly_once(url: str) -> dict[str, list[int]]:
    """Every unit's rows are in the table once, and in the ledger once, by one epoch."""
    by_unit = _rows_by_unit(url)
    assert sorted(by_unit) == sorted(str(u) for u in range(UNITS))
    for u, epochs in by_unit.items():
        assert len(epochs) == CHUNK and len(set(epochs)) == 1, (u, epochs)
    assert check_sink(url) == {"rows": UNITS * CHUNK, "distinct": UNITS * CHUNK, "duplicates": 0}
    ledger = _ledger(url)
    assert sorted(ledger) == sorted(f"i:{u}" for u in range(UNITS))
    for u, epochs in by_unit.items():
        assert ledger[f"i:{u}"] == (epochs[0], CHUNK)
    return by_unit


# -- SqlSink: killed writers ---------------------------------------------------------------


@pytest.mark.parametrize(
    "point",
    [
        pytest.param("sink.rows_written", id="before-commit"),
        pytest.param("sink.committed", id="after-commit"),
    ],
)
def test_kill_around_commit_rows_exactly_once(sink_url, tmp_path, point):
    """SIGKILL between rows and commit (or right after it): the retry lands every unit once."""
    a = Child(tmp_path, "a", sink_url, failpoints=f"{point}=kill@4")
    a.finish()
    assert a.proc.returncode == -signal.SIGKILL, a.stderr()
    committed = 3 if point == "sink.rows_written" else 4
    assert check_sink(sink_url)["rows"] == committed * CHUNK
    b = Child(tmp_path, "b", sink_url)
    rb = b.finish()
    assert b.proc.returncode == 0, b.stderr()
    assert rb["epoch"] == 2 and rb["stale"] is None
    # After the commit the unit is in the ledger, not the log: found there, not rewritten.
    assert rb["skipped"] == ([] if point == "sink.rows_written" else [3])
    assert rb["written"] == list(range(committed, UNITS))
    by_unit = _assert_exactly_once(sink_url)
    assert by_unit["3"] == [1 if committed == 4 else 2] * CHUNK


# -- SqlSink: paused writers (zombies) -----------------------------------------------------


@pytest.mark.parametrize(
    "point",
    [
        pytest.param("sink.rows_written", id="after-rows"),
        pytest.param("sink.checked", id="before-commit"),
    ],
)
def test_postgres_zombie_in_transaction_is_aborted_and_refused(postgres_url, tmp_path, point):
    """A PostgreSQL writer SIGSTOPped inside its transaction delays the newer attempt by
    about a commit window, then, resumed, raises StaleAttemptError with none of its rows in."""
    url = postgres_url
    a = Child(tmp_path, "a", url, failpoints=f"{point}=stop@3", window=W)
    try:
        a.wait_stopped("the zombie paused inside its transaction of unit 2")
        b = Child(tmp_path, "b", url, window=W, lock_wait=30)
        rb = b.finish()
        assert b.proc.returncode == 0, b.stderr()
        assert rb["epoch"] == 2 and rb["stale"] is None and rb["written"] == list(range(2, UNITS))
        # The claim waits one window; the server aborts the zombie's session within one
        # window of its pause (lock_wait=30 would show if the newer writer waited it out).
        assert rb["total_s"] < 2 * (W * 1.02 + 0.05) + SLACK
        assert rb["claim_s"] >= W
    finally:
        os.kill(a.pid, signal.SIGCONT)
    ra = a.finish()
    assert a.proc.returncode == 0, a.stderr()
    assert ra["written"] == [0, 1] and ra["stale"] == 2
    by_unit = _assert_exactly_once(url)
    assert by_unit["2"] == [2] * CHUNK  # none of the zombie's rows of unit 2


@pytest.mark.parametrize(
    "point",
    [
        pytest.param("sink.rows_written", id="after-rows"),
        pytest.param("sink.checked", id="before-commit"),
    ],
)
def test_sqlite_zombie_holding_lock_fails_claim_until_killed(tmp_path, point):
    """A SQLite writer SIGSTOPped holding the write lock makes the newer claim fail after the
    lock wait with SinkBusyError naming the file; once the zombie is killed the retry wins."""
    db = f"{tmp_path}/sink.db"
    url, wait = f"sqlite:///{db}", 1.5
    a = Child(tmp_path, "a", url, failpoints=f"{point}=stop@3", lock_wait=wait)
    try:
        a.wait_stopped("the zombie paused holding the SQLite write lock")
        b = Child(tmp_path, "b", url, lock_wait=wait)
        rb = b.finish()
        assert b.proc.returncode == 3, b.stderr()
        assert rb["error"] == "SinkBusyError" and rb["epoch"] is None
        assert repr(db) in rb["message"] and "stopped older attempt" in rb["message"]
        assert "retry will try again" in rb["message"]
        assert wait <= rb["claim_s"] < wait + SLACK
    finally:
        os.kill(a.pid, signal.SIGKILL)
    a.finish()
    assert a.proc.returncode == -signal.SIGKILL
    c = Child(tmp_path, "c", url, lock_wait=wait)
    rc = c.finish()
    assert c.proc.returncode == 0, c.stderr()
    assert rc["epoch"] == 2 and rc["written"] == list(range(2, UNITS))
    by_unit = _assert_exactly_once(url)
    assert by_unit["2"] == [2] * CHUNK
    assert issubclass(SinkBusyError, TimeoutError) and issubclass(SinkBusyError, FaultkitError)


def test_sqlite_zombie_resumed_during_claim_commits_before_it(tmp_path):
    """A SQLite zombie resumed while the newer claim waits for its lock commits before the
    claim returns; the newer attempt finds that unit in the ledger, and the zombie is fenced."""
    db = f"{tmp_path}/sink.db"
    url = f"sqlite:///{db}"
    a = Child(
        tmp_path, "a", url, failpoints="sink.checked=stop@3,sink.committed=stop@3", lock_wait=20
    )
    try:
        a.wait_stopped("the zombie paused before COMMIT of unit 2")
        b = Child(tmp_path, "b", url, lock_wait=20)
        wait_until(lambda: b.opened(db), 60, "the newer claim waiting for the SQLite lock")
        os.kill(a.pid, signal.SIGCONT)
        wait_until(
            lambda: "i:2" in _ledger(url) and process_state(a.pid) == "T",
            60,
            "the zombie's commit of unit 2",
        )
        rb = b.finish()
        assert b.proc.returncode == 0, b.stderr()
        assert rb["epoch"] == 2 and rb["skipped"] == [2] and rb["written"] == list(range(3, 10))
        assert rb["claim_s"] < 20
    finally:
        os.kill(a.pid, signal.SIGCONT)
    ra = a.finish()
    assert a.proc.returncode == 0, a.stderr()
    # Unit 2 committed before the claim, so the zombie's write returned True although its
    # done record was fenced; that refusal showed it the newer attempt's work: nothing left.
    assert ra["written"] == [0, 1, 2] and ra["skipped"] == []
    assert _assert_exactly_once(url)["2"] == [1] * CHUNK


def test_zombie_paused_before_its_transaction_is_refused(sink_url, tmp_path):
    """A zombie resumed after the newer attempt claimed and wrote raises StaleAttemptError
    and writes none of its rows."""
    a = Child(tmp_path, "a", sink_url, failpoints="sink.declared=stop@3", window=1)
    try:
        a.wait_stopped("the zombie paused before its transaction of unit 2")
        b = Child(tmp_path, "b", sink_url, window=1)
        rb = b.finish()
        assert b.proc.returncode == 0, b.stderr()
        assert rb["epoch"] == 2 and rb["written"] == list(range(2, UNITS))
    finally:
        os.kill(a.pid, signal.SIGCONT)
    ra = a.finish()
    assert a.proc.returncode == 0, a.stderr()
    assert ra["written"] == [0, 1] and ra["stale"] == 2
    assert _assert_exactly_once(sink_url)["2"] == [2] * CHUNK


def test_rerun_after_delete_is_accepted_and_old_zombie_refused(sink_url, tmp_path):
    """After store.delete(key) a new run writes to the sink (units already there are found,
    not doubled) while a zombie of the deleted run is refused."""
    a = Child(tmp_path, "a", sink_url, failpoints="sink.declared=stop@3", window=1)
    try:
        a.wait_stopped("the deleted run's zombie paused before unit 2")
        CheckpointStore(f"file://{tmp_path}/store").delete(KEY)
        b = Child(tmp_path, "b", sink_url, window=1)
        rb = b.finish()
        assert b.proc.returncode == 0, b.stderr()
        assert rb["epoch"] == 3 and rb["stale"] is None
        assert rb["skipped"] == [0, 1] and rb["written"] == list(range(2, UNITS))
    finally:
        os.kill(a.pid, signal.SIGCONT)
    ra = a.finish()
    assert a.proc.returncode == 0, a.stderr()
    assert ra["written"] == [0, 1] and ra["stale"] is not None and ra["stale"] >= 2
    assert _assert_exactly_once(sink_url)["2"] == [3] * CHUNK


def test_db_fence_refuses_older_epoch(sink_url, tmp_path):
    """Once a newer epoch wrote, the database itself refuses the older epoch, even one that
    misses every log check."""
    store = CheckpointStore(f"file://{tmp_path}/store")
    sink = SqlSink(sink_url, "events", commit_window=0.5)
    old = store.stage("s/a").claim()
    new = store.stage("s/a").claim()
    assert sink.write(new, 1, [{"id": 1, "v": "new"}]) is True
    old.check = lambda: None  # the zombie missed the claim: only the database can stop it
    old._declare_sink = lambda *a: None
    with pytest.raises(StaleAttemptError, match=r"fence .* is at epoch 2"):
        sink.write(old, 2, [{"id": 2, "v": "zombie"}])
    assert sink.count() == 1 and not sink.is_written("s/a", 2)
    assert sink.write(new, 1, [{"id": 1, "v": "again"}]) is False
    assert sink.count() == 1 and sink.is_written("s/a", 1)


def test_postgres_commit_window_trigger_refuses_late_commit(postgres_url, tmp_path):
    """PostgreSQL refuses to commit a ledger row whose deadline has passed (or was never set)."""
    store = CheckpointStore(f"file://{tmp_path}/store")
    sink = SqlSink(postgres_url, "events", commit_window=1)
    assert sink.write(store.stage("w/a").claim(), 1, [{"id": 1}]) is True
    eng = sa.create_engine(postgres_url)
    try:
        for deadline in ("clock_timestamp() - interval '1 second'", "NULL"):
            with eng.connect() as c:
                c.execute(
                    sa.text(
                        "INSERT INTO faultkit_units (stage_key, unit_ref, unit_id, dest, epoch, "
                        "rows, token, committed_at, deadline) VALUES ('w/a', 'i:2', 'i:2', "
                        f"'events', 1, 0, 't', 0, {deadline})"
                    )
                )
                with pytest.raises(sa_exc.DBAPIError, match="commit window"):
                    c.commit()
    finally:
        eng.dispose()
    assert not sink.is_written("w/a", 2)


# -- SqlSink: identity and input -----------------------------------------------------------


def test_long_unit_ids_and_keys(sink_url, tmp_path):
    """1,000-character unit ids and 500-character stage keys work; ids differing only at the
    end stay distinct."""
    store = CheckpointStore(f"file://{tmp_path}/store")
    k = "/".join(["a" * 200, "b" * 200, "c" * 98])
    assert len(k) == 500
    u1, u2 = "x" * 999 + "1", "x" * 999 + "2"
    sink = SqlSink(sink_url, "events", commit_window=0.5)
    st = store.stage(k).claim()
    assert sink.write(st, u1, [{"id": 1}]) and sink.write(st, u2, [{"id": 2}])
    assert sink.write(st, u1, [{"id": 3}]) is False
    assert sink.is_written(k, u1) and sink.is_written(k, u2) and sink.count() == 2
    assert st.is_done(u1) and st.is_done(u2)
    assert len(_ledger(sink_url)) == 2


def test_int_and_str_units_are_distinct(sink_url, tmp_path):
    """Unit 5 and unit "5" are two units in the stage and in both sinks."""
    store = CheckpointStore(f"file://{tmp_path}/store")
    st = store.stage("d/a").claim()
    sql = SqlSink(sink_url, "events", commit_window=0.5)
    files = FileSink(f"file://{tmp_path}/out")
    assert sql.write(st, 5, [{"id": 1}]) is True
    assert not st.is_done("5") and not sql.is_written("d/a", "5")
    assert sql.write(st, "5", [{"id": 2}]) is True
    assert sql.count() == 2 and sorted(_ledger(sink_url)) == ["i:5", "s:5"]
    st2 = store.stage("d/b").claim()
    assert files.write(st2, 5, b"int") is True and files.write(st2, "5", b"str") is True
    assert files.read("d/b", 5) == b"int" and files.read("d/b", "5") == b"str"
    assert files.path("d/b", 5) != files.path("d/b", "5")
    assert st.results() == {5: {"rows": 1, "epoch": 1}, "5": {"rows": 1, "epoch": 1}}


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        pytest.param(
            [{"id": 9, "nmae": "x"}],
            r"no column 'nmae'.*columns are \['id', 'name'\]",
            id="misspelled",
        ),
        pytest.param({"id": 9, "name": "x"}, "wrap a single row in a list", id="single-row"),
        pytest.param([("id", 9)], "not a mapping", id="not-mapping"),
        pytest.param([{"id": 9, "name": "x"}, {"id": 10}], "same keys", id="inconsistent"),
        pytest.param([{"id": 9, "name": {"a": 1}}], "json.dumps", id="bad-type"),
    ],
)
def test_bad_rows_raise_and_write_nothing(sink_url, tmp_path, rows, match):
    """Rows the table cannot take raise a StoreConfigError saying the fix; nothing is written."""
    store = CheckpointStore(f"file://{tmp_path}/store")
    sink = SqlSink(sink_url, "people", commit_window=0.5)
    st = store.stage("b/a").claim()
    assert sink.write(st, 1, [{"id": 1, "name": "ok"}]) is True
    with pytest.raises(StoreConfigError, match=match) as info:
        sink.write(st, 2, rows)
    assert isinstance(info.value, SinkInputError)
    assert sink.count() == 1 and not sink.is_written("b/a", 2) and not st.is_done(2)
    assert sink.write(st, 2, [{"id": 2, "name": "fixed"}]) is True


def test_values_the_database_refuses_raise_sink_input_error(postgres_url, tmp_path):
    """A value PostgreSQL refuses for its column is a SinkInputError; nothing is written."""
    store = CheckpointStore(f"file://{tmp_path}/store")
    sink = SqlSink(postgres_url, "people", commit_window=0.5)
    st = store.stage("b/a").claim()
    assert sink.write(st, 1, [{"id": 1}]) is True
    with pytest.raises(SinkInputError, match=r"refused the rows.*nothing was written"):
        sink.write(st, 2, [{"id": "not a number"}])
    assert sink.count() == 1 and not sink.is_written("b/a", 2) and not st.is_done(2)


def test_new_table_needs_inferable_types(sink_url, tmp_path):
    """A new table cannot be made from a column that is None in every row."""
    st = CheckpointStore(f"file://{tmp_path}/store").stage("b/a").claim()
    sink = SqlSink(sink_url, "people", commit_window=0.5)
    with pytest.raises(SinkInputError, match="column 'name' is None in every row"):
        sink.write(st, 1, [{"id": 1, "name": None}])
    assert sink.count() == 0 and not st.is_done(1)


def test_older_ledger_schema_is_refused_with_the_fix(sink_url, tmp_path):
    """A faultkit_units table of another schema raises StoreConfigError saying what to do."""
    eng = sa.create_engine(sink_url)
    with eng.begin() as c:
        c.execute(
            sa.text(
                "CREATE TABLE faultkit_units (stage_key VARCHAR(900), unit_id VARCHAR(400), "
                "epoch INTEGER, rows INTEGER, committed_at FLOAT)"
            )
        )
    eng.dispose()
    st = CheckpointStore(f"file://{tmp_path}/store").stage("b/a").claim()
    with pytest.raises(StoreConfigError, match="RENAME TO faultkit_units_old"):
        SqlSink(sink_url, "people").write(st, 1, [{"id": 1}])
    assert not st.is_done(1)


@pytest.mark.parametrize(
    ("url", "match"),
    [
        pytest.param("not a url", "SQLAlchemy URL", id="not-a-url"),
        pytest.param("mysql://u@h/db", "supports SQLite and PostgreSQL, not 'mysql'", id="mysql"),
        pytest.param("sqlite://", "needs a SQLite file", id="sqlite-memory"),
    ],
)
def test_bad_sink_url(url, match):
    """A URL SqlSink cannot fence with is a StoreConfigError naming what works."""
    with pytest.raises(StoreConfigError, match=match):
        SqlSink(url, "t")


def test_demo_etl_resumes_without_redoing_units(tmp_path):
    """A partition interrupted mid-way resumes at the first unwritten unit."""
    url = f"sqlite:///{tmp_path}/sink.db"
    store = CheckpointStore(f"file://{tmp_path}/store")
    with store.stage("etl/0") as st:
        sink = SqlSink(url, "orders")
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
        res = etl_partition(st, 0, url, rows=100, chunk=10)
    assert (res["units_written"], res["units_skipped"]) == (7, 3)
    assert check_sink(url) == {"rows": 100, "distinct": 100, "duplicates": 0}


# -- FileSink ------------------------------------------------------------------------------


def _files(tmp_path) -> dict[int, bytes]:
    sink = FileSink(f"file://{tmp_path}/out")
    out = {}
    for u in range(UNITS):
        try:
            out[u] = sink.read(KEY, u)
        except FileNotFoundError:
            pass
    return out


def _staging(tmp_path) -> list[str]:
    root = tmp_path / "out" / "@staging"
    return [str(p) for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_file_sink_zombie_paused_after_staging_is_refused(tmp_path):
    """A FileSink writer SIGSTOPped with its bytes staged does not delay the newer attempt and,
    resumed, raises StaleAttemptError; its bytes never become visible."""
    url = f"file://{tmp_path}/out"
    a = Child(tmp_path, "a", url, kind="file", failpoints="filesink.staged=stop@3")
    try:
        a.wait_stopped("the zombie paused with unit 2 staged")
        assert len(_staging(tmp_path)) == 1
        b = Child(tmp_path, "b", url, kind="file")
        rb = b.finish()
        assert b.proc.returncode == 0, b.stderr()
        assert rb["epoch"] == 2 and rb["written"] == list(range(2, UNITS))
        assert rb["total_s"] < SLACK
    finally:
        os.kill(a.pid, signal.SIGCONT)
    ra = a.finish()
    assert a.proc.returncode == 0, a.stderr()
    assert ra["written"] == [0, 1] and ra["stale"] == 2
    assert _files(tmp_path) == {u: f"{u}:{1 if u < 2 else 2}".encode() for u in range(UNITS)}
    assert _staging(tmp_path) == []


def test_file_sink_zombie_paused_after_commit_is_published_once(tmp_path):
    """A FileSink writer SIGSTOPped after its commit (before publishing) has its bytes
    published by the newer attempt; resumed, it publishes nothing twice and is then fenced."""
    url = f"file://{tmp_path}/out"
    a = Child(tmp_path, "a", url, kind="file", failpoints="filesink.committed=stop@3")
    try:
        a.wait_stopped("the zombie paused after committing unit 2")
        assert 2 not in _files(tmp_path)
        b = Child(tmp_path, "b", url, kind="file")
        rb = b.finish()
        assert b.proc.returncode == 0, b.stderr()
        assert rb["epoch"] == 2 and rb["written"] == list(range(3, UNITS))
        assert _files(tmp_path)[2] == b"2:1"  # published from the zombie's committed bytes
    finally:
        os.kill(a.pid, signal.SIGCONT)
    ra = a.finish()
    assert a.proc.returncode == 0, a.stderr()
    assert ra["written"] == [0, 1, 2] and ra["stale"] == 2
    assert _files(tmp_path) == {u: f"{u}:{1 if u < 3 else 2}".encode() for u in range(UNITS)}
    assert _staging(tmp_path) == []


@pytest.mark.parametrize(
    ("point", "committed"),
    [
        pytest.param("filesink.staged", 3, id="staged"),
        pytest.param("filesink.committed", 4, id="committed"),
        pytest.param("filesink.published", 4, id="published"),
    ],
)
def test_file_sink_kill_then_retry_exactly_once(tmp_path, point, committed):
    """SIGKILL at each step of a FileSink write: the retry leaves every unit's bytes once and
    no staging objects."""
    url = f"file://{tmp_path}/out"
    a = Child(tmp_path, "a", url, kind="file", failpoints=f"{point}=kill@4")
    a.finish()
    assert a.proc.returncode == -signal.SIGKILL, a.stderr()
    assert _staging(tmp_path)  # the kill left a staging object behind
    b = Child(tmp_path, "b", url, kind="file")
    rb = b.finish()
    assert b.proc.returncode == 0, b.stderr()
    assert rb["written"] == list(range(committed, UNITS))
    assert _files(tmp_path) == {
        u: f"{u}:{1 if u < committed else 2}".encode() for u in range(UNITS)
    }
    assert _staging(tmp_path) == []


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("file", id="file"),
        pytest.param("memory", id="memory"),
        pytest.param("s3", id="s3"),
    ],
)
def test_file_sink_exactly_once(backend, tmp_path, request):
    """FileSink writes each unit once; a zombie and its retry cannot both write a unit."""
    opts = {}
    if backend == "file":
        url = f"file://{tmp_path}/out"
    elif backend == "memory":
        url = f"memory://fs-{tmp_path.name}"
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
    assert [n for n in sink._storage.list("@staging/f/a") if n] == []


def test_file_sink_publishes_committed_unit_on_read(tmp_path):
    """A unit committed but not published (its writer died) is published by read(stage)."""
    store = CheckpointStore(f"file://{tmp_path}/store")
    sink = FileSink(f"file://{tmp_path}/out")
    st = store.stage("f/a").claim()
    _failpoints.arm("filesink.committed", "raise")
    try:
        with pytest.raises(_failpoints.InjectedFault):
            sink.write(st, "u", b"bytes")
    finally:
        _failpoints.disarm()
    assert st.is_done("u")
    with pytest.raises(FileNotFoundError, match="pass the stage"):
        sink.read("f/a", "u")
    assert sink.read(store.stage("f/a"), "u") == b"bytes"
    assert sink.read("f/a", "u") == b"bytes" and _staging(tmp_path) == []


def test_file_sink_refuses_foreign_bytes_at_the_final_path(tmp_path):
    """Different bytes already at a unit's path are reported as corruption, never replaced."""
    store = CheckpointStore(f"file://{tmp_path}/store")
    sink = FileSink(f"file://{tmp_path}/out")
    sink._storage.create(sink.path("f/a", 1), b"foreign")
    st = store.stage("f/a").claim()
    assert sink.write(st, 1, b"ours") is True  # committed in the log; publishing failed
    with pytest.raises(CorruptCheckpointError, match="differ from the committed output"):
        sink.read(st, 1)
    assert sink.read("f/a", 1) == b"foreign"


def test_file_sink_bad_data_writes_nothing(tmp_path):
    """Data that is not bytes is a SinkInputError saying how to convert it; nothing is written."""
    st = CheckpointStore(f"file://{tmp_path}/store").stage("f/a").claim()
    sink = FileSink(f"file://{tmp_path}/out")
    with pytest.raises(SinkInputError, match=r"encode text first"):
        sink.write(st, 1, "text")
    assert not st.is_done(1) and _staging(tmp_path) == []
    with pytest.raises(FileNotFoundError):
        sink.read("f/a", 1)


def test_file_sink_long_unit_ids_and_keys(tmp_path):
    """1,000-character unit ids and 500-character keys work in FileSink and stay distinct."""
    k = "/".join(["a" * 200, "b" * 200, "c" * 98])
    u1, u2 = "x" * 999 + "1", "x" * 999 + "2"
    st = CheckpointStore(f"file://{tmp_path}/store").stage(k).claim()
    sink = FileSink(f"file://{tmp_path}/out")
    assert sink.write(st, u1, b"1") and sink.write(st, u2, b"2")
    assert sink.read(k, u1) == b"1" and sink.read(k, u2) == b"2"
    assert _staging(tmp_path) == []


def test_claim_after_delete_still_fences_the_deleted_runs_sinks(tmp_path):
    """delete() keeps the sinks the deleted run wrote to in its base record, so the re-run's
    claim raises their fence before it returns (a zombie of the deleted run paused inside its
    transaction cannot commit afterwards)."""
    import sqlalchemy as sa

    store = CheckpointStore(f"file://{tmp_path}/store")
    url = f"sqlite:///{tmp_path}/out.db"
    sink = SqlSink(url, "t")
    with store.stage("del/sink") as st:
        assert sink.write(st, 0, [{"x": 1}])
    store.delete("del/sink")
    assert store.read_view("del/sink").sinks  # remembered across the delete
    new = CheckpointStore(f"file://{tmp_path}/store").stage("del/sink").claim()
    eng = sa.create_engine(url)
    with eng.connect() as c:
        fence = c.execute(sa.text("SELECT epoch FROM faultkit_fence")).scalar()
    eng.dispose()
    assert fence == new.epoch > 1
