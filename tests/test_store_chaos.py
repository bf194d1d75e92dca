"""Real processes killed (SIGKILL) and paused (SIGSTOP) around the store's commits."""

from __future__ import annotations

import gc
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from faultkit import CheckpointStore, CheckpointWriteError
from faultkit.testing import process_state, wait_until

CHILD = os.path.join(os.path.dirname(__file__), "scripts", "store_child.py")
sys.path.insert(0, os.path.dirname(CHILD))
from store_child import payload  # noqa: E402


@pytest.fixture(params=[pytest.param("file", id="file"), pytest.param("s3", id="s3")])
def backend(request, tmp_path):
    """(url, storage_options) of a fresh cross-process store."""
    if request.param == "file":
        return f"file://{tmp_path}/store", {}
    return request.getfixturevalue("s3_store_url")


def _spawn(backend, *args, failpoints: str = "", **kw) -> subprocess.Popen:
    url, opts = backend
    env = {**os.environ, "FK_STORAGE_OPTIONS": json.dumps(opts), "FAULTKIT_FAILPOINTS": failpoints}
    return subprocess.Popen(
        [sys.executable, CHILD, *args, "--store", url],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


def _lines(path) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def _check_exactly_once(store: CheckpointStore, k: str, out, units: int) -> None:
    """Every unit done once; none confirmed done was started again by a later epoch."""
    view = store.read_view(k)
    assert sorted(r.unit for r in view.units.values()) == list(range(units))
    confirmed: dict[int, int] = {}
    for line in _lines(out):
        parts = line.split()
        if parts[0] == "done" and parts[3] == "True":
            confirmed[int(parts[1])] = int(parts[2])
        if parts[0] == "start" and int(parts[1]) in confirmed:
            raise AssertionError(f"unit {parts[1]} repeated after its done() returned: {line}")
    # whatever epoch a unit's record names is the epoch that confirmed it
    for u, e in confirmed.items():
        assert view.units[f"i:{u}"].epoch == e


SAVE_POINTS = ["save.blob_partial", "save.blob_written", "log.before_create", "save.committed"]
DONE_POINTS = ["log.before_create", "log.created", "done.committed"]
LOCAL_POINTS = ["storage.tmp_written", "storage.linked"]


@pytest.mark.parametrize(
    "point,nth",
    [pytest.param(p, 3, id=f"done-{p}") for p in DONE_POINTS]
    + [pytest.param(p, 2, id=f"save-{p}") for p in SAVE_POINTS],
)
def test_kill_at_each_failpoint(backend, tmp_path, point, nth):
    """SIGKILL at each step of done()/save(): after restart nothing is torn, lost or repeated."""
    _kill_at(backend, tmp_path, point, nth)


@pytest.mark.parametrize("point", [pytest.param(p, id=p) for p in LOCAL_POINTS])
@pytest.mark.parametrize("nth", [pytest.param(3, id="done"), pytest.param(4, id="save")])
@pytest.mark.parametrize(
    "fsync", [pytest.param(True, id="fsync"), pytest.param(False, id="nofsync")]
)
def test_kill_inside_local_commit(tmp_path, point, nth, fsync):
    """SIGKILL between the local backend's temp write, link and folder fsync loses nothing,
    with fsync=False too (a killed process never loses what the kernel has)."""
    _kill_at((f"file://{tmp_path}/store", {"fsync": fsync}), tmp_path, point, nth)


def _kill_at(backend, tmp_path, point: str, nth: int) -> None:
    out = tmp_path / "out.log"
    k = "chaos/fp"
    args = [
        "work",
        "--key",
        k,
        "--out",
        str(out),
        "--units",
        "8",
        "--snap-every",
        "2",
        "--snap-size",
        str(3 << 20),
    ]
    p = _spawn(backend, *args, failpoints=f"{point}=kill@{nth}")
    p.communicate(timeout=120)
    assert p.returncode == -signal.SIGKILL, "the failpoint did not fire"
    assert "finished" not in _lines(out)
    store = CheckpointStore(backend[0], **backend[1])
    with store.stage(k) as probe:
        snap = probe.latest()
        if snap is not None:  # old or new, never torn
            assert snap.data == payload(snap.step, 3 << 20)
    p = _spawn(backend, *args)
    _stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr.decode()[-2000:]
    _check_exactly_once(store, k, out, 8)
    with store.stage(k) as final:
        assert final.latest().step == 7


def test_random_kills(tmp_path):
    """30+ SIGKILLs at random moments of a working stage; the ledger ends exactly once."""
    backend = (f"file://{tmp_path}/store", {})
    out = tmp_path / "out.log"
    k = "chaos/random"
    units = 800  # enough work that 30 kills land before it is done, even on a fast disk
    args = [
        "work",
        "--key",
        k,
        "--out",
        str(out),
        "--units",
        str(units),
        "--delay",
        "0.003",
        "--snap-every",
        "5",
        "--snap-size",
        "65536",
    ]
    rnd = random.Random(1234)
    kills = 0
    for _ in range(200):
        if "finished" in _lines(out) or kills >= 32:
            break
        p = _spawn(backend, *args)
        start = len(_lines(out))
        # wait until the child has claimed and is working, then kill at a random moment
        wait_until(
            lambda p=p, start=start: len(_lines(out)) > start + 1 or p.poll() is not None,
            60,
            "progress",
        )
        time.sleep(rnd.uniform(0, 0.05))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(30)
            if p.returncode == -signal.SIGKILL:
                kills += 1
        else:
            p.wait(30)
    while "finished" not in _lines(out):
        p = _spawn(backend, *args)
        p.communicate(timeout=120)
        assert p.returncode == 0
    assert kills >= 30, f"only {kills} kills landed"
    store = CheckpointStore(backend[0])
    _check_exactly_once(store, k, out, units)
    view = store.read_view(k)
    assert view.epoch >= kills + 1


@pytest.mark.parametrize(
    "lazy",
    [
        pytest.param(-1, id="claimed"),
        pytest.param(0, id="lazy-before-first-commit"),
        pytest.param(1, id="lazy-after-first-commit"),
    ],
)
def test_zombie_paused_then_fenced(backend, tmp_path, lazy):
    """A SIGSTOPped attempt resumed after a newer one committed cannot write anything: also
    a first try whose claim rides on its first commit, paused before or after that commit
    (before it, the newer attempt claims the same epoch number first, and that fences it)."""
    k = "chaos/zombie"
    out_a = str(tmp_path / "a.json")
    go = str(tmp_path / "go")
    a = _spawn(backend, "zombie", "--key", k, "--out", out_a, "--go", go, "--lazy", str(lazy))
    wait_until(lambda: os.path.exists(out_a + ".ready") or a.poll() is not None, 60, "A ready")
    os.kill(a.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: process_state(a.pid) == "T", 10, "A stopped")
        b = _spawn(
            backend,
            "work",
            "--key",
            k,
            "--out",
            str(tmp_path / "b.log"),
            "--units",
            "3",
            "--snap-every",
            "3",
        )
        b.communicate(timeout=120)
        assert b.returncode == 0
        open(go, "w").close()
    finally:
        os.kill(a.pid, signal.SIGCONT)
    a.communicate(timeout=120)
    assert a.returncode == 0
    result = json.load(open(out_a))
    newer = 1 if lazy == 0 else 2  # the log was still empty when the newer attempt claimed
    assert result == {"epoch": 1, "done": f"stale:{newer}", "save": f"stale:{newer}"}
    store = CheckpointStore(backend[0], **backend[1])
    with store.stage(k) as st:
        assert set(st.results()) == ({0, 1, 2} if lazy == 0 else {"before-pause", 0, 1, 2})
        assert st.latest().step == 2
        assert [e for e, _, _ in st._view.claims] == list(range(1, newer + 2))
        units = st._view.units.values()
        assert {r.epoch for r in units} == ({1} if lazy == 0 else {1, 2})


@pytest.mark.parametrize("procs,units", [pytest.param(8, 300, id="8x300")])
def test_concurrent_done_exactly_once(backend, tmp_path, procs, units, capsys):
    """8 processes of one attempt race done() over the same 300 units: each unit has one winner."""
    k = f"load/{uuid.uuid4().hex[:6]}"
    store = CheckpointStore(backend[0], **backend[1])
    stage = store.stage(k).claim()
    go = str(tmp_path / "go")
    children = [
        _spawn(
            backend,
            "race",
            "--key",
            k,
            "--epoch",
            str(stage.epoch),
            "--units",
            str(units),
            "--out",
            str(tmp_path / f"r{i}.json"),
            "--go",
            go,
        )
        for i in range(procs)
    ]
    time.sleep(0)  # children poll for the go file themselves
    open(go, "w").close()
    t0 = time.perf_counter()
    for c in children:
        _out, err = c.communicate(timeout=600)
        assert c.returncode == 0, err.decode()[-2000:]
    elapsed = time.perf_counter() - t0
    won = [u for i in range(procs) for u in json.load(open(tmp_path / f"r{i}.json"))["won"]]
    assert sorted(won) == list(range(units)), "a unit was lost or won twice"
    view = store.read_view(k)
    assert len(view.units) == units
    with capsys.disabled():
        print(
            f"\n[{backend[0].split(':')[0]}] {procs} processes x {units} units: "
            f"{units / elapsed:.0f} commits/s ({view.cursor} log records, {elapsed:.2f} s)"
        )


def test_concurrent_claims_get_distinct_epochs(backend, tmp_path):
    """Processes claiming the same stage at once get distinct, consecutive epochs."""
    k = "load/claims"
    procs = [
        _spawn(backend, "work", "--key", k, "--out", str(tmp_path / f"c{i}.log"), "--units", "0")
        for i in range(4)
    ]
    for p in procs:
        p.communicate(timeout=120)
        assert p.returncode == 0
    epochs = sorted(int(_lines(tmp_path / f"c{i}.log")[0].split()[1]) for i in range(4))
    assert epochs == [1, 2, 3, 4]


@pytest.fixture
def tiny_fs(tmp_path):
    """A 4 MiB tmpfs mount: a real disk that fills up."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_during_save(tiny_fs):
    """ENOSPC mid-save raises CheckpointWriteError; the previous snapshot stays intact."""
    store = CheckpointStore(f"file://{tiny_fs}/store")
    with store.stage("full/a") as st:
        st.save(b"A" * (1 << 20), step=1)
        with pytest.raises(CheckpointWriteError, match="disk is full") as err:
            st.save(os.urandom(8 << 20), step=2)
        assert err.value.errno == 28
        st.done("still-works")
    with store.stage("full/a") as st:
        snap = st.latest()
        assert snap.step == 1 and snap.data == b"A" * (1 << 20)
        assert st.results() == {"still-works": None}
    # The failed save left no file behind: only the first snapshot's data remains.
    assert len(os.listdir(tiny_fs / "store" / "full" / "a" / "@blobs")) == 1
    assert not (tiny_fs / "store" / "@tmp").exists() or not os.listdir(tiny_fs / "store" / "@tmp")


def test_local_commits_without_unnamed_files(tmp_path):
    """Where O_TMPFILE is unavailable the named-temp path commits the same and leaves no temp."""
    store = CheckpointStore(f"file://{tmp_path}/store")
    store._storage._anon_ok = False
    with store.stage("n/a") as st:
        assert st.done(1) and not st.done(1)
        st.save(b"x" * 1000, step=1)
        st.finish("ok")
    assert os.listdir(tmp_path / "store" / "@tmp") == []
    other = CheckpointStore(f"file://{tmp_path}/store")
    assert other.finished("n/a") == (True, "ok")
    assert other.stage("n/a").claim().latest().data == b"x" * 1000


def test_local_writes_survive_their_folder_being_removed(tmp_path):
    """A stage whose folder another process removed is written again in a new folder: the
    cached folder descriptor is not used for the removed one."""
    url = f"file://{tmp_path}/store"
    store = CheckpointStore(url)
    with store.stage("d/a") as st:
        st.done(1)
    shutil.rmtree(tmp_path / "store" / "d")
    with store.stage("d/a") as again:
        assert again.epoch == 1 and again.done(2)
    assert set(CheckpointStore(url).read_view("d/a").units) == {"i:2"}


def test_local_folder_descriptors_are_bounded(tmp_path):
    """Writing to many stages keeps a bounded number of folders open."""
    store = CheckpointStore(f"file://{tmp_path}/store")
    before = len(os.listdir("/proc/self/fd"))
    for i in range(300):
        with store.stage(f"many/s{i}") as st:
            st.done(0)
    assert len(os.listdir("/proc/self/fd")) - before <= 64 + 2
    del st, store
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) - before <= 2
