"""Run a function in a child process, SIGKILL it at chosen moments, retry until it finishes."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import random
import signal
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ChaosReport", "ChildResult", "run_in_child", "run_with_kills"]


@dataclass(frozen=True, slots=True)
class ChildResult:
    """How one child run ended."""

    returncode: int
    killed: bool  # ended by SIGKILL
    result: Any = None  # the function's return value when it finished
    error: str | None = None  # repr of the exception it raised, if any
    seconds: float = 0.0


@dataclass
class ChaosReport:
    """What :func:`run_with_kills` did: every attempt, the kills that landed, the result."""

    attempts: list[ChildResult] = field(default_factory=list)
    kill_times: list[float] = field(default_factory=list)  # seconds into each killed attempt
    result: Any = None

    @property
    def kills(self) -> int:
        """Attempts that really ended by SIGKILL."""
        return sum(1 for a in self.attempts if a.killed)


def _child(fn: Callable[..., Any], args: tuple, kwargs: dict, out: str, env: dict) -> None:
    os.environ.update(env)
    if "FAULTKIT_FAILPOINTS" in env:
        from .. import _failpoints

        _failpoints.disarm()
        _failpoints._armed.update(_failpoints._parse(env["FAULTKIT_FAILPOINTS"]))
    try:
        value = fn(*args, **kwargs)
        payload = ("ok", value)
    except BaseException as exc:
        payload = ("error", repr(exc))
    with open(out, "wb") as f:
        pickle.dump(payload, f)


def _start(fn, args, kwargs, env) -> tuple[Any, str]:
    fd, out = tempfile.mkstemp(prefix="faultkit-chaos-", suffix=".pkl")
    os.close(fd)
    os.unlink(out)
    proc = mp.get_context("spawn").Process(
        target=_child, args=(fn, args, kwargs, out, dict(env or {})), daemon=False
    )
    proc.start()
    return proc, out


def _finish(proc: Any, out: str, t0: float) -> ChildResult:
    proc.join()
    code = proc.exitcode if proc.exitcode is not None else -1
    result = error = None
    try:
        with open(out, "rb") as f:
            status, value = pickle.load(f)
        os.unlink(out)
        if status == "ok":
            result = value
        else:
            error = value
    except FileNotFoundError:
        pass
    return ChildResult(code, code == -signal.SIGKILL, result, error, time.monotonic() - t0)


def run_in_child(
    fn: Callable[..., Any],
    *args: Any,
    env: Mapping[str, str] | None = None,
    timeout: float = 600.0,
    **kwargs: Any,
) -> ChildResult:
    """Run ``fn(*args, **kwargs)`` in a fresh (spawned) process and wait for it.

    ``fn`` must be importable (a module-level function). ``env`` is applied in the child
    before ``fn`` runs, e.g. ``{"FAULTKIT_FAILPOINTS": "save.blob_partial=kill"}``.
    """
    t0 = time.monotonic()
    proc, out = _start(fn, args, kwargs, env)
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(30)
        raise TimeoutError(f"{fn.__name__} did not finish in {timeout:.0f} s; it was killed")
    return _finish(proc, out, t0)


def run_with_kills(
    fn: Callable[..., Any],
    *args: Any,
    kills: int = 3,
    seed: int = 0,
    ready: Callable[[], bool] | None = None,
    max_delay: float = 0.5,
    env: Mapping[str, str] | None = None,
    timeout: float = 600.0,
    max_attempts: int | None = None,
    on_kill: Callable[[int, float], None] | None = None,
    **kwargs: Any,
) -> ChaosReport:
    """Run ``fn`` in a child, SIGKILL it ``kills`` times at random moments, then let it finish.

    Each attempt waits until ``ready()`` is true (e.g. "a new unit was committed since the
    last attempt"; default: the child is alive), sleeps a random ``0..max_delay`` seconds,
    and kills the child with SIGKILL if it is still running. The next attempt starts at once,
    as an orchestrator's retry would. After ``kills`` kills landed, the last attempt runs
    to completion.

    Returns:
        a :class:`ChaosReport`; ``report.kills`` counts the kills that really landed.

    Raises:
        RuntimeError: the function raised instead of finishing, or attempts ran out.
        TimeoutError: the whole run exceeded ``timeout`` seconds.
    """
    rnd = random.Random(seed)
    report = ChaosReport()
    deadline = time.monotonic() + timeout
    limit = max_attempts if max_attempts is not None else kills * 5 + 5
    while len(report.attempts) < limit:
        t0 = time.monotonic()
        proc, out = _start(fn, args, kwargs, env)
        if report.kills < kills:
            while proc.is_alive() and not (ready() if ready else True):
                if time.monotonic() > deadline:
                    proc.kill()
                    raise TimeoutError("the child never became ready to be killed")
                time.sleep(0.01)
            time.sleep(rnd.uniform(0.0, max_delay))
            if proc.is_alive():
                proc.kill()
                report.kill_times.append(time.monotonic() - t0)
        proc.join(max(1.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(30)
            raise TimeoutError(f"{fn.__name__} did not finish within {timeout:.0f} s")
        res = _finish(proc, out, t0)
        report.attempts.append(res)
        if res.killed and on_kill is not None:
            on_kill(len(report.attempts), res.seconds)
        if res.error is not None:
            n = len(report.attempts)
            raise RuntimeError(f"{fn.__name__} raised in attempt {n}: {res.error}")
        if not res.killed and res.returncode == 0 and report.kills >= kills:
            report.result = res.result
            return report
        if not res.killed and res.returncode != 0:
            raise RuntimeError(f"{fn.__name__} exited with status {res.returncode}")
    raise RuntimeError(
        f"{fn.__name__} did not finish after {limit} attempts ({report.kills} kills landed)"
    )
