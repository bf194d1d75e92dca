"""Store benchmarks on a file:// store: ratios against baselines doing the same work in the
same process, in interleaved rounds (ABBA order), reported as the median and the range over
the rounds, never the best one.

- save() of N MiB vs a buffered write + fsync of a new file (goal: speed >= 0.8x), beside
  the physical floor: an ``O_DIRECT`` write + fsync of the same bytes (no page cache);
- latest() read + verify vs a raw read of the same file, warm (page cache) and cold (the
  file evicted first with ``posix_fadvise(DONTNEED)``, so both read the disk);
- done() vs the cheapest durable create: create-exclusive + write + fsync + rename + fsync
  of the folder, 100 bytes (goal: time <= 1.1x).

    python -m bench store        (from the repository root; `make bench` runs them all)
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

from faultkit import CheckpointStore

CHUNK = 8 << 20


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _raw_write(path: str, data: bytes) -> None:
    # A checkpoint is a new file each time: the baseline writes a new file too.
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _direct_write(path: str, aligned: mmap.mmap) -> None:
    """The physical floor: the bytes go to the device, not the page cache."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
    try:
        view = memoryview(aligned)
        for i in range(0, len(view), CHUNK):
            os.write(fd, view[i : i + CHUNK])
        os.fsync(fd)
    finally:
        os.close(fd)


def _evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _raw_read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _floor_commit(folder: str, i: int, payload: bytes) -> None:
    tmp = os.path.join(folder, f".tmp{i}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, payload)
    os.fsync(fd)
    os.close(fd)
    os.rename(tmp, os.path.join(folder, f"{i:012d}"))
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)


def _stats(ratios: list[float]) -> dict[str, float]:
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def _fmt(name: str, s: dict[str, float], goal: str) -> str:
    return f"{name}: median {s['median']:.2f} (range {s['min']:.2f}-{s['max']:.2f}) {goal}"


def main(mib: int = 256, units: int = 400, rounds: int = 6) -> dict[str, object]:
    root = tempfile.mkdtemp(prefix="faultkit-bench-", dir=os.environ.get("FAULTKIT_BENCH_DIR"))
    try:
        size = mib << 20
        aligned = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs
        aligned.write(os.urandom(size))
        data = bytes(aligned)
        store = CheckpointStore(f"file://{root}/store")
        stage = store.stage("bench/save").claim()
        raw, direct, save = [], [], []
        warm = {"raw": [], "latest": []}
        cold = {"raw": [], "latest": []}
        for r in range(rounds):
            order = ["raw", "save", "direct"] if r % 2 == 0 else ["direct", "save", "raw"]
            for what in order:
                path = os.path.join(root, f"{what}.{r}")
                if what == "raw":
                    raw.append(_timed(lambda p=path: _raw_write(p, data)))
                elif what == "direct":
                    direct.append(_timed(lambda p=path: _direct_write(p, aligned)))
                    os.unlink(path)
                else:
                    save.append(_timed(lambda r=r: stage.save(data, step=r)))
            blob = stage.snapshots()[-1].blob
            blob_path = os.path.join(root, "store", "bench", "save", "@blobs", blob)
            raw_path = os.path.join(root, f"raw.{r}")
            for state, box in (("warm", warm), ("cold", cold)):
                for what in ("raw", "latest") if r % 2 == 0 else ("latest", "raw"):
                    if state == "cold":
                        _evict(raw_path if what == "raw" else blob_path)
                    if what == "raw":
                        box["raw"].append(_timed(lambda p=raw_path: _raw_read(p)))
                    else:
                        box["latest"].append(_timed(stage.latest))
            os.unlink(raw_path)
            store.gc("bench/save", keep=1, grace=0.0)

        folder = os.path.join(root, "floor")
        os.makedirs(folder)
        payload = b"x" * 100
        floor, dones = [], []
        dstage = store.stage("bench/done").claim()
        block = max(1, units // 8)
        for b in range(8):  # blocks in ABBA order
            first, second = (floor, dones) if b % 2 == 0 else (dones, floor)
            for target in (first, second):
                for i in range(b * block, (b + 1) * block):
                    if target is floor:
                        target.append(_timed(lambda i=i: _floor_commit(folder, i, payload)))
                    else:
                        target.append(_timed(lambda i=i: dstage.done(i, {"rows": 100})))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    half = len(dones) // 8
    done_ratios = [
        statistics.median(dones[i : i + half]) / statistics.median(floor[i : i + half])
        for i in range(0, len(dones), half)
    ]
    res: dict[str, object] = {
        "mib": mib,
        "rounds": rounds,
        "save_MiB_s": mib / statistics.median(save),
        "raw_write_fsync_MiB_s": mib / statistics.median(raw),
        "direct_write_fsync_MiB_s": mib / statistics.median(direct),
        "save_vs_raw": _stats([a / b for a, b in zip(raw, save, strict=True)]),
        "save_vs_direct": _stats([a / b for a, b in zip(direct, save, strict=True)]),
        "latest_warm_vs_raw": _stats(
            [a / b for a, b in zip(warm["raw"], warm["latest"], strict=True)]
        ),
        "latest_cold_vs_raw": _stats(
            [a / b for a, b in zip(cold["raw"], cold["latest"], strict=True)]
        ),
        "latest_warm_MiB_s": mib / statistics.median(warm["latest"]),
        "latest_cold_MiB_s": mib / statistics.median(cold["latest"]),
        "done_ms": statistics.median(dones) * 1e3,
        "floor_ms": statistics.median(floor) * 1e3,
        "done_vs_floor": _stats(done_ratios),
    }
    print(
        f"save() {mib} MiB x {rounds}: {res['save_MiB_s']:.0f} MiB/s; buffered write+fsync "
        f"{res['raw_write_fsync_MiB_s']:.0f} MiB/s; O_DIRECT write+fsync "
        f"{res['direct_write_fsync_MiB_s']:.0f} MiB/s"
    )
    print("  " + _fmt("save speed / buffered write", res["save_vs_raw"], "(goal >= 0.8)"))
    print("  " + _fmt("save speed / O_DIRECT write", res["save_vs_direct"], "(the floor)"))
    print(
        f"latest() read+verify: warm {res['latest_warm_MiB_s']:.0f} MiB/s, cold "
        f"{res['latest_cold_MiB_s']:.0f} MiB/s"
    )
    print("  " + _fmt("latest speed / raw read (warm)", res["latest_warm_vs_raw"], ""))
    print("  " + _fmt("latest speed / raw read (cold)", res["latest_cold_vs_raw"], ""))
    print(
        f"done(): {res['done_ms']:.3f} ms vs floor {res['floor_ms']:.3f} ms per commit "
        f"({units} each)"
    )
    print("  " + _fmt("done time / floor time", res["done_vs_floor"], "(goal <= 1.1)"))
    return res


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--units", type=int, default=400)
    p.add_argument("--rounds", type=int, default=6)
    a = p.parse_args()
    main(a.mib, a.units, a.rounds)
