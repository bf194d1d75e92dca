"""A flow with one resumable task, run as a script by the Prefect re-run tests.

The task marks units 0..14 done; with FK_HOLD_AFTER=N it stops after unit N and waits to be
SIGKILLed by the test (a lost worker). The store is FK_STORE; the Prefect API is whatever the
environment says (none: Prefect's ephemeral server).
"""

from __future__ import annotations

import os
import threading

from prefect import flow

from prefect_blocks import resumable_task

HOLD = os.environ.get("FK_HOLD_AFTER")


@resumable_task(store=os.environ["FK_STORE"], key="demo/load/{day}")
def load(day: str, stage) -> list[int]:
    ran = []
    for unit in stage.pending(range(15)):
        stage.done(unit)
        ran.append(unit)
        print(f"UNIT {stage.epoch} {unit}", flush=True)
        if HOLD is not None and unit == int(HOLD):
            threading.Event().wait(300)  # the test SIGKILLs us here
            os._exit(3)  # never killed: the test has failed
    return ran


@flow(name="faultkit-rerun")
def etl(day: str = "2024-01-01") -> list[int]:
    return load(day)


if __name__ == "__main__":
    print("RESULT", etl(), flush=True)
