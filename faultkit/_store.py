"""CheckpointStore: where stages live, and the maintenance around them (keys, gc, delete)."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ._errors import CorruptCheckpointError, InvalidKeyError, StoreConfigError
from ._keys import check_key
from ._log import Damage, SnapRecord, View, encode
from ._stage import GONE, Snapshot, Stage
from ._storage import Storage, open_storage, redact_url
from ._storage_local import LocalStorage
from ._storage_s3 import FsspecStorage

__all__ = ["CheckpointStore", "Snapshot", "Stage", "StageReport"]

# Room our own names take after a key: "/@blobs/" and a blob name of 44 characters.
_SUFFIX = 64


@dataclass
class StageReport:
    """What ``verify`` found in one stage: each problem is one human-readable line."""

    key: str
    snapshots: list[tuple[SnapRecord, str | None]] = field(default_factory=list)
    damaged: list[Damage] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        out = [f"log record {d.seq}: {d.kind} ({d.detail})" for d in self.damaged]
        out += [f"snapshot step {r.step}: {err}" for r, err in self.snapshots if err]
        out += [f"{p}: a link or special file, ignored by faultkit" for p in self.anomalies]
        return out


class CheckpointStore:
    """Fenced, verified, atomic checkpoints on ``file://``, ``memory://`` or ``s3://``.

    Args:
        url: where the store lives; ``file:///path``, ``memory://name``, ``s3://bucket/prefix``.
        must_exist: refuse (``StoreConfigError``) a store that does not exist yet instead of
            making it; for tools that inspect, where a mistyped path must not look empty.
        compact_every: after this many log records since the last summary, a commit also
            writes a checksummed summary of the stage, so a claim reads the summary and the
            records after it instead of the stage's whole history (0: never).
        **storage_options: for ``s3://``, passed to s3fs (``key``, ``secret``,
            ``client_kwargs={"endpoint_url": ...}``, ...). For ``file://``, only ``fsync``:
            ``True`` (the default) makes every commit durable before it returns; ``False``
            skips the fsyncs, so a commit is visible to every process and survives the loss
            of any process (a killed worker) at once, but not a crash of the machine or a
            power cut. Use it where the store's disk is scratch that outlives workers.
    """

    def __init__(
        self,
        url: str,
        *,
        must_exist: bool = False,
        compact_every: int = 500,
        **storage_options: Any,
    ) -> None:
        if (
            isinstance(compact_every, bool)
            or not isinstance(compact_every, int)
            or compact_every < 0
        ):
            raise StoreConfigError(
                f"compact_every must be a whole number of log records (0: never), not "
                f"{compact_every!r}"
            )
        if 0 < compact_every < 16:
            raise StoreConfigError(
                f"compact_every={compact_every} would write a summary of the whole stage "
                "every few commits; use 16 or more (500 by default), or 0 to never compact"
            )
        self.compact_every = compact_every
        if "create" in storage_options:
            create = storage_options["create"]
            raise StoreConfigError(
                f"CheckpointStore takes no create= option; write must_exist={not create!r} "
                "to refuse a store that does not exist yet (the default makes it)"
            )
        self._storage: Storage = open_storage(url, create=not must_exist, **storage_options)
        self.url = self._storage.url
        # Snapshots this object wrote or verified, with their identity then: gc need not
        # read them again while the object is provably the same.
        self._verified: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CheckpointStore({redact_url(self.url)!r})"

    def __reduce__(self) -> Any:
        raise TypeError(
            "a CheckpointStore holds credentials and is not pickled; pass its URL "
            "(and options from a secret) to the other process instead"
        )

    def _check_key_fits(self, key: str) -> None:
        """Refuse a key whose paths would exceed the backend's limits (before any write)."""
        s = self._storage
        if isinstance(s, FsspecStorage):
            room, what = 1024 - len(s.root.encode()) - 1 - _SUFFIX, "S3 object keys (1,024 bytes)"
        elif isinstance(s, LocalStorage):
            room, what = 4095 - len(s.root.encode()) - 1 - _SUFFIX, "paths (4,096 bytes)"
        else:
            return
        if len(key.encode()) > room:
            raise InvalidKeyError(
                f"key of {len(key)} characters does not fit this store: its {what} leave "
                f"{room} for the key under {redact_url(self.url)!r}. Use a shorter store "
                "prefix, or shorter key parts"
            )

    def _trust(self, key: str, blob: str, ident: str | None = None) -> None:
        if ident is None:
            try:
                ident = self._storage.info(f"{key}/@blobs/{blob}").ident
            except OSError:
                return
        with self._lock:
            self._verified[(key, blob)] = ident

    def _trusted(self, key: str, blob: str) -> bool:
        with self._lock:
            ident = self._verified.get((key, blob))
        if not ident:
            return False
        try:
            return self._storage.info(f"{key}/@blobs/{blob}").ident == ident
        except OSError:
            return False

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
        st._catch_up(full=True)
        if epoch < 1 or epoch > st._view.epoch:
            raise ValueError(
                f"stage {key!r} has no epoch {epoch!r} (newest: {st._view.epoch}); "
                "attach with the epoch of a claimed Stage (stage.epoch)"
            )
        st._epoch = int(epoch)
        st._claimed_at = time.time()
        if st._view.fence > epoch:
            raise st._stale(None)
        return st

    def keys(self, prefix: str = "") -> list[str]:
        """Every stage key starting with ``prefix``, sorted (deleted stages left out).

        Found by walking the store's folders, so no stage is ever invisible to it.
        """
        out: list[str] = []
        # Start below the folders the prefix names whole (prefect/etl/ -> "prefect/etl").
        start = "/".join(prefix.split("/")[:-1]) if "/" in prefix else ""
        try:
            start = check_key(start) if start else ""
        except InvalidKeyError:  # not a key's folder: walk everything and filter
            start = ""
        todo = [start]
        while todo:
            folder = todo.pop()
            subs = self._storage.subdirs(folder)
            if folder and "@log" in subs and not self._storage.present(folder, [GONE]):
                out.append(folder)
            todo.extend(f"{folder}/{n}" if folder else n for n in subs if not n.startswith("@"))
        return sorted(k for k in out if k.startswith(prefix))

    def read_view(self, key: str) -> View:
        """Replay a stage's log without claiming it (for inspection)."""
        st = Stage(self, key)
        st._catch_up(full=True)
        return st._view

    def finished(self, key: str) -> tuple[bool, Any]:
        """``(True, result)`` if stage ``key`` finished, else ``(False, None)``; claims nothing."""
        v = self.read_view(key)
        return (True, v.finished.result) if v.finished else (False, None)

    def verify(self, key: str) -> list[tuple[SnapRecord, str | None]]:
        """Check every snapshot of ``key``: ``[(record, error or None)]``, oldest first.

        A snapshot that gc removed while it was being read is left out, not reported.
        """
        return self.report(key).snapshots

    def report(self, key: str) -> StageReport:
        """Everything wrong with stage ``key``: damaged log records, snapshots that fail
        their checksum, symbolic links or special files under it."""
        st = Stage(self, key)
        st._catch_up(full=True)
        out = StageReport(key, damaged=list(st._view.damaged))
        for rec in st._view.live_snaps():
            try:
                st._read_verified(rec)
                out.snapshots.append((rec, None))
            except CorruptCheckpointError as exc:
                if not st._dropped_since(rec):
                    out.snapshots.append((rec, str(exc)))
        out.anomalies = self._storage.anomalies(key)
        return out

    def delete(self, key: str) -> None:
        """Remove a stage: its snapshots, its progress and its results.

        The log keeps one ``base`` record with an epoch above every epoch the stage handed
        out, so a new run of ``key`` claims above them and the deleted run's zombies stay
        fenced (their writes raise ``StaleAttemptError``). Safe beside a live attempt: that
        attempt is fenced too.
        """
        check_key(key)
        st = Stage(self, key)
        st._catch_up(full=True)
        names = self._storage.list(f"{key}/@log")
        if st._view.cursor:
            while True:
                v = st._view
                base = {"t": "base", "e": v.fence + 1, "why": "deleted", "ts": time.time()}
                base["p"] = v.last_digest
                # Sinks the deleted run wrote to stay known: the next claim fences them too.
                base["sinks"] = {sid: [e, fence] for sid, (e, fence) in v.sinks.items()}
                try:
                    self._storage.create(st._path(v.cursor + 1), encode(base))
                except FileExistsError:
                    st._catch_up()
                    continue
                break
            with contextlib.suppress(FileExistsError):
                self._storage.create(f"{key}/{GONE}", b"", durable=False)
            last = v.cursor + 1
        else:
            last = 0
        self._storage.delete_tree(f"{key}/@blobs")
        for n in sorted(n for n in names if n.isdigit() and int(n) < last):
            self._storage.delete(f"{key}/@log/{n}")  # oldest first (see Stage._neighbours_ok)
        for n in names:  # the summaries of compactions, and their hints
            if n.startswith(("sum-", "head-")):
                with contextlib.suppress(FileNotFoundError):
                    self._storage.delete(f"{key}/@log/{n}")
        with self._lock:
            for k in [k for k in self._verified if k[0] == key]:
                del self._verified[k]

    def expire(self, older_than: float, prefix: str = "") -> list[str]:
        """Delete every *finished* stage (under ``prefix``) whose result is older than
        ``older_than`` seconds; returns their keys. Unfinished stages are kept: their
        progress is what a retry resumes from. (``faultkit gc --older-than 7d``.)"""
        now = time.time()
        gone = []
        for k in self.keys(prefix):
            fin = self.read_view(k).finished
            if fin is not None and now - fin.ts > older_than:
                self.delete(k)
                gone.append(k)
        if not prefix:  # and the notes that named such results as fallbacks (fallback=)
            from ._degraded import expire_notes

            expire_notes(self, older_than)
        return gone

    def gc(self, key: str, keep: int = 3, grace: float = 600.0) -> dict[str, Any]:
        """Remove old snapshots of ``key`` and files left by killed writers.

        Keeps the ``keep`` newest snapshots that verify (at least one: the newest valid one
        is never removed). A snapshot this store object wrote or verified is trusted without
        reading it again while its object is provably unchanged (same file identity: inode,
        size, change time; or ETag), so a training loop calling gc after each save does not
        re-read gigabytes; anything else is read and verified. Data files no record names,
        and temp files, are removed once older than ``grace`` seconds, so a writer still at
        work is not disturbed.

        Returns:
            ``{"kept": [steps], "removed": [steps], "orphans": n, "temp_files": n}``.
        """
        keep = max(1, int(keep))
        st = Stage(self, key)
        st._catch_up(full=True)
        recs = st._view.live_snaps()
        kept: list[SnapRecord] = []
        drop: list[SnapRecord] = []
        for rec in reversed(recs):
            if len(kept) >= keep:
                drop.append(rec)
                continue
            if self._trusted(key, rec.blob):
                kept.append(rec)
                continue
            try:
                st._read_verified(rec)
                kept.append(rec)
            except CorruptCheckpointError:
                if not st._dropped_since(rec):
                    drop.append(rec)
        if drop and kept:
            with st._lock:
                st._append(
                    {"t": "gc", "blobs": [r.blob for r in drop], "ts": time.time()}, fenced=False
                )
            for r in drop:
                self._storage.delete(f"{key}/@blobs/{r.blob}")
        elif drop:
            drop = []  # nothing valid to fall back on: corrupt ones stay for inspection
        now = time.time()
        with st._lock:
            st._catch_up()
            named = {r.blob for r in st._view.live_snaps()}
        orphans = 0
        for name in self._storage.list(f"{key}/@blobs"):
            if name in named:
                continue
            with contextlib.suppress(FileNotFoundError):
                if now - self._storage.info(f"{key}/@blobs/{name}").mtime >= grace:
                    self._storage.delete(f"{key}/@blobs/{name}")
                    orphans += 1
        temps = 0
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
