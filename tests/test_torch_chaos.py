"""Training processes SIGKILLed at random steps and moments resume to bitwise-equal weights."""

from __future__ import annotations

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("torch")

from faultkit.testing import free_port

SCRIPTS = os.path.join(os.path.dirname(__file__), "torch_scripts")
ZYGOTE = os.path.join(SCRIPTS, "zygote.py")
DDP = os.path.join(SCRIPTS, "ddp_train.py")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")

STEPS, EVERY = 40, 5
RUNS = 24
FP_POINTS = ["save.blob_partial", "save.blob_written", "log.before_create"]


def _seed() -> int:
    return int(os.environ.get("FK_CHAOS_SEED") or time.time_ns() % 2**32)


def _check_resume(events: list, next_start: int, every: int, what: str) -> int:
    """Assert the next incarnation restarted from a snapshot this one committed; returns redone.

    Steps redone are at most ``every``, plus, when the newest write was lost in flight (async
    save killed mid-write), the steps trained while it was being written.
    """
    starts = [v for e, v in events if e == "start"]
    steps = [v for e, v in events if e == "step"]
    saves = [v for e, v in events if e == "save"]
    s0 = starts[0] if starts else next_start
    last = steps[-1] if steps else s0 - 1
    begun = [s0 - 1, *saves]
    committed = next_start - 1
    assert committed <= last, f"{what}: resumed after step {committed}, beyond step {last}"
    assert committed >= (begun[-2] if len(begun) > 1 else begun[-1]), (
        f"{what}: resumed after step {committed}, but the save of step {begun[-2:]} had been "
        "waited for: a committed snapshot was lost"
    )
    in_flight = last - begun[-1] if committed < begun[-1] else 0
    redone = last - committed
    assert redone <= every + in_flight, (
        f"{what}: {redone} steps redone (every_steps={every}, in flight {in_flight})"
    )
    return redone


def _plans(rng: random.Random, i: int) -> list[dict]:
    plans = []
    for j in range(1 + (i % 3 == 0)):
        if j == 0 and i % 3 == 1:
            plans.append({"kind": "fp", "point": rng.choice(FP_POINTS), "nth": rng.randint(1, 3)})
        else:
            plans.append(
                {"kind": "time", "step": rng.randint(1, STEPS - 8), "after": rng.uniform(0, 0.01)}
            )
    return plans


