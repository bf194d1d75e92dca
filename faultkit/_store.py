"""CheckpointStore, Stage and Snapshot: fenced, verified, atomic progress of a stage."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import xxhash

from . import _failpoints, _metrics
from ._errors import CorruptCheckpointError, StaleAttemptError
from ._events import Event, emit
from ._keys import check_key, check_unit, unit_id
from ._log import SnapRecord, View, decode, encode, seq_name
from ._storage import LocalStorage, Storage, open_storage, redact_url

__all__ = ["CheckpointStore", "Snapshot", "Stage"]

log = logging.getLogger("faultkit.store")

CHUNK = 8 << 20
INDEX = "@index"


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
    A ``Stage`` may be shared by threads of one attempt (e.g. an async checkpoint writer).
    """

    def __init__(self, store: CheckpointStore, key: str) -> None:
        self.store = store
        self.key = check_key(key)
        self._storage = store._storage
        self._dir = f"{self.key}/@log"
        self._view = View()
        self._read = False  # has the log been read at all (claim reads it first if not)
        self._epoch = 0
        self._lock = threading.RLock()
        self._claimed_at = 0.0
        self._prior: dict[str, Any] = {}
        self._reported_corrupt: set[str] = set()

    # -- reading the log ---------------------------------------------------------------

    def _record(self, seq: int, data: bytes | None) -> dict[str, Any] | None:
        if data is None:
            return None
        try:
            return decode(data)
        except CorruptCheckpointError:
            log.warning("record %d of %s failed its checksum; ignoring it", seq, self.key)
            return None

    def _catch_up(self) -> None:
        """Read every record after the view's cursor."""
        self._read = True
        v = self._view
        if v.cursor == 0:
            # First read: list once and fetch everything (concurrently on S3). What the
            # listing shows is the log as of that moment; only a gap makes us probe further.
            names = [n for n in self._storage.list(self._dir) if n.isdigit()]
            seqs = sorted(int(n) for n in names)
            expect = 1
            batch: list[int] = []
            for s in seqs:
                if s != expect:
                    break  # records past a gap are read below, one by one
                batch.append(s)
                expect += 1
            got = self._storage.read_many([f"{self._dir}/{seq_name(s)}" for s in batch])
            for s in batch:
                data = got[f"{self._dir}/{seq_name(s)}"]
                if data is None:
                    break
                v.apply(s, self._record(s, data))
            if v.cursor == len(seqs):
                return
        while True:
            nxt = v.cursor + 1
            try:
                data = self._storage.read(f"{self._dir}/{seq_name(nxt)}")
            except FileNotFoundError:
                return
            v.apply(nxt, self._record(nxt, data))

    def refresh(self) -> None:
        """Read records written by other processes since the last read."""
        with self._lock:
            self._catch_up()

    # -- writing the log ---------------------------------------------------------------

    def _stale(self, what: str | None) -> StaleAttemptError:
        written = f"; {what} was not written" if what else ""
        err = StaleAttemptError(
            f"stage {self.key!r}: epoch {self._epoch} is stale (epoch {self._view.epoch} "
            f"claimed it){written}. A newer attempt owns this stage: stop this one and let "
            "the newer attempt finish.",
            key=self.key,
            epoch=self._epoch,
            current=self._view.epoch,
        )
        emit(
            Event(
                "stale_attempt",
                self.key,
                f"a stale attempt (epoch {self._epoch}) of {self.key} was fenced after epoch "
                f"{self._view.epoch} took over" + (f"; its {what} was refused" if what else ""),
                {"epoch": self._epoch, "current": self._view.epoch, "write": what},
                dedupe_key=f"{self._epoch}",
            )
        )
        return err

    def _append(
        self,
        body: dict[str, Any],
        *,
        fenced: bool = True,
        redundant: Callable[[View], bool] | None = None,
    ) -> int:
        """Create the next record; returns its seq, or 0 when ``redundant(view)`` says it is
        already there (a unit done, the stage finished) by the time it would be written."""
        data = encode(body)
        kind = body["t"]
        what = {"done": f"done({body.get('u')!r})", "fin": "finish()"}.get(
            kind, f"{kind}(step={body.get('step')})"
        )
        while True:
            v = self._view
            if fenced and v.epoch > self._epoch:
                raise self._stale(what)
            if redundant is not None and redundant(v):
                return 0
            seq = v.cursor + 1
            _failpoints.hit("log.before_create")
            try:
                self._storage.create(f"{self._dir}/{seq_name(seq)}", data)
            except FileExistsError:
                self._catch_up()
                continue
            _failpoints.hit("log.created")
            v.apply(seq, body)
            return seq

    # -- public API -------------------------------------------------------------------

    def claim(self) -> Stage:
        """Claim a new epoch; every write of an older epoch fails from now on.

        The first claim of a stage is written without fsync: there is no earlier attempt for
        it to fence, and every later commit of its epoch implies it (readers count a commit
        of epoch ``e`` as a claim of ``e``), so losing it in a power cut changes nothing.
        Every later claim is durable before this returns.
        """
        with self._lock:
            if self._epoch:
                return self
            if not self._read:
                self._catch_up()
            while True:
                epoch = self._view.epoch + 1
                now = time.time()
                body = {"t": "claim", "e": epoch, "ts": now, "pid": os.getpid()}
                seq = self._view.cursor + 1
                try:
                    self._storage.create(
                        f"{self._dir}/{seq_name(seq)}", encode(body), durable=epoch > 1
                    )
                except FileExistsError:
                    self._catch_up()
                    continue
                self._view.apply(seq, body)
                break
            self._epoch = epoch
            self._claimed_at = now
            # The index is a listing hint for keys(), never fsync'd (a claim that finds it
            # missing makes it again).
            self._storage.touch(f"{INDEX}/{self.key.replace('/', '@')}")
            v = self._view
            if self.resumed:
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
            return self

    def __enter__(self) -> Stage:
        return self.claim()

    def __exit__(self, *exc: object) -> None:
        return None

    @property
    def epoch(self) -> int:
        """This attempt's epoch (1 for the first attempt, then 2, 3, ...)."""
        return self._epoch

    @property
    def resumed(self) -> bool:
        """True if an earlier attempt left progress (units done, snapshots or a finish)."""
        v = self._view
        return bool(v.units or v.finished is not None or v.live_snaps())

    @property
    def resume_info(self) -> Mapping[str, Any]:
        """What the ``resumed`` event reported ({} for a fresh stage)."""
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
            if self._view.epoch > self._epoch:
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

    @property
    def finished(self) -> bool:
        """True once some attempt recorded :meth:`finish`."""
        return self._view.finished is not None

    @property
    def final_result(self) -> Any:
        """The result given to :meth:`finish` (None if not finished)."""
        return self._view.finished.result if self._view.finished else None

    def results(self) -> dict[str | int, Any]:
        """``{unit: result}`` for every unit done so far."""
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
        with self._storage.open_new(path) as f:
            half_mark = False
            for chunk in _chunks(data):
                h.update(chunk)
                f.write(chunk)
                size += len(chunk)
                if not half_mark:
                    half_mark = True
                    _failpoints.hit("save.blob_partial")
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
            self._storage.delete(path)
            raise
        _failpoints.hit("save.committed")
        self.store._verified.add((self.key, blob))
        _metrics.observe_save(time.perf_counter() - t0, size)
        return Snapshot(self.key, int(step), self._epoch, meta, size, checksum, now, b"")

    def _read_verified(self, rec: SnapRecord, mapped: bool = False) -> Any:
        """Read a snapshot whole and check its size and checksum.

        One ``read()`` into a fresh ``bytes`` is as fast as a raw read (a pre-zeroed
        ``bytearray`` filled with ``readinto`` costs an extra pass over the memory), and a
        ``bytes`` nobody else holds lets loaders share it without copying. With ``mapped``
        on a local store, a private copy-on-write map of the file is verified and returned
        as a writable ``memoryview`` instead: no copy at all.
        """
        path = f"{self.key}/@blobs/{rec.blob}"
        algo, _, want = rec.checksum.partition(":")
        if algo != "xxh3_128":
            raise CorruptCheckpointError(f"snapshot step {rec.step}: unknown checksum {algo!r}")
        try:
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
        self.store._verified.add((self.key, rec.blob))
        return data

    def _report_corrupt(
        self, rec: SnapRecord, exc: CorruptCheckpointError, fallback: int | None
    ) -> None:
        if rec.blob in self._reported_corrupt:
            return
        self._reported_corrupt.add(rec.blob)
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


