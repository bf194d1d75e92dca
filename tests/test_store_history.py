"""A randomized, seeded history test of the store's contract.

Several client processes (tests/scripts/history_worker.py) claim, write (also through older
attempts they still hold: zombies), check, finish, gc and delete stages of a real store, while
this test SIGSTOPs them for a while and SIGKILLs and restarts them. Every operation is
recorded with its invocation and completion times (CLOCK_MONOTONIC, shared by processes), and
the history is then checked against a model of the contract:

* epochs are unique, and a claim that finished before another began has the lower epoch;
* no write of an epoch succeeds once a higher epoch's claim, or a delete, has returned;
* a unit is reported newly done at most once, and a stage finished at most once, per
  generation (the time between deletes);
* every write that returned is visible in the final log, and no write that was refused is;
* the final snapshots are intact and the healthy store shows no damage (no false alarm).

The seed comes from FAULTKIT_HISTORY_SEED (default: a fixed one) and is printed on failure.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from faultkit import CheckpointStore

WORKER = Path(__file__).parent / "scripts" / "history_worker.py"
sys.path.insert(0, str(WORKER.parent))
from history_worker import payload  # noqa: E402

KEYS = ["h/a", "h/b", "h/c"]
DELETABLE = ["h/c"]


@dataclass
class Op:
    id: str
    op: str
    k: str
    t0: float
    e: int | None = None
    u: int | None = None
    s: int | None = None
    a: str | None = None  # writes: the claim op of the attempt that wrote
    lazy: bool = False  # claims: the claim rides on the attempt's first commit
    t1: float | None = None  # None: no completion (the process was killed mid-operation)
    r: Any = None
    stale: bool = False
    err: str | None = None

    @property
    def ok(self) -> bool:
        return self.t1 is not None and not self.stale and self.err is None


@dataclass
class History:
    ops: list[Op] = field(default_factory=list)
    kills: int = 0
    stops: int = 0

    def of(self, k: str, *kinds: str) -> list[Op]:
        return [o for o in self.ops if o.k == k and o.op in kinds]


def _read(files: list[Path]) -> History:
    h = History()
    by_id: dict[str, Op] = {}
    for f in files:
        if not f.exists():
            continue  # killed before it began
        for line in f.read_text().splitlines():
            kind, _, body = line.partition(" ")
            try:
                d = json.loads(body)
            except ValueError:
                continue  # a line cut by SIGKILL
            if kind == "I":
                op = Op(**{k: d.get(k) for k in ("id", "op", "k", "t0", "e", "u", "s", "a")})
                op.lazy = bool(d.get("lazy"))
                by_id[op.id] = op
                h.ops.append(op)
            elif kind == "C" and d["id"] in by_id:
                op = by_id[d["id"]]
                op.t1, op.r = d["t1"], d.get("r")
                op.stale, op.err = bool(d.get("stale")), d.get("err")
    return h


def _run(url: str, opts: dict, tmp: Path, seed: int, seconds: float, workers: int) -> History:
    rng = random.Random(seed)
    until = time.monotonic() + seconds
    files: list[Path] = []
    procs: dict[int, subprocess.Popen] = {}
    h = History()

    def start(slot: int) -> None:
        f = tmp / f"w{slot}-{len(files)}.log"
        files.append(f)
        procs[slot] = subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                "--store",
                url,
                "--opts",
                json.dumps(opts),
                "--keys",
                ",".join(KEYS),
                "--deletable",
                ",".join(DELETABLE),
                "--seed",
                str(rng.randrange(1 << 30)),
                "--out",
                str(f),
                "--until",
                str(until),
            ],
            stderr=subprocess.PIPE,
        )

    for slot in range(workers):
        start(slot)
    stopped: dict[int, float] = {}
    while time.monotonic() < until - 0.5:
        time.sleep(rng.uniform(0.1, 0.4))  # the fault schedule, not synchronisation
        now = time.monotonic()
        for slot, t in list(stopped.items()):
            if now >= t:
                procs[slot].send_signal(signal.SIGCONT)
                del stopped[slot]
        slot = rng.randrange(workers)
        if slot in stopped or procs[slot].poll() is not None:
            continue
        if rng.random() < 0.5:
            procs[slot].send_signal(signal.SIGSTOP)
            stopped[slot] = now + rng.uniform(0.2, 2.0)
            h.stops += 1
        else:
            procs[slot].send_signal(signal.SIGKILL)
            procs[slot].wait(30)
            h.kills += 1
            start(slot)
    for slot in stopped:
        procs[slot].send_signal(signal.SIGCONT)
    for p in procs.values():
        try:
            _, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            raise
        assert p.returncode in (0, -signal.SIGKILL), err.decode()[-3000:]
    got = _read(files)
    got.kills, got.stops = h.kills, h.stops
    return got


def _wrote(w: Op) -> bool:
    """True if ``w`` returned having written (done()/finish() answering False did not)."""
    return w.op in ("done", "save", "finish") and w.ok and (w.op == "save" or w.r is True)


def _claims(h: History, k: str) -> list[Op]:
    """The claims that took effect, each with ``t1`` when it did. A lazy claim (a first
    try's) writes nothing itself: it takes effect with its attempt's first write, and one
    whose attempt never wrote is no claim at all (its epoch number may be handed out again,
    and nothing of it may ever land)."""
    out = []
    firsts: dict[str, float] = {}
    for w in h.ops:
        if w.a is not None and w.k == k and _wrote(w):
            firsts[w.a] = min(firsts.get(w.a, 1e18), w.t1)
    for c in h.of(k, "claim"):
        if not c.ok:
            continue
        if c.lazy:
            if c.id not in firsts:
                continue
            c = Op(**{**c.__dict__, "t1": firsts[c.id]})
        out.append(c)
    return out


def _check(h: History, store: CheckpointStore) -> list[str]:
    bad: list[str] = []
    lazy = {c.id: c for c in h.ops if c.op == "claim" and c.lazy}
    for k in KEYS:
        claims = _claims(h, k)
        deletes = [o for o in h.of(k, "delete") if o.ok]
        epochs = [o.r for o in claims]
        if len(epochs) != len(set(epochs)):
            bad.append(f"{k}: an epoch was handed out twice: {sorted(epochs)}")
        for x in claims:
            for y in claims:
                if x.t1 < y.t0 and not x.r < y.r:
                    bad.append(f"{k}: claim {y.id} (epoch {y.r}) after {x.id} (epoch {x.r})")

        all_deletes = h.of(k, "delete")

        def gen(o: Op, all_deletes=all_deletes, deletes=deletes) -> int | None:
            if any(d.t0 <= (o.t1 or 1e18) and o.t0 <= (d.t1 or 1e18) for d in all_deletes):
                return None  # overlaps a delete: either side of it
            return sum(1 for d in deletes if d.t1 < o.t0)

        writes = [o for o in h.of(k, "done", "save", "finish") if o.e is not None]
        first_write: dict[str, float] = {}  # attempt -> when its first write returned
        for w in writes:
            if _wrote(w):
                first_write[w.a] = min(first_write.get(w.a, 1e18), w.t1)
        last_gc = max((g.t0 for g in h.of(k, "gc")), default=-1.0)
        for w in writes:
            if not _wrote(w):
                continue  # done()/finish() answering False wrote nothing: it was done already
            newer = [c for c in claims if c.r > w.e and c.t1 < w.t0]
            if newer:
                bad.append(f"{k}: {w.op} {w.id} of epoch {w.e} succeeded after claim {newer[0].id}")
            if w.a in lazy and not first_write.get(w.a, 1e18) < w.t0:
                # the write that carried a lazy claim: a claim of its own epoch fences it too
                same = [c for c in claims if c.r == w.e and c.id != w.a and c.t1 < w.t0]
                if same:
                    bad.append(
                        f"{k}: {w.op} {w.id} carried lazy claim {w.a} (epoch {w.e}) after "
                        f"claim {same[0].id} of that epoch"
                    )
            claimed_before = [c for c in claims if c.id == w.a]
            for d in deletes:
                if d.t1 < w.t0 and claimed_before and claimed_before[0].t1 < d.t0:
                    bad.append(f"{k}: {w.op} {w.id} of epoch {w.e} succeeded after delete {d.id}")
        per_unit: dict[tuple[int, Any], list[Op]] = defaultdict(list)
        fins: dict[int, list[Op]] = defaultdict(list)
        for w in writes:
            g = gen(w)
            if g is None or not w.ok or w.r is not True:
                continue
            if w.op == "done":
                per_unit[(g, w.u)].append(w)
            elif w.op == "finish":
                fins[g].append(w)
        bad += [
            f"{k}: unit {u} newly done twice: {[o.id for o in os_]}"
            for (_, u), os_ in per_unit.items()
            if len(os_) > 1
        ]
        bad += [
            f"{k}: finished twice: {[o.id for o in os_]}" for os_ in fins.values() if len(os_) > 1
        ]

        view = store.read_view(k)
        last = max((d.t1 for d in deletes), default=-1.0)
        steps = {r.step: r for r in view.snaps}
        for w in writes:
            if w.t0 <= last or any(d.t1 is None or d.t1 >= w.t0 for d in all_deletes):
                continue  # possibly removed by a delete
            if w.ok and w.op == "done" and w.r is True:
                rec = view.units.get(f"i:{w.u}")
                if rec is None or rec.epoch != w.e:
                    bad.append(f"{k}: done {w.id} (unit {w.u}, epoch {w.e}) returned but is lost")
            gc_after = last_gc > (w.t1 or 1e18)
            if w.ok and w.op == "save" and w.s not in steps and not gc_after:
                # (gc removes old snapshots; a compaction then summarizes only those kept)
                bad.append(f"{k}: save {w.id} (step {w.s}) returned but is lost")
            if w.stale and w.op == "save" and w.s in steps:
                bad.append(f"{k}: save {w.id} (step {w.s}) was refused but is visible")
            if w.stale and w.op == "done":
                rec = view.units.get(f"i:{w.u}")
                if rec is not None and rec.result == {"by": w.id}:
                    bad.append(f"{k}: done {w.id} was refused but is visible")
        with store.stage(k) as st:
            snap = st.latest()
            if snap is not None and snap.data != payload(k, snap.epoch, snap.step):
                bad.append(f"{k}: the newest snapshot is torn")
        report = store.report(k)
        bad += [f"{k}: false alarm: {p}" for p in report.problems]
    return bad


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "backend,seconds,workers,min_ops",
    [
        pytest.param("file", 20.0, 4, 200, id="file"),
        # SeaweedFS holds the losers of a create race for about a second: fewer operations.
        pytest.param("s3", 20.0, 3, 50, id="s3"),
    ],
)
def test_random_histories_satisfy_the_contract(
    request, tmp_path, backend, seconds, workers, min_ops
):
    """Random concurrent claims, writes, zombies, gc, deletes, SIGKILLs and SIGSTOPs never
    produce a history the contract forbids."""
    seed = int(os.environ.get("FAULTKIT_HISTORY_SEED", "20261201"))
    # Compacting every 16 records: the histories run across many compactions.
    if backend == "file":
        url, opts = f"file://{tmp_path}/store", {"fsync": False, "compact_every": 16}
    else:
        url, opts = request.getfixturevalue("s3_store_url")
        opts = {**opts, "compact_every": 16}
    h = _run(url, opts, tmp_path, seed, seconds, workers)
    done = [o for o in h.ops if o.t1 is not None]
    assert len(done) > min_ops, f"too few operations to mean anything ({len(done)})"
    assert h.kills + h.stops >= 5, "the faults did not fire"
    assert any(o.stale for o in done), "no zombie write was ever refused: nothing was tested"
    assert any(c.lazy for k in KEYS for c in _claims(h, k)), "no lazy claim ever took effect"
    errors = [o for o in done if o.err]
    assert not errors, (
        f"seed {seed}: unexpected errors: {[(o.id, o.op, o.err) for o in errors[:5]]}"
    )
    bad = _check(h, CheckpointStore(url, **opts))
    assert not bad, f"seed {seed}: " + "\n".join(bad[:20])
