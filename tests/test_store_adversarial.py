"""The store's promises against an adversary: damaged logs, zombies writing into holes, long
and odd keys, deletes under live attempts, symbolic links, live maintenance, bad input.

Every case runs on memory://, file:// and a real S3 server (SeaweedFS) unless it is about one
backend's own mechanism (symbolic links exist on file:// only).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
from store_helpers import blob_path, claim_seq, flip, log_path, objects, overwrite, remove

from faultkit import (
    CheckpointStore,
    InvalidKeyError,
    LinkRefusedError,
    StaleAttemptError,
    StoreConfigError,
    _failpoints,
    _resumable,
    key,
)
from faultkit._keys import MAX_KEY, MAX_SEGMENT, key_parts
from faultkit._log import decode, encode
from faultkit._stage import Stage


def _fresh(store: CheckpointStore, backend) -> CheckpointStore:
    """Another process's view of the same store (memory:// stores are per process)."""
    url, opts = backend
    return store if url.startswith("memory://") else CheckpointStore(url, **opts)


def _history(store: CheckpointStore, k: str) -> tuple[Stage, Stage]:
    """Attempt 1 (done 0, snapshot 1), then attempt 2 (done 1, snapshot 2), both still held."""
    a = store.stage(k).claim()
    a.done(0)
    a.save(b"one", step=1)
    b = store.stage(k).claim()
    b.done(1)
    b.save(b"two", step=2)
    return a, b


# -- damaged logs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage", [pytest.param("gap", id="missing-claim"), pytest.param("flip", id="flipped-claim")]
)
def test_damaged_claim_never_lets_an_epoch_be_reused(store, backend, events, damage):
    """With attempt 2's claim lost or bit-flipped, the next claim still takes a new epoch,
    both older attempts are fenced, the newest valid snapshot is found, damage is reported."""
    k = "dmg/claim"
    a, b = _history(store, k)
    at = claim_seq(store, k, 2)
    (remove if damage == "gap" else flip)(store, log_path(k, at))
    reader = _fresh(store, backend)
    view = reader.read_view(k)
    assert [d.seq for d in view.damaged] == [at]
    with reader.stage(k) as probe:  # a reader after the hole still sees the newest snapshot
        assert probe.latest().data == b"two"
        assert probe.epoch > max(2, at)  # above every epoch the damaged record could hold
    c = reader.stage(k).claim()
    assert c.epoch not in (1, 2) and c.epoch > probe.epoch
    for old in (a, b):
        with pytest.raises(StaleAttemptError):
            old.done(9)
        with pytest.raises(StaleAttemptError):
            old.save(b"zombie", step=9)
    assert c.done(9) and c.results() == {0: None, 1: None, 9: None}
    assert [s.step for s in reader.read_view(k).live_snaps()] == [1, 2]
    problems = reader.report(k).problems
    assert problems and str(at) in problems[0]
    assert any(e.kind == "checkpoint_corrupt" and e.key == k for e in events)


def test_flipped_commit_is_reported_and_its_unit_redone(store, backend):
    """A done record that fails its checksum is damage: reported, the unit counted as not done,
    and the next claim steps past it."""
    k = "dmg/commit"
    with store.stage(k) as a:
        for u in range(3):
            a.done(u)
    view = store.read_view(k)
    flip(store, log_path(k, view.units["i:1"].seq))
    reader = _fresh(store, backend)
    with reader.stage(k) as b:
        assert list(b.pending(range(3))) == [1]
        assert b.epoch > view.units["i:1"].seq
        assert b.done(1)
    assert reader.report(k).problems


def test_zombie_writing_into_a_hole_is_fenced(store, backend):
    """A zombie whose next position is a hole left by a lost record (a newer claim) cannot
    fill it: its write raises and the hole is not filled with its record."""
    k = "dmg/hole"
    a = store.stage(k).claim()  # record 1; its cursor stays at 1
    b = _fresh(store, backend).stage(k).claim()  # record 2
    b.done("b")  # record 3, which names record 2
    remove(store, log_path(k, 2))
    with pytest.raises(StaleAttemptError, match="missing"):
        a.done("zombie")
    view = _fresh(store, backend).read_view(k)
    assert "s:zombie" not in view.units and "s:b" in view.units
    assert [(d.seq, d.kind) for d in view.damaged] == [(2, "missing")]


