"""The few collectives TrainingCheckpointer needs under torch.distributed (DDP)."""

from __future__ import annotations

import torch

__all__ = ["World"]


class World:
    """This process's place in the default process group (rank 0 of 1 without one)."""

    def __init__(self, enabled: bool | None) -> None:
        dist = torch.distributed
        on = dist.is_available() and dist.is_initialized()
        if enabled and not on:
            raise ValueError(
                "distributed=True but torch.distributed is not initialised; call "
                "init_process_group() before building the TrainingCheckpointer"
            )
        self.on = bool(on if enabled is None else enabled and on)
        self.rank = dist.get_rank() if self.on else 0
        self.size = dist.get_world_size() if self.on else 1
        self.device = torch.device("cpu")
        if self.on and dist.get_backend() == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())

    def max_ints(self, *values: int) -> list[int]:
        """Element-wise maximum of ``values`` over every rank."""
        if not self.on:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return [int(v) for v in t.tolist()]

    def min_max(self, value: int) -> tuple[int, int]:
        """(min, max) of ``value`` over every rank."""
        lo, hi = self.max_ints(-value, value)
        return -lo, hi

    def gather_bytes(self, blob: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's uint8 ``blob`` on rank 0 (in rank order); None on other ranks."""
        if not self.on:
            return [blob]
        dist = torch.distributed
        size = torch.tensor([blob.numel()], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.size)]
        dist.all_gather(sizes, size)
        lengths = [int(s.item()) for s in sizes]
        width = max(lengths)
        padded = torch.zeros(width, dtype=torch.uint8, device=self.device)
        padded[: blob.numel()] = blob.to(self.device)
        if self.rank == 0:
            out = [
                torch.empty(width, dtype=torch.uint8, device=self.device) for _ in range(self.size)
            ]
            dist.gather(padded, out, dst=0)
            return [o[:n].cpu() for o, n in zip(out, lengths, strict=True)]
        dist.gather(padded, None, dst=0)
        return None
