"""The training half of the demo pipeline: a small MLP that resumes bit for bit.

Deterministic by construction: every RNG is seeded from ``seed``, the data order comes from a
:class:`~faultkit.torch.ResumableSampler`, and torch runs on one thread while training (the
thread count can change floating-point summation order).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from .._store import CheckpointStore, Stage

__all__ = ["reference_train", "train", "weights_digest"]

MLFLOW_ENV = "FAULTKIT_DEMO_MLFLOW"  # the demo's tracking URI, inherited by its workers
MLFLOW_EXPERIMENT = "faultkit-demo"
ROWS = 512
FEATURES = 16
CLASSES = 4
BATCH = 16


def _update(h: Any, obj: Any) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode() + b"=")
            _update(h, obj[k])
            h.update(b",")
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _update(h, v)
            h.update(b",")
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


class _PyRNG(random.Random):
    """A private ``random.Random`` that checkpoints through state_dict/load_state_dict."""

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.getstate()
        return {"version": version, "internal": list(internal), "gauss": gauss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.setstate((state["version"], tuple(state["internal"]), state["gauss"]))


def weights_digest(state_dict: Any) -> str:
    """sha256 hex of a state dict: keys in sorted order, each tensor's dtype, shape and bytes.

    Nested dicts and lists (an optimizer's state dict) are hashed the same way.
    """
    h = hashlib.sha256()
    _update(h, state_dict)
    return h.hexdigest()


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _run(
    stage: Stage,
    *,
    steps: int,
    every_steps: int,
    seed: int,
    step_delay: float = 0.0,
    async_save: bool = True,
    keep: int | None = 3,
    on_event: Callable[[str, int], None] | None = None,
    tracking: Any = None,
) -> dict[str, Any]:
    """Train to ``steps`` through a TrainingCheckpointer; returns start step and digests.

    ``tracking``: a :class:`faultkit.torch.MlflowRun` that gets each step's loss and learning
    rate (and travels in the snapshots)."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from ..torch import ResumableSampler, TrainingCheckpointer

    emit = on_event or (lambda event, step: None)
    with _one_thread():
        # Python's and NumPy's global RNGs are shared with every thread of the process, and
        # Dask's own threads draw from `random`: a stage that must resume bitwise owns its
        # generators and checkpoints them (here through `extra`).
        rng = _PyRNG(seed)
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(ROWS, FEATURES, generator=g)
        y = (x[:, :CLASSES] * torch.arange(1.0, CLASSES + 1)).argmax(dim=1)
        data = TensorDataset(x, y)
        sampler = ResumableSampler(data, seed=seed)
        # Its own generator: an iterator draws a seed when created, and a resumed run creates
        # one at a point where the uninterrupted run does not.
        loader = DataLoader(data, batch_size=BATCH, sampler=sampler, generator=sampler.generator)
        model = torch.nn.Sequential(
            torch.nn.Linear(FEATURES, 64),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(64, 64),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(64, CLASSES),
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=25, gamma=0.5)
        with TrainingCheckpointer(
            stage,
            model=model,
            optimizer=opt,
            scheduler=sched,
            extra={"sampler": sampler, "rng": rng, **({"mlflow": tracking} if tracking else {})},
            every_steps=every_steps,
            keep=keep,
            async_save=async_save,
            config_hash=f"demo-mlp-seed{seed}",
        ) as ckpt:
            start = ckpt.restore()
            emit("start", start)
            if tracking is not None:
                tracking.log_params({"seed": seed, "steps": steps, "every_steps": every_steps})
            batches = iter(loader)
            for step in range(start, steps):
                try:
                    xb, yb = next(batches)
                except StopIteration:
                    batches = iter(loader)
                    xb, yb = next(batches)
                # Draw from every RNG, so a resume that missed one would show in the weights.
                xb = xb + 0.01 * torch.randn_like(xb)
                weight = 1.0 + 0.1 * rng.random() + 0.01 * rng.gauss(0.0, 1.0)
                loss = torch.nn.functional.cross_entropy(model(xb), yb) * weight
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if tracking is not None:
                    lr = sched.get_last_lr()[0]
                    tracking.log_metrics({"loss": loss.item(), "lr": lr}, step=step)
                if step_delay:
                    time.sleep(step_delay)
                emit("step", step)
                if ckpt.step(step):
                    emit("save", step)
            if steps > start and ckpt.last_saved_step != steps - 1:
                ckpt.save(steps - 1, wait=True)
                emit("save", steps - 1)
        return {
            "start": start,
            "model": weights_digest(model.state_dict()),
            "optimizer": weights_digest(opt.state_dict()),
        }


def train(
    stage: Stage,
    *,
    steps: int = 60,
    every_steps: int = 10,
    seed: int = 0,
    step_delay: float = 0.0,
    on_step: Callable[[int], None] | None = None,
    track: bool = True,
) -> str:
    """Run the demo training stage on a claimed ``stage``, resuming from its newest snapshot.

    ``on_step(step)`` is called after each training step (the demo counts redone steps).
    With ``track`` and ``FAULTKIT_DEMO_MLFLOW`` (a tracking URI) in the environment, loss and
    learning rate go to one MLflow run per stage (:class:`faultkit.torch.MlflowRun`).

    Returns:
        The sha256 hex of the final model state dict (see :func:`weights_digest`); equal to
        :func:`reference_train` however often the stage was killed and resumed.
    """

    def on_event(event: str, step: int) -> None:
        if event == "step" and on_step is not None:
            on_step(step)

    with contextlib.ExitStack() as stack:
        tracking = None
        uri = os.environ.get(MLFLOW_ENV) if track else None
        if uri:
            from ..torch import MlflowRun

            tracking = stack.enter_context(
                MlflowRun(stage, experiment=MLFLOW_EXPERIMENT, tracking_uri=uri)
            )
        return _run(
            stage,
            steps=steps,
            every_steps=every_steps,
            seed=seed,
            step_delay=step_delay,
            on_event=on_event,
            tracking=tracking,
        )["model"]


def mlflow_summary(uri: str, steps: int) -> dict[str, Any]:
    """What the demo's MLflow tracking store holds: runs, the status, each step's points."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    runs = client.search_runs([exp.experiment_id]) if exp is not None else []
    out: dict[str, Any] = {"runs": len(runs), "status": None, "points": 0, "duplicates": 0}
    if len(runs) == 1:
        history = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
        out.update(
            status=runs[0].info.status,
            points=len(history),
            duplicates=len(history) - len(set(history)),
            all_steps=sorted(set(history)) == list(range(steps)),
        )
    out["ok"] = bool(
        out["runs"] == 1 and out["status"] == "FINISHED" and out.get("all_steps")
        and out["duplicates"] == 0
    )  # fmt: skip
    return out


def reference_train(steps: int = 60, seed: int = 0) -> str:
    """The digest of an uninterrupted run (on a private ``memory://`` store)."""
    store = CheckpointStore(f"memory://faultkit-demo-reference-{uuid.uuid4().hex}")
    key = "demo/train-reference"
    try:
        with store.stage(key) as stage:
            return train(stage, steps=steps, every_steps=max(1, steps), seed=seed, track=False)
    finally:
        store.delete(key)
