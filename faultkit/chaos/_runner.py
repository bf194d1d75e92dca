"""Run a function in a child process, SIGKILL it at chosen moments, retry until it finishes.

The child reports its progress to the parent through a small file: ``s`` when it claims a
stage, ``c`` for every committed unit or snapshot, ``r`` when a claim resumed earlier
progress. By default a kill waits for the attempt's first commit, so it lands on a stage that
is really at work, and the report counts the resumes that followed.
"""

from __future__ import annotations

import contextlib
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


_COMMITS = frozenset({"done.committed", "save.committed"})


@dataclass(frozen=True, slots=True)
class ChildResult:
    """How one child run ended.

    Attributes:
        returncode: the child's exit status (negative: killed by that signal).
        killed: ended by SIGKILL.
        result: the function's return value when it finished.
        error: repr of the exception it raised, if any.
        seconds: how long it ran.
        claimed: it had claimed a stage (when killed: before the kill).
        commits: units and snapshots it committed.
        resumed: one of its claims resumed an earlier attempt's progress.
    """

    returncode: int
    killed: bool
    result: Any = None
    error: str | None = None
    seconds: float = 0.0
    claimed: bool = False
    commits: int = 0
    resumed: bool = False


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

    @property
    def kills_mid_stage(self) -> int:
        """Kills that landed while the attempt held a claimed stage."""
        return sum(1 for a in self.attempts if a.killed and a.claimed)

    @property
    def resumes(self) -> int:
        """Attempts that resumed progress an earlier attempt left."""
        return sum(1 for a in self.attempts if a.resumed)


def _watch_progress(path: str) -> None:
    """In the child: append s/c/r to ``path`` as stages are claimed, commit and resume."""
    from .. import _failpoints
    from .._events import subscribe

    f = open(path, "ab", buffering=0)  # open for the child's whole life
    marks = {"stage.claimed": b"s", **dict.fromkeys(_COMMITS, b"c")}

    def on_hit(name: str) -> None:
        mark = marks.get(name)
        if mark:
            f.write(mark)

    _failpoints.watch(on_hit)
    subscribe(lambda e: f.write(b"r") if e.kind == "resumed" else None)


def _child(
    fn: Callable[..., Any], args: tuple, kwargs: dict, out: str, env: dict, progress: str
) -> None:
    os.environ.update(env)
    if "FAULTKIT_FAILPOINTS" in env:
        from .. import _failpoints

        _failpoints.disarm()
        _failpoints._armed.update(_failpoints._parse(env["FAULTKIT_FAILPOINTS"]))
    _watch_progress(progress)
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
    open(out + ".progress", "wb").close()
    proc = mp.get_context("spawn").Process(
        target=_child,
        args=(fn, args, kwargs, out, dict(env or {}), out + ".progress"),
        daemon=False,
    )
    proc.start()
    return proc, out


def _progress(out: str) -> bytes:
    try:
        with open(out + ".progress", "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def _finish(proc: Any, out: str, t0: float, seen: bytes | None = None) -> ChildResult:
    """How the child ended; ``seen`` is its progress at the moment it was killed."""
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
    marks = _progress(out) if seen is None else seen
    with contextlib.suppress(FileNotFoundError):
        os.unlink(out + ".progress")
    return ChildResult(
        code,
        code == -signal.SIGKILL,
        result,
        error,
        time.monotonic() - t0,
        claimed=b"s" in marks,
        commits=marks.count(b"c"),
        resumed=b"r" in marks,
    )


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

    Each attempt waits until ``ready()`` is true (default: the attempt committed its first
    unit or snapshot, so the kill lands on a stage at work), sleeps a random
    ``0..max_delay`` seconds, and kills the child with SIGKILL if it is still running. The
    next attempt starts at once, as an orchestrator's retry would. After ``kills`` kills
    landed, the last attempt runs to completion.

    Returns:
        a :class:`ChaosReport`: ``report.kills`` counts the kills that really landed,
        ``report.kills_mid_stage`` those that hit a claimed stage, and ``report.resumes``
        the attempts that resumed the progress of an earlier one. ``kills == resumes``
        says every kill was followed by a resume.

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
        seen: bytes | None = None
        if report.kills < kills:
            is_ready = ready if ready is not None else (lambda out=out: b"c" in _progress(out))
            while proc.is_alive() and not is_ready():
                if time.monotonic() > deadline:
                    proc.kill()
                    raise TimeoutError("the child never became ready to be killed")
                time.sleep(0.01)
            time.sleep(rnd.uniform(0.0, max_delay))
            if proc.is_alive():
                seen = _progress(out)
                proc.kill()
                report.kill_times.append(time.monotonic() - t0)
        proc.join(max(1.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(30)
            raise TimeoutError(f"{fn.__name__} did not finish within {timeout:.0f} s")
        res = _finish(proc, out, t0, seen)
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
    early = sum(1 for a in report.attempts if not a.killed)
    raise RuntimeError(
        f"{fn.__name__}: {report.kills} of {kills} kills landed in {limit} attempts; "
        f"{early} attempt(s) finished before a kill could land. A kill waits for the "
        "attempt's first committed unit or snapshot (or for ready()): give the job more "
        "units, or pass ready= to choose the moment"
    )
