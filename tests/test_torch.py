"""TrainingCheckpointer, its pickle-free format, ResumableSampler and the demo training stage."""

from __future__ import annotations

import builtins
import collections
import hashlib
import io
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import uuid
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

from faultkit import (  # noqa: E402
    CheckpointStore,
    CorruptCheckpointError,
    StaleAttemptError,
    UnsafeCheckpointError,
    subscribe,
)
from faultkit.demo import reference_train, train, weights_digest  # noqa: E402
from faultkit.torch import (  # noqa: E402
    EXIT_PREEMPTED,
    ResumableSampler,
    ResumeWarning,
    TrainingCheckpointer,
)
from faultkit.torch._format import decode, encode  # noqa: E402


@pytest.fixture
def store(tmp_path):
    """A file:// store in a temp folder."""
    return CheckpointStore(f"file://{tmp_path}/store")


class Counter:
    """A custom extra object: a counter with state_dict/load_state_dict."""

    def __init__(self) -> None:
        self.n = 0

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.n = state["n"]


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 2)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    return model, opt, sched, scaler


def _train_step(model, opt, sched, scaler, counter=None):
    x = torch.randn(4, 8) + random.random() + float(np.random.rand())
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    sched.step()
    if counter is not None:
        counter.n += 1


def _ckpt(stage, parts, counter, **kw):
    model, opt, sched, scaler = parts
    kw.setdefault("every_steps", 1)
    kw.setdefault("check_data_position", False)
    return TrainingCheckpointer(
        stage,
        model=model,
        optimizer=opt,
        scheduler=sched,
        scaler=scaler,
        extra={"counter": counter},
        **kw,
    )


def _digest(parts, counter) -> str:
    model, opt, sched, scaler = parts
    return weights_digest(
        [model.state_dict(), opt.state_dict(), sched.state_dict(), scaler.state_dict(), counter.n]
    )


def test_format_round_trips_every_supported_value():
    """Tensors of every dtype and shape, tuples, int keys, arrays and metadata come back equal."""
    od = collections.OrderedDict(w=torch.arange(6.0).reshape(2, 3).t())  # non-contiguous
    od._metadata = {"": {"version": 2}}
    tree = {
        "od": od,
        "bf16": torch.randn(5).to(torch.bfloat16),
        "bool": torch.tensor([True, False, True]),
        "i64": torch.tensor([[1, -2], [3, 2**40]]),
        "c64": torch.randn(3, dtype=torch.complex64),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "intkeys": {0: {"step": torch.tensor(1.0)}, 1: "x"},
        "tuple": (0.9, 0.999, float("inf"), float("nan")),
        "nd": np.arange(10, dtype=np.uint32),
        "misc": [None, True, "s", b"\x00\xff", torch.float16, torch.device("cpu"), np.int64(7)],
    }
    enc = encode(tree)
    out = decode(b"".join(bytes(c) for c in enc.chunks()))
    assert out["od"]._metadata == {"": {"version": 2}}
    assert torch.equal(out["od"]["w"], od["w"])
    for k in ("bf16", "bool", "i64", "c64", "scalar", "empty"):
        assert out[k].dtype == tree[k].dtype and out[k].shape == tree[k].shape
        assert torch.equal(out[k], tree[k]), k
    assert out["intkeys"][0]["step"].item() == 1.0 and out["intkeys"][1] == "x"
    assert out["tuple"][:3] == (0.9, 0.999, float("inf")) and out["tuple"][3] != out["tuple"][3]
    assert out["nd"].dtype == np.uint32 and (out["nd"] == np.arange(10)).all()
    assert out["misc"] == [None, True, "s", b"\x00\xff", torch.float16, torch.device("cpu"), 7]


def test_unsafe_state_is_refused_at_save(store):
    """State holding an arbitrary object raises TypeError when saving, and nothing is written."""
    with store.stage("t/unsafe") as stage:
        obj = type(
            "Sneaky",
            (),
            {"state_dict": lambda self: {"x": object()}, "load_state_dict": lambda self, s: None},
        )()
        ckpt = TrainingCheckpointer(stage, extra={"s": obj}, every_steps=1, async_save=False)
        with pytest.raises(TypeError, match="without pickle"):
            ckpt.step(0)
        ckpt.close()
        assert stage.snapshots() == []


