"""TrainingCheckpointer: the whole training state, saved in the background, resumed bitwise."""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from .._errors import CorruptCheckpointError
from .._store import Stage
from . import _rng
from ._dist import World
from ._format import Encoded, clone_tensors, decode, encode
from ._sampler import ResumableSampler

__all__ = ["EXIT_PREEMPTED", "FORMAT", "ResumeWarning", "TrainingCheckpointer"]

log = logging.getLogger("faultkit.torch")

FORMAT = "faultkit.torch/1"
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later", which is what an evicted trainer wants


class ResumeWarning(UserWarning):
    """A resume that works but will not match an uninterrupted run bit for bit."""


def _stateful(name: str, obj: Any) -> Any:
    has = all(callable(getattr(obj, m, None)) for m in ("state_dict", "load_state_dict"))
    if obj is not None and not has:
        raise TypeError(
            f"{name} is a {type(obj).__qualname__}, which has no state_dict()/load_state_dict(); "
            "pass objects that do (or wrap it in one)"
        )
    return obj


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _sole_owner(data: Any) -> bool:
    """True if ``data`` is referenced only by the caller's one variable (CPython): bytes
    nobody else holds, or a writable private (copy-on-write) map of the file. Tensors left
    over it may be written to; over a buffer the store shares (memory://) they may not."""
    getrefcount = getattr(sys, "getrefcount", None)
    # the caller's variable, this function's argument, getrefcount's argument
    if getrefcount is None or getrefcount(data) > 3:
        return False
    return type(data) is bytes or (type(data) is memoryview and not data.readonly)


def _optimizer_state(opt: Any, state: Any) -> Any:
    """``state`` for ``opt.load_state_dict`` with copies of the tensors it keeps as given.

    A ``torch.optim.Optimizer`` moves each state tensor to its parameter's device and dtype
    (a copy where they differ: a GPU parameter's state goes to the GPU) and keeps the rest,
    and ``step`` counters, as given. Only those it keeps are copied here, so a GPU
    optimizer's state is not first copied in host memory. Anything else gets copies of all.
    """
    groups = state.get("param_groups") if isinstance(state, dict) else None
    saved = state.get("state") if isinstance(state, dict) else None
    if not isinstance(opt, torch.optim.Optimizer) or not isinstance(groups, list):
        return clone_tensors(state)
    if not isinstance(saved, dict):
        return clone_tensors(state)
    try:
        ids = [i for g in groups for i in g["params"]]
        params = dict(zip(ids, (p for g in opt.param_groups for p in g["params"]), strict=False))
    except (TypeError, KeyError):
        return clone_tensors(state)  # malformed: load_state_dict says what is wrong

    def kept(param: torch.Tensor | None, k: Any, v: torch.Tensor) -> bool:
        """Whether load_state_dict keeps ``v`` as given (neither moves nor casts it)."""
        if param is None or k == "step":
            return True
        if v.device != param.device:
            return False
        return v.dtype == param.dtype or not param.is_floating_point()

    def entry(i: Any, s: Any) -> Any:
        if not isinstance(s, dict):
            return clone_tensors(s)
        p = params.get(i)
        out: dict[Any, Any] = {}
        for k, v in s.items():
            if not isinstance(v, torch.Tensor):
                out[k] = clone_tensors(v)
            else:
                out[k] = v.clone() if kept(p, k, v) else v
        return out

    out = dict(state)
    out["state"] = {i: entry(i, s) for i, s in saved.items()}
    return out


_WARNED_LOADERS: set[int] = set()


def _is_data_position(obj: Any) -> bool:
    from torch.utils.data import DataLoader, Sampler

    return (
        isinstance(obj, (ResumableSampler, Sampler, DataLoader))
        or type(obj).__name__ == "StatefulDataLoader"
        or bool(getattr(obj, "faultkit_data_position", False))
    )


