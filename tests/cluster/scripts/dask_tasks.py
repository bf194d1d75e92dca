"""Task bodies for the Dask cluster test, importable on every host (PYTHONPATH).

Each appends what it does to the shared events file (the hosts share this machine's file
system): ``START host epoch``, ``UNIT host epoch u``, ``STALE host epoch u``, ``END``.
"""

import os
import time

from faultkit import StaleAttemptError


def _event(path: str, *parts: object) -> None:
    with open(path, "a") as f:
        f.write(" ".join(str(p) for p in parts) + "\n")


def units(events: str, n: int, pause: float, *, stage) -> dict:
    host = os.environ.get("FK_HOST", "?")
    _event(events, "START", host, stage.epoch)
    for u in stage.pending(range(n)):
        time.sleep(pause)  # the unit's work
        try:
            stage.done(u, result=u * u)
        except StaleAttemptError:
            _event(events, "STALE", host, stage.epoch, u)
            raise
        _event(events, "UNIT", host, stage.epoch, u)
    _event(events, "END", host, stage.epoch)
    return {"host": host, "epoch": stage.epoch, "sum": sum(stage.results().values())}


def train(events: str, total_steps: int, pause: float, *, stage) -> dict:
    """The README's training loop as a resumable task; returns the weights' SHA-256."""
    import hashlib

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from faultkit.torch import ResumableSampler, TrainingCheckpointer

    torch.set_num_threads(1)  # the same arithmetic on every host
    torch.manual_seed(0)
    dataset = TensorDataset(torch.randn(512, 8), torch.randint(0, 2, (512,)))
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 2)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=50)
    sampler = ResumableSampler(dataset, seed=0)
    loader = DataLoader(dataset, batch_size=64, sampler=sampler, generator=sampler.generator)
    host = os.environ.get("FK_HOST", "?")
    with TrainingCheckpointer(
        stage, model=model, optimizer=opt, scheduler=sched, extra={"sampler": sampler},
        every_steps=20,
    ) as ckpt:  # fmt: skip
        step = ckpt.restore()
        _event(events, "START", host, stage.epoch, step)
        while step < total_steps:
            for x, y in loader:
                time.sleep(pause)
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                ckpt.step(step)
                step += 1
                _event(events, "STEP", host, stage.epoch, step)
                if step == total_steps:
                    break
    weights = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
    return {"host": host, "epoch": stage.epoch, "sha256": hashlib.sha256(weights).hexdigest()}
