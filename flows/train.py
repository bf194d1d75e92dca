"""Training flow: one resumable task trains the demo model, checkpointing every few steps.

Killed at any step and re-run, it resumes from the newest verified checkpoint and ends with
weights bitwise equal to an uninterrupted run (the returned digest says so).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from faultkit import demo
from faultkit.demo._jobs import append_journal
from prefect_blocks import alert_hooks, resumable_task

BLOCK = "faultkit-demo"


@resumable_task(store=BLOCK, retry=BLOCK, alerts=BLOCK)
def train_model(
    steps: int, every_steps: int, seed: int, step_delay: float, journal: str | None, stage: Any
) -> str:
    """Train the demo model; returns the sha256 of its final state_dict.

    ``journal`` (optional) gets a ``step N`` line as each step ends (``faultkit demo``
    counts redone steps with it).
    """
    return demo.train(
        stage,
        steps=steps,
        every_steps=every_steps,
        seed=seed,
        step_delay=step_delay,
        on_step=lambda s: append_journal(journal, f"step {s}"),
    )


@flow(name="faultkit-train", **alert_hooks(BLOCK, store=BLOCK, retry=BLOCK))
def train_flow(
    steps: int = 60,
    every_steps: int = 10,
    seed: int = 0,
    step_delay: float = 0.0,
    journal: str | None = None,
) -> str:
    """Train and return the weights' digest."""
    return train_model(
        steps=steps, every_steps=every_steps, seed=seed, step_delay=step_delay, journal=journal
    )