class TrainingCheckpointer:
    """Saves and restores everything a training loop needs to resume bit for bit.

    The bundle: model, optimizer, LR scheduler, grad scaler, the step, every RNG (Python,
    NumPy, torch CPU and CUDA) and each ``extra`` object with ``state_dict()`` /
    ``load_state_dict()`` (samplers, ``StatefulDataLoader``, EMA weights, counters). It is
    written through ``stage.save`` (fenced, atomic, checksummed) in a pickle-free format.

    ``step(s)`` saves after step ``s`` when ``(s + 1) % every_steps == 0`` or when
    ``every_seconds`` have passed since the last save. With ``async_save`` the state is copied
    to a CPU buffer, the call returns, and a background thread writes it; the next save waits
    for it, and a background failure is raised by the next ``step()``, ``save()`` or
    ``close()``. Under ``torch.distributed`` every rank calls the same methods at the same
    steps: rank 0 writes (claiming the stage if it is not claimed), each rank's RNG and data
    position travel with it, and every rank restores.

    Args:
        stage: the stage to save to. Under DDP, claim it on rank 0 only (or let this class).
        model: a module (a DDP wrapper is fine; restore into the same kind).
        optimizer: its optimizer.
        scheduler: an LR scheduler.
        scaler: a ``torch.amp.GradScaler``.
        extra: more objects with ``state_dict()`` / ``load_state_dict()``, by name.
        every_steps: save after every N-th step.
        every_seconds: save when this many seconds passed since the last save.
        keep: snapshots to keep (older ones are removed in the background); None keeps all.
        async_save: write in a background thread (the loop pauses only to copy the state).
            Parameters and optimizer state are copied in the background and the optimizer's
            next ``step()`` waits for that copy; code that changes parameters in place
            outside ``optimizer.step()`` should call :meth:`wait` first.
        config_hash: a hash of the run's configuration, recorded and compared on restore.
        save_on_sigterm: on SIGTERM, finish the current step, save, and exit with
            ``exit_code`` (for spot/pod eviction notices). Needs the main thread.
        exit_code: the status of that exit (default 75, ``EX_TEMPFAIL``).
        check_data_position: warn on resume when no ``extra`` object records the data
            position (a mid-epoch resume would reuse or skip batches).
        per_rank_extra: names of ``extra`` objects whose state differs per rank; default:
            the samplers and data loaders. Other extras are saved from rank 0.
        distributed: None uses the default process group when one is initialised.
    """

    def __init__(
        self,
        stage: Stage,
        *,
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        scheduler: Any = None,
        scaler: Any = None,
        extra: Mapping[str, Any] | None = None,
        every_steps: int | None = None,
        every_seconds: float | None = None,
        keep: int | None = 3,
        async_save: bool = True,
        config_hash: str | None = None,
        save_on_sigterm: bool = False,
        exit_code: int = EXIT_PREEMPTED,
        check_data_position: bool = True,
        per_rank_extra: Iterable[str] | None = None,
        distributed: bool | None = None,
    ) -> None:
        if every_steps is None and every_seconds is None:
            raise ValueError("give every_steps and/or every_seconds: when should it save?")
        if every_steps is not None and int(every_steps) < 1:
            raise ValueError(f"every_steps must be >= 1, not {every_steps!r}")
        if every_seconds is not None and not every_seconds > 0:
            raise ValueError(f"every_seconds must be > 0, not {every_seconds!r}")
        if keep is not None and int(keep) < 1:
            raise ValueError(f"keep must be >= 1 (or None to keep all), not {keep!r}")
        self.stage = stage
        self.model = _stateful("model", model)
        self.optimizer = _stateful("optimizer", optimizer)
        self.scheduler = _stateful("scheduler", scheduler)
        self.scaler = _stateful("scaler", scaler)
        self.extra = {str(k): _stateful(f"extra[{k!r}]", v) for k, v in (extra or {}).items()}
        self.every_steps = int(every_steps) if every_steps is not None else None
        self.every_seconds = float(every_seconds) if every_seconds is not None else None
        self.keep = int(keep) if keep is not None else None
        self.async_save = async_save
        self.config_hash = config_hash
        self.exit_code = int(exit_code)
        self.check_data_position = check_data_position
        if per_rank_extra is None:
            self._per_rank = {k for k, v in self.extra.items() if _is_data_position(v)}
        else:
            self._per_rank = set(per_rank_extra)
            unknown = self._per_rank - set(self.extra)
            if unknown:
                raise ValueError(f"per_rank_extra names {sorted(unknown)!r}, not in extra")
        self._world = World(distributed)
        if self._world.rank == 0:
            stage.claim()
        elif stage.epoch:
            raise ValueError(
                f"rank {self._world.rank} claimed stage {stage.key!r}, which fences rank 0's "
                "writes. Claim it on rank 0 only: on the other ranks pass store.stage(key) "
                "without entering it."
            )
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None
        self._pending_step: int | None = None
        self._staging: torch.Tensor | None = None
        # Async saves copy parameters and optimizer state in the background; the optimizer's
        # next step() waits for that copy (they are the only tensors it changes in place).
        self._copied: threading.Event | None = None
        self._step_hook: Any = None
        if async_save and optimizer is not None:
            self._step_hook = optimizer.register_step_pre_hook(self._before_optimizer_step)
        self._last_step: int | None = None
        self._last_time = time.monotonic()
        self._closed = False
        self._preempt = False
        self._old_handler: Any = None
        self._sigterm = save_on_sigterm
        self.last_save: dict[str, Any] = {}
        if save_on_sigterm:
            if threading.current_thread() is not threading.main_thread():
                raise ValueError("save_on_sigterm=True needs the main thread (signal handlers)")
            self._old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    # -- public API -------------------------------------------------------------------

    @property
    def last_saved_step(self) -> int | None:
        """The step of the newest save begun by this object (or restored), else None."""
        return self._last_step

    def restore(self) -> int:
        """Load the newest valid snapshot into every object; returns the next step (0 if none).

        Raises:
            UnsafeCheckpointError: the newest snapshot would need pickle; nothing was loaded.
            CorruptCheckpointError: it is malformed, or ranks see different snapshots.
        """
        self._check_open()
        snap = self.stage.latest(mapped=True)
        step = snap.step if snap is not None else -1
        if self._world.on:
            lo, hi = self._world.min_max(step)
            if lo != hi:
                raise CorruptCheckpointError(
                    f"stage {self.stage.key!r}: ranks see different newest snapshots (steps "
                    f"{lo} to {hi}); check that every rank uses the same store"
                )
        self._last_time = time.monotonic()
        if snap is None:
            return 0
        # Tensors share the snapshot's buffer (on file:// a private map of the file); the
        # model copies from it, other objects get copies of what they would keep (_load).
        data = snap.data
        del snap
        private = _sole_owner(data)
        tree = decode(data)
        del data
        if not isinstance(tree, dict) or tree.get("format") != FORMAT:
            raise CorruptCheckpointError(
                f"stage {self.stage.key!r}: snapshot of step {step} is not a {FORMAT} bundle"
            )
        self._load(tree, step, private=private)
        self._last_step = step
        return step + 1

    def step(self, step: int) -> bool:
        """Call after each training step; saves when due. Returns True if it began a save.

        Raises:
            Exception: the error of a failed background save (e.g. ``StaleAttemptError``).
            SystemExit: after saving, when ``save_on_sigterm`` caught SIGTERM.
        """
        self._check_open()
        self._raise_background(block=False)
        step = int(step)
        due = self._due_steps(step)
        timed = self.every_seconds is not None and (
            time.monotonic() - self._last_time >= self.every_seconds
        )
        preempt = self._preempt
        if self._world.on and (self.every_seconds is not None or self._sigterm):
            # Clocks and signals differ per rank: agree, so every rank saves at the same step.
            t, p = self._world.max_ints(int(timed and self._world.rank == 0), int(preempt))
            timed, preempt = bool(t), bool(p)
        if preempt:
            self._exit_preempted(step)
        if (due or timed) and step != self._last_step:
            self._save(step, block=not self.async_save)
            return True
        return False

    def save(self, step: int, *, wait: bool = False) -> None:
        """Save now (every rank must call it); ``wait`` blocks until the snapshot is durable."""
        self._check_open()
        self._save(int(step), block=wait or not self.async_save)

    def wait(self) -> None:
        """Block until the background save (if any) is durable; raises its error."""
        self._raise_background(block=True)

    def close(self) -> None:
        """Wait for the pending save, stop the writer thread and restore the SIGTERM handler."""
        if self._closed:
            return
        self._closed = True
        try:
            self._raise_background(block=True)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            if self._sigterm and self._old_handler is not None:
                with contextlib.suppress(ValueError):
                    signal.signal(signal.SIGTERM, self._old_handler)
            if self._step_hook is not None:
                self._step_hook.remove()
                self._step_hook = None
            self._staging = None

    def __enter__(self) -> TrainingCheckpointer:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception:
            log.exception("stage %s: the background save failed as well", self.stage.key)

    def __repr__(self) -> str:
        return (
            f"TrainingCheckpointer({self.stage!r}, every_steps={self.every_steps}, "
            f"every_seconds={self.every_seconds}, keep={self.keep}, async_save={self.async_save})"
        )

    # -- saving -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")

    def _due_steps(self, step: int) -> bool:
        return self.every_steps is not None and (step + 1) % self.every_steps == 0

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._preempt = True

    def _exit_preempted(self, step: int) -> None:
        if step != self._last_step:
            self._save(step, block=True)
        else:
            self._raise_background(block=True)
        self.close()
        log.warning(
            "stage %s: SIGTERM received; saved step %d and exiting with status %d",
            self.stage.key,
            step,
            self.exit_code,
        )
        raise SystemExit(self.exit_code)

    def _collect(self, step: int) -> dict[str, Any] | None:
        """The bundle on rank 0 (None elsewhere); a collective under DDP."""
        w = self._world
        local = {
            "rng": _rng.capture(),
            "extra": {k: v.state_dict() for k, v in self.extra.items() if k in self._per_rank},
        }
        blobs: list[torch.Tensor] | None = None
        if w.on:
            enc = encode(local, what=f"rank {w.rank} state")
            raw = bytearray(b"".join(enc.chunks()))
            blobs = w.gather_bytes(torch.frombuffer(raw, dtype=torch.uint8))
            if w.rank != 0:
                return None
        tree: dict[str, Any] = {
            "format": FORMAT,
            "step": step,
            "world_size": w.size,
            "meta": self._meta(),
            "model": self.model.state_dict() if self.model is not None else None,
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "extra": {k: v.state_dict() for k, v in self.extra.items() if k not in self._per_rank},
        }
        if blobs is not None and w.on:
            tree["ranks"] = blobs
        else:
            tree["local"] = local
        return tree

    def _meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "torch": torch.__version__,
            "config_hash": self.config_hash,
            "wall_time": time.time(),
            "epoch": self.stage.epoch,
            "world_size": self._world.size,
        }

    def _save(self, step: int, *, block: bool) -> None:
        self._raise_background(block=True)
        t0 = time.perf_counter()
        tree = self._collect(step)
        self._last_step = step
        self._last_time = time.monotonic()
        if tree is None:
            return
        enc = encode(tree, what=f"stage {self.stage.key!r} step {step}")
        meta = dict(tree["meta"], bytes=enc.size)
        if block:
            self.stage.save(enc.chunks(), step=step, meta=meta)
            dt = time.perf_counter() - t0
            self.last_save = {"step": step, "bytes": enc.size, "pause_s": dt, "write_s": dt}
            if self.keep is not None:
                self._submit(self._gc)
            return
        staging = self._staging_for(enc.data_size)
        later = self._deferrable()
        enc.copy_into(staging, lambda t: _storage_ptr(t) not in later)
        pause = time.perf_counter() - t0
        self.last_save = {
            "step": step,
            "bytes": enc.size,
            "pause_s": pause,
            "write_s": None,
            "stall_s": 0.0,
        }
        copied = threading.Event()
        if not later:
            copied.set()
        self._copied = copied
        self._pending_step = step
        self._submit(self._copy_and_write, enc, staging, later, copied, step, meta, t0)

    def _deferrable(self) -> set[int]:
        """Storages the optimizer alone changes in place: parameters and optimizer state."""
        if self._step_hook is None or self.optimizer is None:
            return set()
        ptrs = {_storage_ptr(p) for g in self.optimizer.param_groups for p in g["params"]}
        for state in self.optimizer.state.values():
            ptrs.update(_storage_ptr(v) for v in state.values() if isinstance(v, torch.Tensor))
        return ptrs

    def _before_optimizer_step(self, *_: Any) -> None:
        copied = self._copied
        if copied is not None and not copied.is_set():
            t0 = time.perf_counter()
            copied.wait()
            self.last_save["stall_s"] = self.last_save.get("stall_s", 0.0) + (
                time.perf_counter() - t0
            )

    def _copy_and_write(
        self,
        enc: Encoded,
        staging: torch.Tensor,
        later: set[int],
        copied: threading.Event,
        step: int,
        meta: dict[str, Any],
        t0: float,
    ) -> None:
        try:
            if later:
                enc.copy_into(staging, lambda t: _storage_ptr(t) in later)
        finally:
            copied.set()  # never leave the optimizer waiting, even when the copy failed
        header_only = Encoded(enc.header, [], [], enc.data_size)
        self._write(header_only, staging, step, meta, t0)

    def _staging_for(self, size: int) -> torch.Tensor:
        # Reused across saves: the next save waits for this one, and fresh memory would cost
        # a page fault per 4 KiB inside the training loop's pause.
        if self._staging is None or self._staging.numel() < size:
            self._staging = None
            self._staging = torch.empty(
                max(size, 1), dtype=torch.uint8, pin_memory=torch.cuda.is_available()
            )
        return self._staging

    def _submit(self, fn: Any, *args: Any) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="faultkit-ckpt")
        self._pending = self._pool.submit(fn, *args)

    def _write(
        self, enc: Encoded, staging: torch.Tensor, step: int, meta: dict[str, Any], t0: float
    ) -> None:
        self.stage.save(enc.staged_chunks(staging), step=step, meta=meta)
        self.last_save["write_s"] = time.perf_counter() - t0
        if self.keep is not None:
            self._gc()

    def _gc(self) -> None:
        try:
            if self.keep is not None and len(self.stage.snapshots()) > self.keep:
                self.stage.store.gc(self.stage.key, keep=self.keep)
        except Exception:  # retention must never stop training
            log.exception("stage %s: removing old snapshots failed; will retry", self.stage.key)

    def _raise_background(self, *, block: bool) -> None:
        fut = self._pending
        if fut is None or (not block and not fut.done()):
            return
        self._pending = None
        step, self._pending_step = self._pending_step, None
        exc = fut.exception()
        if exc is not None:
            if step is not None:
                exc.add_note(f"(raised by the background save of step {step})")
            raise exc

    # -- restoring --------------------------------------------------------------------

    def _load(self, tree: dict[str, Any], step: int, *, private: bool) -> None:
        key = self.stage.key
        meta = tree.get("meta") or {}
        if meta.get("torch") != torch.__version__:
            warnings.warn(
                f"stage {key!r}: the snapshot of step {step} was written by torch "
                f"{meta.get('torch')!r}, this is {torch.__version__!r}; results may differ "
                "from an uninterrupted run",
                ResumeWarning,
                stacklevel=3,
            )
        if self.config_hash is not None and meta.get("config_hash") not in (None, self.config_hash):
            warnings.warn(
                f"stage {key!r}: the snapshot of step {step} was written with config hash "
                f"{meta.get('config_hash')!r}, this run has {self.config_hash!r}",
                ResumeWarning,
                stacklevel=3,
            )
        for name in ("model", "optimizer", "scheduler", "scaler"):
            obj = getattr(self, name)
            if obj is None:
                continue
            state = tree.get(name)
            if state is None:
                raise CorruptCheckpointError(
                    f"stage {key!r}: the snapshot of step {step} has no {name} state; it was "
                    f"saved without a {name}. Pass the same objects that saved it."
                )
            # A module copies into its own tensors. Other objects keep what they are given
            # (the optimizer updates its state in place), so they get tensors with memory of
            # their own: the snapshot is released after the load, and the optimizer's first
            # step writes to memory it owns. Sharing the map instead made that step copy
            # every page of its state on first write, 4 KB at a time, which cost more than
            # this copy (see the README's benchmark notes). Optimizer state it moves to
            # another device is copied by that move, not here (_optimizer_state).
            if name == "model":
                obj.load_state_dict(state)
            elif name == "optimizer" and private:
                obj.load_state_dict(_optimizer_state(obj, state))
            else:
                obj.load_state_dict(clone_tensors(state))
        local = self._local_state(tree, step)
        shared = tree.get("extra") or {}
        rank_extra = (local or {}).get("extra") or {}
        for name, obj in self.extra.items():
            state = rank_extra.get(name, shared.get(name))
            if state is None:
                warnings.warn(
                    f"stage {key!r}: the snapshot of step {step} has no state for "
                    f"extra[{name!r}]; it starts fresh",
                    ResumeWarning,
                    stacklevel=3,
                )
                continue
            obj.load_state_dict(clone_tensors(state))
        if local is not None:
            _rng.restore(local["rng"])
        self._warn_global_seed_loaders(step)
        if self.check_data_position and not any(_is_data_position(v) for v in self.extra.values()):
            warnings.warn(
                f"stage {key!r} resumed after step {step}, but no extra object records the "
                "data position: a mid-epoch resume reuses or skips batches, so the result "
                "differs from an uninterrupted run. Pass extra={'sampler': "
                "ResumableSampler(...)} (or a torchdata StatefulDataLoader), or "
                "check_data_position=False if the data has no position.",
                ResumeWarning,
                stacklevel=3,
            )

    def _warn_global_seed_loaders(self, step: int) -> None:
        """Warn once per loader that feeds a checkpointed sampler but seeds its epochs from
        the global torch RNG: the restored RNG stream would then be one draw off."""
        from torch.utils.data import BatchSampler, DataLoader

        samplers = {id(v) for v in self.extra.values() if isinstance(v, ResumableSampler)}
        if not samplers:
            return
        for obj in gc.get_objects():
            # type(), not isinstance(): isinstance also asks a non-match for its __class__,
            # which runs code in proxies (torch's deprecated reduce_op warns when asked).
            if not issubclass(type(obj), DataLoader) or obj.generator is not None:
                continue
            inner = obj.sampler
            if isinstance(obj.batch_sampler, BatchSampler):
                inner = obj.batch_sampler.sampler
            if id(inner) in samplers and id(obj) not in _WARNED_LOADERS:
                _WARNED_LOADERS.add(id(obj))
                warnings.warn(
                    f"stage {self.stage.key!r} resumed after step {step}, but a DataLoader "
                    "over its ResumableSampler has no generator=: it seeds every epoch from "
                    "the global torch RNG, which this restore just set, so the next epoch "
                    "shifts the random stream (dropout, augmentation) and the run is NOT "
                    "bit for bit. Build it as DataLoader(..., sampler=sampler, "
                    "generator=sampler.generator).",
                    ResumeWarning,
                    stacklevel=4,
                )

    def _local_state(self, tree: dict[str, Any], step: int) -> dict[str, Any] | None:
        w = self._world
        saved = int(tree.get("world_size") or 1)
        if saved != w.size:
            warnings.warn(
                f"stage {self.stage.key!r}: the snapshot of step {step} was written by "
                f"{saved} rank(s), this run has {w.size}; per-rank RNG and data positions are "
                f"restored for ranks below {saved} only, so the run will not match bit for bit",
                ResumeWarning,
                stacklevel=4,
            )
        if "ranks" in tree:
            blobs = tree["ranks"]
            if w.rank >= len(blobs):
                return None
            return decode(blobs[w.rank].numpy().tobytes())
        return tree.get("local") if w.rank == 0 or saved == 1 else None
