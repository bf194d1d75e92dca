"""The databases SqlSink writes to: URLs, engines, the ledger and fence tables, the
PostgreSQL commit-window trigger, and the SQLite fence a newer claim raises."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from .._errors import SinkBusyError, StoreConfigError
from .._keys import MAX_KEY, MAX_SEGMENT
from .._storage import redact_url

__all__ = [
    "DEFAULT_COMMIT_WINDOW",
    "DEFAULT_LOCK_WAIT",
    "FENCE",
    "FENCE_COLUMNS",
    "LEDGER",
    "LEDGER_COLUMNS",
    "PG_FUNCTION",
    "PG_TRIGGER",
    "WINDOW_SQLSTATE",
    "busy_sqlite",
    "engine",
    "fence_sqlite",
    "parse_url",
    "schema",
    "sqlite_busy",
    "sqlstate",
]

log = logging.getLogger("faultkit.sinks")

DEFAULT_COMMIT_WINDOW = 5.0
DEFAULT_LOCK_WAIT = 30.0
LEDGER = "faultkit_units"
FENCE = "faultkit_fence"
LEDGER_COLUMNS = (
    "stage_key",
    "unit_ref",
    "unit_id",
    "dest",
    "epoch",
    "rows",
    "token",
    "committed_at",
    "deadline",
)
FENCE_COLUMNS = ("stage_key", "epoch")
_DIALECTS = ("sqlite", "postgresql")
WINDOW_SQLSTATE = "FK001"  # raised by the commit-window trigger

# The commit window (PostgreSQL): a deferred constraint trigger that refuses to commit a
# ledger row whose deadline has passed, read on the database's clock at COMMIT.
PG_FUNCTION = f"""
CREATE OR REPLACE FUNCTION faultkit_commit_window() RETURNS trigger
LANGUAGE plpgsql AS $fk$
DECLARE d timestamptz;
BEGIN
    SELECT deadline INTO d FROM {LEDGER}
        WHERE stage_key = NEW.stage_key AND unit_ref = NEW.unit_ref;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF d IS NULL OR clock_timestamp() > d THEN
        RAISE EXCEPTION 'faultkit: the commit window of unit % of stage % closed at %',
            NEW.unit_ref, NEW.stage_key, d
            USING ERRCODE = '{WINDOW_SQLSTATE}',
                  HINT = 'a newer attempt may own the stage; the writer checks and retries';
    END IF;
    RETURN NULL;
