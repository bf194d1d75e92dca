"""Capture and restore every random number generator a training step may draw from."""

from __future__ import annotations

import logging
import random
from typing import Any

import torch

__all__ = ["capture", "restore"]

log = logging.getLogger("faultkit.torch")


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def capture() -> dict[str, Any]:
    """The state of Python's ``random``, NumPy's global RNG, torch's CPU and CUDA RNGs."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    np = _numpy()
    if np is not None:
        state["numpy"] = np.random.get_state()
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore(state: dict[str, Any]) -> None:
    """Put every generator back to ``state`` (as returned by :func:`capture`)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"].clone())
    np = _numpy()
    if "numpy" in state and np is not None:
        np.random.set_state(tuple(state["numpy"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            log.warning(
                "the snapshot has CUDA RNG states for %d device(s), this process sees %d; "
                "restoring the first %d",
                len(cuda),
                torch.cuda.device_count(),
                min(len(cuda), torch.cuda.device_count()),
            )
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.clone(), i)