def test_forged_record_left_by_a_killed_zombie_is_not_trusted(store, backend, monkeypatch):
    """If the zombie dies between filling a hole and withdrawing its record, the record stays,
    but its successor's chain link exposes it: readers ignore it and report it."""
    k = "dmg/forged"
    a = store.stage(k).claim()
    b = _fresh(store, backend).stage(k).claim()
    b.done("b")
    remove(store, log_path(k, 2))
    monkeypatch.setattr(Stage, "_neighbours_ok", lambda self, *a: "")  # killed here
    a.done("zombie")  # believes it committed
    monkeypatch.undo()
    view = _fresh(store, backend).read_view(k)
    assert "s:zombie" not in view.units and "s:b" in view.units
    assert [(d.seq, d.kind) for d in view.damaged] == [(2, "unlinked")]
    c = _fresh(store, backend).stage(k).claim()
    assert c.epoch > 2
    with pytest.raises(StaleAttemptError):
        a.done("again")


def test_two_zombies_writing_into_a_deleted_log_are_both_fenced(store, backend):
    """After delete() removed a log's records, a stale writer may create into the removed
    positions, and a second one may find that record where its predecessor was: it must
    still see that the record before its own is not the one it read, and withdraw."""
    k = "dmg/two-zombies"
    a = store.stage(k).claim()
    a.done(0)
    b = _fresh(store, backend).stage(k).claim()
    b.done(1)  # b has read up to here (position 4)
    other = _fresh(store, backend).stage(k).claim()
    other.done(2)  # positions 5 and 6, which b has not read
    _fresh(store, backend).delete(k)  # a base at 7; positions 1-6 removed
    # zombie a, in the removed part, created position 4 and has not withdrawn it yet:
    forged = encode({"t": "done", "e": a._epoch, "id": "s:a", "u": "a", "ts": 1.0, "p": ""})
    store._storage.create(log_path(k, 4), forged)
    with pytest.raises(StaleAttemptError):
        b.done("late")  # creates position 5, whose predecessor is not the record b read
    assert not store._storage.present(f"{k}/@log", ["000000000005"])
    view = _fresh(store, backend).read_view(k)
    assert not view.units and view.deleted


def test_claim_seals_gaps_and_verify_names_them(store, backend):
    """A claim fills each gap with a void record, so later readers and writers meet damage
    instead of a hole; the damage stays visible to verify."""
    k = "dmg/seal"
    with store.stage(k) as a:
        for u in range(5):
            a.done(u)
    remove(store, log_path(k, 3))
    reader = _fresh(store, backend)
    c = reader.stage(k).claim()
    assert c.epoch >= 4
    kinds = {d.seq: d.kind for d in reader.read_view(k).damaged}
    assert kinds == {3: "sealed"}
    assert reader.report(k).problems


# -- keys --------------------------------------------------------------------------------


def test_long_and_odd_keys_work_everywhere(store, backend):
    """Airflow-sized, Unicode, 1,024+ character and surrogate keys built by key() all work."""
    parts = [
        ("airflow", "d" * 120, "scheduled__2024-01-01T00:00:00+00:00", "t" * 100, "-1"),
        ("ü" * 400, "日本語" * 200, "🔥" * 100),
        tuple(f"part-{i}-" + "x" * 40 for i in range(40)),
        ("\ud800bad-surrogate", "\x00nul", ".hidden", "..", "/", ""),
    ]
    keys = set()
    for p in parts:
        k = key(*p)
        assert len(k) <= MAX_KEY
        keys.add(k)
        with store.stage(k) as st:
            st.done(0)
            st.save(b"x", step=1)
        with _fresh(store, backend).stage(k) as again:
            assert again.resumed and again.latest().data == b"x"
    assert len(keys) == len(parts)
    assert set(_fresh(store, backend).keys()) == keys
    assert key_parts(key("etl", "a/b", "")) == ["etl", "a/b", ""]


def test_key_parts_that_differ_give_different_keys():
    """Distinct inputs give distinct keys, however long (hashes are 128-bit)."""
    base = "y" * 600
    ks = {key(base + c) for c in "abc"} | {key("z", base + c) for c in "abc"}
    assert len(ks) == 6
    assert key(*["q"] * 300) != key(*["q"] * 301)