END
$fk$
"""
PG_TRIGGER = f"""
CREATE CONSTRAINT TRIGGER faultkit_commit_window AFTER INSERT ON {LEDGER}
DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION faultkit_commit_window()
"""
_SQLITE_FENCE_DDL = (
    f"CREATE TABLE IF NOT EXISTS {FENCE} (stage_key VARCHAR({MAX_KEY}) NOT NULL, "
    "epoch BIGINT NOT NULL, PRIMARY KEY (stage_key))"
)


def schema(meta: sa.MetaData) -> tuple[sa.Table, sa.Table]:
    """The ledger (one row per committed unit: primary key stage key + ``unit_ref``) and
    the fence (the highest epoch that wrote per stage key), in ``meta``."""
    units = sa.Table(
        LEDGER,
        meta,
        sa.Column("stage_key", sa.String(MAX_KEY), primary_key=True),
        sa.Column("unit_ref", sa.String(MAX_SEGMENT), primary_key=True),
        sa.Column("unit_id", sa.Text, nullable=False),
        sa.Column("dest", sa.Text, nullable=False),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column("token", sa.String(32), nullable=False),
        sa.Column("committed_at", sa.Float, nullable=False),
        sa.Column("deadline", sa.DateTime(timezone=True), nullable=True),
    )
    fence = sa.Table(
        FENCE,
        meta,
        sa.Column("stage_key", sa.String(MAX_KEY), primary_key=True),
        sa.Column("epoch", sa.BigInteger, nullable=False),
    )
    return units, fence


# -- engines ---------------------------------------------------------------------------

_engines: dict[str, sa.Engine] = {}
_engines_lock = threading.Lock()


def engine(url: sa.URL) -> sa.Engine:
    """One engine (and connection pool) per database URL in this process."""
    text = url.render_as_string(hide_password=False)
    with _engines_lock:
        eng = _engines.get(text)
        if eng is None:
            eng = _engines[text] = _make_engine(url)
        return eng


def _make_engine(url: sa.URL) -> sa.Engine:
    if url.get_backend_name() != "sqlite":
        return sa.create_engine(url, pool_pre_ping=True)
    eng = sa.create_engine(url)

    # pysqlite's own BEGIN is deferred; we issue BEGIN IMMEDIATE for writes, so a writer
    # holds the write lock from its first statement (no deadlock upgrading a read lock) and
    # waits for it at most its lock wait (the busy timeout).
    @sa.event.listens_for(eng, "connect")
    def _connect(dbapi_conn: Any, _rec: Any) -> None:
        dbapi_conn.isolation_level = None

    @sa.event.listens_for(eng, "begin")
    def _begin(conn: sa.Connection) -> None:
        opts = conn.get_execution_options()
        ms = int(opts.get("faultkit_busy_ms", DEFAULT_LOCK_WAIT * 1000))
        conn.exec_driver_sql(f"PRAGMA busy_timeout = {ms}")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if opts.get("faultkit_write") else "BEGIN")

    return eng


def parse_url(url: str) -> sa.URL:
    """``url`` as a SQLAlchemy URL of a SQLite file (made absolute) or a PostgreSQL
    database; anything else is a :class:`~faultkit.StoreConfigError` saying what works."""
    if not isinstance(url, str) or not url:
        raise StoreConfigError(
            f"SqlSink needs a SQLAlchemy URL such as 'sqlite:////abs/out.db' or "
            f"'postgresql+psycopg://user@host/db'; got {url!r}"
        )
    try:
        u = sa.make_url(url)
    except sa_exc.ArgumentError as exc:
        raise StoreConfigError(
            f"sink URL {redact_url(url)!r} is not a SQLAlchemy URL; e.g. sqlite:////tmp/out.db "
            "or postgresql+psycopg://user@host/db"
        ) from exc
    backend = u.get_backend_name()
    if backend not in _DIALECTS:
        raise StoreConfigError(
            f"SqlSink supports SQLite and PostgreSQL, not {backend!r} ({redact_url(url)!r}): "
            "its exactly-once fence needs SQLite's write lock or PostgreSQL's row locks and "
            "deferred constraint triggers. Use sqlite:////abs/path.db or "
            "postgresql+psycopg://user@host/db"
        )
    if backend == "sqlite":
        db = u.database or ""
        if db in ("", ":memory:") or db.startswith("file:") or u.query.get("mode") == "memory":
            raise StoreConfigError(
                f"SqlSink needs a SQLite file, not {redact_url(url)!r}: an in-memory database "
                "vanishes with its connection and cannot fence other processes. Use "
                "sqlite:////abs/path/out.db"
            )
        u = u.set(database=os.path.abspath(db))
    return u


def sqlstate(exc: BaseException) -> str:
    """The PostgreSQL SQLSTATE of a driver error ("" when it has none)."""
    orig = getattr(exc, "orig", exc)
    return str(getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None) or "")


def sqlite_busy(exc: BaseException) -> bool:
    """True if ``exc`` is SQLite's "database is locked" (the busy timeout ran out)."""
    orig = getattr(exc, "orig", exc)
    if not isinstance(orig, sqlite3.OperationalError):
        return False
    code = getattr(orig, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(orig) or "busy" in str(orig)


def busy_sqlite(path: str, wait: float, stage_key: str, who: str) -> SinkBusyError:
    """The error for a SQLite write lock not obtained within ``wait`` seconds."""
    return SinkBusyError(
        f"the SQLite database {path!r} is locked: another writer holds its write lock "
        f"(perhaps a stopped older attempt of stage {stage_key!r}) and did not release it "
        f"within the lock wait of {wait:g} s, so {who}. Nothing was written. The task's "
        "retry will try again: a killed writer's lock is freed at once, a stopped one's when "
        "it is killed or resumed (raise lock_wait= to wait longer)."
    )


def fence_sqlite(fence: Mapping[str, Any], stage_key: str, epoch: int) -> None:
    """Raise the SQLite sink's fence of ``stage_key`` to ``epoch`` (called by ``claim()``).

    Runs before the claim record exists: it takes the database's write lock (waiting at
    most the sink's lock wait), so every transaction of an older attempt either committed
    before this returns or, after it, reads the higher fence and writes nothing.

    Args:
        fence: what the sink declared in the stage's log: ``{"kind": "sqlite",
            "path": <absolute db path>, "wait": <lock wait, seconds>}``.
        stage_key: the stage being claimed.
        epoch: the epoch being claimed.

    Raises:
        SinkBusyError: the write lock was not obtained within the lock wait.
        StoreConfigError: the fence names no absolute path, or the database refuses it.
    """
    path = str(fence.get("path") or "")
    wait = float(fence.get("wait", DEFAULT_LOCK_WAIT))
    if not os.path.isabs(path):
        raise StoreConfigError(
            f"stage {stage_key!r}: a SqlSink fence names {path!r}, not an absolute SQLite "
            "path; the stage's log was written by something else. Run `faultkit verify`."
        )
    if not os.path.exists(path):
        log.warning(
            "stage %s: SQLite sink %s is gone; nothing to fence (its rows went with it)",
            stage_key,
            path,
        )
        return
    uri = f"file:{urllib.parse.quote(path)}?mode=rw"
    try:
        con = sqlite3.connect(uri, uri=True, timeout=wait, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreConfigError(
            f"stage {stage_key!r}: cannot open the SQLite sink {path!r} to fence it ({exc}); "
            "make it readable and writable by this worker, then retry the task"
        ) from exc
    try:
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute(_SQLITE_FENCE_DDL)
            con.execute(
                f"INSERT INTO {FENCE} (stage_key, epoch) VALUES (?, ?) ON CONFLICT (stage_key) "
                "DO UPDATE SET epoch = max(epoch, excluded.epoch)",
                (stage_key, int(epoch)),
            )
            con.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if sqlite_busy(exc):
                raise busy_sqlite(
                    path, wait, stage_key, f"attempt {epoch} could not claim the stage"
                ) from exc
            raise StoreConfigError(
                f"stage {stage_key!r}: the SQLite sink {path!r} refused the fence ({exc}); "
                f"if its {FENCE!r} table was made by something else, rename it"
            ) from exc
    finally:
        con.close()  # rolls back anything left open
