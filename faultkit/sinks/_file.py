"""FileSink: each unit's bytes, committed through the stage's log, published once."""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
import uuid
from typing import TYPE_CHECKING, Any

import xxhash

from .. import _failpoints
from .._errors import CorruptCheckpointError, SinkInputError
from .._keys import check_key, check_unit, unit_segment
from .._storage import open_storage, redact_url

if TYPE_CHECKING:
    from .._stage import Stage

__all__ = ["STAGING", "FileSink"]

log = logging.getLogger("faultkit.sinks")

STAGING = "@staging"  # "@" never starts a key segment, so this folder is no stage's


def _checksum(data: bytes) -> str:
    return f"xxh3_128:{xxhash.xxh3_128_hexdigest(data)}"


def _as_bytes(data: Any) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise SinkInputError(
        f"FileSink.write takes bytes (or a bytearray or memoryview), not a "
        f"{type(data).__name__}; encode text first (text.encode()) or serialise objects "
        "(json.dumps(obj).encode()). Nothing was written."
    )


class FileSink:
    """Write each unit's bytes exactly once, at ``<stage key>/<unit>.out`` under ``url``.

    The commit point is the stage's log, so the promise holds on every storage
    (``file://``, ``memory://``, ``s3://``) without a lock:

    1. the bytes go to a staging object with a unique name,
       ``@staging/<stage key>/<unit segment>-<epoch>-<random>``;
    2. :meth:`Stage.done` records the unit with the staging name, size and checksum. This
       is the commit, fenced like every commit: a stale attempt raises
       :class:`~faultkit.StaleAttemptError` here, its staging object is removed and
       nothing visible changed; of two writers of one unit, one records it;
    3. the bytes are published at the final path with create-if-absent (an object already
       there with the same bytes is fine; different bytes are
       :class:`~faultkit.CorruptCheckpointError`), and the staging object is removed.

    A unit recorded done whose final object is missing (its writer died between 2 and 3)
    is published from its staging object by the next :meth:`write` of the stage (the first
    write of each attempt publishes them all), by :meth:`read` given the stage, or by
    :meth:`publish_pending`. The object name is :func:`~faultkit._keys.unit_segment` of the
    unit, so ``5`` and ``"5"`` are different objects, as they are different units in the
    stage.

    Args:
        url: where outputs go: ``file:///path``, ``memory://name`` or ``s3://bucket/prefix``.
        **storage_options: passed to the storage, as for :class:`~faultkit.CheckpointStore`.
    """

    def __init__(self, url: str, **storage_options: Any) -> None:
        self._storage = open_storage(url, **storage_options)
        self.url = self._storage.url
        self._swept: set[tuple[str, int]] = set()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"FileSink({redact_url(self.url)!r})"

    @staticmethod
    def path(stage_key: str, unit: str | int) -> str:
        """The object path of ``unit`` of ``stage_key``, relative to the sink's root."""
        return f"{check_key(stage_key)}/{unit_segment(check_unit(unit))}.out"

    def write(self, stage: Stage, unit: str | int, data: bytes) -> bool:
        """Store ``data`` as the output of ``unit``, exactly once, and record it done.

        Returns:
            True if this call committed ``data``; False if the unit was already done (its
            committed output stays, and is published if it was not yet).

        Raises:
            StaleAttemptError: a newer attempt claimed the stage; nothing visible changed.
            SinkInputError: ``data`` is not bytes; nothing was written.
        """
        check_unit(unit)
        data = _as_bytes(data)
        self._sweep(stage)
        if stage.is_done(unit):
            self._publish_done(stage, unit)
            return False
        stage.check()
        seg = unit_segment(unit)
        staged = f"{STAGING}/{stage.key}/{seg}-{stage._epoch}-{uuid.uuid4().hex[:12]}"
        with self._storage.open_new(staged) as f:
            f.write(data)
        _failpoints.hit("filesink.staged")
        final = self.path(stage.key, unit)
        checksum = _checksum(data)
        result = {"staged": staged, "bytes": len(data), "sum": checksum, "path": final}
        try:
            recorded = stage.done(unit, result)
        except BaseException:
            self._discard(stage, unit, staged)
            raise
        if not recorded:  # another writer of this attempt recorded the unit first
            self._discard(stage, unit, staged)
            self._publish_done(stage, unit)
            return False
        _failpoints.hit("filesink.committed")
        try:
            self._publish(stage.key, unit, result)
        except Exception as exc:  # committed: publishing is retried by the next write/read
            log.warning(
                "stage %s: unit %r is committed but not yet published at %s (%s); the next "
                "write, read(stage, unit) or publish_pending(stage) publishes it",
                stage.key,
                unit,
                final,
                exc,
            )
        return True

    def read(self, stage: Stage | str, unit: str | int) -> bytes:
        """The bytes committed for ``unit``.

        Given the :class:`~faultkit.Stage` (claimed or not: ``store.stage(key)``), the bytes
        are checked against the unit's commit record, and a unit committed but not yet
        published is published first. Given only the stage key, the published object is
        read as it is.

        Raises:
            FileNotFoundError: nothing is committed for ``unit``.
            CorruptCheckpointError: the committed bytes are damaged or were overwritten.
        """
        key = stage if isinstance(stage, str) else stage.key
        final = self.path(key, unit)
        if isinstance(stage, str):
            try:
                return self._storage.read(final)
            except FileNotFoundError:
                raise FileNotFoundError(
                    errno.ENOENT,
                    f"no output for unit {unit!r} of stage {key!r} in "
                    f"{redact_url(self.url)}; if its writer died after committing it, pass "
                    "the stage to publish it: sink.read(store.stage(key), unit)",
                    final,
                ) from None
        rec = self._record(stage, unit)
        if rec is None or not isinstance(rec.get("staged"), str):
            raise FileNotFoundError(
                errno.ENOENT, f"unit {unit!r} of stage {key!r} has no committed output", final
            )
        self._publish(key, unit, rec)  # verifies what is there, publishes what is not
        data = self._storage.read(final)
        if len(data) != int(rec["bytes"]) or _checksum(data) != rec["sum"]:
            raise self._differs(key, unit, final, len(data))
        return data

    def publish_pending(self, stage: Stage) -> int:
        """Publish every unit of ``stage`` that is committed but not yet published, and
        remove staging objects of older attempts that never committed.

        Returns:
            How many units were published.
        """
        stage.refresh()
        results = stage.results()
        named = {
            r["staged"]: (u, r)
            for u, r in results.items()
            if isinstance(r, dict) and isinstance(r.get("staged"), str)
        }
        folder = f"{STAGING}/{stage.key}"
        published = 0
        for name in self._storage.list(folder):
            if not name:
                continue
            path = f"{folder}/{name}"
            if path in named:
                u, r = named[path]
                self._publish(stage.key, u, r)
                published += 1
                continue
            try:
                epoch = int(name.rsplit("-", 2)[1])
            except (IndexError, ValueError):
                continue
            # An unnamed staging object of an older epoch can never be named now: that
            # epoch's done() is fenced by this attempt's claim.
            if stage.epoch and epoch < stage.epoch:
                with contextlib.suppress(FileNotFoundError):
                    self._storage.delete(path)
        return published

    # -- internals ---------------------------------------------------------------------

    def _sweep(self, stage: Stage) -> None:
        """Once per attempt: publish what a dead writer committed but did not publish."""
        mark = (stage.key, stage.epoch)
        with self._lock:
            if mark in self._swept:
                return
            self._swept.add(mark)
        try:
            self.publish_pending(stage)
        except Exception as exc:
            with self._lock:
                self._swept.discard(mark)
            if isinstance(exc, CorruptCheckpointError):
                raise
            log.warning("stage %s: could not publish pending outputs (%s)", stage.key, exc)

    def _record(self, stage: Stage, unit: str | int) -> dict[str, Any] | None:
        stage.refresh()
        for u, r in stage.results().items():
            if u == unit and type(u) is type(unit):
                return r if isinstance(r, dict) else None
        return None

    def _discard(self, stage: Stage, unit: str | int, staged: str) -> None:
        """Remove our staging object after a failed commit, unless the log names it (the
        commit landed before the failure): committed bytes are never removed."""
        try:
            rec = self._record(stage, unit)
            if rec is None or rec.get("staged") != staged:
                self._storage.delete(staged)
        except Exception:  # cannot tell: leave it; publish_pending removes it later
            log.warning("stage %s: could not clean up staging object %s", stage.key, staged)

    def _publish_done(self, stage: Stage, unit: str | int) -> bool:
        """Make sure a done unit's output is published; False if it has none here."""
        final = self.path(stage.key, unit)
        try:
            self._storage.info(final)
            return True
        except FileNotFoundError:
            pass
        rec = self._record(stage, unit)
        if rec is None or not isinstance(rec.get("staged"), str):
            return False  # recorded by something other than a FileSink
        self._publish(stage.key, unit, rec)
        return True

    def _publish(self, key: str, unit: str | int, rec: dict[str, Any]) -> None:
        final = self.path(key, unit)
        staged, size, want = rec["staged"], int(rec["bytes"]), str(rec["sum"])
        try:
            data: bytes | None = self._storage.read(staged)
        except FileNotFoundError:
            data = None
        if data is None:  # published already (the staging object goes last)
            try:
                have = self._storage.read(final)
            except FileNotFoundError:
                raise CorruptCheckpointError(
                    f"unit {unit!r} of stage {key!r} is recorded done, but neither its output "
                    f"{final!r} nor its staged copy {staged!r} exists in "
                    f"{redact_url(self.url)} (removed by hand?); delete the stage "
                    "(store.delete(key)) and run it again"
                ) from None
            if len(have) != size or _checksum(have) != want:
                raise self._differs(key, unit, final, len(have))
            return
        if len(data) != size or _checksum(data) != want:
            raise CorruptCheckpointError(
                f"the staged output {staged!r} of unit {unit!r} of stage {key!r} fails its "
                f"checksum ({len(data)} bytes, {size} recorded); delete the stage "
                "(store.delete(key)) and run it again"
            )
        try:
            self._storage.create(final, data)
        except FileExistsError:
            have = self._storage.read(final)
            if len(have) != size or _checksum(have) != want:
                raise self._differs(key, unit, final, len(have)) from None
        _failpoints.hit("filesink.published")
        with contextlib.suppress(FileNotFoundError):
            self._storage.delete(staged)

    def _differs(self, key: str, unit: str | int, final: str, n: int) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{final!r} in {redact_url(self.url)} holds {n} bytes that differ from the "
            f"committed output of unit {unit!r} of stage {key!r}: something other than this "
            "stage wrote there. Move that object away, then call sink.publish_pending(stage)"
        )
