"""One rank of a 2-rank DDP training (CPU, gloo) under torchrun; kills itself as planned.

Usage: torchrun ... ddp_train.py STORE_URL KEY STEPS EVERY OUT_DIR PLANS_JSON

PLANS_JSON is a list of {"attempt": a, "rank": r, "kind": "time", "step": k, "after": s} (on
restart attempt a, this rank SIGKILLs itself `after` seconds after its first step >= k) or
{"attempt": a, "rank": r, "kind": "fp", "point": name, "nth": n} (a faultkit failpoint that
SIGKILLs it). Each rank writes JSON-line events to OUT_DIR/r<rank>.a<attempt>.jsonl.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from faultkit import CheckpointStore, _failpoints
from faultkit.demo._train import weights_digest
from faultkit.torch import ResumableSampler, TrainingCheckpointer


def main() -> None:
    url, key, steps, every, out, plans = sys.argv[1:7]
    steps, every = int(steps), int(every)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    base = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=not agent_store and rank == 0,
        multi_tenant=not agent_store,
    )
    # Keys of a killed attempt stay in the agent's store; without a per-attempt prefix gloo of
    # the restarted group can read the dead peers' addresses and fail to connect.
    dist.init_process_group(
        "gloo", store=dist.PrefixStore(f"attempt-{attempt}", base), rank=rank, world_size=world
    )
    log = open(os.path.join(out, f"r{rank}.a{attempt}.jsonl"), "a", buffering=1)

    def say(event: str, value: object) -> None:
        log.write(json.dumps([event, value]) + "\n")

    say("pid", os.getpid())
    kill_step, kill_after = None, 0.0
    for p in json.loads(plans):
        if p["attempt"] == attempt and p["rank"] == rank:
            if p["kind"] == "fp":
                _failpoints.arm(p["point"], "kill", p["nth"])
            else:
                kill_step, kill_after = p["step"], p["after"]
    seed = 7
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 16, generator=g)
    y = (x[:, :4] * torch.arange(1.0, 5.0)).argmax(dim=1)
    data = TensorDataset(x, y)
    sampler = ResumableSampler(data, seed=seed)
    loader = DataLoader(data, batch_size=8, sampler=sampler, generator=torch.Generator())
    net = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 4)
    )
    model = DistributedDataParallel(net)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.7)
    store = CheckpointStore(url)
    stage = store.stage(key)  # rank 0's checkpointer claims it; the others only read
    with TrainingCheckpointer(
        stage,
        model=model,
        optimizer=opt,
        scheduler=sched,
        extra={"sampler": sampler},
        every_steps=every,
        keep=2,
        async_save=True,
    ) as ckpt:
        start = ckpt.restore()
        say("start", start)
        batches = iter(loader)
        for step in range(start, steps):
            try:
                xb, yb = next(batches)
            except StopIteration:
                batches = iter(loader)
                xb, yb = next(batches)
            xb = xb + 0.01 * torch.randn_like(xb)
            w = 1.0 + 0.1 * random.random() + 0.01 * float(np.random.standard_normal())
            loss = torch.nn.functional.cross_entropy(model(xb), yb) * w
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            say("step", step)
            if kill_step is not None and step >= kill_step:
                kill_step = None
                say("kill", step)
                threading.Timer(kill_after, os.kill, (os.getpid(), signal.SIGKILL)).start()
            if ckpt.step(step):
                say("save", step)
        if steps > start and ckpt.last_saved_step != steps - 1:
            ckpt.save(steps - 1, wait=True)
            say("save", steps - 1)
    say(
        "result",
        {
            "start": start,
            "model": weights_digest(model.state_dict()),
            "optimizer": weights_digest(opt.state_dict()),
        },
    )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
