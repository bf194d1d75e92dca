"""faultkit_train: a PyTorch training stage that resumes bitwise-identically after worker loss.

``train`` checkpoints model, optimizer, LR scheduler, RNGs and data position every
``every_steps`` steps through ``faultkit.torch.TrainingCheckpointer``; a retry restores the
newest valid snapshot and continues, so the final weights equal an uninterrupted run's.
``verify`` recomputes that run in-process and compares the SHA-256 of the weights.

Configuration: connection ``faultkit_default`` (store and alert URLs, see faultkit_etl),
params ``steps``, ``every_steps``, ``seed``, ``step_delay`` (seconds per step), ``verify`` and
``journal`` (a file to which each step start appends ``step <n> <pid>``); env
``FAULTKIT_DEMO_RETRY_WAIT`` (seconds before a retry, default 5) and ``FAULTKIT_DEMO_ATTEMPTS``
(tries per task, default 3).
"""

from __future__ import annotations

import os
from datetime import datetime

from airflow.sdk import DAG, Param, task

from airflow_provider.notifications import FaultkitNotifier
from faultkit import RetryPolicy

RETRY = RetryPolicy(
    on=(ConnectionError, TimeoutError),
    attempts=int(os.environ.get("FAULTKIT_DEMO_ATTEMPTS", "3")),
    wait_initial=float(os.environ.get("FAULTKIT_DEMO_RETRY_WAIT", "5")),
    wait_max=60.0,
    wait_jitter=0.0,
)
NOTIFY = FaultkitNotifier()

with DAG(
    dag_id="faultkit_train",
    schedule=None,
    start_date=datetime(2024, 1, 1),
    catchup=False,
    params={
        "steps": Param(60, type="integer", minimum=1),
        "every_steps": Param(10, type="integer", minimum=1),
        "seed": Param(0, type="integer"),
        "step_delay": Param(0.0, type="number", minimum=0),
        "verify": Param(True, type="boolean"),
        "journal": Param(None, type=["null", "string"]),
    },
    default_args={"on_retry_callback": NOTIFY, "on_failure_callback": NOTIFY},
    on_failure_callback=NOTIFY,
    tags=["faultkit", "example"],
    doc_md=__doc__,
) as dag:

    @task.resumable(retry=RETRY)
    def train(*, stage, params: dict | None = None) -> str:
        """Train, checkpointing every ``every_steps``; returns the weights' SHA-256."""
        from faultkit.demo import train as run_training  # torch is imported here, not at parse

        journal, pid = params["journal"], os.getpid()

        def on_step(step: int) -> None:
            if journal:
                with open(journal, "a") as f:
                    f.write(f"step {step} {pid}\n")

        return run_training(
            stage,
            steps=int(params["steps"]),
            every_steps=int(params["every_steps"]),
            seed=int(params["seed"]),
            step_delay=float(params["step_delay"]),
            on_step=on_step,
        )

    @task
    def verify(digest: str, params: dict | None = None) -> str:
        """Fail the run unless the weights equal an uninterrupted run's, bit for bit."""
        if not params["verify"]:
            return digest
        from faultkit.demo import reference_train

        want = reference_train(int(params["steps"]), int(params["seed"]))
        if digest != want:
            raise ValueError(f"weights differ from an uninterrupted run: {digest} != {want}")
        return digest

    verify(train())