@pytest.mark.timeout(240)
def test_sigkilled_training_resumes_bitwise(tmp_path):
    """24 runs, each SIGKILLed once or twice (at random steps, mid-write too), end bitwise equal."""
    seed = _seed()
    rng = random.Random(seed)
    jobs = []
    for s in (0, 1):  # uninterrupted references, one per data/model seed
        jobs.append(
            {
                "id": f"ref{s}",
                "store": f"file://{tmp_path}/ref{s}",
                "key": "t",
                "steps": STEPS,
                "every": EVERY,
                "seed": s,
                "async": True,
                "delay": 0.0,
                "kills": [],
            }
        )
    for i in range(RUNS):
        jobs.append(
            {
                "id": i,
                "store": f"file://{tmp_path}/run{i}",
                "key": "train/mlp",
                "steps": STEPS,
                "every": EVERY,
                "seed": i % 2,
                "async": i % 2 == 0,
                "delay": 0.003,
                "kills": _plans(rng, i),
            }
        )
    proc = subprocess.run(
        [sys.executable, ZYGOTE],
        input="".join(json.dumps(j) + "\n" for j in jobs),
        capture_output=True,
        text=True,
        timeout=200,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {r["id"]: r for r in map(json.loads, proc.stdout.splitlines())}
    ref = {}
    for s in (0, 1):
        (only,) = results[f"ref{s}"]["incarnations"]
        ref[s] = only["events"][-1][1]
        assert only["exit"] == 0 and ref[s]["start"] == 0
    kills = mid_write = 0
    for job in jobs[2:]:
        what = f"run {job['id']} (seed {seed}, plans {job['kills']})"
        incs = results[job["id"]]["incarnations"]
        assert len(incs) == len(job["kills"]) + 1
        for n, (inc, plan) in enumerate(zip(incs, job["kills"], strict=False)):
            assert inc["signal"] == signal.SIGKILL, f"{what}: kill {n} did not land: {inc}"
            assert not any(e == "result" for e, _ in inc["events"]), what
            kills += 1
            nxt = next(v for e, v in incs[n + 1]["events"] if e == "start")
            _check_resume(inc["events"], nxt, EVERY, what)
            if plan["kind"] == "fp" and plan["point"] == "save.blob_partial":
                # The writer died (SIGKILL at the failpoint) with half a snapshot written to
                # an unnamed file: nothing of it is left behind.
                tmp = f"{tmp_path}/run{job['id']}/@tmp"
                assert not os.path.exists(tmp) or not os.listdir(tmp), what
                mid_write += 1
        last = incs[-1]
        assert last["exit"] == 0, f"{what}: {last}"
        result = last["events"][-1]
        assert result[0] == "result", f"{what}: {last['events'][-3:]}"
        expect = ref[job["seed"]]
        assert result[1]["model"] == expect["model"], f"{what}: model differs"
        assert result[1]["optimizer"] == expect["optimizer"], f"{what}: optimizer differs"
    assert kills >= RUNS
    assert mid_write >= 1 or not any(
        p.get("point") == "save.blob_partial" for j in jobs for p in j["kills"]
    )


def _read_events(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _torchrun(tmp_path, name: str, plans: list[dict], restarts: int = 3):
    out = tmp_path / name
    out.mkdir()
    url = f"file://{tmp_path}/{name}-store"
    cmd = [
        TORCHRUN,
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        str(restarts),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        "--local-addr",
        "127.0.0.1",
        "--monitor-interval",
        "0.1",
        DDP,
        url,
        "train/ddp",
        str(STEPS),
        str(EVERY),
        str(out),
        json.dumps(plans),
    ]
    env = {
        **os.environ,
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


DDP_PLANS = [
    pytest.param("rank1-step-then-rank0-midwrite", id="rank1-step-then-rank0-midwrite"),
    pytest.param("rank0-step-then-rank1-step", id="rank0-step-then-rank1-step"),
]


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory):
    """The digests of an uninterrupted 2-rank run."""
    out = _torchrun(tmp_path_factory.mktemp("ddpref"), "ref", [])
    final = [_read_events(str(out / f"r{r}.a0.jsonl"))[-1] for r in (0, 1)]
    assert final[0][0] == "result" and final[0][1] == final[1][1]
    return final[0][1]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario", DDP_PLANS)
def test_ddp_rank_killed_resumes_bitwise(tmp_path, ddp_reference, scenario):
    """A SIGKILLed DDP rank makes torchrun restart the group, which resumes bitwise equal."""
    seed = _seed()
    rng = random.Random(seed)

    def at_step(attempt: int, rank: int) -> dict:
        return {
            "attempt": attempt,
            "rank": rank,
            "kind": "time",
            "step": rng.randint(2, STEPS - 12),
            "after": rng.uniform(0, 0.01),
        }

    if scenario == "rank1-step-then-rank0-midwrite":
        plans = [
            at_step(0, 1),
            {"attempt": 1, "rank": 0, "kind": "fp", "point": "save.blob_partial", "nth": 2},
        ]
    else:
        plans = [at_step(0, 0), at_step(1, 1)]
    out = _torchrun(tmp_path, scenario, plans)
    what = f"{scenario} (seed {seed}, plans {plans})"
    for attempt, plan in enumerate(plans):
        killed = _read_events(str(out / f"r{plan['rank']}.a{attempt}.jsonl"))
        assert not any(e == "result" for e, _ in killed), f"{what}: kill {attempt} did not land"
        if plan["kind"] == "time":
            assert any(e == "kill" and v >= plan["step"] for e, v in killed), what
        nxt = _read_events(str(out / f"r0.a{attempt + 1}.jsonl"))
        start = next(v for e, v in nxt if e == "start")
        _check_resume(_read_events(str(out / f"r0.a{attempt}.jsonl")), start, EVERY, what)
    last = len(plans)
    assert not glob.glob(str(out / f"r*.a{last + 1}.jsonl")), f"{what}: extra restarts"
    for r in (0, 1):
        final = _read_events(str(out / f"r{r}.a{last}.jsonl"))[-1]
        assert final[0] == "result", f"{what}: rank {r} did not finish"
        assert final[1]["model"] == ddp_reference["model"], f"{what}: rank {r} model differs"
        assert final[1]["optimizer"] == ddp_reference["optimizer"], what
