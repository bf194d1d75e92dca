"""Store benchmarks: ratios against baselines measured in the same process (file backend).

- save() of 256 MiB vs a raw write + fsync of the same bytes      (goal: speed >= 0.8x)
- latest() read + verify vs a raw read of the same file            (goal: speed >= 0.8x)
- done() vs create-exclusive + fsync + rename + dir fsync, 100 B   (goal: time <= 3x)

    python -m bench.bench_store [--mib 256] [--units 300]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

from faultkit import CheckpointStore


def _best(fn: Any, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _raw_write(path: str, data: bytes) -> None:
    # A checkpoint is a new file each time: the baseline writes a new file too (rewriting
    # a just-unlinked path is faster than any real checkpoint write and would flatter it).
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


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


def main(mib: int = 256, units: int = 300, repeat: int = 3) -> dict[str, float]:
    root = tempfile.mkdtemp(prefix="faultkit-bench-", dir=os.environ.get("FAULTKIT_BENCH_DIR"))
    try:
        data = os.urandom(mib << 20)
        store = CheckpointStore(f"file://{root}/store")
        stage = store.stage("bench/save").claim()
        raw_path = os.path.join(root, "raw.bin")
        raw_w, save, raw_r, latest = [], [], [], []
        for i in range(repeat):  # interleaved, so background load hits both alike
            raw_w.append(_best(lambda i=i: _raw_write(f"{raw_path}.{i}", data), 1))
            save.append(_best(lambda i=i: stage.save(data, step=i), 1))
            raw_r.append(_best(lambda i=i: _raw_read(f"{raw_path}.{i}"), 1))
            latest.append(_best(stage.latest, 1))
        t_raw_w, t_save, t_raw_r, t_latest = min(raw_w), min(save), min(raw_r), min(latest)

        folder = os.path.join(root, "floor")
        os.makedirs(folder)
        payload = b"x" * 100
        floor = []
        for i in range(units):
            t0 = time.perf_counter()
            _floor_commit(folder, i, payload)
            floor.append(time.perf_counter() - t0)
        dstage = store.stage("bench/done").claim()
        dones = []
        for i in range(units):
            t0 = time.perf_counter()
            dstage.done(i, {"rows": 100})
            dones.append(time.perf_counter() - t0)
        t_floor, t_done = statistics.median(floor), statistics.median(dones)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    res = {
        "save_MiB_s": mib / t_save,
        "raw_write_fsync_MiB_s": mib / t_raw_w,
        "save_speed_ratio": t_raw_w / t_save,
        "latest_MiB_s": mib / t_latest,
        "raw_read_MiB_s": mib / t_raw_r,
        "latest_speed_ratio": t_raw_r / t_latest,
        "done_ms": t_done * 1e3,
        "floor_ms": t_floor * 1e3,
        "done_time_ratio": t_done / t_floor,
        "done_per_s": 1 / t_done,
    }
    print(
        f"save() {mib} MiB: {res['save_MiB_s']:.0f} MiB/s vs raw write+fsync "
        f"{res['raw_write_fsync_MiB_s']:.0f} MiB/s -> speed ratio {res['save_speed_ratio']:.2f}"
        " (goal >= 0.8)"
    )
    print(
        f"latest() read+verify: {res['latest_MiB_s']:.0f} MiB/s vs raw read "
        f"{res['raw_read_MiB_s']:.0f} MiB/s -> speed ratio {res['latest_speed_ratio']:.2f}"
        " (goal >= 0.8)"
    )
    print(
        f"done(): {res['done_ms']:.3f} ms vs floor {res['floor_ms']:.3f} ms -> time ratio "
        f"{res['done_time_ratio']:.2f} (goal <= 3.0); {res['done_per_s']:.0f} commits/s"
    )
    return res


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--units", type=int, default=300)
    a = p.parse_args()
    main(a.mib, a.units)
