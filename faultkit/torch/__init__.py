"""PyTorch training state that resumes bit for bit: ``TrainingCheckpointer``, ``ResumableSampler``.

Needs PyTorch (``pip install 'faultkit[torch]'``); ``import faultkit`` alone never imports it.
"""

from __future__ import annotations

try:
    import torch as _torch  # noqa: F401
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "faultkit.torch needs PyTorch, which is not installed: pip install 'faultkit[torch]'"
    ) from _exc

from ._checkpointer import EXIT_PREEMPTED, FORMAT, ResumeWarning, TrainingCheckpointer
from ._sampler import ResumableSampler

__all__ = ["EXIT_PREEMPTED", "FORMAT", "ResumableSampler", "ResumeWarning", "TrainingCheckpointer"]
