"""PyTorch training state that resumes bit for bit: ``TrainingCheckpointer``, ``ResumableSampler``.

Needs PyTorch (``pip install 'faultkit[torch]'``); ``import faultkit`` alone never imports it.

The data position must be part of the state, or a mid-epoch resume reuses or skips batches
(``restore()`` warns with :class:`ResumeWarning`). Either sample with ``ResumableSampler``::

    sampler = ResumableSampler(dataset, seed=0)
    loader = DataLoader(dataset, batch_size=32, sampler=sampler,
                        generator=sampler.generator)   # keeps iter() off the global RNG
    ckpt = TrainingCheckpointer(stage, model=m, optimizer=opt, extra={"sampler": sampler},
                                every_steps=100)

or, with loader worker processes, use torchdata's ``StatefulDataLoader`` (it tracks batches
already yielded, prefetching included) and pass the loader itself::

    from torchdata.stateful_dataloader import StatefulDataLoader
    loader = StatefulDataLoader(dataset, batch_size=32, shuffle=True, num_workers=4)
    ckpt = TrainingCheckpointer(stage, model=m, optimizer=opt, extra={"loader": loader},
                                every_steps=100)

Under DDP, give each rank's sampler or loader in ``extra``: their states are saved per rank.
Sharded state (FSDP, DTensor, torch.distributed.checkpoint) is not supported yet.

With ``faultkit[mlflow]``, :class:`MlflowRun` (given in ``extra``) keeps one MLflow run per
stage and each metric point once across kills and resumes.
"""

from __future__ import annotations

try:
    import torch as _torch  # noqa: F401
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "faultkit.torch needs PyTorch, which is not installed: pip install 'faultkit[torch]'"
    ) from _exc

from ._checkpointer import EXIT_PREEMPTED, FORMAT, ResumeWarning, TrainingCheckpointer
from ._mlflow import MlflowRun
from ._sampler import ResumableSampler

__all__ = [
    "EXIT_PREEMPTED",
    "FORMAT",
    "MlflowRun",
    "ResumableSampler",
    "ResumeWarning",
    "TrainingCheckpointer",
]
