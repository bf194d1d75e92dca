"""ResumableSampler: a shuffling sampler that remembers its place inside an epoch."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableSampler"]


class ResumableSampler(Sampler[int]):
    """Yields dataset indices, shuffled per epoch from ``seed``; resumes mid-epoch.

    Its ``state_dict()`` records the epoch and how many indices of it were handed out, so a
    :class:`~faultkit.torch.TrainingCheckpointer` given it in ``extra=`` resumes on exactly
    the next batch. An epoch that runs out moves the sampler to the next epoch by itself;
    ``set_epoch`` (as with ``DistributedSampler``) also works.

    Use it with ``DataLoader(..., sampler=sampler, generator=sampler.generator)`` and
    ``num_workers=0`` (or any loader that fetches indices only when it builds a batch). The
    ``generator=`` matters: without it a ``DataLoader`` draws a seed from the global torch
    RNG each time an epoch starts, so after a resume the RNG stream (dropout, augmentation)
    is one draw off and the run is no longer bit for bit; ``TrainingCheckpointer.restore()``
    warns when it sees such a loader. Loaders with worker processes prefetch indices ahead
    of training: for them use torchdata's ``StatefulDataLoader`` in ``extra=`` instead.

    Args:
        data_source: the dataset (anything with ``len()``) or its length.
        seed: the shuffle seed; epoch ``e`` uses ``seed + e``.
        shuffle: False yields indices in order.
        num_replicas: ranks sharing the data (default: the process group's world size, or 1).
        rank: this rank (default: the process group's rank, or 0).
        drop_last: drop the tail that does not divide evenly among ranks, rather than pad it.
    """

    def __init__(
        self,
        data_source: Sized | int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        n = data_source if isinstance(data_source, int) else len(data_source)
        if num_replicas is None or rank is None:
            dist = torch.distributed
            on = dist.is_available() and dist.is_initialized()
            num_replicas = (
                num_replicas if num_replicas is not None else (dist.get_world_size() if on else 1)
            )
            rank = rank if rank is not None else (dist.get_rank() if on else 0)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank!r} is not in [0, {num_replicas!r})")
        self.size = int(n)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.drop_last = drop_last
        if drop_last:
            self.num_samples = self.size // self.num_replicas
        else:
            self.num_samples = math.ceil(self.size / self.num_replicas)
        self.epoch = 0
        self.position = 0
        # The loader's own seed source (see the class docstring), so that starting an epoch
        # draws nothing from the global RNG that the checkpointer restores.
        self.generator = torch.Generator()
        self.generator.manual_seed(self.seed)

    def __len__(self) -> int:
        return self.num_samples

    def _indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        total = self.num_samples * self.num_replicas
        if total > len(order) and order:
            order += (order * math.ceil(total / len(order)))[: total - len(order)]
        return order[:total][self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        indices = self._indices(self.epoch)
        for i in range(self.position, len(indices)):
            self.position = i + 1
            yield indices[i]
        self.epoch += 1
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning, unless the sampler is already in it."""
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self.position = 0

    def state_dict(self) -> dict[str, Any]:
        """Epoch, position in it, and what the order depends on."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "size": self.size,
            "shuffle": self.shuffle,
            "num_replicas": self.num_replicas,
            "rank": self.rank,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; refuses one saved for a different dataset or seed."""
        for k in ("seed", "size", "shuffle", "num_replicas"):
            if state.get(k) != getattr(self, k):
                raise ValueError(
                    f"ResumableSampler state has {k}={state.get(k)!r}, this sampler has "
                    f"{k}={getattr(self, k)!r}: the saved position means nothing for this "
                    "data. Build the sampler with the same dataset, seed and world size."
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])

    def __repr__(self) -> str:
        return (
            f"ResumableSampler(size={self.size}, seed={self.seed}, epoch={self.epoch}, "
            f"position={self.position}, rank={self.rank}/{self.num_replicas})"
        )
