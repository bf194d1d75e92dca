"""A stage's commit log: an append-only sequence of create-if-absent records.

Every change to a stage is one small record at ``<key>/@log/<seq>``, where ``seq`` counts
1, 2, 3, ... with no gaps. A writer that has read every record below ``seq`` creates ``seq``
with create-if-absent; if the name is taken it reads that record and tries ``seq + 1``.
Because each position is won by exactly one writer, the records are totally ordered, and
fencing needs no lock, lease or clock:

* a ``claim`` record opens epoch ``E`` (one more than the highest epoch before it); a commit
  of an epoch higher than any claim before it counts as that epoch's claim (the stage's first
  claim is not fsync'd, see :meth:`Stage.claim`);
* a commit (``done``, ``snap``) of epoch ``e`` is valid only if no claim of a higher epoch
  precedes it. Writers check this before they create, and a writer that loses a position
  to a newer claim raises :class:`~faultkit.StaleAttemptError` without writing. Readers
  apply the same rule, so even a hand-crafted late record cannot take effect.

Each record is one JSON object followed by a newline and its xxh64 checksum.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import xxhash

from ._errors import CorruptCheckpointError

__all__ = ["SnapRecord", "UnitRecord", "View", "decode", "encode", "seq_name"]

SEQ_WIDTH = 12


def seq_name(seq: int) -> str:
    return f"{seq:0{SEQ_WIDTH}d}"


def encode(body: dict[str, Any]) -> bytes:
    raw = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    return raw + b"\n" + xxhash.xxh64_hexdigest(raw).encode()


def decode(data: bytes) -> dict[str, Any]:
    raw, sep, digest = data.rpartition(b"\n")
    if not sep or xxhash.xxh64_hexdigest(raw).encode() != digest:
        raise CorruptCheckpointError("log record failed its checksum")
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise CorruptCheckpointError("log record is not JSON") from exc
    if not isinstance(body, dict) or "t" not in body:
        raise CorruptCheckpointError("log record has no type")
    return body


@dataclass(frozen=True, slots=True)
class UnitRecord:
    unit: str | int
    result: Any
    epoch: int
    seq: int
    ts: float


@dataclass(frozen=True, slots=True)
class SnapRecord:
    seq: int
    epoch: int
    step: int
    blob: str
    size: int
    checksum: str
    meta: dict[str, Any]
    ts: float


@dataclass
class View:
    """What the records up to ``cursor`` say about a stage."""

    cursor: int = 0
    epoch: int = 0  # the highest epoch claimed so far
    claims: list[tuple[int, int, float]] = field(default_factory=list)  # (epoch, seq, ts)
    units: dict[str, UnitRecord] = field(default_factory=dict)  # unit_id -> record
    snaps: list[SnapRecord] = field(default_factory=list)
    dropped: set[str] = field(default_factory=set)  # blobs removed by gc
    corrupt: list[int] = field(default_factory=list)  # seqs whose record failed to decode
    ignored: list[int] = field(default_factory=list)  # stale commits (never written by us)
    last_commit: float = 0.0
    finished: UnitRecord | None = None  # the stage's final result, once recorded

    def apply(self, seq: int, body: dict[str, Any] | None) -> None:
        """Fold record ``seq`` into the view (``None`` for an undecodable record)."""
        self.cursor = seq
        if body is None:
            self.corrupt.append(seq)
            return
        t = body["t"]
        if t == "claim":
            self.epoch = max(self.epoch, int(body["e"]))
            self.claims.append((int(body["e"]), seq, float(body.get("ts", 0.0))))
            return
        if t == "gc":
            self.dropped.update(body.get("blobs", ()))
            return
        e = int(body.get("e", 0))
        if e < self.epoch:
            self.ignored.append(seq)
            return
        if e > self.epoch:
            # Only an attempt that claimed e writes its commits, so e was claimed; its claim
            # (the stage's first, written without fsync) may have been lost in a power cut.
            self.epoch = e
            self.claims.append((e, seq, float(body.get("ts", 0.0))))
        ts = float(body.get("ts", 0.0))
        if t == "done":
            uid = body["id"]
            if uid not in self.units:
                self.units[uid] = UnitRecord(body["u"], body.get("r"), e, seq, ts)
                self.last_commit = max(self.last_commit, ts)
        elif t == "fin":
            if self.finished is None:
                self.finished = UnitRecord("@finished", body.get("r"), e, seq, ts)
                self.last_commit = max(self.last_commit, ts)
        elif t == "snap":
            self.snaps.append(
                SnapRecord(
                    seq,
                    e,
                    int(body["step"]),
                    body["blob"],
                    int(body["size"]),
                    body["sum"],
                    dict(body.get("meta") or {}),
                    ts,
                )
            )
            self.last_commit = max(self.last_commit, ts)

    def live_snaps(self) -> list[SnapRecord]:
        """Snapshots not removed by gc, oldest first."""
        return [s for s in self.snaps if s.blob not in self.dropped]