class CheckpointStore:
    """Fenced, verified, atomic checkpoints on ``file://``, ``memory://`` or ``s3://``.

    Args:
        url: where the store lives; ``file:///path``, ``memory://name``, ``s3://bucket/prefix``.
        **storage_options: for ``s3://``, passed to fsspec (``key``, ``secret``,
            ``endpoint_url``, ...). For ``file://``, only ``fsync``: ``True`` (the default)
            makes every commit durable before it returns; ``False`` skips the fsyncs, so a
            commit is visible to every process and survives the loss of any process (a
            killed worker) at once, but not a crash of the machine or a power cut. Use it
            where the store's disk is scratch that outlives workers but not the machine.
    """

    def __init__(self, url: str, **storage_options: Any) -> None:
        self._storage: Storage = open_storage(url, **storage_options)
        self.url = self._storage.url
        # Snapshots this object wrote or verified: gc need not read them again.
        self._verified: set[tuple[str, str]] = set()

    def __repr__(self) -> str:
        return f"CheckpointStore({redact_url(self.url)!r})"

    def __reduce__(self) -> Any:
        raise TypeError(
            "a CheckpointStore holds credentials and is not pickled; pass its URL "
            "(and options from a secret) to the other process instead"
        )

    def stage(self, key: str) -> Stage:
        """The stage at ``key``; entering it (``with``) claims a new epoch."""
        return Stage(self, key)

    def attach(self, key: str, epoch: int) -> Stage:
        """Join epoch ``epoch`` of ``key`` from another process of the same attempt.

        For worker processes an attempt starts itself (a multiprocessing pool, data loader
        workers): they write as that epoch and are fenced with it. Nothing is claimed.

        Raises:
            StaleAttemptError: a newer epoch already claimed the stage.
            ValueError: ``epoch`` was never claimed.
        """
        st = Stage(self, key)
        st._catch_up()
        if epoch < 1 or epoch > st._view.epoch:
            raise ValueError(
                f"stage {key!r} has no epoch {epoch!r} (newest: {st._view.epoch}); "
                "attach with the epoch of a claimed Stage (stage.epoch)"
            )
        st._epoch = int(epoch)
        st._claimed_at = time.time()
        if st._view.epoch > epoch:
            raise st._stale(None)
        return st

    def keys(self, prefix: str = "") -> list[str]:
        """Every stage key starting with ``prefix``, sorted."""
        return sorted(
            k
            for k in (n.replace("@", "/") for n in self._storage.list(INDEX))
            if k.startswith(prefix)
        )

    def read_view(self, key: str) -> View:
        """Replay a stage's log without claiming it (for inspection)."""
        st = Stage(self, key)
        st._catch_up()
        return st._view

    def finished(self, key: str) -> tuple[bool, Any]:
        """``(True, result)`` if stage ``key`` finished, else ``(False, None)``; claims nothing."""
        v = self.read_view(key)
        return (True, v.finished.result) if v.finished else (False, None)

    def verify(self, key: str) -> list[tuple[SnapRecord, str | None]]:
        """Check every snapshot of ``key``: ``[(record, error or None)]``, oldest first."""
        st = Stage(self, key)
        st._catch_up()
        out: list[tuple[SnapRecord, str | None]] = []
        for rec in st._view.live_snaps():
            try:
                st._read_verified(rec)
                out.append((rec, None))
            except CorruptCheckpointError as exc:
                out.append((rec, str(exc)))
        return out

    def delete(self, key: str) -> None:
        """Remove a stage (log, snapshots, index entry). Do not run it under a live attempt."""
        check_key(key)
        self._storage.delete(f"{INDEX}/{key.replace('/', '@')}")
        self._storage.delete_tree(f"{key}/@blobs")
        names = sorted(self._storage.list(f"{key}/@log"), reverse=True)
        for n in names:  # newest first: a crash mid-way leaves a consistent prefix
            self._storage.delete(f"{key}/@log/{n}")
        self._storage.delete_tree(f"{key}/@log")

    def gc(self, key: str, keep: int = 3, grace: float = 600.0) -> dict[str, Any]:
        """Remove old snapshots of ``key`` and files left by killed writers.

        Keeps the ``keep`` newest snapshots that verify (at least one: the newest valid one
        is never removed). Snapshots this store object wrote or verified are trusted without
        reading them again (a training loop calling gc after each save must not re-read
        gigabytes); a fresh store object, such as ``faultkit gc``, verifies everything. Data
        files that no record names and temp files are removed once older than ``grace``
        seconds, so a writer still at work is not disturbed.

        Returns:
            ``{"kept": [steps], "removed": [steps], "orphans": n, "temp_files": n}``.
        """
        keep = max(1, int(keep))
        st = Stage(self, key)
        st._catch_up()
        recs = st._view.live_snaps()
        kept: list[SnapRecord] = []
        drop: list[SnapRecord] = []
        for rec in reversed(recs):
            if len(kept) >= keep:
                drop.append(rec)
                continue
            if (key, rec.blob) in self._verified:
                kept.append(rec)
                continue
            try:
                st._read_verified(rec)
                kept.append(rec)
            except CorruptCheckpointError:
                drop.append(rec)
        if drop:
            st._append(
                {"t": "gc", "blobs": [r.blob for r in drop], "ts": time.time()}, fenced=False
            )
            for r in drop:
                self._storage.delete(f"{key}/@blobs/{r.blob}")
        now = time.time()
        named = {r.blob for r in st._view.snaps}
        orphans = 0
        for name in self._storage.list(f"{key}/@blobs"):
            if name in named:
                continue
            with contextlib.suppress(FileNotFoundError):
                if now - self._storage.info(f"{key}/@blobs/{name}").mtime >= grace:
                    self._storage.delete(f"{key}/@blobs/{name}")
                    orphans += 1
        temps = 0
        if isinstance(self._storage, LocalStorage):
            for inf in self._storage.tmp_files():
                if now - inf.mtime >= grace:
                    self._storage.delete(inf.path)
                    temps += 1
        return {
            "kept": [r.step for r in reversed(kept)],
            "removed": [r.step for r in reversed(drop)],
            "orphans": orphans,
            "temp_files": temps,
        }
