"""Runs demo trainings in forked children and SIGKILLs them as planned (torch imported once).

Reads one JSON job per stdin line, writes one JSON result per stdout line. A job::

    {"store": url, "key": k, "steps": n, "every": e, "seed": s, "async": bool, "delay": secs,
     "kills": [plan, ...], "mlflow": {"uri": tracking_uri, "experiment": name} (optional)}

Each plan kills one incarnation of the run; the incarnation after the last plan runs to the
end. Plans: {"kind": "time", "step": k, "after": secs} (this process SIGKILLs the child once
it reported step k, after `after` seconds) or {"kind": "fp", "point": name, "nth": n} (the
child arms a faultkit failpoint that SIGKILLs it, e.g. in the middle of a background write).
The parent kills only its own unreaped child, so a pid can never belong to someone else.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
import time

import numpy  # noqa: F401  (imported before fork, like torch)
import torch
import torch._dynamo  # noqa: F401  (the first optimizer imports it: seconds, once, here)

import faultkit.torch
from faultkit import CheckpointStore, _failpoints
from faultkit.demo._train import _run

DEADLINE = 60.0


def child(job: dict, plan: dict | None, wfd: int) -> None:
    def say(event: str, value: object) -> None:
        os.write(wfd, (json.dumps([event, value]) + "\n").encode())

    if plan and plan["kind"] == "fp":
        _failpoints.arm(plan["point"], "kill", plan["nth"])
    store = CheckpointStore(job["store"])
    with store.stage(job["key"]) as stage, contextlib.ExitStack() as stack:
        tracking = None
        if job.get("mlflow"):
            m = job["mlflow"]
            tracking = stack.enter_context(
                faultkit.torch.MlflowRun(stage, experiment=m["experiment"], tracking_uri=m["uri"])
            )
        out = _run(
            stage,
            steps=job["steps"],
            every_steps=job["every"],
            seed=job["seed"],
            step_delay=job["delay"],
            async_save=job["async"],
            keep=2,
            on_event=lambda event, step: say(event, step),
            tracking=tracking,
        )
    say("result", out)


def incarnation(job: dict, plan: dict | None) -> dict:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.dup2(2, 1)  # stdout carries the parent's results; the child's prints go to stderr
        code = 0
        try:
            child(job, plan, w)
        except BaseException as exc:  # report, never return into the parent's loop
            os.write(w, (json.dumps(["error", repr(exc)]) + "\n").encode())
            code = 1
        os._exit(code)
    os.close(w)
    events: list = []
    buf = b""
    killed = False
    kill_at: float | None = None
    deadline = time.monotonic() + DEADLINE
    eof = False
    while not eof and time.monotonic() < deadline:
        timeout = 0.5 if kill_at is None else max(0.0, kill_at - time.monotonic())
        ready, _, _ = select.select([r], [], [], timeout)
        if ready:
            data = os.read(r, 65536)
            if not data:
                eof = True
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                ev = json.loads(line)
                events.append(ev)
                if (
                    plan
                    and plan["kind"] == "time"
                    and kill_at is None
                    and ev[0] == "step"
                    and ev[1] >= plan["step"]
                ):
                    kill_at = time.monotonic() + plan["after"]
        if kill_at is not None and not killed and time.monotonic() >= kill_at:
            os.kill(pid, signal.SIGKILL)  # our own child, not yet reaped: cannot be reused
            killed = True
    if not eof:
        os.kill(pid, signal.SIGKILL)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return {
        "events": events,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "parent_killed": killed,
        "timed_out": not eof,
    }


def main() -> None:
    for line in sys.stdin:
        job = json.loads(line)
        if job.get("mlflow"):
            import mlflow.tracking  # noqa: F401  (once, before the forks)
        runs = [incarnation(job, plan) for plan in job["kills"]]
        runs.append(incarnation(job, None))
        sys.stdout.write(json.dumps({"id": job.get("id"), "incarnations": runs}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
