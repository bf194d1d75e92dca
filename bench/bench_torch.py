"""TrainingCheckpointer against torch.save/torch.load, measured in the same process.

A 4-layer 2048-wide MLP with AdamW: 16.8 M parameters, 201 MB of parameters + optimizer
state, on a ``file://`` store in a temp folder. Prints and returns:

* ``sync_save_ratio``: (torch.save to a new file + fsync + rename) time / ``save(wait=True)``
  time (>= 1: faster). Both write a new file each time: overwriting a file in place would
  reuse its pages, which neither an atomic torch.save nor a snapshot can;
* ``restore_ratio``: (torch.load + load_state_dict + the first step) time / (``restore()``
  + the first step) time, each in a fresh process whose optimizer has no state yet (a
  restore follows a restart); ``restore_stepped_ratio`` the same after one training step;

Save and restore run in ABBA order; each ratio is the median, with the range over pairs.
* ``async_pause_ratio``: training-loop pause of an async save / sync save time (<= 0.15);
* ``steady_ratio``: steps/s with one save per ``steady_seconds`` window / steps/s without,
  in windows taking turns (ABBA); the median of the pairs' ratios.

Torch runs on one thread (on 2 cores the other is left to the background writer, as a GPU
trainer leaves its CPU cores). Run: ``python bench/bench_torch.py [steady_seconds]``.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from faultkit import CheckpointStore
from faultkit.torch import TrainingCheckpointer

WIDTH, LAYERS, BATCH = 2048, 4, 32


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(LAYERS):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, opt


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    x = torch.randn(BATCH, WIDTH)
    loss = model(x).square().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    n = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for s in opt.state.values():
        n += sum(t.numel() * t.element_size() for t in s.values() if isinstance(t, torch.Tensor))
    return n


def _torch_save(model: torch.nn.Module, opt: torch.optim.Optimizer, path: str) -> float:
    """The careful way: a new file, fsync'd, renamed over the previous one."""
    t0 = time.perf_counter()
    with open(path + ".tmp", "wb") as f:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return time.perf_counter() - t0


def _torch_load(model: torch.nn.Module, opt: torch.optim.Optimizer, path: str) -> float:
    t0 = time.perf_counter()
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return time.perf_counter() - t0


def _child_restore(kind: str, root: str, path: str, stepped: bool = False) -> None:
    """In a fresh process: build the model and optimizer, then time one restore of ``kind``
    together with the first training step after it (work a restore leaves undone lands in
    that step); prints seconds. A restarted trainer restores before its first step, so its
    optimizer has no state yet; ``stepped`` takes one step first, so that state of the same
    shapes is already allocated (and freed by the load): memory the load can reuse."""
    torch.set_num_threads(1)
    model, opt = _model()
    if stepped:
        _step(model, opt)
    if kind == "torch.load":
        t0 = time.perf_counter()
        _torch_load(model, opt, path)
        _step(model, opt)
        print(time.perf_counter() - t0)
        return
    store = CheckpointStore(f"file://{root}/store")
    with store.stage("bench/torch") as stage:
        ckpt = TrainingCheckpointer(
            stage, model=model, optimizer=opt, every_steps=10**9, check_data_position=False
        )
        t0 = time.perf_counter()
        ckpt.restore()
        _step(model, opt)
        print(time.perf_counter() - t0)
        ckpt.close()


def _restore_in_child(kind: str, root: str, path: str, stepped: bool = False) -> float:
    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import sys; sys.path.insert(0, {here!r}); import bench_torch; "
        f"bench_torch._child_restore({kind!r}, {root!r}, {path!r}, {stepped!r})"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return float(out.stdout.strip().splitlines()[-1])


def _rate(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    seconds: float,
    ckpt: TrainingCheckpointer | None,
    first: int,
) -> tuple[float, int, int]:
    """Train for ``seconds``; with ``ckpt``, one async save after the window's first step
    (its background copy and write overlap the rest of the window)."""
    steps = saves = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        _step(model, opt)
        if ckpt is not None and steps == 0:
            ckpt.save(first)
            saves += 1
        steps += 1
    return steps / (time.perf_counter() - t0), steps, saves


