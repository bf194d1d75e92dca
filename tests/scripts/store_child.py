"""Child-process scenarios for the store's chaos tests (run as a script, killed by the tests).

Storage options come as JSON in FK_STORAGE_OPTIONS; failpoints in FAULTKIT_FAILPOINTS.
Every line appended to --out is fsync'd, so the parent sees exactly what happened before a kill.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

from faultkit import CheckpointStore, StaleAttemptError


def _store(url: str) -> CheckpointStore:
    return CheckpointStore(url, **json.loads(os.environ.get("FK_STORAGE_OPTIONS", "{}")))


def _note(path: str, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def payload(step: int, size: int) -> bytes:
    """The deterministic bytes of snapshot ``step``: a torn write cannot pass for it."""
    unit = f"snapshot-{step}|".encode()
    return (unit * (size // len(unit) + 1))[:size]


def _wait_file(path: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            sys.exit(9)
        time.sleep(0.01)


def work(a: argparse.Namespace) -> None:
    store = _store(a.store)
    with store.stage(a.key) as stage:
        _note(a.out, f"claim {stage.epoch}")
        for u in stage.pending(range(a.units)):
            _note(a.out, f"start {u} {stage.epoch}")
            if a.delay:
                time.sleep(a.delay)
            ok = stage.done(u, {"u": u, "epoch": stage.epoch})
            _note(a.out, f"done {u} {stage.epoch} {ok}")
            if a.snap_every and (u + 1) % a.snap_every == 0:
                stage.save(payload(u, a.snap_size), step=u, meta={"u": u})
                _note(a.out, f"saved {u} {stage.epoch}")
        _note(a.out, "finished")


def zombie(a: argparse.Namespace) -> None:
    store = _store(a.store)
    result: dict[str, object] = {}
    # --lazy: a host's first try, whose claim rides on its first commit (--lazy 0: it is
    # paused before that commit, so its claim is not in the log yet; --lazy 1: after it).
    stage = store.stage(a.key).claim(lazy=a.lazy >= 0)
    result["epoch"] = stage._epoch  # .epoch would write a lazy claim
    if a.lazy != 0:
        stage.done("before-pause")
    _note(a.out + ".ready", str(os.getpid()))
    _wait_file(a.go)
    for what, fn in (
        ("done", lambda: stage.done("zombie-unit", "zombie")),
        ("save", lambda: stage.save(b"zombie-bytes", step=999)),
    ):
        try:
            fn()
            result[what] = "written"
        except StaleAttemptError as exc:
            result[what] = f"stale:{exc.current}"
    with open(a.out, "w") as f:
        json.dump(result, f)


def race(a: argparse.Namespace) -> None:
    store = _store(a.store)
    stage = store.attach(a.key, a.epoch)
    units = list(range(a.units))
    random.Random(os.getpid()).shuffle(units)
    _wait_file(a.go)
    t0 = time.perf_counter()
    won = [u for u in units if stage.done(u, {"pid": os.getpid()})]
    with open(a.out, "w") as f:
        json.dump({"won": won, "seconds": time.perf_counter() - t0}, f)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=["work", "zombie", "race"])
    p.add_argument("--store", required=True)
    p.add_argument("--key", default="chaos/stage")
    p.add_argument("--out", required=True)
    p.add_argument("--units", type=int, default=10)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--snap-every", type=int, default=0)
    p.add_argument("--snap-size", type=int, default=4096)
    p.add_argument("--go", default="")
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("--lazy", type=int, default=-1)
    a = p.parse_args()
    {"work": work, "zombie": zombie, "race": race}[a.scenario](a)


if __name__ == "__main__":
    main()
