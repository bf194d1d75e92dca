"""One client of the randomized history test: random claims, writes (also through older,
stale attempts it keeps: zombies), gc and deletes against a real store, each operation
recorded as an invocation line before it starts and a completion line after it returns.

The test SIGKILLs and SIGSTOPs these processes; an operation with no completion line has an
unknown outcome. Lines are flushed one by one (a killed process loses nothing it wrote).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

from faultkit import CheckpointStore, StaleAttemptError


def payload(k: str, epoch: int, step: int) -> bytes:
    return f"{k}|{epoch}|{step}|".encode() * 64


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True)
    p.add_argument("--opts", default="{}")
    p.add_argument("--keys", required=True)
    p.add_argument("--deletable", default="")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--until", type=float, required=True)  # time.monotonic() deadline
    a = p.parse_args()
    rng = random.Random(a.seed)
    opts = json.loads(a.opts)
    store = CheckpointStore(a.store, **opts)
    keys = a.keys.split(",")
    deletable = set(filter(None, a.deletable.split(",")))
    attempts: dict[str, list] = {k: [] for k in keys}
    owner: dict[int, str] = {}  # id(stage) -> the id of the claim op that made it
    out = open(a.out, "a", buffering=1)
    pid = os.getpid()
    n = 0

    def record(kind: str, body: dict) -> None:
        out.write(f"{kind} {json.dumps(body)}\n")

    while time.monotonic() < a.until:
        k = rng.choice(keys)
        held = attempts[k]
        r = rng.random()
        if not held or r < 0.12:
            op = "claim"
        elif r < 0.47:
            op = "done"
        elif r < 0.62:
            op = "save"
        elif r < 0.66:
            op = "finish"
        elif r < 0.74:
            op = "check"
        elif r < 0.82:
            op = "gc"
        elif r < 0.85 and k in deletable:
            op = "delete"
        else:
            op = "done"
        # Mostly the newest attempt; sometimes an older one this process still holds.
        st = None
        if op in ("done", "save", "finish", "check") and held:
            st = held[-1] if rng.random() < 0.75 else rng.choice(held)
        n += 1
        oid = f"{pid}-{n}"
        body = {"id": oid, "op": op, "k": k, "t0": time.monotonic()}
        if st is not None:
            body["e"] = st._epoch  # .epoch would write a lazy claim
            body["a"] = owner[id(st)]
        if op == "claim":
            body["lazy"] = rng.random() < 0.3  # a first try: the claim rides on a commit
        if op == "done":
            body["u"] = rng.randrange(40)
        elif op == "save":
            body["s"] = pid * 1_000_000 + n  # unique across the run
        record("I", body)
        try:
            if op == "claim":
                fresh = CheckpointStore(a.store, **opts) if rng.random() < 0.3 else store
                stage = fresh.stage(k)
                res: object = stage.claim(lazy=body["lazy"])._epoch
                owner[id(stage)] = oid
                held.append(stage)
            elif op == "done":
                res = st.done(body["u"], {"by": oid})
            elif op == "save":
                st.save(payload(k, st.epoch, body["s"]), step=body["s"])
                res = True
            elif op == "finish":
                res = st.finish({"by": oid})
            elif op == "check":
                st.check()
                res = True
            elif op == "gc":
                res = CheckpointStore(a.store, **opts).gc(k, keep=2, grace=3600)["removed"]
            else:
                CheckpointStore(a.store, **opts).delete(k)
                res = True
            done = {"id": oid, "t1": time.monotonic(), "r": res}
        except StaleAttemptError:
            done = {"id": oid, "t1": time.monotonic(), "stale": True}
        except Exception as exc:  # recorded; the checker decides whether it is allowed
            done = {"id": oid, "t1": time.monotonic(), "err": f"{type(exc).__name__}: {exc}"}
        record("C", done)
        if len(held) > 6:
            owner.pop(id(held.pop(0)), None)
    out.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
