"""SqlSink: a unit's rows and its done-record commit in one database transaction."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from .. import _failpoints
from .._errors import StaleAttemptError, StoreConfigError
from .._keys import check_unit, unit_id
from .._storage import redact_url
from .._store import Stage

__all__ = ["SqlSink"]

_TYPES: list[tuple[type, Any]] = [
    (bool, sa.Boolean),
    (int, sa.BigInteger),
    (float, sa.Float),
    (str, sa.Text),
    (bytes, sa.LargeBinary),
    (dt.datetime, sa.DateTime),
    (dt.date, sa.Date),
]

_engines: dict[str, sa.Engine] = {}
_engines_lock = threading.Lock()


def _engine(url: str) -> sa.Engine:
    with _engines_lock:
        eng = _engines.get(url)
        if eng is None:
            eng = _make_engine(url)
            _engines[url] = eng
        return eng


def _make_engine(url: str) -> sa.Engine:
    try:
        u = sa.make_url(url)
    except sa_exc.ArgumentError as exc:
        raise StoreConfigError(
            f"sink URL {redact_url(url)!r} is not a SQLAlchemy URL; e.g. sqlite:////tmp/out.db "
            "or postgresql+psycopg://user@host/db"
        ) from exc
    if u.get_backend_name() == "sqlite":
        eng = sa.create_engine(u, connect_args={"timeout": 60})

        # pysqlite's implicit BEGIN is deferred; take the write lock up front so two
        # writers never deadlock upgrading a read lock.
        @sa.event.listens_for(eng, "connect")
        def _connect(dbapi_conn: Any, _rec: Any) -> None:
            dbapi_conn.isolation_level = None
            dbapi_conn.execute("PRAGMA busy_timeout = 60000")

        @sa.event.listens_for(eng, "begin")
        def _begin(conn: sa.Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return eng
    return sa.create_engine(u, pool_pre_ping=True)


def _column_type(value: Any) -> Any:
    for py, col in _TYPES:
        if isinstance(value, py):
            return col
    raise StoreConfigError(
        f"cannot infer a column type for {value!r} ({type(value).__name__}); create the table "
        "yourself before the first write"
    )


class SqlSink:
    """Write each unit's rows exactly once to a SQL table (SQLite, PostgreSQL, ...).

    The rows, a ``faultkit_units`` record for the unit and the stage's epoch in
    ``faultkit_fence`` commit in ONE transaction: a zombie and its retry writing the same unit
    leave its rows once, and once a newer epoch has written, an older one is refused with
    :class:`~faultkit.StaleAttemptError`. A table that does not exist is created from the
    first rows (column types inferred from the values).

    Args:
        url: a SQLAlchemy URL (``sqlite:////abs/path.db``, ``postgresql+psycopg://...``).
        table: the destination table.
    """

    def __init__(self, url: str, table: str) -> None:
        self.url = url
        self.table_name = table
        self.engine = _engine(url)
        self._meta = sa.MetaData()
        self._units = sa.Table(
            "faultkit_units",
            self._meta,
            sa.Column("stage_key", sa.String(900), primary_key=True),
            sa.Column("unit_id", sa.String(400), primary_key=True),
            sa.Column("epoch", sa.Integer, nullable=False),
            sa.Column("rows", sa.Integer, nullable=False),
            sa.Column("committed_at", sa.Float, nullable=False),
        )
        self._fence = sa.Table(
            "faultkit_fence",
            self._meta,
            sa.Column("stage_key", sa.String(900), primary_key=True),
            sa.Column("epoch", sa.Integer, nullable=False),
        )
        self._table: sa.Table | None = None
        self._ready = False

    def __repr__(self) -> str:
        return f"SqlSink({redact_url(self.url)!r}, {self.table_name!r})"

    def _setup(self, sample: Mapping[str, Any] | None) -> sa.Table | None:
        if not self._ready:
            self._meta.create_all(self.engine, tables=[self._units, self._fence], checkfirst=True)
            self._ready = True
        if self._table is not None:
            return self._table
        insp = sa.inspect(self.engine)
        if insp.has_table(self.table_name):
            self._table = sa.Table(self.table_name, sa.MetaData(), autoload_with=self.engine)
        elif sample is not None:
            cols = [sa.Column(k, _column_type(v)) for k, v in sample.items()]
            t = sa.Table(self.table_name, sa.MetaData(), *cols)
            try:
                t.create(self.engine, checkfirst=True)
            except sa_exc.DBAPIError:  # created concurrently by another writer
                if not sa.inspect(self.engine).has_table(self.table_name):
                    raise
            self._table = sa.Table(self.table_name, sa.MetaData(), autoload_with=self.engine)
        return self._table

    def _fence_epoch(self, conn: sa.Connection, stage: Stage) -> None:
        f = self._fence
        res = conn.execute(
            sa.update(f)
            .where(f.c.stage_key == stage.key, f.c.epoch <= stage.epoch)
            .values(epoch=stage.epoch)
        )
        if res.rowcount:
            return
        current = conn.execute(sa.select(f.c.epoch).where(f.c.stage_key == stage.key)).scalar()
        if current is None:
            conn.execute(sa.insert(f).values(stage_key=stage.key, epoch=stage.epoch))
            return
        raise StaleAttemptError(
            f"stage {stage.key!r}: epoch {stage.epoch} is stale; epoch {current} already "
            f"wrote to {self.table_name!r}. Nothing was written; let the newer attempt finish.",
            key=stage.key,
            epoch=stage.epoch,
            current=int(current),
        )

    def write(self, stage: Stage, unit: str | int, rows: Sequence[Mapping[str, Any]]) -> bool:
        """Insert ``rows`` as the output of ``unit``, exactly once.

        Returns:
            True if this call wrote them; False if the unit was already written (the rows
            are not inserted again). Either way the unit is then done in the stage.

        Raises:
            StaleAttemptError: a newer attempt owns the stage; nothing was written.
        """
        check_unit(unit)
        if stage.is_done(unit):
            return False
        stage.check()
        uid = unit_id(unit)
        rows = list(rows)
        table = self._setup(rows[0] if rows else None)
        for attempt in range(3):
            try:
                with self.engine.begin() as conn:
                    self._fence_epoch(conn, stage)
                    conn.execute(
                        sa.insert(self._units).values(
                            stage_key=stage.key,
                            unit_id=uid,
                            epoch=stage.epoch,
                            rows=len(rows),
                            committed_at=time.time(),
                        )
                    )
                    if rows and table is not None:
                        conn.execute(sa.insert(table), rows)
                    _failpoints.hit("sink.rows_written")
                break
            except sa_exc.IntegrityError:
                # Either the unit was written by another attempt (the common case), or two
                # first writers raced to create the fence row: look which.
                if self.is_written(stage.key, unit):
                    stage.done(unit, {"rows": None, "sink": "already written"})
                    return False
                if attempt == 2:
                    raise
        _failpoints.hit("sink.committed")
        stage.done(unit, {"rows": len(rows)})
        return True

    def is_written(self, stage_key: str, unit: str | int) -> bool:
        """True if ``unit`` of ``stage_key`` has committed rows in this sink."""
        self._setup(None)
        u = self._units
        with self.engine.connect() as conn:
            return (
                conn.execute(
                    sa.select(sa.func.count()).where(
                        u.c.stage_key == stage_key, u.c.unit_id == unit_id(unit)
                    )
                ).scalar()
                or 0
            ) > 0

    def count(self) -> int:
        """Rows in the destination table (0 if it does not exist yet)."""
        table = self._setup(None)
        if table is None:
            return 0
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() or 0)

    def duplicates(self, column: str) -> int:
        """Rows minus distinct values of ``column`` (0 when every value appears once)."""
        table = self._setup(None)
        if table is None:
            return 0
        c = table.c[column]
        with self.engine.connect() as conn:
            n, d = conn.execute(sa.select(sa.func.count(), sa.func.count(sa.distinct(c)))).one()
        return int(n) - int(d)
