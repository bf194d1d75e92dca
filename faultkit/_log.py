"""A stage's commit log: an append-only sequence of create-if-absent records.

Every change to a stage is one small record at ``<key>/@log/<seq>``, where ``seq`` counts
1, 2, 3, ... A writer that has read every record below ``seq`` creates ``seq`` with
create-if-absent; if the name is taken it reads that record and tries ``seq + 1``. Because
each position is won by exactly one writer, the records are totally ordered, and fencing
needs no lock, lease or clock:

* a ``claim`` record opens epoch ``E``, above every epoch the log could hold before it; a
  commit of an epoch higher than any claim before it counts as that epoch's claim (the
  stage's first claim is not fsync'd, see :meth:`Stage.claim`);
* a commit (``done``, ``fin``, ``snap``, ``sink``) of epoch ``e`` is valid only if no claim
  of a higher epoch precedes it. Writers check this before they create, and a writer that
  loses a position to a newer claim raises :class:`~faultkit.StaleAttemptError` without
  writing. Readers apply the same rule, so even a hand-crafted late record cannot take effect.

Damage. Each record is one JSON object, a newline and its xxh64 checksum, and names the
checksum of the record before it (``p``), so the log is a chain. A record that fails its
checksum, a position missing below later records (a gap), a record its successor does not
name (written into a gap after the fact) and anything that is not a plain file are damage:
reported by readers (``View.damaged``) and never silently skipped into a reused epoch. A
record at position ``s`` can only hold an epoch ``<= s`` (each claim is at most one above
every record before it), so a claim steps past damage by claiming above the highest damaged
position, and a writer whose epoch is below that bound is treated as fenced. A claim also
seals each gap with a ``void`` record, so a writer that reads up to the gap next finds the
damage instead of a hole it could write into.

Compaction. A claim replays the log, so a long stage would cost a claim time linear in its
history. After ``compact_every`` records (500 by default) a committing writer writes a summary
of its view (``sum-<seq>-<id>``: JSON, checksum and length named by the record) and then a
``base`` record with ``why: compact`` at the next position, which names it, and an empty
``head-<seq>`` hint. A reader lists the hints, reads from the newest summary on, and folds the
records after it; the records before it are kept, so a summary that is missing or fails its
checksum is damage at its position (reported, claimed above) and the reader folds the history
instead. A hint is only a shortcut: what it points at is checked like any record. A writer that
has folded every record before the base treats it as a marker. The base is written at one
position with create-if-absent like every record, so it summarizes exactly the records below
it, whoever wrote it; fencing is unchanged.

A ``base`` record starts the log over: :meth:`CheckpointStore.delete` writes one with an
epoch above everything before it, then removes the older records, so a new run of the key
claims above every epoch the deleted stage handed out and its zombies stay fenced.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import xxhash

from ._errors import CorruptCheckpointError

__all__ = [
    "Damage",
    "SnapRecord",
    "UnitRecord",
    "View",
    "decode",
    "digest",
    "encode",
    "seq_name",
]

SEQ_WIDTH = 12
MAX_RECORD = 1 << 20  # a record larger than this is damage (records are small JSON)


def seq_name(seq: int) -> str:
    return f"{seq:0{SEQ_WIDTH}d}"


def encode(body: dict[str, Any]) -> bytes:
    raw = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    return raw + b"\n" + xxhash.xxh64_hexdigest(raw).encode()


def digest(data: bytes) -> str:
    """What the next record names as its predecessor (``p``)."""
    return xxhash.xxh64_hexdigest(data)


_TYPES = frozenset({"claim", "done", "fin", "snap", "gc", "sink", "base", "void"})


def decode(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_RECORD:
        raise CorruptCheckpointError(f"log record of {len(data)} bytes is too large")
    raw, sep, want = data.rpartition(b"\n")
    if not sep or xxhash.xxh64_hexdigest(raw).encode() != want:
        raise CorruptCheckpointError("log record failed its checksum")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise CorruptCheckpointError("log record is not JSON") from exc
    if not isinstance(body, dict) or body.get("t") not in _TYPES:
        raise CorruptCheckpointError("log record has no known type")
    return body


def _order(body: dict[str, Any]) -> int | None:
    o = body.get("o")
    return o if isinstance(o, int) and not isinstance(o, bool) else None


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


@dataclass(frozen=True, slots=True)
class Damage:
    """One damaged position of a log: ``kind`` is ``corrupt`` (fails its checksum or
    cannot be parsed), ``missing`` (a gap), ``sealed`` (a gap a claim filled with a void
    record), ``unlinked`` (its successor names another record: it was written into a gap
    after the fact) or ``link`` (a symbolic link or other non-file)."""

    seq: int
    kind: str
    detail: str = ""


@dataclass
class View:
    """What the records up to ``cursor`` say about a stage."""

    cursor: int = 0
    epoch: int = 0  # the highest epoch claimed so far
    # The host's order of the attempt whose first commit claimed ``epoch`` (an ordered lazy
    # claim, see Stage.claim); None for a claim record or a claim without an order.
    epoch_order: int | None = None
    base: int = 0  # seq of the base record the log starts from (0: none)
    claims: list[tuple[int, int, float]] = field(default_factory=list)  # (epoch, seq, ts)
    units: dict[str, UnitRecord] = field(default_factory=dict)  # unit_id -> record
    snaps: list[SnapRecord] = field(default_factory=list)
    dropped: set[str] = field(default_factory=set)  # blobs removed by gc
    damaged: list[Damage] = field(default_factory=list)
    ignored: list[int] = field(default_factory=list)  # stale commits (never written by us)
    sinks: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)  # id -> (e, fence)
    last_commit: float = 0.0
    finished: UnitRecord | None = None  # the stage's final result, once recorded
    deleted: float = 0.0  # when delete() reset the log (0: never)
    last_digest: str = ""  # digest of the record at ``cursor``
    suspect: set[int] = field(default_factory=set)  # positions to treat as damage

    @property
    def floor(self) -> int:
        """The highest damaged position: a damaged record may hold any epoch up to it."""
        return max((d.seq for d in self.damaged), default=0)

    @property
    def fence(self) -> int:
        """Every epoch below this is fenced: the newest claim, or the damage bound."""
        return max(self.epoch, self.floor)

    @property
    def corrupt(self) -> list[int]:
        """Positions of damaged records (see :attr:`damaged`)."""
        return [d.seq for d in self.damaged]

    def damage(self, seq: int, kind: str, detail: str = "") -> None:
        """Record damage at ``seq`` and move the cursor past it."""
        self.cursor = max(self.cursor, seq)
        self.last_digest = ""
        if not any(d.seq == seq for d in self.damaged):
            self.damaged.append(Damage(seq, kind, detail))

    def link_ok(self, seq: int, body: dict[str, Any]) -> bool:
        """False if ``body`` (at ``seq``) names a predecessor other than the one read."""
        prev = body.get("p")
        if not prev or not self.last_digest or seq != self.cursor + 1:
            return True  # unknown either way (the predecessor was damaged, or is a base)
        return prev == self.last_digest

    def apply(self, seq: int, body: dict[str, Any], data_digest: str = "") -> None:
        """Fold record ``seq`` into the view."""
        if seq in self.suspect:
            self.damage(seq, "unlinked", "its successor names a different record")
            return
        t = body["t"]
        if t == "void":
            self.damage(seq, "sealed", str(body.get("why", "missing")))
            return
        self.cursor = seq
        self.last_digest = data_digest
        ts = float(body.get("ts", 0.0))
        if t == "base":
            if body.get("why") == "compact":
                # A summary of every record before it, which this view has folded already
                # (a reader that starts here restores it first: see Stage._catch_up_once).
                self.base = seq
                return
            self._reset(seq, int(body["e"]), body, ts)
            return
        if t == "claim":
            e = int(body["e"])
            if e > self.epoch:
                self.epoch, self.epoch_order = e, _order(body)
            self.claims.append((e, seq, ts))
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
            self.epoch, self.epoch_order = e, _order(body)
            self.claims.append((e, seq, ts))
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
        elif t == "sink":
            self.sinks[str(body["id"])] = (e, dict(body.get("fence") or {}))

    def _reset(self, seq: int, epoch: int, body: dict[str, Any], ts: float) -> None:
        """A base record: everything before it is gone; epochs up to ``epoch`` are fenced."""
        suspect, digest_ = self.suspect, self.last_digest
        self.__init__()  # type: ignore[misc]
        self.suspect = suspect
        self.cursor = self.base = seq
        self.last_digest = digest_
        self.epoch = epoch
        self.claims.append((epoch, seq, ts))
        self.sinks = {k: (int(e), dict(f)) for k, (e, f) in (body.get("sinks") or {}).items()}
        if body.get("why") == "deleted":
            self.deleted = ts

    def summary(self) -> bytes:
        """Everything this view knows, as JSON: what a ``compact`` base record names."""
        fin = self.finished
        state = {
            "v": 1,
            "cursor": self.cursor,
            "epoch": self.epoch,
            "claims": self.claims,
            "units": [[k, r.unit, r.result, r.epoch, r.seq, r.ts] for k, r in self.units.items()],
            "snaps": [
                [r.seq, r.epoch, r.step, r.blob, r.size, r.checksum, r.meta, r.ts]
                for r in self.live_snaps()
            ],
            "sinks": {k: [e, f] for k, (e, f) in self.sinks.items()},
            "ignored": self.ignored,
            "last_commit": self.last_commit,
            "finished": [fin.result, fin.epoch, fin.seq, fin.ts] if fin else None,
            "deleted": self.deleted,
            "o": self.epoch_order,
        }
        return json.dumps(state, separators=(",", ":")).encode()

    def restore(self, data: bytes, seq: int, prev_digest: str) -> None:
        """Become the view a summary describes, as of the record before ``seq`` (the
        ``compact`` base that names it). Raises ``CorruptCheckpointError`` if it is not one."""
        try:
            st = json.loads(data)
            if st.get("v") != 1 or int(st["cursor"]) != seq - 1:
                raise ValueError("not a summary of the records before its base")
            units = {
                str(k): UnitRecord(u, r, int(e), int(s), float(ts))
                for k, u, r, e, s, ts in st["units"]
            }
            snaps = [
                SnapRecord(int(a), int(e), int(step), str(b), int(n), str(c), dict(m), float(ts))
                for a, e, step, b, n, c, m, ts in st["snaps"]
            ]
            fin = st.get("finished")
            finished = (
                UnitRecord("@finished", fin[0], int(fin[1]), int(fin[2]), float(fin[3]))
                if fin
                else None
            )
            claims = [(int(e), int(s), float(ts)) for e, s, ts in st["claims"]]
            sinks = {str(k): (int(e), dict(f)) for k, (e, f) in st["sinks"].items()}
            epoch, last_commit = int(st["epoch"]), float(st["last_commit"])
            ignored, deleted = [int(i) for i in st["ignored"]], float(st["deleted"])
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
            raise CorruptCheckpointError(f"log summary is not valid: {exc}") from exc
        self.cursor, self.last_digest = seq - 1, prev_digest
        self.epoch, self.claims, self.units, self.snaps = epoch, claims, units, snaps
        self.sinks, self.ignored, self.finished = sinks, ignored, finished
        self.last_commit, self.deleted, self.dropped = last_commit, deleted, set()
        self.epoch_order = _order(st)

    def live_snaps(self) -> list[SnapRecord]:
        """Snapshots not removed by gc, oldest first."""
        return [s for s in self.snaps if s.blob not in self.dropped]