def test_plain_parts_are_kept_and_the_rest_escaped():
    """key()'s fast path (a part that needs no escaping is kept as it is) gives exactly the
    escaped form, at the edges of what it admits too."""

    def escaped(part: str) -> str:
        if part == "":
            return "="
        safe = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
        out = []
        for i, c in enumerate(part):
            if c in safe and not (c == "." and i == 0):
                out.append(c)
            else:
                out.extend(f"={b:02X}" for b in c.encode())
        return "".join(out)

    parts = ["a", "A-z_0.9", "-", "_", "a.", ".a", "..", "a b", "a\n", "é", "٣", "x" * 200]
    for part in parts:
        assert key("p", part) == f"p/{escaped(part)}", part
    assert key("x" * 201) != "x" * 201 and len(key("x" * 201)) <= MAX_SEGMENT
    assert key("x" * 200) == "x" * 200


def test_refused_key_writes_nothing(store, backend):
    """A key over the limit, or one that does not fit the store's paths, writes nothing."""
    before = objects(store)
    with pytest.raises(InvalidKeyError, match="key"):
        store.stage("a/" + "b" * MAX_KEY).claim()
    assert objects(store) == before


def test_key_that_does_not_fit_a_long_s3_prefix_is_refused(s3_store_url):
    """On S3 the store's prefix counts against the 1,024-byte key limit: refused up front."""
    url, opts = s3_store_url
    store = CheckpointStore(url + "/" + "p" * 600, **opts)
    with pytest.raises(InvalidKeyError, match="does not fit"):
        store.stage(key("k" * 200, "l" * 200)).claim()
    assert objects(store) == []


# -- delete ------------------------------------------------------------------------------


def test_delete_keeps_the_deleted_runs_zombies_fenced(store, backend):
    """After delete(), a new run claims above every old epoch; the old attempts (zombies) are
    refused; the stage is hidden from keys() until the new run claims it."""
    k = "del/a"
    a, b = _history(store, k)
    _fresh(store, backend).delete(k)
    assert k not in _fresh(store, backend).keys()
    assert _fresh(store, backend).finished(k) == (False, None)
    for old in (a, b):
        with pytest.raises(StaleAttemptError):
            old.done("late")
        with pytest.raises(StaleAttemptError):
            old.save(b"late", step=3)
    new = _fresh(store, backend).stage(k).claim()
    assert new.epoch > 2 and not new.resumed and new.latest() is None
    assert new.done(0) and new.results() == {0: None}
    assert k in _fresh(store, backend).keys()
    with pytest.raises(StaleAttemptError):
        b.done("later")
    assert not _fresh(store, backend).report(k).problems


def test_delete_under_a_live_attempt_fences_it(store, backend):
    """delete() beside a running attempt fences that attempt instead of corrupting the stage."""
    k = "del/live"
    live = store.stage(k).claim()
    live.done(0)
    _fresh(store, backend).delete(k)
    with pytest.raises(StaleAttemptError):
        live.done(1)
    assert _fresh(store, backend).read_view(k).units == {}


# -- live maintenance --------------------------------------------------------------------


def test_results_and_done_from_many_threads(store):
    """results(), snapshots(), resumed and done() from concurrent threads never raise."""
    st = store.stage("thr/a").claim()
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                st.results()
                st.snapshots()
                _ = st.resumed
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    writers = [
        threading.Thread(target=lambda i=i: [st.done(f"{i}-{u}") for u in range(150)])
        for i in range(3)
    ]
    for t in writers:
        t.start()
    for t in writers:
        t.join(120)
    stop.set()
    for t in readers:
        t.join(30)
    assert not errors, errors
    assert len(st.results()) == 450


def test_signal_right_after_commit_keeps_the_committed_snapshot(store, backend):
    """An exception arriving just after a snapshot's record is created (the failpoint raises,
    as a KeyboardInterrupt would) leaves the committed data in place."""
    k = "sig/a"
    st = store.stage(k).claim()
    _failpoints.arm("log.created", "raise")
    try:
        with pytest.raises(_failpoints.InjectedFault):
            st.save(b"committed", step=7)
    finally:
        _failpoints.disarm()
    with _fresh(store, backend).stage(k) as again:
        snap = again.latest()
        assert snap is not None and snap.step == 7 and snap.data == b"committed"


