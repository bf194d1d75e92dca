"""Stage and Snapshot: one attempt at a stage, fenced by the stage's log (see ``_log.py``)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import xxhash

from . import _failpoints, _metrics
from ._errors import (
    CheckpointWriteError,
    CorruptCheckpointError,
    LinkRefusedError,
    StaleAttemptError,
)
from ._events import Event, emit
from ._keys import check_key, check_unit, unit_id
from ._log import SnapRecord, View, decode, digest, encode, seq_name
from ._storage_local import LocalStorage

if TYPE_CHECKING:
    from ._store import CheckpointStore

__all__ = ["Snapshot", "Stage"]

log = logging.getLogger("faultkit.store")

CHUNK = 8 << 20
GONE = "@gone"  # marks a deleted stage, so keys() leaves it out until a new run claims it


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One verified snapshot of a stage.

    Attributes:
        key: the stage key.
        step: the step the writer gave to :meth:`Stage.save`.
        epoch: the epoch (attempt) that wrote it.
        meta: the small JSON dict given to :meth:`Stage.save`.
        size: bytes.
        checksum: ``"xxh3_128:<hex>"``, verified before this object was returned.
        created: when its record was committed (seconds since the epoch).
        data: the bytes (a writable ``memoryview`` when asked for with ``mapped=True``).
    """

    key: str
    step: int
    epoch: int
    meta: Mapping[str, Any]
    size: int
    checksum: str
    created: float
    data: bytes | memoryview = field(repr=False)