class _Evil:
    """Unpickling this creates a marker file: proof that code from a checkpoint ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


@pytest.mark.parametrize(
    "kind", [pytest.param("pickle", id="raw-pickle"), pytest.param("torch.save", id="torch-save")]
)
def test_malicious_snapshot_is_refused(store, tmp_path, kind):
    """A planted snapshot that needs pickle raises UnsafeCheckpointError; its code never runs."""
    marker = tmp_path / "pwned"
    parts, counter = _setup(), Counter()
    with store.stage("t/evil") as stage:
        with _ckpt(stage, parts, counter) as ckpt:
            _train_step(*parts)
            ckpt.step(0)
        if kind == "pickle":
            blob = pickle.dumps({"model": _Evil(str(marker))})
        else:
            buf = io.BytesIO()
            torch.save({"model": _Evil(str(marker))}, buf)
            blob = buf.getvalue()
        stage.save(blob, step=5, meta={"format": "faultkit.torch/1"})
    before = _digest(parts, counter)
    with store.stage("t/evil") as stage:
        ckpt = _ckpt(stage, parts, counter)
        with pytest.raises(UnsafeCheckpointError, match=r"refused|not written by"):
            ckpt.restore()
        ckpt.close()
    assert not marker.exists()
    assert _digest(parts, counter) == before


def test_corrupt_newest_snapshot_falls_back(store):
    """A corrupt newest snapshot is skipped: the previous one is restored and reported."""
    events = []
    unsubscribe = subscribe(events.append)
    try:
        parts, counter = _setup(), Counter()
        with store.stage("t/corrupt") as stage, _ckpt(stage, parts, counter, every_steps=2) as c:
            for step in range(4):
                _train_step(*parts, counter)
                c.step(step)
                if step == 1:
                    c.wait()
                    saved = _digest(parts, counter)
        newest = stage.snapshots()[-1]
        assert newest.step == 3
        path = os.path.join(store.url.removeprefix("file://"), "t/corrupt/@blobs", newest.blob)
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            f.write(b"\x00garbage\x00")
        parts2, counter2 = _setup(seed=1), Counter()
        with store.stage("t/corrupt") as stage, _ckpt(stage, parts2, counter2) as c:
            assert c.restore() == 2
        assert _digest(parts2, counter2) == saved
        corrupt = [e for e in events if e.kind == "checkpoint_corrupt"]
        assert len(corrupt) == 1 and corrupt[0].details["fallback_step"] == 1
    finally:
        unsubscribe()


@pytest.mark.parametrize(
    "async_save", [pytest.param(True, id="async"), pytest.param(False, id="sync")]
)
def test_restore_continues_bitwise(store, async_save):
    """Model, optimizer, scheduler, scaler, extras and every RNG resume to an identical run."""
    parts, counter = _setup(), Counter()
    random.seed(1)
    np.random.seed(1)
    with (
        store.stage("t/resume") as stage,
        _ckpt(stage, parts, counter, every_steps=3, async_save=async_save) as ckpt,
    ):
        assert ckpt.restore() == 0
        for step in range(6):
            _train_step(*parts, counter)
            ckpt.step(step)
    # the uninterrupted continuation, from the state right after step 5
    for _ in range(3):
        _train_step(*parts, counter)
    expect = _digest(parts, counter)
    parts2, counter2 = _setup(seed=9), Counter()
    random.seed(2)
    with store.stage("t/resume") as stage, _ckpt(stage, parts2, counter2) as ckpt:
        assert ckpt.restore() == 6
        for _ in range(3):
            _train_step(*parts2, counter2)
    assert _digest(parts2, counter2) == expect


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps")
def test_restore_keeps_no_map_of_the_snapshot(store, tmp_path):
    """After a restore from file:// nothing holds the snapshot's map: the optimizer's state
    has memory of its own (it would otherwise pin the whole snapshot, model part included,
    and copy its pages one by one on the first step), and training on leaves the file as
    it was."""
    parts, counter = _setup(), Counter()
    with store.stage("t/maps") as stage, _ckpt(stage, parts, counter) as ckpt:
        _train_step(*parts, counter)
        ckpt.save(1, wait=True)
    (blob,) = (tmp_path / "store").rglob("@blobs/*")
    before = hashlib.sha256(blob.read_bytes()).hexdigest()
    parts2, counter2 = _setup(seed=3), Counter()
    with store.stage("t/maps") as stage, _ckpt(stage, parts2, counter2) as ckpt:
        assert ckpt.restore() == 2
        state = parts2[1].state_dict()["state"]
        assert state and all(s["exp_avg"].is_contiguous() for s in state.values())
        maps = Path("/proc/self/maps").read_text()
        assert str(blob) not in maps, "the restored state still maps the snapshot"
        _train_step(*parts2, counter2)
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == before


def test_restored_optimizer_state_is_copied_only_where_it_is_kept():
    """The optimizer keeps a CPU parameter's state as given, so that is copied out of the
    snapshot; state it moves to another device is left for load_state_dict to copy (a GPU
    optimizer's state is not staged twice in host memory); step counters are copied."""
    from faultkit.torch._checkpointer import _optimizer_state

    cpu = torch.nn.Parameter(torch.ones(3))
    other = torch.nn.Parameter(torch.ones(3, device="meta"))
    opt = torch.optim.Adam([cpu, other])
    snap = bytearray(4096)
    mapped = [torch.frombuffer(snap, dtype=torch.float32, count=3, offset=64 * k) for k in range(6)]
    state = {
        "state": {
            0: {"step": mapped[0], "exp_avg": mapped[1], "exp_avg_sq": mapped[2]},
            1: {"step": mapped[3], "exp_avg": mapped[4], "exp_avg_sq": mapped[5]},
        },
        "param_groups": [{**opt.param_groups[0], "params": [0, 1]}],
    }
    out = _optimizer_state(opt, state)
    shares = {
        (i, k): v.data_ptr() == state["state"][i][k].data_ptr()
        for i, s in out["state"].items()
        for k, v in s.items()
    }
    assert shares == {
        (0, "step"): False,
        (0, "exp_avg"): False,
        (0, "exp_avg_sq"): False,
        (1, "step"): False,
        (1, "exp_avg"): True,
        (1, "exp_avg_sq"): True,
    }
    assert torch.equal(out["state"][0]["exp_avg"], mapped[1])
    # what it cannot read is copied whole and left for load_state_dict to refuse
    odd = {"state": {0: {"exp_avg": mapped[1]}}, "param_groups": [{"params": [[0]]}]}
    assert _optimizer_state(opt, odd)["state"][0]["exp_avg"].data_ptr() != mapped[1].data_ptr()


def test_background_failure_surfaces_at_next_step(store):
    """An async write refused in the background (a newer attempt fenced it) raises at step()."""
    parts, counter = _setup(), Counter()
    with store.stage("t/fenced") as stage:
        ckpt = _ckpt(stage, parts, counter, every_steps=1, async_save=True)
        with store.stage("t/fenced"):  # a newer attempt claims the stage
            pass
        assert ckpt.step(0)  # the copy succeeds; the write fails in the background
        with pytest.raises(StaleAttemptError) as info:
            for step in range(1, 50):  # bounded: the failure surfaces within a few steps
                ckpt.step(step)
                ckpt.wait()
        assert "background save of step" in "".join(info.value.__notes__)
        ckpt.close()
    assert store.verify("t/fenced") == []


def test_next_save_waits_for_the_previous_one(store):
    """With async saves, a save returns only after the previous snapshot is durable."""
    parts, counter = _setup(), Counter()
    with store.stage("t/order") as stage, _ckpt(stage, parts, counter, every_steps=1) as ckpt:
        for step in range(5):
            _train_step(*parts, counter)
            ckpt.step(step)
            assert step == 0 or (step - 1) in [r.step for r in stage.snapshots()]


def test_keep_removes_old_snapshots(store):
    """keep=2 leaves the two newest snapshots, removed off the training thread."""
    parts, counter = _setup(), Counter()
    with store.stage("t/keep") as stage, _ckpt(stage, parts, counter, keep=2) as ckpt:
        for step in range(6):
            _train_step(*parts, counter)
            ckpt.step(step)
    assert [r.step for r, err in store.verify("t/keep") if err is None] == [4, 5]


def test_missing_data_position_warns(store):
    """Resuming without a sampler or stateful loader in extra warns that data will differ."""
    parts, counter = _setup(), Counter()
    with store.stage("t/warn") as stage, _ckpt(stage, parts, counter) as ckpt:
        ckpt.step(0)
    with store.stage("t/warn") as stage:
        ckpt = _ckpt(stage, parts, counter, check_data_position=True)
        with pytest.warns(ResumeWarning, match="data position"):
            ckpt.restore()
        ckpt.close()
        model, opt, sched, scaler = parts
        ckpt = TrainingCheckpointer(
            stage,
            model=model,
            optimizer=opt,
            scheduler=sched,
            scaler=scaler,
            extra={"counter": counter, "sampler": ResumableSampler(10)},
            every_steps=1,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResumeWarning)
            with pytest.warns(ResumeWarning, match=r"no state for extra\['sampler'\]"):
                ckpt.restore()
        ckpt.close()


def test_resumable_sampler_resumes_mid_epoch():
    """A sampler restored mid-epoch yields exactly the rest of the uninterrupted order."""
    full = ResumableSampler(50, seed=3)
    order = [list(full) for _ in range(3)]
    assert order[0] != order[1] and sorted(order[0]) == list(range(50))
    s = ResumableSampler(50, seed=3)
    it = iter(s)
    first = [next(it) for _ in range(17)]
    state = s.state_dict()
    s2 = ResumableSampler(50, seed=3)
    s2.load_state_dict(state)
    assert first + list(s2) == order[0]
    assert list(s2) == order[1]
    shards = [list(ResumableSampler(50, seed=3, num_replicas=4, rank=r)) for r in range(4)]
    assert all(len(x) == 13 for x in shards) and set().union(*shards) == set(range(50))
    with pytest.raises(ValueError, match="seed"):
        ResumableSampler(50, seed=4).load_state_dict(state)


def test_sigterm_finishes_step_saves_and_exits(store):
    """With save_on_sigterm, SIGTERM makes the next step() save and exit with status 75."""
    parts, counter = _setup(), Counter()
    previous = signal.getsignal(signal.SIGTERM)
    with store.stage("t/sigterm") as stage:
        ckpt = _ckpt(stage, parts, counter, every_steps=100, save_on_sigterm=True)
        with pytest.raises(SystemExit) as info:
            for step in range(20):
                _train_step(*parts, counter)
                if step == 4:
                    os.kill(os.getpid(), signal.SIGTERM)  # delivered to the real handler
                ckpt.step(step)
        assert info.value.code == EXIT_PREEMPTED
        assert [r.step for r in stage.snapshots()] == [4]
    assert signal.getsignal(signal.SIGTERM) == previous


def test_demo_train_resumes_to_reference(store):
    """The demo stage run in two attempts yields the digest of one uninterrupted run."""
    with store.stage("demo/train") as stage:
        partial = train(stage, steps=23, every_steps=10)
    with store.stage("demo/train") as stage:
        assert stage.resumed
        final = train(stage, steps=40, every_steps=10)
    assert final != partial
    assert final == reference_train(steps=40)


def test_import_faultkit_does_not_import_torch():
    """`import faultkit` (and faultkit.demo) leaves torch unimported."""
    code = "import sys, faultkit, faultkit.demo; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_bad_configuration_is_refused(store):
    """No save schedule, or an extra without state_dict, is a clear error up front."""
    with store.stage(f"t/cfg-{uuid.uuid4().hex[:6]}") as stage:
        with pytest.raises(ValueError, match="every_steps"):
            TrainingCheckpointer(stage)
        with pytest.raises(TypeError, match="state_dict"):
            TrainingCheckpointer(stage, extra={"x": object()}, every_steps=1)


@pytest.mark.parametrize(
    "where", [pytest.param("json", id="deep-json"), pytest.param("tree", id="deep-tree")]
)
def test_deeply_nested_header_is_corrupt_not_a_crash(where):
    """A header nested 100,000 levels deep (a crafted snapshot) is a CorruptCheckpointError,
    not a RecursionError, and a state nested too deep is refused at save with a TypeError."""
    import struct

    from faultkit.torch._format import MAGIC

    if where == "json":
        header = b"[" * 100_000 + b"]" * 100_000
    else:
        tree = "0"
        for _ in range(500):
            tree = '{"a":' + tree + "}"
        head = {"v": 1, "byteorder": sys.byteorder, "tensors": []}
        header = (json.dumps(head)[:-1] + ',"tree":' + tree + "}").encode()
    blob = MAGIC + struct.pack("<Q", len(header)) + header
    with pytest.raises(CorruptCheckpointError, match="nested"):
        decode(blob)
    deep: dict = {}
    node = deep
    for _ in range(200):
        node["a"] = {}
        node = node["a"]
    with pytest.raises(TypeError, match="nested deeper"):
        encode({"state": deep})


def test_loader_seeding_from_the_global_rng_is_warned_at_restore(store):
    """A DataLoader over the checkpointed ResumableSampler without generator= would shift the
    restored RNG stream: restore() says so, loudly, naming the fix; with it, no warning."""
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.arange(64.0).reshape(32, 2))
    for generator, warned in ((False, True), (True, False)):
        sampler = ResumableSampler(data, seed=1)
        loader = DataLoader(  # noqa: F841 - found by restore() through the garbage collector
            data, batch_size=4, sampler=sampler, generator=sampler.generator if generator else None
        )
        model = torch.nn.Linear(2, 1)
        k = f"t/loader-{generator}"
        with store.stage(k) as st:
            c = TrainingCheckpointer(st, model=model, extra={"sampler": sampler}, every_steps=1)
            c.step(0)
            c.close()
        with store.stage(k) as st, warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            c = TrainingCheckpointer(st, model=model, extra={"sampler": sampler}, every_steps=1)
            c.restore()
            c.close()
        hit = [w for w in got if "generator=sampler.generator" in str(w.message)]
        assert bool(hit) is warned, [str(w.message) for w in got]