def test_gc_shortcut_never_removes_the_newest_valid_snapshot(store, backend):
    """gc trusts snapshots its store object wrote only while they are unchanged: one replaced
    behind its back is verified, found corrupt, and the newest valid one is kept."""
    k = "gc/trust"
    with store.stage(k) as st:
        for step in (1, 2, 3):
            st.save(f"snap-{step}".encode() * 50, step=step)
    overwrite(store, blob_path(store, k, 3), b"rotten" * 10)
    report = store.gc(k, keep=1)
    assert report["kept"] == [2], report
    with _fresh(store, backend).stage(k) as again:
        assert again.latest().data == b"snap-2" * 50


def _live_writer(url: str, opts: dict, k: str, seconds: float) -> subprocess.Popen:
    code = f"""
import json, sys, time
from faultkit import CheckpointStore
store = CheckpointStore({url!r}, **json.loads({json.dumps(json.dumps(opts))}))
end = time.monotonic() + {seconds}
step = 0
while time.monotonic() < end:
    with store.stage({k!r}) as st:
        for _ in range(5):
            step += 1
            st.save(b"x" * 20000, step=step)
            st.done(step)
            store.gc({k!r}, keep=2, grace=0.0)
print("wrote", step)
"""
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", [pytest.param("file", id="file")])
def test_verify_and_gc_beside_a_live_job_raise_no_false_alarm(tmp_path, backend_name):
    """faultkit verify, ls and gc run again and again beside a job that saves, claims and gc's
    never report damage on the healthy store."""
    url = f"file://{tmp_path}/store"
    CheckpointStore(url)
    job = _live_writer(url, {}, "live/job", 12.0)
    runs = 0
    try:
        while job.poll() is None:
            for cmd in (["verify", url], ["ls", url], ["gc", url, "--keep", "2"]):
                r = subprocess.run(
                    [sys.executable, "-m", "faultkit.cli", *cmd],
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                assert r.returncode == 0, (cmd, r.stdout, r.stderr)
            runs += 1
    finally:
        out, err = job.communicate(timeout=120)
    assert job.returncode == 0, err
    assert runs >= 3, "the checks did not overlap the job"
    assert int(out.split()[-1]) > 10
    assert not CheckpointStore(url).report("live/job").problems


# -- inspecting what is not there ---------------------------------------------------------


@pytest.mark.parametrize("cmd", ["ls", "verify", "show", "gc"])
def test_missing_store_is_exit_2_and_nothing_is_created(tmp_path, cmd):
    """A mistyped store path exits 2 with a clear message and no folder appears."""
    where = tmp_path / "no" / "such"
    args = [cmd, f"file://{where}"] + (["k"] if cmd == "show" else [])
    r = subprocess.run(
        [sys.executable, "-m", "faultkit.cli", *args], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "does not exist" in r.stderr
    assert not (tmp_path / "no").exists()


def test_stage_with_no_index_is_still_found(store, backend):
    """Every stage is listed, whatever hint files are missing: keys() walks the store."""
    for k in ("a/1", "a/2", "b/c/d"):
        with store.stage(k) as st:
            st.done(0)
    assert _fresh(store, backend).keys() == ["a/1", "a/2", "b/c/d"]


# -- bad configuration --------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, 0, "maybe", 1.5])
def test_fsync_must_be_a_boolean(tmp_path, value):
    """fsync takes True/False (or their spellings in text), never a silent off."""
    with pytest.raises(StoreConfigError, match="fsync"):
        CheckpointStore(f"file://{tmp_path}/s", fsync=value)
    assert not (tmp_path / "s").exists() or not os.listdir(tmp_path / "s")


@pytest.mark.parametrize(
    "url,hint",
    [
        pytest.param("file:/data/ck", "file:///data/ck", id="file-one-slash"),
        pytest.param("file:data", "file:///data", id="file-no-slash"),
        pytest.param("s3:bucket/x", "s3://bucket/x", id="s3-no-slashes"),
        pytest.param("file://relative/path", "three slashes", id="file-relative"),
    ],
)
def test_misspelled_urls_say_how_to_write_them(url, hint):
    """A URL with a missing '//' or a relative file path says the right spelling."""
    with pytest.raises(StoreConfigError) as err:
        CheckpointStore(url)
    assert hint in str(err.value)


# -- symbolic links (file:// only) ---------------------------------------------------------


@pytest.fixture
def outside(tmp_path):
    """A folder outside the store with a file an attacker would like removed or read."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "victim.bin").write_bytes(b"precious")
    (d / "000000000002").write_bytes(b'{"t":"claim","e":99}\n0')
    return d


def _tree(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_symlinked_blob_folder_is_never_followed(tmp_path, outside):
    """A stage's @blobs replaced by a link to another folder: gc, delete and verify never
    read, write or delete through it, and verify reports it."""
    url = f"file://{tmp_path}/store"
    store = CheckpointStore(url)
    with store.stage("ln/a") as st:
        st.save(b"one", step=1)
        st.save(b"two", step=2)
    blobs = tmp_path / "store" / "ln" / "a" / "@blobs"
    for f in blobs.iterdir():
        f.unlink()
    blobs.rmdir()
    blobs.symlink_to(outside)
    before = _tree(outside)
    report = CheckpointStore(url).report("ln/a")
    assert "ln/a/@blobs" in report.anomalies
    assert all(err for _, err in report.snapshots)
    CheckpointStore(url).gc("ln/a", keep=1, grace=0.0)
    r = subprocess.run(
        [sys.executable, "-m", "faultkit.cli", "verify", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "ln/a/@blobs" in r.stdout
    CheckpointStore(url).delete("ln/a")
    assert _tree(outside) == before


def test_symlinked_log_record_is_damage_not_read(tmp_path, outside):
    """A log record replaced by a link to a file outside is reported as damage; its target's
    content (a forged claim of epoch 99) is never read."""
    url = f"file://{tmp_path}/store"
    store = CheckpointStore(url)
    with store.stage("ln/log") as st:
        st.done(0)
        st.done(1)
    rec = tmp_path / "store" / "ln" / "log" / "@log" / "000000000002"
    rec.unlink()
    rec.symlink_to(outside / "000000000002")
    view = CheckpointStore(url).read_view("ln/log")
    assert [(d.seq, d.kind) for d in view.damaged] == [(2, "link")]
    assert view.epoch == 1  # the forged epoch 99 was not read
    with CheckpointStore(url).stage("ln/log") as again:
        assert again.epoch == 3  # stepped past position 2, not to 100


def test_symlinked_stage_folder_is_refused(tmp_path, outside):
    """A stage folder that is a link to elsewhere: writes fail with a clear error and nothing
    appears outside the store."""
    url = f"file://{tmp_path}/store"
    CheckpointStore(url)
    (tmp_path / "store" / "evil").symlink_to(outside)
    before = _tree(outside)
    with pytest.raises(OSError, match="link"):
        CheckpointStore(url).stage("evil").claim()
    with pytest.raises(OSError, match="link"):
        CheckpointStore(url).stage("evil/sub").claim()
    with pytest.raises(OSError, match="link"):
        CheckpointStore(url).delete("evil")
    with pytest.raises(OSError, match="link"):
        CheckpointStore(url).gc("evil", grace=0.0)
    assert _tree(outside) == before


def test_linked_log_folder_is_refused_not_taken_for_a_fresh_stage(tmp_path, outside):
    """A stage's ``@log`` folder replaced by a link to a folder of forged records: the
    listing that tells a fresh stage (no log folder) from one to read refuses the link;
    nothing is read through it, claimed, recorded or deleted there."""
    url = f"file://{tmp_path}/store"
    (tmp_path / "store" / "ln" / "t").mkdir(parents=True)
    (outside / "000000000001").write_bytes(encode({"t": "fin", "e": 7, "r": {"v": 1}, "ts": 0}))
    (tmp_path / "store" / "ln" / "t" / "@log").symlink_to(outside)
    before = _tree(outside)
    with pytest.raises(LinkRefusedError):
        CheckpointStore(url).stage("ln/t").refresh()
    with pytest.raises(LinkRefusedError):
        _resumable.recorded(CheckpointStore(url), "ln/t")
    for first_try in (True, False):
        with pytest.raises(LinkRefusedError):
            _resumable.call(
                lambda stage: "ran", store=CheckpointStore(url), key="ln/t", first_try=first_try
            )
    with pytest.raises(OSError, match="link"):
        CheckpointStore(url).delete("ln/t")
    assert _tree(outside) == before


def test_new_folder_step_uses_a_racing_writers_folder_and_refuses_a_link(tmp_path, outside):
    """Under a folder just made, the next one is made before it is looked up: a folder a
    racing writer made there first is opened all the same, and a link planted there is
    refused, never followed."""
    store = CheckpointStore(f"file://{tmp_path}/store")
    dirs = store._storage._dirs
    before = _tree(outside)
    root = os.open(tmp_path / "store", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd, made = dirs._step(root, "fresh", True, "fresh", True)
        os.close(fd)
        assert made and (tmp_path / "store" / "fresh").is_dir()
        fd, made = dirs._step(root, "fresh", True, "fresh", True)  # a racer made it first
        os.close(fd)
        assert not made
        (tmp_path / "store" / "planted").symlink_to(outside)
        with pytest.raises(LinkRefusedError):
            dirs._step(root, "planted", True, "planted", True)
    finally:
        os.close(root)
    assert _tree(outside) == before


def test_cached_folders_removed_and_made_again_elsewhere(tmp_path, outside):
    """One process caches the folders above a stage it looked up; another removes the run's
    folder and makes it again, then replaces it with a link. The first finds the new stage,
    never the old answer; it reads nothing through the link and refuses to write there."""
    url = f"file://{tmp_path}/store"
    mine, other = CheckpointStore(url), CheckpointStore(url)
    k = key("run", "r1", "task", "p0")
    assert _resumable.recorded(mine, k) == (False, None)  # missing: its run folder is cached
    _resumable.call(lambda stage: "first", store=other, key=k)
    assert _resumable.recorded(mine, k) == (True, "first")

    run = tmp_path / "store" / "run"
    shutil.rmtree(run)  # the folders mine has cached are gone
    assert _resumable.recorded(mine, k) == (False, None)
    _resumable.call(lambda stage: "second", store=other, key=k)  # made again
    assert _resumable.recorded(mine, k) == (True, "second")

    shutil.rmtree(run)
    run.symlink_to(outside)
    before = _tree(outside)
    assert _resumable.recorded(mine, k) == (False, None)  # nothing read through the link
    with pytest.raises(OSError, match="link"):
        _resumable.call(lambda stage: "third", store=mine, key=k)
    assert _tree(outside) == before


def test_folder_cache_never_closes_a_descriptor_in_use(tmp_path):
    """Many threads commit through one store whose folder cache holds two entries while
    another thread keeps emptying it: every descriptor taken from the cache must stay open
    (and name the same folder) until its user is done, or a record lands in another stage's
    log. Every stage ends with its own units and result, its log undamaged, and no
    descriptor is left open once the store's cache is dropped."""
    store = CheckpointStore(f"file://{tmp_path}/s", fsync=False)
    dirs = store._storage._dirs
    dirs._limit = 2
    walks = []
    walk = dirs._open
    dirs._open = lambda folder, create: walks.append(folder) or walk(folder, create)
    fds = len(os.listdir("/proc/self/fd"))
    stop, errors = threading.Event(), []

    def churn() -> None:
        while not stop.is_set():
            dirs.forget("run")
            os.sched_yield()

    def body(i: int, stage: Stage) -> int:
        for u in range(3):
            stage.done(u, {"i": i, "u": u})
        return i

    def worker(w: int) -> None:
        try:
            for j in range(8):
                i = w * 8 + j
                _resumable.call(body, (i,), store=store, key=f"run/t-{i}", first_try=True)
        except Exception as exc:  # reported below, with the others
            errors.append(exc)

    churner = threading.Thread(target=churn)
    churner.start()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    stop.set()
    churner.join(timeout=30)
    assert not errors, errors[:3]
    assert len(walks) > 2 * 256, "the cache never missed: nothing was evicted under a user"
    other = CheckpointStore(f"file://{tmp_path}/s")
    for i in range(256):
        k = f"run/t-{i}"
        assert _resumable.recorded(other, k) == (True, i)
        view = other.read_view(k)
        assert not view.damaged, (k, view.damaged)
        got = {r.unit: r.result for r in view.units.values()}
        assert got == {u: {"i": i, "u": u} for u in range(3)}, k
    dirs.close()
    other._storage._dirs.close()
    assert len(os.listdir("/proc/self/fd")) <= fds + 1  # other's root


def test_store_root_may_itself_be_a_link(tmp_path):
    """The store's own root may be a link (that is the user's configuration)."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "ck").symlink_to(real)
    with CheckpointStore(f"file://{tmp_path}/ck").stage("r/a") as st:
        st.done(0)
    assert (real / "r" / "a" / "@log").is_dir()


# -- compaction --------------------------------------------------------------------------


def _compacted(backend, k: str, units: int = 40) -> tuple[CheckpointStore, str]:
    """A stage of ``units`` done units and one snapshot, compacted every 16 records; returns
    the store and the newest summary's name."""
    url, opts = backend
    store = CheckpointStore(url, **{**opts, "compact_every": 16})
    with store.stage(k) as st:
        for u in range(units):
            st.done(u, {"u": u})
            if u == 20:
                st.save(b"twenty", step=20)
    names = store._storage.list(f"{k}/@log")
    sums = sorted(n for n in names if n.startswith("sum-"))
    assert len(sums) >= 2 and any(n.startswith("head-") for n in names), names
    return store, sums[-1]


@pytest.mark.parametrize("how", ["flipped", "removed", "truncated", "forged"])
def test_damaged_summary_falls_back_to_the_history(backend, how):
    """A summary that fails its checksum, is gone, is cut short or was rewritten with a
    matching length is never trusted: the reader folds the records it summarized (they are
    kept), reports the damage, and the next claim steps above it."""
    k = "cmp/damaged"
    store, summary = _compacted(backend, k)
    path = f"{k}/@log/{summary}"
    if how == "flipped":
        flip(store, path, at=40)
    elif how == "removed":
        remove(store, path)
    elif how == "truncated":
        overwrite(store, path, store._storage.read(path)[:-7])
    else:  # same length, valid JSON, claiming no unit is done: the checksum still catches it
        data = store._storage.read(path)
        fake = json.dumps({"v": 1, "cursor": 0, "units": []}).encode()
        overwrite(store, path, fake.ljust(len(data), b" "))
    base = int(summary.split("-")[1])
    fresh = CheckpointStore(backend[0], **backend[1])
    view = fresh.read_view(k)
    assert (base, "corrupt") in [(d.seq, d.kind) for d in view.damaged]
    assert set(view.units) == {f"i:{u}" for u in range(40)}
    assert [s.step for s in view.live_snaps()] == [20]
    with fresh.stage(k) as again:
        assert again.epoch > base  # above every epoch the damaged position could hold
        assert set(again.results()) == set(range(40)) and again.latest().data == b"twenty"
    assert fresh.report(k).problems


def test_hint_pointing_at_a_plain_record_is_only_a_shortcut(backend):
    """A forged ``head-`` hint (at a record that is no summary, or past the log) changes
    nothing the reader concludes."""
    k = "cmp/hint"
    store, _ = _compacted(backend, k)
    truth = store.read_view(k)
    for seq in (3, truth.cursor, truth.cursor + 50):
        store._storage.create(f"{k}/@log/head-{seq:012d}", b"", durable=False)
        view = CheckpointStore(backend[0], **backend[1]).read_view(k)
        assert set(view.units) == set(truth.units) and view.epoch == truth.epoch
        assert not view.damaged


def test_zombie_fenced_across_compactions(backend):
    """An attempt left behind while a newer one committed through several compactions is
    still fenced, and a reader starting from the newest summary sees every unit once."""
    url, opts = backend
    store = CheckpointStore(url, **{**opts, "compact_every": 16})
    k = "cmp/zombie"
    old = store.stage(k).claim()
    old.done("old")
    new = store.stage(k).claim()
    for u in range(50):
        new.done(u)
    with pytest.raises(StaleAttemptError):
        old.done("late")
    with pytest.raises(StaleAttemptError):
        old.save(b"late", step=9)
    view = CheckpointStore(url, **opts).read_view(k)
    assert view.base > 16 and set(view.units) == {"s:old"} | {f"i:{u}" for u in range(50)}
    assert [e for e, _s, _t in view.claims] == [1, 2] and not view.snaps


def test_delete_removes_summaries_and_keeps_zombies_fenced(backend):
    k = "cmp/delete"
    store, _ = _compacted(backend, k)
    held = store.stage(k).claim()
    store.delete(k)
    assert not [n for n in store._storage.list(f"{k}/@log") if not n.isdigit()]
    with pytest.raises(StaleAttemptError):
        held.done("after-delete")
    with store.stage(k) as again:
        assert again.epoch > held._epoch and not again.results()


def test_compaction_removes_summaries_that_no_record_names(backend):
    """A compactor that died between its summary and its base record leaves the summary
    behind; once another record holds that position, the next compaction removes it. A
    summary whose position is still free (its compactor may yet name it) is kept."""
    url, opts = backend
    store = CheckpointStore(url, **{**opts, "compact_every": 16})
    k = "cmp/orphans"
    st = store.stage(k).claim()
    for u in range(5):
        st.done(u)
    cursor = store.read_view(k).cursor
    dead = f"sum-{cursor + 1:012d}-deadbeef"  # the next position goes to a plain commit
    ahead = f"sum-{cursor + 500:012d}-cafe0000"
    for name in (dead, ahead):
        store._storage.create(f"{k}/@log/{name}", b"left by a compactor that died")
    for u in range(5, 40):
        st.done(u)
    sums = [n for n in store._storage.list(f"{k}/@log") if n.startswith("sum-")]
    assert dead not in sums and ahead in sums, sums
    named = [n for n in sums if n != ahead]
    assert len(named) >= 2
    for n in named:  # every other summary is the one its base record names
        body = decode(store._storage.read(f"{k}/@log/{n.split('-')[1]}"))
        assert body["t"] == "base" and body["sum"] == n, (n, body)
    view = CheckpointStore(url, **opts).read_view(k)
    assert not view.damaged and set(view.units) == {f"i:{u}" for u in range(40)}


@pytest.mark.parametrize("value", [True, 3, -1, "500", 1.5])
def test_compact_every_is_checked(tmp_path, value):
    with pytest.raises(StoreConfigError, match="compact_every"):
        CheckpointStore(f"file://{tmp_path}/s", compact_every=value)


def test_symlinked_summary_is_damage_not_read(tmp_path, outside):
    """A summary replaced by a link to a forged one outside the store is not followed."""
    url = f"file://{tmp_path}/store"
    _, summary = _compacted((url, {}), "ln/cmp")
    folder = tmp_path / "store" / "ln" / "cmp" / "@log"
    forged = outside / "forged"
    forged.write_bytes((folder / summary).read_bytes())
    (folder / summary).unlink()
    (folder / summary).symlink_to(forged)
    view = CheckpointStore(url).read_view("ln/cmp")
    assert view.damaged and set(view.units) == {f"i:{u}" for u in range(40)}


@pytest.mark.parametrize("create", [False, True])
def test_create_option_says_must_exist(tmp_path, create):
    """``create=`` is not an option: the error names the one that is, and nothing is made."""
    with pytest.raises(StoreConfigError, match=f"must_exist={not create}"):
        CheckpointStore(f"file://{tmp_path}/nope", create=create)
    assert not (tmp_path / "nope").exists()


def test_save_whose_folder_delete_removed_mid_write_is_stale(tmp_path, monkeypatch):
    """delete() beside a live attempt can remove the snapshot folder just as a save opens
    its file there, and the storage refuses the write ("folder does not exist"): the
    attempt is told it was fenced (StaleAttemptError), not that the disk failed. A refusal
    with no delete behind it stays a CheckpointWriteError."""
    from faultkit import CheckpointWriteError

    url = f"file://{tmp_path}/store"
    store = CheckpointStore(url)
    st = store.stage("del/mid-save").claim()
    st.done(0)
    real = store._storage.open_new

    deleting = []

    def refused(path):  # the race, made to happen here: after save() checked its fence
        if deleting:
            CheckpointStore(url).delete("del/mid-save")
        raise CheckpointWriteError(f"could not write {path!r}: the folder does not exist")

    monkeypatch.setattr(store._storage, "open_new", refused)
    with pytest.raises(CheckpointWriteError):
        st.save(b"no delete behind it", step=1)
    deleting.append(True)
    with pytest.raises(StaleAttemptError):
        st.save(b"deleted meanwhile", step=2)
    monkeypatch.setattr(store._storage, "open_new", real)
    assert not CheckpointStore(url).read_view("del/mid-save").snaps
