"""A claim's cost on S3 (SeaweedFS on loopback) is bounded by compaction, not the history.

Run: ``.venv/bin/python -m bench claim [--units 100000]``.

1. Fresh-process claim of a stage with ``units`` done units: the stage is written on a local
   file store by one attempt (compacting every 500 records, the default), its objects are
   uploaded to a SeaweedFS bucket, and a new process times ``CheckpointStore(url)`` plus
   ``stage.claim()`` (which reads the newest summary and the records after it). The same
   claim of a smaller stage that never compacted (``compact_every=0``) is the baseline: its
   cost per record shows what the whole history would cost.
2. Commits: ``stage.done()`` on S3 (the log's requests through obstore) against one
   conditional PUT (``If-None-Match: *``) of the same bytes by the same client, and by s3fs,
   in ABBA blocks; compaction happens inside the commits it falls on.
Every run is printed; the median and range are reported. Target: claim <= 2 s at 100,000
units; commits <= 1.5x one conditional PUT.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

_CLAIM = """
import json, sys, time
t0 = time.perf_counter()
from faultkit import CheckpointStore
store = CheckpointStore(sys.argv[1], **json.loads(sys.argv[2]))
t1 = time.perf_counter()
st = store.stage(sys.argv[3]).claim()
t2 = time.perf_counter()
print(json.dumps({"open": t1 - t0, "claim": t2 - t1, "units": len(st.results())}))
"""


def _build(root: str, key: str, units: int, compact_every: int) -> str:
    """Write a stage of ``units`` done units on a local store; returns its folder."""
    from faultkit import CheckpointStore

    store = CheckpointStore(f"file://{root}", fsync=False, compact_every=compact_every)
    with store.stage(key) as st:
        for u in range(units):
            st.done(u, {"rows": u % 97})
    return os.path.join(root, key)


def _upload(fs: Any, folder: str, dest: str) -> int:
    names = []
    for dirpath, _dirs, files in os.walk(folder):
        names += [os.path.join(dirpath, f) for f in files]
    rel = [os.path.relpath(n, folder) for n in names]
    fs.put(names, [f"{dest}/{r}" for r in rel])
    return len(names)


def _claim(url: str, opts: dict[str, Any], key: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", _CLAIM, url, json.dumps(opts), key],
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _stats(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.3f} (range {min(xs):.3f}-{max(xs):.3f})"


def main(units: int = 100_000, small: int = 2_000, rounds: int = 3, commits: int = 200) -> dict:
    from faultkit.testing import SeaweedS3Server

    reason = SeaweedS3Server.available()
    if reason:
        print(f"   skipped: {reason}")
        return {"skipped": reason}
    import s3fs

    from faultkit import CheckpointStore

    tmp = tempfile.mkdtemp(prefix="faultkit-bench-claim-")
    out: dict[str, Any] = {}
    with SeaweedS3Server() as server:
        opts = server.storage_options()
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        server.make_bucket(bucket)
        url = f"s3://{bucket}/ck"
        fs = s3fs.S3FileSystem(**opts)

        # 1. claims
        t0 = time.perf_counter()
        big = _build(f"{tmp}/big", "etl/run/big", units, 500)
        built = time.perf_counter() - t0
        n = _upload(fs, big, f"{bucket}/ck/etl/run/big")
        flat = _build(f"{tmp}/flat", "etl/run/flat", small, 0)
        _upload(fs, flat, f"{bucket}/ck/etl/run/flat")
        print(f"   built {units:,} units in {built:.1f} s; {n:,} objects uploaded")
        big_s, flat_s = [], []
        # A fresh process's open + claim of the big stage, by each client.
        total: dict[str, list[float]] = {"obstore": [], "s3fs": []}
        for r in range(rounds):
            order = ("big", "flat", "s3fs") if r % 2 == 0 else ("s3fs", "flat", "big")
            for which in order:
                client = "s3fs" if which == "s3fs" else "auto"
                stage = "etl/run/flat" if which == "flat" else "etl/run/big"
                got = _claim(url, {**opts, "client": client}, stage)
                want = small if which == "flat" else units
                assert got["units"] == want, got
                if which != "flat":
                    total["s3fs" if which == "s3fs" else "obstore"].append(
                        got["open"] + got["claim"]
                    )
                if which != "s3fs":
                    (big_s if which == "big" else flat_s).append(got["claim"])
                print(f"   claim {which}: {got['claim']:.3f} s (open {got['open']:.3f} s)")
        for client, xs in total.items():
            out[f"open_claim_{client}_s"] = statistics.median(xs)
            print(f"   fresh process, open + claim of {units:,} units, {client}: {_stats(xs)} s")
        per_record = statistics.median(flat_s) / small
        out["claim_s"] = statistics.median(big_s)
        out["claim_range"] = [min(big_s), max(big_s)]
        out["uncompacted_ms_per_record"] = per_record * 1000
        print(
            f"   fresh-process claim, {units:,} done units: {_stats(big_s)} s; target <= 2 s "
            f"{'OK' if out['claim_s'] <= 2 else 'MISSED'}"
        )
        print(
            f"   without compaction: {small:,} units {_stats(flat_s)} s = "
            f"{per_record * 1000:.2f} ms/record, so {units:,} units ~ {per_record * units:.0f} s"
        )

        # 2. commits against one conditional PUT of the same bytes, by each client
        import obstore

        store = CheckpointStore(url, **opts)  # the log's requests go through obstore
        st = store.stage("etl/run/commits").claim()
        ob = store._storage._client()
        assert ob is not None, "the store did not pick obstore"
        body = b'{"e":1,"id":"i:0","r":{"rows":1},"t":"done","u":0}\n' + b"0" * 16

        def put_s3fs(i: int) -> None:
            with fs.open(f"{bucket}/ck/floor/{i:012d}", "xb") as f:
                f.write(body)

        def put_obstore(i: int) -> None:
            obstore.put(ob, f"ck/floor/{i:012d}", body, mode="create", use_multipart=False)

        arms = {
            "done": lambda i: st.done(i, {"rows": 1}),
            "put": put_obstore,
            "put_s3fs": put_s3fs,
        }
        ratios, ratios_s3fs = [], []
        times_all: dict[str, list[float]] = {k: [] for k in arms}
        i = 0
        block = commits // (rounds * 2)
        for r in range(rounds * 2):
            times = {}
            order = list(arms) if r % 2 == 0 else list(reversed(arms))
            for which in order:
                t0 = time.perf_counter()
                for _ in range(block):
                    i += 1
                    arms[which](i)
                times[which] = (time.perf_counter() - t0) / block
                times_all[which].append(times[which] * 1000)
            ratios.append(times["done"] / times["put"])
            ratios_s3fs.append(times["done"] / times["put_s3fs"])
            print(
                f"   commits block {r}: done {times['done'] * 1000:.2f} ms, conditional PUT "
                f"obstore {times['put'] * 1000:.2f} ms, s3fs {times['put_s3fs'] * 1000:.2f} ms; "
                f"ratio {ratios[-1]:.2f} (vs s3fs {ratios_s3fs[-1]:.2f})"
            )
        for which, xs in times_all.items():
            out[f"{which}_ms"] = statistics.median(xs)
            print(f"   {which}: {_stats(xs)} ms")
        out["commit_ratio"] = statistics.median(ratios)
        out["commit_range"] = [min(ratios), max(ratios)]
        out["commit_ratio_s3fs_put"] = statistics.median(ratios_s3fs)
        print(
            f"   done() vs one conditional PUT by the same client (obstore): {_stats(ratios)}x "
            f"time; target <= 1.5 {'OK' if out['commit_ratio'] <= 1.5 else 'MISSED'}; vs an "
            f"s3fs PUT: {_stats(ratios_s3fs)}x (compacting every 500 records)"
        )
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--units", type=int, default=100_000)
    a = p.parse_args()
    main(units=a.units)