def _chunks(data: Any) -> Iterator[memoryview | bytes]:
    """Yield ``data`` in pieces without copying it (bytes-like, file-like or iterable)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data).cast("B")
        for i in range(0, len(view), CHUNK):
            yield view[i : i + CHUNK]
    elif hasattr(data, "readinto"):
        buf = bytearray(CHUNK)
        mv = memoryview(buf)
        while n := data.readinto(mv):
            yield mv[:n]
    elif hasattr(data, "read"):
        while chunk := data.read(CHUNK):
            yield chunk
    elif isinstance(data, Iterable):
        for chunk in data:
            yield chunk
    else:
        raise TypeError(
            f"save() takes bytes, a binary file or an iterable of bytes, not {type(data).__name__}"
        )


class Stage:
    """One attempt at a stage: claims an epoch on entry, fences every later write.

    Use it as a context manager (``with store.stage(k) as stage:``) or call :meth:`claim`.
    Every method is safe from several threads of one attempt (e.g. an async checkpoint
    writer beside the training loop).
    """

    def __init__(self, store: CheckpointStore, key: str) -> None:
        self.store = store
        self.key = check_key(key)
        store._check_key_fits(self.key)
        self._storage = store._storage
        self._dir = f"{self.key}/@log"
        self._view = View()
        self._read = False  # has the log been read at all (claim reads it first if not)
        self._listed = False  # has a full read (listing the log) been done on this object
        self._epoch = 0
        self._lazy = False  # claimed, but the claim rides on the first commit (see claim())
        self._order: int | None = None  # the host's order of this attempt (claim(order=))
        self._lock = threading.RLock()
        self._claimed_at = 0.0
        self._prior: dict[str, Any] = {}
        self._reported: set[str] = set()
        self._sinks: set[str] = set()  # sinks this attempt declared in the log
        self._bad_bases: set[int] = set()  # compact bases whose summary did not verify

    # -- reading the log ---------------------------------------------------------------

    def _path(self, seq: int) -> str:
        return f"{self._dir}/{seq_name(seq)}"

    def _read_one(self, seq: int) -> bytes | None:
        """Record ``seq``'s bytes; None when absent. A link is damage, not a record."""
        path = self._path(seq)
        try:
            return self._storage.read(path)
        except FileNotFoundError:
            return None
        except LinkRefusedError as exc:
            if exc.path != path:
                raise  # a folder above the log is a link: nothing here can be read
            return b""  # the record itself is a link: damage

    def _read_one_and_present(self, seq: int, names: list[str]) -> tuple[bytes | None, set[str]]:
        """:meth:`_read_one` of ``seq`` and which of ``names`` exist in the log, together."""
        path = self._path(seq)
        try:
            return self._storage.read_and_present(path, self._dir, names)
        except LinkRefusedError as exc:
            if exc.path != path:
                raise
            return b"", self._storage.present(self._dir, names)  # a link record: damage

    def _fold(self, seq: int, data: bytes) -> bool:
        """Apply record ``seq``; False when its link shows the record before it is forged
        (the view must then be rebuilt without it)."""
        v = self._view
        try:
            body = decode(data)
        except CorruptCheckpointError as exc:
            log.warning("stage %s: log record %d is damaged (%s)", self.key, seq, exc)
            v.damage(seq, "corrupt" if data else "link", str(exc) if data else "not a file")
            return True
        if seq in self._bad_bases:
            v.damage(seq, "corrupt", "its summary is missing or fails its checksum")
            return True
        if not v.link_ok(seq, body):
            v.suspect.add(seq - 1)
            return False
        v.apply(seq, body, digest(data))
        return True

    def _catch_up(self, full: bool = False) -> None:
        """Read every record after the view's cursor.

        ``full`` lists the log folder first, so records beyond a gap are found and the gap
        is reported; otherwise records are probed one by one from the cursor (cheap, for
        writers: a writer that meets a gap is caught by its neighbour check instead).
        """
        for _ in range(64):  # each turn names one more forged record; a log has few
            if self._catch_up_once(full or not self._read):
                return
            suspect = self._view.suspect
            self._view = View(suspect=suspect)
            full = True
        raise CorruptCheckpointError(
            f"stage {self.key!r}: the log's records do not chain after 64 repairs; run "
            "`faultkit verify` and restore the store from a backup"
        )

    def _catch_up_once(self, full: bool) -> bool:
        self._read = True
        v = self._view
        if full:
            self._listed = True
            seqs = self._list_log(v.cursor)
            if seqs is None:
                return True  # the log's folder does not exist: nothing to read (a fresh stage)
            if seqs:
                try:
                    got = self._storage.read_many([self._path(s) for s in seqs])
                    datas = {s: got[self._path(s)] for s in seqs}
                except LinkRefusedError:  # one of them is a link: read them one by one
                    datas = {s: self._read_one(s) for s in seqs}
                start, body = v.cursor + 1, {}
                for s in reversed(seqs):  # records below the newest base are history
                    d = datas[s]
                    if d and b'"t":"base"' in d and s > v.cursor and s not in self._bad_bases:
                        with contextlib.suppress(CorruptCheckpointError):
                            body = decode(d)
                            if body["t"] == "base":
                                start = s
                                break
                if start > v.cursor + 1 and body.get("why") == "compact":
                    if not self._restore(start, body):
                        self._bad_bases.add(start)
                        return False  # read the history the summary stood for instead
                for s in range(start, seqs[-1] + 1):
                    data = datas.get(s)
                    if data is None:
                        data = self._read_one(s)  # listed late, or a gap: look again
                    if data is None:
                        v.damage(s, "missing", "a record is missing below later ones")
                        continue
                    if not self._fold(s, data):
                        return False
        while True:
            nxt = v.cursor + 1
            data = self._read_one(nxt)
            if data is None:
                return True
            if not self._fold(nxt, data):
                return False

    def _list_log(self, cursor: int) -> list[int] | None:
        """Positions of the log's records after ``cursor``, from the newest compaction on
        (its ``head-`` hint; a hint is only a shortcut: the record it names is checked);
        None when the log's folder surely does not exist (a link raises)."""
        st, folder = self._storage, self._dir
        names = None
        if st.cheap_list:
            names = st.list_or_missing(folder)
            if names is None:
                return None
        after = cursor
        if not self._bad_bases:  # a summary failed: read the whole history instead
            heads = (
                [n for n in names if n.startswith("head-")]
                if names is not None
                else st.list_from(folder, prefix="head-")
            )
            newest = max((int(n[5:]) for n in heads if n[5:].isdigit()), default=0)
            after = max(cursor, newest - 1)
        if names is None:
            names = st.list_from(folder, after=seq_name(after)) if after else st.list(folder)
        return sorted(int(n) for n in names if n.isdigit() and int(n) > after)

    def _restore(self, seq: int, body: dict[str, Any]) -> bool:
        """Start the view from the summary compact base ``seq`` names; False if the summary
        is missing or damaged."""
        name = str(body.get("sum", ""))
        if not name.startswith("sum-") or "/" in name:
            return False
        try:
            data = self._storage.read(f"{self._dir}/{name}")
        except (FileNotFoundError, LinkRefusedError):
            data = None
        if data is None or len(data) != body.get("n") or digest(data) != body.get("h"):
            log.warning("stage %s: the summary named by record %d is damaged", self.key, seq)
            return False
        try:
            self._view.restore(data, seq, str(body.get("p", "")))
        except CorruptCheckpointError as exc:
            log.warning("stage %s: record %d: %s", self.key, seq, exc)
            return False
        return True

    def _compact(self) -> None:
        """Write a summary of the view and a ``compact`` base record naming it at the next
        position, so later readers start there. Best effort: a commit never fails for it."""
        v = self._view
        if v.damaged or v.suspect or self._lazy:
            return  # damage is kept in the open, where verify reports it
        seq = v.cursor + 1
        before = v.base
        data = v.summary()
        name = f"sum-{seq_name(seq)}-{uuid.uuid4().hex[:8]}"
        path = f"{self._dir}/{name}"
        try:
            self._storage.create(path, data)
            body = {"t": "base", "why": "compact", "e": v.fence, "sum": name, "h": digest(data)}
            body.update(n=len(data), units=len(v.units), ts=time.time(), p=v.last_digest)
            try:
                why = self._create(seq, body)
            except FileExistsError:
                why = "taken"
            if why:
                self._storage.delete(path)
                return
            with contextlib.suppress(FileExistsError):
                self._storage.create(f"{self._dir}/head-{seq_name(seq)}", b"", durable=False)
            log.debug("stage %s: compacted %d records into %s", self.key, seq - 1, name)
            self._sweep_summaries(before, seq)
        except Exception as exc:  # the next commit tries again
            log.warning("stage %s: could not compact its log (%s)", self.key, exc)

    def _sweep_summaries(self, base: int, seq: int) -> None:
        """Remove the summaries that compactions after ``base`` wrote but never named: their
        compactor lost the position to another record, or died before writing its base.
        A summary is an orphan once its position holds a record that does not name it (a
        compactor still running then loses that position and removes its own); a summary
        whose position is still free is kept."""
        names = self._storage.list_from(self._dir, after=f"sum-{seq_name(base)}", prefix="sum-")
        for name in names:
            parts = name.split("-")
            if len(parts) != 3 or not parts[1].isdigit() or not base < int(parts[1]) < seq:
                continue
            data = self._read_one(int(parts[1]))
            try:
                body = decode(data) if data else None
            except CorruptCheckpointError:
                continue  # damage stays in the open, where verify reports it
            if body is None or (body.get("t") == "base" and body.get("sum") == name):
                continue
            with contextlib.suppress(FileNotFoundError):
                self._storage.delete(f"{self._dir}/{name}")
            log.info("stage %s: removed summary %s, which no record names", self.key, name)

    def refresh(self) -> None:
        """Read records written by other processes since the last read."""
        with self._lock:
            self._catch_up()

    # -- writing the log ---------------------------------------------------------------

    def _stale(self, what: str | None, why: str = "") -> StaleAttemptError:
        v = self._view
        written = f"; {what} was not written" if what else ""
        cause = why or f"epoch {v.fence} claimed it"
        err = StaleAttemptError(
            f"stage {self.key!r}: epoch {self._epoch} is stale ({cause}){written}. A newer "
            "attempt owns this stage: stop this one and let the newer attempt finish.",
            key=self.key,
            epoch=self._epoch,
            current=v.fence,
        )
        emit(
            Event(
                "stale_attempt",
                self.key,
                f"a stale attempt (epoch {self._epoch}) of {self.key} was fenced ({cause})"
                + (f"; its {what} was refused" if what else ""),
                {"epoch": self._epoch, "current": v.fence, "write": what},
                dedupe_key=f"{self._epoch}",
            )
        )
        return err

    def _neighbours_ok(self, seq: int, mine: str, prev: str = "") -> str:
        """After creating ``seq`` (whose digest is ``mine``, naming ``prev`` as the digest of
        the record before it): "" if it extends the log, else why it does not: it filled a
        gap below later records (the record after it names another predecessor), or the
        records before it were removed (the stage was deleted) or replaced.

        The record before it must be the one this writer read, not only exist: two stale
        writers creating into the removed part of a deleted stage's log would otherwise
        each find the other's record there and both keep theirs.
        """
        succ = seq_name(seq + 1)
        if seq > 1 and prev:  # reading the predecessor also shows it exists
            before, have = self._read_one_and_present(seq - 1, [succ])
            if before is None:
                return "the stage was deleted or its log was reset"
            if digest(before) != prev:
                return "the record before it is not the one this attempt read (the log was reset)"
        else:
            names = [succ] + ([seq_name(seq - 1)] if seq > 1 else [])
            have = self._storage.present(self._dir, names)
            if len(names) > 1 and names[1] not in have:
                return "the stage was deleted or its log was reset"
        if succ in have:
            data = self._read_one(seq + 1)
            try:
                body = decode(data) if data else {}
            except CorruptCheckpointError:
                body = {}  # cannot tell: keep ours (a writer after us may have named it)
            if body.get("p") not in (None, "", mine):
                return f"record {seq} was missing below later records (log damage)"
        return ""

    def _create(self, seq: int, body: dict[str, Any], durable: bool = True) -> str:
        """Create record ``seq``; "" on success, or why it had to be withdrawn.

        Raises ``FileExistsError`` when the position is taken.
        """
        data = encode(body)
        path = self._path(seq)
        _failpoints.hit("log.before_create")
        try:
            self._storage.create(path, data, durable=durable)
        except FileExistsError:
            # A retried request whose first try landed (S3 answers the retry 412) finds our
            # own record: the same bytes, which hold our pid and a timestamp.
            if self._read_one(seq) != data:
                raise
        _failpoints.hit("log.created")
        mine = digest(data)
        why = self._neighbours_ok(seq, mine, str(body.get("p") or ""))
        if why:
            with contextlib.suppress(Exception):
                self._storage.delete(path)  # never valid: no reader may build on it
            return why
        self._view.apply(seq, body, mine)
        return ""

    def _append(
        self,
        body: dict[str, Any],
        *,
        fenced: bool = True,
        redundant: Callable[[View], bool] | None = None,
    ) -> int:
        """Create the next record; returns its seq, or 0 when ``redundant(view)`` says it is
        already there (a unit done, the stage finished) by the time it would be written."""
        kind = body["t"]
        what = {
            "done": f"done({body.get('u')!r})",
            "fin": "finish()",
            "sink": "a sink write",
            "claim": "its claim",
        }.get(kind, f"{kind}(step={body.get('step')})")
        while True:
            v = self._view
            if fenced and self._older_got_there_first(v):
                # This attempt is the newer one: claim for real above the older attempt
                # (fencing it and its sinks), then commit under the new epoch.
                before = self._epoch, self._lazy, self._order
                self._epoch, self._lazy, self._order = 0, False, None
                try:
                    wait = self._claim_now()
                except BaseException:
                    if not self._epoch:  # no claim was written: still the lazy attempt
                        self._epoch, self._lazy, self._order = before
                    raise
                if wait:
                    time.sleep(wait)
                if kind == "claim":
                    return 0  # the claim it was to write is written
                body["e"] = self._epoch
                body.pop("o", None)
                continue
            if fenced and self._fenced(v):
                raise self._stale(what)
            if redundant is not None and redundant(v):
                return 0
            seq = v.cursor + 1
            body["p"] = v.last_digest
            if self._lazy and self._order is not None and body.get("e") == self._epoch:
                body["o"] = self._order  # the claim this commit carries says whose it is
            try:
                why = self._create(seq, body)
            except FileExistsError:
                self._catch_up()
                continue
            if why:
                if fenced:
                    raise self._stale(what, why)
                self._catch_up(full=True)
                continue
            if self._lazy and body.get("e") == self._epoch:
                self._lazy = False  # this commit carried the claim: the epoch is in the log
                _failpoints.hit("stage.claim_written")
            every = self.store.compact_every
            if every and seq - self._view.base >= every:
                self._compact()
            return seq

    def _older_got_there_first(self, v: View) -> bool:
        """True when this attempt's ordered lazy claim (nothing written yet) lost its epoch to
        the first commit of an attempt the host ordered before it: a zombie of the run
        this one replaces (see :meth:`claim`)."""
        return (
            self._lazy
            and self._order is not None
            and v.fence == v.epoch == self._epoch
            and v.epoch_order is not None
            and v.epoch_order < self._order
        )

    def _fenced(self, v: View) -> bool:
        """True if a newer attempt owns the stage. Until a lazy claim is written (it rides
        on the attempt's first commit), a claim of the same epoch by anyone else fences it
        too: that writer read the same log and got there first; unless the host ordered
        that writer before this attempt (it takes over at its first commit instead)."""
        if self._lazy:
            return v.fence >= self._epoch and not self._older_got_there_first(v)
        return v.fence > self._epoch

    # -- claiming ----------------------------------------------------------------------

    def claim(self, *, lazy: bool = False, order: int | None = None) -> Stage:
        """Claim a new epoch; every write of an older epoch fails from now on.

        The new epoch is above every epoch the log holds, and above every damaged position
        in it (see ``_log.py``); gaps are sealed first. Sinks used by older epochs are fenced
        before this returns (see :class:`~faultkit.sinks.SqlSink`). The first claim of a
        stage is written without fsync: there is no earlier attempt for it to fence, and
        every later commit of its epoch implies it, so losing it in a power cut of the
        machine that ran it changes nothing. Every later claim is durable before this returns.

        ``lazy=True`` (for a host's first try of a task, which no older attempt can race)
        writes no claim record: the epoch above every one in the log is taken now, and the
        attempt's first commit carries it (a commit of an epoch above every claim counts as
        that epoch's claim). That first commit succeeds only while nobody else has claimed
        the same epoch or a higher one meanwhile; otherwise it raises
        :class:`~faultkit.StaleAttemptError` and writes nothing, exactly as if this claim
        had been written first and then fenced. So no epoch is ever written by two
        attempts. A log with damage, a reset (delete) or sinks of older epochs to fence is
        claimed as usual.

        ``order`` (with ``lazy=True``) is for a host that cannot tell a first try from a
        rerun whose older attempt may still be running (Dask after a worker loss), but
        numbers its runs of a task in the order it started them (Dask's run id). The claim
        is then lazy only on an empty log, and its first commit records ``order``. If
        another attempt's first commit took the same epoch first, the one with the lower
        order is fenced: the older attempt gets :class:`~faultkit.StaleAttemptError`, while
        the newer one claims above it at once (a durable claim that fences it and its sinks,
        as an eager claim would have) and commits under that epoch. At most the work in
        flight in both before that first commit is done twice, as with an eager claim.
        """
        with self._lock:
            if self._epoch:
                return self
            # One listing per attempt finds gaps. After it (refresh() then claim()) nothing
            # more is read: the claim, or with lazy=True the first commit, is created at the
            # position after what was read, so a record made since makes that create fail;
            # it then reads on and claims above (or, lazy, is fenced by a newer claim).
            if not self._listed:
                self._catch_up(full=True)
            v = self._view
            if (
                lazy
                and not (v.damaged or v.base or v.sinks or v.deleted)
                and (order is None or v.cursor == 0)
            ):
                self._epoch, self._lazy, self._order = v.fence + 1, True, order
                self._claimed_at = time.time()
                _failpoints.hit("stage.claimed")
                if self.resumed:
                    self._announce_resume(v, self._epoch, self._claimed_at)
                return self
            wait = self._claim_now()
        if wait:
            # Sinks with a commit window: a write of an older epoch that passed its fence
            # check commits within the window or not at all (see SqlSink).
            time.sleep(wait)
        return self

    def _claim_now(self) -> float:
        """Write a claim above every epoch in the log (under the lock); returns the seconds
        to wait for older epochs' sink commit windows."""
        with self._lock:
            while True:
                if self._seal_gaps():
                    continue
                v = self._view
                epoch = v.fence + 1
                wait = self._fence_sinks(epoch)
                now = time.time()
                seq = v.cursor + 1
                body = {"t": "claim", "e": epoch, "ts": now, "pid": os.getpid()}
                body["p"] = v.last_digest
                fresh = epoch == 1 and not v.damaged and not v.base
                try:
                    why = self._create(seq, body, durable=not fresh)
                except FileExistsError:
                    self._catch_up()
                    continue
                if why:
                    self._catch_up(full=True)
                    continue
                break
            self._epoch = epoch
            self._claimed_at = now
            _failpoints.hit("stage.claimed")
            if v.deleted:
                self._storage.delete(f"{self.key}/{GONE}")
            self._report_damage(v)
            if self.resumed:
                self._announce_resume(v, epoch, now)
            return wait

    def _seal_gaps(self) -> bool:
        """Fill every gap with a ``void`` record; True if the log changed meanwhile."""
        v = self._view
        changed = False
        for d in [d for d in v.damaged if d.kind == "missing"]:
            body = {"t": "void", "why": "missing", "ts": time.time(), "p": ""}
            try:
                self._storage.create(self._path(d.seq), encode(body))
            except FileExistsError:
                changed = True  # written meanwhile: read it
        if changed or any(d.kind == "missing" for d in v.damaged):
            suspect = v.suspect
            self._view = View(suspect=suspect)
            self._catch_up(full=True)
            return any(d.kind == "missing" for d in self._view.damaged)
        return False

    def _fence_sinks(self, epoch: int) -> float:
        """Fence sinks older epochs declared; returns seconds to wait for commit windows."""
        wait = 0.0
        for _sink, (e, fence) in self._view.sinks.items():
            if e >= epoch:
                continue
            if fence.get("kind") == "sqlite":
                from .sinks._sql import fence_sqlite

                fence_sqlite(fence, self.key, epoch)
            elif fence.get("kind") == "window":
                wait = max(wait, float(fence.get("seconds", 0.0)))
        return wait * 1.02 + 0.05 if wait else 0.0

    def _report_damage(self, v: View) -> None:
        if not v.damaged:
            return
        where = ", ".join(f"{d.seq} ({d.kind})" for d in v.damaged[:10])
        emit(
            Event(
                "checkpoint_corrupt",
                self.key,
                f"the log of {self.key} is damaged at record(s) {where}; attempt {self._epoch} "
                "claimed above every epoch they could hold. Run `faultkit verify` to see them.",
                {"records": [d.seq for d in v.damaged], "epoch": self._epoch},
                dedupe_key=f"log-{v.floor}",
            )
        )

    def _announce_resume(self, v: View, epoch: int, now: float) -> None:
        live = v.live_snaps()
        self._prior = {
            "epoch": epoch,
            "previous_epoch": epoch - 1,
            "units_done": len(v.units),
            "last_step": live[-1].step if live else None,
            "seconds_since_last_commit": round(max(0.0, now - v.last_commit), 3)
            if v.last_commit
            else None,
        }
        emit(
            Event(
                "resumed",
                self.key,
                f"attempt {epoch} resumed {self.key}: {len(v.units)} unit(s) done, "
                f"last snapshot step {self._prior['last_step']}; work since the last "
                f"commit ({self._prior['seconds_since_last_commit']} s at most) is redone",
                self._prior,
                dedupe_key=str(epoch),
            )
        )

    def __enter__(self) -> Stage:
        return self.claim()

    def __exit__(self, *exc: object) -> None:
        return None

    # -- public API -------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """This attempt's epoch (1 for the first attempt, then 2, 3, ...).

        On a stage claimed with ``lazy=True`` that has not committed yet, reading it writes
        the claim first, so the epoch can be handed to :meth:`CheckpointStore.attach`.
        """
        if self._lazy:
            with self._lock:
                if self._lazy:
                    body = {"t": "claim", "e": self._epoch, "ts": time.time(), "pid": os.getpid()}
                    self._append(body)
        return self._epoch

    @property
    def resumed(self) -> bool:
        """True if an earlier attempt left progress (units done, snapshots or a finish)."""
        with self._lock:
            v = self._view
            return bool(v.units or v.finished is not None or v.live_snaps())

    @property
    def resume_info(self) -> Mapping[str, Any]:
        """What the ``resumed`` event reported ({} for a fresh stage)."""
        with self._lock:
            return dict(self._prior)

    def _require_claim(self) -> None:
        if not self._epoch:
            raise RuntimeError(
                f"stage {self.key!r} is not claimed; use 'with store.stage(key) as stage:'"
            )

    def check(self) -> None:
        """Raise :class:`StaleAttemptError` if a newer attempt has claimed this stage."""
        self._require_claim()
        with self._lock:
            self._catch_up()
            if self._fenced(self._view):
                raise self._stale(None)

    def is_done(self, unit: str | int) -> bool:
        """True if ``unit`` is recorded as done (by any attempt)."""
        return unit_id(check_unit(unit)) in self._view.units

    def pending(self, units: Iterable[str | int]) -> Iterator[str | int]:
        """Yield the units that no attempt has marked done, in order."""
        self._require_claim()
        for u in units:
            if unit_id(check_unit(u)) not in self._view.units:
                yield u

    def done(self, unit: str | int, result: Any = None) -> bool:
        """Record ``unit`` as done with a small JSON ``result``, durably and fenced.

        Returns:
            True if this call recorded it; False if it was already done (by any attempt).

        Raises:
            StaleAttemptError: a newer attempt claimed the stage; nothing was written.
        """
        self._require_claim()
        uid = unit_id(check_unit(unit))
        body = {"t": "done", "e": self._epoch, "id": uid, "u": unit, "r": result, "ts": time.time()}
        with self._lock:
            seq = self._append(body, redundant=lambda v: uid in v.units)
        if seq:
            _failpoints.hit("done.committed")
        return bool(seq)

    def finish(self, result: Any = None) -> bool:
        """Record that the stage completed, with a small JSON ``result``; fenced and durable.

        A later attempt (a retry after the worker died between finishing and reporting) sees
        :attr:`finished` and can return :attr:`final_result` without running anything.

        Returns:
            True if this call recorded it; False if the stage was already finished.
        """
        self._require_claim()
        body = {"t": "fin", "e": self._epoch, "r": result, "ts": time.time()}
        with self._lock:
            return bool(self._append(body, redundant=lambda v: v.finished is not None))

    def _declare_sink(self, sink_id: str, fence: Mapping[str, Any]) -> None:
        """Record, once per attempt, that this epoch writes to sink ``sink_id``, so a newer
        claim fences it (``fence`` says how; see :meth:`claim`)."""
        self._require_claim()
        with self._lock:
            if sink_id in self._sinks:
                return
            mine = self._view.sinks.get(sink_id)
            # A lazy claim has written nothing: a declaration of its epoch is another's.
            if self._lazy or mine is None or mine[0] != self._epoch or mine[1] != dict(fence):
                body = {"t": "sink", "e": self._epoch, "id": sink_id, "fence": dict(fence)}
                body["ts"] = time.time()
                self._append(body)
            self._sinks.add(sink_id)

    @property
    def finished(self) -> bool:
        """True once some attempt recorded :meth:`finish`."""
        return self._view.finished is not None

    @property
    def final_result(self) -> Any:
        """The result given to :meth:`finish` (None if not finished)."""
        fin = self._view.finished
        return fin.result if fin else None

    def results(self) -> dict[str | int, Any]:
        """``{unit: result}`` for every unit done so far."""
        with self._lock:
            return {r.unit: r.result for r in self._view.units.values()}

    def save(self, data: Any, step: int, meta: Mapping[str, Any] | None = None) -> Snapshot:
        """Write a checksummed snapshot, durably and fenced.

        ``data`` is bytes-like, a binary file or an iterable of byte chunks; it is streamed,
        so saving N bytes needs no second copy in memory.

        Raises:
            StaleAttemptError: a newer attempt claimed the stage; nothing is visible.
            CheckpointWriteError: the storage refused the write; the previous snapshot is intact.
        """
        self._require_claim()
        t0 = time.perf_counter()
        self.check()  # cheap, and spares writing gigabytes for a stale attempt
        meta = dict(meta or {})
        blob = f"{self._epoch:06d}-{int(step):012d}-{uuid.uuid4().hex[:12]}.bin"
        path = f"{self.key}/@blobs/{blob}"
        h = xxhash.xxh3_128()
        size = 0
        try:
            with self._storage.open_new(path) as f:
                half_mark = False
                for chunk in _chunks(data):
                    h.update(chunk)
                    f.write(chunk)
                    size += len(chunk)
                    if not half_mark:
                        half_mark = True
                        _failpoints.hit("save.blob_partial")
        except CheckpointWriteError:
            # delete() under this attempt removes the stage's folders mid-write: that is a
            # fence, and the attempt is told so; any other refusal stands as it is.
            with self._lock:
                self._catch_up(full=True)  # the records it would probe may be gone too
                if self._fenced(self._view):
                    raise self._stale(f"save(step={step})") from None
            raise
        _failpoints.hit("save.blob_written")
        checksum = f"xxh3_128:{h.hexdigest()}"
        now = time.time()
        body = {
            "t": "snap",
            "e": self._epoch,
            "step": int(step),
            "blob": blob,
            "size": size,
            "sum": checksum,
            "meta": meta,
            "ts": now,
        }
        try:
            with self._lock:
                self._append(body)
        except BaseException:
            self._discard_blob(blob)
            raise
        _failpoints.hit("save.committed")
        self.store._trust(self.key, blob)
        _metrics.observe_save(time.perf_counter() - t0, size)
        return Snapshot(self.key, int(step), self._epoch, meta, size, checksum, now, b"")

    def _discard_blob(self, blob: str) -> None:
        """Remove a snapshot's data after a failed commit, unless a record names it (the
        commit landed before the failure): committed data is never removed."""
        try:
            with self._lock:
                self._catch_up()
                named = any(s.blob == blob for s in self._view.snaps)
            if not named:
                self._storage.delete(f"{self.key}/@blobs/{blob}")
        except Exception:  # cannot tell: leave it; gc removes it once it is old and unnamed
            log.warning("stage %s: could not clean up snapshot data %s", self.key, blob)

    def _read_verified(self, rec: SnapRecord, mapped: bool = False) -> Any:
        """Read a snapshot whole and check its size and checksum.

        One ``read()`` into a fresh ``bytes`` is as fast as a raw read, and a ``bytes``
        nobody else holds lets loaders share it without copying. With ``mapped`` on a local
        store, a private copy-on-write map of the file is verified and returned as a
        writable ``memoryview`` instead: no copy at all.
        """
        path = f"{self.key}/@blobs/{rec.blob}"
        algo, _, want = rec.checksum.partition(":")
        if algo != "xxh3_128":
            raise CorruptCheckpointError(f"snapshot step {rec.step}: unknown checksum {algo!r}")
        try:
            ident = self._storage.info(path).ident
            if mapped and isinstance(self._storage, LocalStorage):
                m = self._storage.map_private(path)
                data: Any = memoryview(m)[: rec.size] if len(m) >= rec.size else memoryview(m)
                size = len(m) if rec.size else 0
            else:
                with self._storage.open_read(path) as f:
                    data = f.read()
                size = len(data)
        except FileNotFoundError as exc:
            raise CorruptCheckpointError(f"snapshot step {rec.step}: its data is missing") from exc
        except LinkRefusedError as exc:
            raise CorruptCheckpointError(f"snapshot step {rec.step}: {exc.strerror}") from exc
        if size != rec.size:
            raise CorruptCheckpointError(
                f"snapshot step {rec.step}: {size} bytes, expected {rec.size} (truncated "
                "or overwritten)"
            )
        h = xxhash.xxh3_128()
        view = memoryview(data)
        for i in range(0, len(view), CHUNK):
            h.update(view[i : i + CHUNK])
        view.release()
        if h.hexdigest() != want:
            raise CorruptCheckpointError(f"snapshot step {rec.step}: checksum mismatch")
        self.store._trust(self.key, rec.blob, ident)
        return data

    def _dropped_since(self, rec: SnapRecord) -> bool:
        """True if gc removed ``rec`` after this view was read (not corruption)."""
        with self._lock:
            self._catch_up()
            v = self._view  # a compaction summarizes only the snapshots gc kept
            return rec.blob in v.dropped or all(s.blob != rec.blob for s in v.snaps)

    def _report_corrupt(
        self, rec: SnapRecord, exc: CorruptCheckpointError, fallback: int | None
    ) -> None:
        if rec.blob in self._reported:
            return
        self._reported.add(rec.blob)
        log.warning("stage %s: %s; falling back", self.key, exc)
        emit(
            Event(
                "checkpoint_corrupt",
                self.key,
                f"{exc}; it was skipped and "
                + (
                    f"the snapshot of step {fallback} was used"
                    if fallback is not None
                    else "no valid snapshot remains, so the stage starts from scratch"
                ),
                {
                    "step": rec.step,
                    "epoch": rec.epoch,
                    "blob": rec.blob,
                    "error": str(exc),
                    "fallback_step": fallback,
                },
                dedupe_key=rec.blob,
            )
        )

    def snapshots(self) -> list[SnapRecord]:
        """Committed snapshot records (not yet verified), oldest first."""
        with self._lock:
            return self._view.live_snaps()

    def latest(self, *, mapped: bool = False) -> Snapshot | None:
        """The newest snapshot that verifies, or None.

        A corrupt or truncated snapshot is skipped, a ``checkpoint_corrupt`` event is emitted,
        and the previous valid one is returned. ``mapped=True`` asks, on ``file://`` stores,
        for ``data`` as a writable ``memoryview`` of a private copy-on-write map of the file
        (for large loaders that would otherwise copy it); elsewhere ``data`` is ``bytes``.
        """
        with self._lock:
            self._catch_up()
            recs = self._view.live_snaps()
        bad: list[tuple[SnapRecord, CorruptCheckpointError]] = []
        found: Snapshot | None = None
        for rec in reversed(recs):
            try:
                data = self._read_verified(rec, mapped)
            except CorruptCheckpointError as exc:
                if not self._dropped_since(rec):
                    bad.append((rec, exc))
                continue
            found = Snapshot(
                self.key, rec.step, rec.epoch, rec.meta, rec.size, rec.checksum, rec.ts, data
            )
            break
        for rec, exc in bad:
            self._report_corrupt(rec, exc, found.step if found else None)
        return found

    def __repr__(self) -> str:
        return f"Stage({self.key!r}, epoch={self._epoch}, store={self.store!r})"