def main(
    steady_seconds: float = 10.0, repeat: int = 6, restore_repeat: int = 4, steady_pairs: int = 4
) -> dict[str, Any]:
    """Run every measurement; returns the ratios and the raw timings (seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tempfile.mkdtemp(prefix="fk-bench-torch-")
    try:
        model, opt = _model()
        _step(model, opt)  # creates the optimizer state
        size = _state_bytes(model, opt)
        store = CheckpointStore(f"file://{root}/store")
        path = os.path.join(root, "baseline.pt")
        with store.stage("bench/torch") as stage:
            kw: dict[str, Any] = {
                "model": model,
                "optimizer": opt,
                "keep": 2,
                "check_data_position": False,
            }
            sync = TrainingCheckpointer(stage, every_steps=10**9, async_save=False, **kw)
            base_save, our_save, base_load, our_load = [], [], [], []
            # One unmeasured pair first: the first 400 MB written in a process land on page
            # cache this VM has not touched yet, and took 0.6 s a save on both sides against
            # 0.1-0.2 s after; ABBA order alone left whichever side met more of that slower.
            _torch_save(model, opt, path)
            sync.save(0, wait=True)
            sync.wait()
            for i in range(repeat):  # ABBA: each side goes first in turn
                for side in ("base", "ours") if i % 2 == 0 else ("ours", "base"):
                    if side == "base":
                        base_save.append(_torch_save(model, opt, path))
                        continue
                    t0 = time.perf_counter()
                    sync.save(i + 1, wait=True)
                    our_save.append(time.perf_counter() - t0)
                    sync.wait()  # retention runs in the background; not part of the save
            sync.close()
        # Each restore in a fresh process, as after a crash: in one process a repeated load
        # would reuse memory freed by the previous one, which a restart never can. (Each
        # claims the stage, as a restarted attempt does.)
        base_stepped: list[float] = []
        our_stepped: list[float] = []
        for stepped, base, ours in (
            (False, base_load, our_load),
            (True, base_stepped, our_stepped),
        ):
            for i in range(restore_repeat):
                for side in ("base", "ours") if i % 2 == 0 else ("ours", "base"):
                    kind = "torch.load" if side == "base" else "restore"
                    t = _restore_in_child(kind, root, path, stepped)
                    (base if side == "base" else ours).append(t)
        with store.stage("bench/torch") as stage:
            asyn = TrainingCheckpointer(stage, every_steps=10**9, async_save=True, **kw)
            pauses = []
            for i in range(repeat + 1):  # the first one allocates the staging buffer
                t0 = time.perf_counter()
                asyn.save(100 + i)
                call = time.perf_counter() - t0
                # The loop's pause also counts any wait of the next optimizer step for the
                # background copy of parameters and optimizer state.
                _step(model, opt)
                pauses.append(call + asyn.last_save.get("stall_s", 0.0))
                asyn.wait()
            asyn.close()
            # Steady training in windows of ``steady_seconds`` each, checkpointing off and
            # on in turn (ABBA): this VM's speed drifts by 10-30% over a minute, so one
            # long "on" run between two "off" runs measured mostly the drift. Each "on"
            # window saves once, after its first step: a save every ``steady_seconds``.
            steady = TrainingCheckpointer(stage, every_steps=10**9, async_save=True, **kw)
            off_rates, on_rates, saves, first = [], [], 0, 1000
            for i in range(steady_pairs):
                for side in ("off", "on") if i % 2 == 0 else ("on", "off"):
                    if side == "off":
                        off_rates.append(_rate(model, opt, steady_seconds, None, 0)[0])
                        continue
                    rate, steps, n = _rate(model, opt, steady_seconds, steady, first)
                    steady.wait()  # nothing of it spills into the next window
                    on_rates.append(rate)
                    first, saves = first + steps, saves + n
            steady.close()
        med = statistics.median

        def spread(base: list[float], ours: list[float]) -> list[float]:
            ratios = [b / o for b, o in zip(base, ours, strict=True)]
            return [min(ratios), max(ratios)]

        out = {
            "state_mb": round(size / 1e6, 1),
            "torch_save_fsync_s": med(base_save),
            "sync_save_s": med(our_save),
            "sync_save_ratio": med(base_save) / med(our_save),
            "sync_save_ratio_range": spread(base_save, our_save),
            "torch_load_s": med(base_load),
            "restore_s": med(our_load),
            "restore_ratio": med(base_load) / med(our_load),
            "restore_ratio_range": spread(base_load, our_load),
            "torch_load_stepped_s": med(base_stepped),
            "restore_stepped_s": med(our_stepped),
            "restore_stepped_ratio": med(base_stepped) / med(our_stepped),
            "restore_stepped_ratio_range": spread(base_stepped, our_stepped),
            "async_pause_s": med(pauses[1:]),
            "async_first_pause_s": pauses[0],
            "async_pause_ratio": med(pauses[1:]) / med(our_save),
            "steps_per_s_off": med(off_rates),
            "steps_per_s_on": med(on_rates),
            "steady_saves": saves,
            "steady_ratio": med([a / b for a, b in zip(on_rates, off_rates, strict=True)]),
            "steady_ratio_range": spread(on_rates, off_rates),  # on / off, as the ratio
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
        torch.set_num_threads(threads)
    print(f"state: {out['state_mb']} MB (parameters + AdamW state), file:// store, 1 torch thread")
    print(
        f"sync save   {out['sync_save_s']:.3f} s vs torch.save+fsync+rename "
        f"{out['torch_save_fsync_s']:.3f} s  ratio {out['sync_save_ratio']:.2f}x "
        f"(range {out['sync_save_ratio_range'][0]:.2f}-{out['sync_save_ratio_range'][1]:.2f}; "
        ">= 1.0)"
    )
    print(
        f"restore+1st step {out['restore_s']:.3f} s vs torch.load+load_state_dict+1st step "
        f"{out['torch_load_s']:.3f} s  ratio {out['restore_ratio']:.2f}x "
        f"(range {out['restore_ratio_range'][0]:.2f}-{out['restore_ratio_range'][1]:.2f}; >= 1.0)"
    )
    lo, hi = out["restore_stepped_ratio_range"]
    print(
        f"  the same after one step (optimizer state already allocated): "
        f"{out['restore_stepped_s']:.3f} s vs {out['torch_load_stepped_s']:.3f} s  "
        f"ratio {out['restore_stepped_ratio']:.2f}x (range {lo:.2f}-{hi:.2f})"
    )
    print(
        f"async pause {out['async_pause_s']:.3f} s (first {out['async_first_pause_s']:.3f} s) "
        f"= {out['async_pause_ratio']:.3f} of a sync save (<= 0.15)"
    )
    lo, hi = out["steady_ratio_range"]
    print(
        f"steady      {out['steps_per_s_on']:.2f} steps/s in {steady_pairs} windows of "
        f"{steady_seconds:.0f} s with a save each ({out['steady_saves']} saves) vs "
        f"{out['steps_per_s_off']:.2f} off, interleaved  ratio {out['steady_ratio']:.3f} "
        f"(range {lo:.3f}-{hi:.3f}; >= 0.95)"
    )
    return out


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 10.0)
