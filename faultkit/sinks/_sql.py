"""SqlSink: a unit's rows and its ledger row commit in one fenced database transaction."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
import xxhash
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

from .. import _failpoints
from .._errors import SinkBusyError, SinkInputError, StaleAttemptError, StoreConfigError
from .._events import Event, emit
from .._keys import check_unit, unit_id, unit_ref
from .._storage import redact_url
from ._rows import check_rows, column_type
from ._sqldb import (
    DEFAULT_COMMIT_WINDOW,
    DEFAULT_LOCK_WAIT,
    FENCE,
    FENCE_COLUMNS,
    LEDGER,
    LEDGER_COLUMNS,
    PG_FUNCTION,
    PG_TRIGGER,
    WINDOW_SQLSTATE,
    busy_sqlite,
    engine,
    fence_sqlite,
    parse_url,
    schema,
    sqlite_busy,
    sqlstate,
)

if TYPE_CHECKING:
    from .._stage import Stage

# fence_sqlite is imported from here by Stage.claim().
__all__ = ["DEFAULT_COMMIT_WINDOW", "DEFAULT_LOCK_WAIT", "SqlSink", "fence_sqlite"]

log = logging.getLogger("faultkit.sinks")

_TRIES = 3  # transactions per write when the window closed or the server aborted one
_RETRY_SQLSTATES = frozenset({"40001", "40P01"})  # serialization failure, deadlock
_MAX_PARAMS = 30_000  # bound parameters per INSERT (PostgreSQL allows 65,535)
_ADVISORY = 0x6661756C746B  # pg_advisory_xact_lock key for creating the tables ("faultk")


class SqlSink:
    """Write each unit's rows exactly once to a table in SQLite or PostgreSQL.

    One :meth:`write` is one database transaction holding the unit's rows and its row in
    the ledger table ``faultkit_units`` (primary key: stage key, :func:`~faultkit._keys.unit_ref`
    of the unit), so a unit's rows commit at most once across all attempts; the rows and
    the ledger are the authority for what the sink holds. After the commit the unit is
    recorded done in the stage's log, which is what :meth:`Stage.pending` reads; a retry
    that finds the unit in the ledger but not in the log records it without writing again.

    **The fence.** Before its first write an attempt declares the sink in the stage's log,
    so every newer :meth:`~faultkit.Stage.claim` knows to fence it. Each transaction:

    1. locks the stage's row in ``faultkit_fence`` and refuses (``StaleAttemptError``,
       nothing written) if it holds a higher epoch, else raises it to this epoch;
    2. inserts the ledger row (a unit already there: nothing is written, ``False``) and the
       rows;
    3. (PostgreSQL) stamps the ledger row with a deadline, ``clock_timestamp() +
       commit_window``, on the database's clock, after the rows so big inserts do not eat
       the window;
    4. reads the stage's log: a newer claim means roll back and ``StaleAttemptError``;
    5. commits.

    *SQLite*: every transaction runs under the database's write lock (``BEGIN
    IMMEDIATE``), and a newer claim raises the fence row under that same lock before it
    writes its claim record. So an older attempt's transaction either committed before the
    claim returned, or reads the higher fence and writes nothing. A writer stopped inside
    its transaction holds the lock: the newer claim (and every writer) fails after
    ``lock_wait`` seconds with :class:`SinkBusyError` naming the file, and the
    orchestrator's retry tries again (a killed holder's lock is freed at once).

    *PostgreSQL*: a deferred constraint trigger refuses the COMMIT of a ledger row whose
    deadline has passed, and a newer claim waits ``commit_window`` (x1.02 + 0.05 s) after
    writing its claim record. An older writer that passed step 4 before the claim record
    existed stamped its deadline before that, so it commits before the claim returns or
    not at all. Each transaction sets ``idle_in_transaction_session_timeout`` to the window,
    so the server aborts a stopped writer's session and frees its locks within
    ``commit_window``; writers wait for locks at most ``lock_wait`` (``lock_timeout``),
    then raise :class:`SinkBusyError`. A COMMIT whose answer is lost (the connection broke)
    is settled by waiting out its deadline and looking for its ledger row. The bound
    assumes the database's and the claimer's clocks run at the same rate (2% slack) and a
    COMMIT lands within 50 ms of its trigger check.

    The cost of the window: on PostgreSQL every claim after an attempt that wrote to the
    sink waits ``commit_window`` seconds. A write whose commit misses the window (a
    writer paused longer than it) is retried, up to 3 times, while its attempt is current.

    A unit is written once per stage: one :meth:`write` per unit, to one table. ``5`` and
    ``"5"`` are different units, here as in the stage.

    Args:
        url: a SQLAlchemy URL: ``sqlite:////abs/path.db`` or
            ``postgresql+psycopg://user@host/db`` (other dialects raise
            :class:`~faultkit.StoreConfigError`).
        table: the destination table; created from the first rows (column types inferred
            from their values) when it does not exist.
        commit_window: seconds (PostgreSQL) within which a transaction must commit after
            its fence check, and that each newer claim waits; also how long the server lets
            a stopped writer's session sit idle in its transaction. Default 5.
        lock_wait: seconds a writer (and on SQLite, a claim) waits for a lock another
            transaction holds before :class:`SinkBusyError`. Default 30; on PostgreSQL keep
            it above ``commit_window`` so a writer outwaits a stopped one.
    """

    def __init__(
        self,
        url: str,
        table: str,
        *,
        commit_window: float = DEFAULT_COMMIT_WINDOW,
        lock_wait: float = DEFAULT_LOCK_WAIT,
    ) -> None:
        u = parse_url(url)
        if not isinstance(table, str) or not table.strip():
            raise StoreConfigError(f"SqlSink needs a table name, got {table!r}")
        if table in (LEDGER, FENCE):
            raise StoreConfigError(
                f"table {table!r} is faultkit's own bookkeeping; write to another table"
            )
        for name, v in (("commit_window", commit_window), ("lock_wait", lock_wait)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 3600:
                raise StoreConfigError(
                    f"SqlSink {name} must be a number of seconds in (0, 3600], got {v!r}"
                )
        self.url = url
        self.table_name = table
        self.dialect = u.get_backend_name()
        self.commit_window = float(commit_window)
        self.lock_wait = float(lock_wait)
        self.path = u.database if self.dialect == "sqlite" else None
        self.engine = engine(u)
        self._units, self._fence = schema(sa.MetaData())
        if self.dialect == "sqlite":
            self._fence_spec: dict[str, Any] = {
                "kind": "sqlite",
                "path": self.path,
                "wait": self.lock_wait,
            }
        else:
            self._fence_spec = {"kind": "window", "seconds": self.commit_window}
        ident = json.dumps(
            [u.set(password=None).render_as_string(), table, self._fence_spec], sort_keys=True
        )
        self.sink_id = f"sql:{xxhash.xxh64_hexdigest(ident.encode())}"
        self._table: sa.Table | None = None
        self._ready = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SqlSink({redact_url(self.url)!r}, {self.table_name!r})"

    # -- connections -------------------------------------------------------------------

    @contextlib.contextmanager
    def _connect(self, *, write: bool) -> Iterator[sa.Connection]:
        with self.engine.connect() as conn:
            if self.dialect == "sqlite":
                conn.execution_options(
                    faultkit_write=write, faultkit_busy_ms=int(self.lock_wait * 1000)
                )
            yield conn

    def _set_local(self, conn: sa.Connection, *, window: bool) -> None:
        if self.dialect != "postgresql":
            return
        conn.exec_driver_sql(f"SET LOCAL lock_timeout = {int(self.lock_wait * 1000)}")
        if window:
            ms = int(self.commit_window * 1000)
            conn.exec_driver_sql(f"SET LOCAL idle_in_transaction_session_timeout = {ms}")

    def _where(self) -> str:
        return self.path if self.path else redact_url(self.url)

    def _busy(self, stage_key: str, exc: BaseException) -> SinkBusyError:
        if self.dialect == "sqlite":
            return busy_sqlite(
                self._where(), self.lock_wait, stage_key, "this write could not start"
            )
        return SinkBusyError(
            f"SqlSink {self._where()!r}: a lock on stage {stage_key!r}'s rows was not "
            f"obtained within the lock wait of {self.lock_wait:g} s (another transaction "
            "holds it: a long write, or a stopped writer the server aborts within "
            f"commit_window={self.commit_window:g} s). Nothing was written; the task's retry "
            "will try again (raise lock_wait= to wait longer)."
        )

    # -- schema ------------------------------------------------------------------------

    def _check_schema(self, insp: Any, table: sa.Table, want: tuple[str, ...]) -> bool:
        """True if ``table`` exists with our columns; False if absent; else raise."""
        if not insp.has_table(table.name):
            return False
        have = [c["name"] for c in insp.get_columns(table.name)]
        if set(have) != set(want):
            raise StoreConfigError(
                f"table {table.name!r} in {self._where()!r} has columns {have}, but this "
                f"faultkit needs {list(want)} (it was made by an older faultkit or by something "
                f"else). Rename it (ALTER TABLE {table.name} RENAME TO {table.name}_old) once "
                "no attempt that used it is running, then write again: the table is created "
                "anew. Units it recorded are not known to the new one."
            )
        return True

    def _setup(self, rows: list[dict[str, Any]] | None, stage_key: str = "") -> sa.Table | None:
        """Create or check the ledger, the fence table and the destination table."""
        with self._lock:
            if self._ready and (self._table is not None or not rows):
                return self._table
            try:
                with self._connect(write=True) as conn, conn.begin():
                    self._set_local(conn, window=False)
                    if self.dialect == "postgresql":
                        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_ADVISORY)))
                    insp = sa.inspect(conn)
                    if not self._ready:
                        if not self._check_schema(insp, self._units, LEDGER_COLUMNS):
                            self._units.create(conn)
                        if not self._check_schema(insp, self._fence, FENCE_COLUMNS):
                            self._fence.create(conn)
                        if self.dialect == "postgresql":
                            self._install_trigger(conn)
                    if self._table is None:
                        self._table = self._dest(conn, insp, rows)
            except sa_exc.OperationalError as exc:
                if sqlite_busy(exc) or sqlstate(exc) == "55P03":
                    raise self._busy(stage_key, exc) from exc
                raise
            except sa_exc.ProgrammingError as exc:
                raise StoreConfigError(
                    f"SqlSink {self._where()!r} could not create its tables ({exc.orig}); "
                    f"grant this user CREATE (or create {LEDGER}/{FENCE} as a user who can)"
                ) from exc
            self._ready = True
            return self._table

    def _install_trigger(self, conn: sa.Connection) -> None:
        exists = conn.execute(
            sa.text(
                "SELECT 1 FROM pg_trigger WHERE tgname = 'faultkit_commit_window' "
                "AND tgrelid = CAST(:t AS regclass)"
            ),
            {"t": LEDGER},
        ).first()
        if exists is None:
            conn.execute(sa.text(PG_FUNCTION))
            conn.execute(sa.text(PG_TRIGGER))

    def _dest(
        self, conn: sa.Connection, insp: Any, rows: list[dict[str, Any]] | None
    ) -> sa.Table | None:
        if insp.has_table(self.table_name):
            return sa.Table(self.table_name, sa.MetaData(), autoload_with=conn)
        if not rows:
            return None
        cols = [sa.Column(k, column_type(self.table_name, k, rows)) for k in check_rows(rows)[1]]
        t = sa.Table(self.table_name, sa.MetaData(), *cols)
        t.create(conn)
        return t

    def _check_columns(self, table: sa.Table, cols: list[str]) -> None:
        have = [c.name for c in table.columns]
        unknown = [c for c in cols if c not in have]
        if unknown:
            raise SinkInputError(
                f"table {self.table_name!r} has no column {unknown[0]!r}"
                + (f" (nor {unknown[1:]})" if len(unknown) > 1 else "")
                + f"; its columns are {have}. Fix the rows' keys (a misspelling?) or add the "
                f"column (ALTER TABLE {self.table_name} ADD COLUMN ...). Nothing was written."
            )

    # -- writing -----------------------------------------------------------------------

    def write(self, stage: Stage, unit: str | int, rows: Iterable[Mapping[str, Any]]) -> bool:
        """Insert ``rows`` as the output of ``unit``, exactly once, then record it done.

        Returns:
            True if this call committed the rows; False if the unit was already written
            (by any attempt: nothing is inserted again). Either way the unit is then done
            in the stage, unless a newer attempt claimed it meanwhile (the newer attempt
            finds the unit in the ledger and records it).

        Raises:
            StaleAttemptError: a newer attempt claimed the stage; nothing was written.
            SinkBusyError: a lock was not obtained within ``lock_wait``; nothing was written.
            SinkInputError: rows the table cannot take (a column it lacks, rows that are
                not mappings, values the database refuses); nothing was written.
        """
        check_unit(unit)
        good, cols = check_rows(rows)
        if stage.is_done(unit):
            return False
        stage.check()
        table = self._setup(good, stage.key)
        if table is not None and good:
            self._check_columns(table, cols)
        stage._declare_sink(self.sink_id, self._fence_spec)
        _failpoints.hit("sink.declared")
        uref = unit_ref(unit)
        why = ""
        for _ in range(_TRIES):
            outcome, why = self._transaction(stage, unit, uref, good, table)
            if outcome == "written":
                break
            if outcome == "exists":
                return self._already_written(stage, unit, uref)
            stage.check()  # not committed: a newer attempt is why, or it was transient
            log.info(
                "stage %s: write of unit %r not committed (%s); retrying", stage.key, unit, why
            )
        else:
            raise SinkBusyError(
                f"SqlSink {self._where()!r}: unit {unit!r} of stage {stage.key!r} did not "
                f"commit in {_TRIES} tries ({why}). Nothing was written. If the writer pauses "
                f"for longer than commit_window={self.commit_window:g} s (GC, swapping), "
                "raise commit_window; the task's retry will try again."
            )
        _failpoints.hit("sink.committed")
        self._record(stage, unit, {"rows": len(good), "epoch": stage.epoch})
        return True

    def _record(self, stage: Stage, unit: str | int, result: dict[str, Any]) -> None:
        """Record a committed unit in the stage's log. A newer claim that landed after our
        commit is not an error: the rows are in; the newer attempt records the unit."""
        try:
            stage.done(unit, result)
        except StaleAttemptError:
            log.info(
                "stage %s: unit %r committed in %s by epoch %d; a newer attempt claimed the "
                "stage before it was recorded, and will record it",
                stage.key,
                unit,
                self._where(),
                stage.epoch,
            )
        except BaseException as exc:
            exc.add_note(
                f"unit {unit!r} of stage {stage.key!r} committed in {self._where()!r}; the "
                "retry finds it in the ledger and does not write it again"
            )
            raise

    def _already_written(self, stage: Stage, unit: str | int, uref: str) -> bool:
        u = self._units
        with self._connect(write=False) as conn:
            row = conn.execute(
                sa.select(u.c.epoch, u.c.rows).where(
                    u.c.stage_key == stage.key, u.c.unit_ref == uref
                )
            ).first()
        epoch, n = (int(row[0]), int(row[1])) if row else (None, None)
        stage.done(unit, {"rows": n, "epoch": epoch, "sink": "already written"})
        return False

    def _stale(self, stage: Stage, current: int) -> StaleAttemptError:
        msg = (
            f"stage {stage.key!r}: epoch {stage.epoch} is stale; the fence in "
            f"{self._where()!r} is at epoch {current} (a newer attempt wrote or claimed). "
            "Nothing was written; stop this attempt and let the newer one finish."
        )
        emit(
            Event(
                "stale_attempt",
                stage.key,
                f"a stale attempt (epoch {stage.epoch}) of {stage.key} was fenced by "
                f"SqlSink {self._where()}",
                {"epoch": stage.epoch, "current": current, "write": "SqlSink rows"},
                dedupe_key=f"{stage.epoch}",
            )
        )
        return StaleAttemptError(msg, key=stage.key, epoch=stage.epoch, current=current)

    def _check_fence(self, conn: sa.Connection, stage: Stage) -> None:
        f = self._fence
        sel = sa.select(f.c.epoch).where(f.c.stage_key == stage.key)
        cur = conn.execute(sel).scalar()
        if cur is not None and cur == stage.epoch and self.dialect == "postgresql":
            # Hold the row (shared with writers of this epoch) until we commit: a newer
            # writer raising the fence waits for us, never commits beside us.
            cur = conn.execute(sel.with_for_update(read=True)).scalar()
        if cur is None or cur < stage.epoch:
            ins = (pg_dialect if self.dialect == "postgresql" else sqlite_dialect).insert(f)
            stmt = ins.values(stage_key=stage.key, epoch=stage.epoch)
            top = sa.func.greatest if self.dialect == "postgresql" else sa.func.max
            stmt = stmt.on_conflict_do_update(
                index_elements=[f.c.stage_key],
                set_={"epoch": top(f.c.epoch, stmt.excluded.epoch)},
            ).returning(f.c.epoch)
            cur = conn.execute(stmt).scalar_one()
        if cur > stage.epoch:
            raise self._stale(stage, int(cur))

    def _transaction(
        self,
        stage: Stage,
        unit: str | int,
        uref: str,
        rows: list[dict[str, Any]],
        table: sa.Table | None,
    ) -> tuple[str, str]:
        """One try; returns ("written" | "exists" | "again", why)."""
        u = self._units
        token = uuid.uuid4().hex
        deadline: dt.datetime | None = None
        committing = False
        with self._connect(write=True) as conn:
            try:
                trans = conn.begin()  # SQLite: BEGIN IMMEDIATE, waits up to lock_wait
                self._set_local(conn, window=True)
                self._check_fence(conn, stage)
                ins = (pg_dialect if self.dialect == "postgresql" else sqlite_dialect).insert(u)
                got = conn.execute(
                    ins.values(
                        stage_key=stage.key,
                        unit_ref=uref,
                        unit_id=unit_id(unit),
                        dest=self.table_name,
                        epoch=stage.epoch,
                        rows=len(rows),
                        token=token,
                        committed_at=time.time(),
                    )
                    .on_conflict_do_nothing(index_elements=[u.c.stage_key, u.c.unit_ref])
                    .returning(u.c.token)
                ).first()
                if got is None:
                    trans.rollback()
                    return "exists", ""
                if rows and table is not None:
                    self._insert_rows(conn, table, rows)
                _failpoints.hit("sink.rows_written")
                if self.dialect == "postgresql":
                    deadline = conn.execute(
                        sa.text(
                            f"UPDATE {LEDGER} SET deadline = clock_timestamp() + "
                            "make_interval(secs => :w) WHERE stage_key = :k AND unit_ref = :u "
                            "RETURNING deadline"
                        ),
                        {"w": self.commit_window, "k": stage.key, "u": uref},
                    ).scalar_one()
                stage.check()
                _failpoints.hit("sink.checked")
                committing = True
                trans.commit()
                return "written", ""
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    conn.rollback()
                if committing and self.dialect == "postgresql":
                    state = sqlstate(exc)
                    if state == WINDOW_SQLSTATE or state in _RETRY_SQLSTATES:
                        return "again", f"COMMIT refused: {state}"
                    if isinstance(exc, sa_exc.DBAPIError) and self._settle(
                        stage.key, uref, token, deadline
                    ):
                        return "written", ""
                    if isinstance(exc, sa_exc.DBAPIError):
                        return "again", f"COMMIT lost: {type(exc.orig).__name__}"
                    raise
                return self._classify(stage, exc)

    def _insert_rows(
        self, conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]]
    ) -> None:
        if self.dialect == "sqlite":
            conn.execute(sa.insert(table), rows)
            return
        # Multi-row VALUES, not executemany: psycopg pipelines executemany, after which the
        # server waits for the client without arming idle_in_transaction_session_timeout, so
        # a writer stopped right after it would hold its locks forever.
        step = max(1, _MAX_PARAMS // max(1, len(rows[0])))
        for i in range(0, len(rows), step):
            conn.execute(sa.insert(table).values(rows[i : i + step]))

    def _classify(self, stage: Stage, exc: BaseException) -> tuple[str, str]:
        """Map an error of an uncommitted transaction: raise it translated, or try again."""
        if isinstance(exc, OverflowError):
            raise SinkInputError(
                f"a value does not fit the column ({exc}); nothing was written"
            ) from exc
        if not isinstance(exc, sa_exc.DBAPIError):
            raise exc
        state = sqlstate(exc)
        if sqlite_busy(exc) or state == "55P03":
            raise self._busy(stage.key, exc) from exc
        if (
            state in _RETRY_SQLSTATES
            or exc.connection_invalidated
            or state.startswith(("08", "57"))
        ):
            return "again", f"{type(exc.orig).__name__}: {str(exc.orig).strip()[:200]}"
        if state == "25P03":  # the server aborted our idle session: we were paused
            return "again", "the server aborted the paused transaction"
        if isinstance(exc, (sa_exc.DataError, sa_exc.IntegrityError)) or state == "42804":
            raise SinkInputError(
                f"{self._where()!r} refused the rows for table {self.table_name!r}: "
                f"{str(exc.orig).strip().splitlines()[0]}. Fix the rows (types, lengths, "
                "constraints) or the table; nothing was written."
            ) from exc
        if isinstance(exc, sa_exc.OperationalError) and self.dialect == "postgresql":
            return "again", f"{type(exc.orig).__name__}: {str(exc.orig).strip()[:200]}"
        raise exc

    def _settle(self, stage_key: str, uref: str, token: str, deadline: dt.datetime | None) -> bool:
        """Whether a COMMIT whose answer was lost committed: once its deadline has passed
        on the database's clock no commit of it can land, so the ledger row tells."""
        u = self._units
        try:
            if deadline is not None:
                with self.engine.connect() as conn:
                    left = conn.execute(
                        sa.select(
                            sa.extract("epoch", sa.literal(deadline) - sa.func.clock_timestamp())
                        )
                    ).scalar()
                if left is not None and float(left) > -0.1:
                    time.sleep(float(left) + 0.1)
            with self.engine.connect() as conn:
                row = conn.execute(
                    sa.select(u.c.token).where(
                        u.c.stage_key == stage_key, u.c.unit_ref == uref, u.c.token == token
                    )
                ).first()
            return row is not None
        except sa_exc.DBAPIError as exc:
            raise SinkBusyError(
                f"SqlSink {self._where()!r}: the answer to a COMMIT was lost and the database "
                f"cannot be reached to see whether it landed ({exc.orig}). The task's retry "
                "checks the ledger: the unit is written exactly once either way."
            ) from exc

    # -- reading -----------------------------------------------------------------------

    def _reflect(self) -> sa.Table | None:
        if self._table is not None:
            return self._table
        with self._connect(write=False) as conn:
            if not sa.inspect(conn).has_table(self.table_name):
                return None
            self._table = sa.Table(self.table_name, sa.MetaData(), autoload_with=conn)
        return self._table

    def is_written(self, stage_key: str, unit: str | int) -> bool:
        """True if ``unit`` of ``stage_key`` has committed rows in this sink's database."""
        u = self._units
        with self._connect(write=False) as conn:
            if not sa.inspect(conn).has_table(LEDGER):
                return False
            row = conn.execute(
                sa.select(u.c.epoch).where(
                    u.c.stage_key == stage_key, u.c.unit_ref == unit_ref(check_unit(unit))
                )
            ).first()
        return row is not None

    def count(self) -> int:
        """Rows in the destination table (0 if it does not exist yet)."""
        table = self._reflect()
        if table is None:
            return 0
        with self._connect(write=False) as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() or 0)

    def duplicates(self, column: str) -> int:
        """Rows minus distinct values of ``column`` (0 when every value appears once)."""
        table = self._reflect()
        if table is None:
            return 0
        c = table.c[column]
        with self._connect(write=False) as conn:
            n, d = conn.execute(sa.select(sa.func.count(), sa.func.count(sa.distinct(c)))).one()
        return int(n) - int(d)
