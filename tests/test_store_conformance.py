"""One conformance suite for CheckpointStore, run on memory://, file:// and s3:// (SeaweedFS)."""

from __future__ import annotations

import os
import uuid

import pytest
from store_helpers import blob_path, overwrite

from faultkit import (
    CheckpointStore,
    InvalidKeyError,
    StaleAttemptError,
    StoreConfigError,
    key,
)


def test_epochs_increase_and_resume_is_reported(store, events):
    """Each entry claims the next epoch; the second sees the first's progress."""
    k = key("etl", "dag", "manual__2024-01-01T00:00:00+00:00", "load")
    with store.stage(k) as a:
        assert (a.epoch, a.resumed) == (1, False)
        assert a.done("p0", {"rows": 3}) is True
    with store.stage(k) as b:
        assert (b.epoch, b.resumed) == (2, True)
        assert b.resume_info["units_done"] == 1
    resumed = [e for e in events if e.kind == "resumed"]
    assert len(resumed) == 1 and resumed[0].details["epoch"] == 2


def test_pending_done_results(store):
    """pending() skips done units, done() is idempotent, results() returns what was recorded."""
    with store.stage("s/a") as st:
        assert list(st.pending([0, 1, "x"])) == [0, 1, "x"]
        assert st.done(0, {"n": 0}) is True
        assert st.done(0, {"n": "again"}) is False
        assert st.done("x") is True
        assert list(st.pending([0, 1, "x"])) == [1]
    with store.stage("s/a") as st2:
        assert list(st2.pending([0, 1, "x", "0"])) == [1, "0"]  # int 0 and str "0" differ
        assert st2.results() == {0: {"n": 0}, "x": None}


def test_save_latest_roundtrip_streams(store):
    """Snapshots round-trip byte for byte; the newest verifying one is returned."""
    with store.stage("t/a") as st:
        assert st.latest() is None
        st.save(b"one", step=1, meta={"loss": 0.5})
        big = os.urandom(3 * (8 << 20) + 17)  # several stream chunks
        st.save(memoryview(big), step=2)
        snap = st.latest()
        assert (snap.step, snap.epoch, snap.size) == (2, 1, len(big))
        assert snap.data == big and snap.checksum.startswith("xxh3_128:")
        st.save(iter([b"ab", b"cd"]), step=3, meta={"k": [1, 2]})
    with store.stage("t/a") as st2:
        snap = st2.latest()
        assert (snap.step, snap.data, dict(snap.meta)) == (3, b"abcd", {"k": [1, 2]})


def test_stale_attempt_is_fenced_and_leaves_no_trace(store, events):
    """After a newer claim, an older epoch's done() and save() raise and write nothing."""
    old = store.stage("z/a").claim()
    old.done("u0")
    old.save(b"old", step=1)
    new = store.stage("z/a").claim()
    with pytest.raises(StaleAttemptError) as err:
        old.done("u1")
    assert (err.value.epoch, err.value.current) == (1, 2)
    with pytest.raises(StaleAttemptError):
        old.save(b"zombie", step=2)
    with pytest.raises(StaleAttemptError):
        old.check()
    fresh = store.stage("z/a").claim()
    assert fresh.results() == {"u0": None}
    assert fresh.latest().data == b"old"
    blobs = store._storage.list("z/a/@blobs")
    assert len(blobs) == 1, blobs  # the zombie's snapshot bytes were removed
    assert any(e.kind == "stale_attempt" for e in events)
    assert new.epoch == 2 and fresh.epoch == 3


@pytest.mark.parametrize(
    "damage", [pytest.param("flip", id="flip-byte"), pytest.param("truncate", id="truncate")]
)
def test_corrupt_snapshot_falls_back(store, events, damage):
    """A damaged newest snapshot is skipped, the previous one returned, an event emitted."""
    with store.stage("c/a") as st:
        st.save(b"A" * 1000, step=1)
        st.save(b"B" * 1000, step=2)
    path = blob_path(store, "c/a", 2)
    data = bytearray(store._storage.read(path))
    if damage == "flip":
        data[500] ^= 0x01
    else:
        data = data[:400]
    overwrite(store, path, bytes(data))
    with store.stage("c/a") as st:
        snap = st.latest()
    assert snap.step == 1 and snap.data == b"A" * 1000
    bad = [e for e in events if e.kind == "checkpoint_corrupt"]
    assert len(bad) == 1 and bad[0].details["step"] == 2 and bad[0].details["fallback_step"] == 1
    assert [err is None for _r, err in store.verify("c/a")] == [True, False]


def test_corrupt_log_record_is_ignored(store):
    """A bit-flipped log record is skipped rather than trusted."""
    with store.stage("r/a") as st:
        st.done("a")
        st.done("b")
    overwrite(store, "r/a/@log/000000000003", b'{"t":"done"}\nbadsum')
    view = store.read_view("r/a")
    assert 3 in view.corrupt and set(view.units) == {"s:a"}


def test_keys_delete_gc(store, backend):
    """keys() lists stages, gc keeps the newest valid snapshots, delete removes a stage."""
    for k in ("etl/a", "etl/b", "train/x"):
        with store.stage(k) as st:
            st.done(1)
    with store.stage("etl/a") as st:
        for i in range(5):
            st.save(f"s{i}".encode(), step=i)
    overwrite(store, blob_path(store, "etl/a", 4), b"rot")
    assert store.keys() == ["etl/a", "etl/b", "train/x"]
    assert store.keys("etl/") == ["etl/a", "etl/b"]
    store = CheckpointStore(backend[0], **backend[1])  # as `faultkit gc` would: verifies all
    report = store.gc("etl/a", keep=2)
    assert report["kept"] == [2, 3] and report["removed"] == [0, 1, 4]
    with store.stage("etl/a") as st:
        assert st.latest().step == 3
    assert store.gc("etl/a", keep=0)["kept"] == [3]  # the newest valid one always stays
    store.delete("etl/b")
    assert store.keys() == ["etl/a", "train/x"]
    with store.stage("etl/b") as st:  # above the deleted run's epoch 1 and its base (2)
        assert st.epoch == 3 and not st.resumed


BAD_KEYS = [
    pytest.param("../escape", id="dotdot"),
    pytest.param("a/../../escape", id="inner-dotdot"),
    pytest.param("/abs/path", id="absolute"),
    pytest.param("a\\b", id="backslash"),
    pytest.param("a//b", id="empty-segment"),
    pytest.param("a/", id="trailing-slash"),
    pytest.param("", id="empty"),
    pytest.param(".", id="dot"),
    pytest.param("a b", id="space"),
    pytest.param("a/b@c", id="reserved-char"),
]


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_traversal_keys_rejected_and_nothing_created(store, backend, tmp_path, bad):
    """Keys that could leave the root raise InvalidKeyError and create nothing anywhere."""
    before = sorted(store._storage.walk_files(""))
    outside = sorted(os.listdir(tmp_path))
    for call in (
        lambda: store.stage(bad).claim(),
        lambda: store.delete(bad),
        lambda: store.gc(bad),
        lambda: store.read_view(bad),
    ):
        with pytest.raises(InvalidKeyError):
            call()
    assert sorted(store._storage.walk_files("")) == before
    assert sorted(os.listdir(tmp_path)) == outside
    if backend[0].startswith("s3://"):
        s = store._storage
        bucket = s.root.split("/", 1)[0]
        assert all(p.startswith(f"{s.root}/") for p in s.fs.find(bucket))


def test_invalid_units_rejected(store):
    """Only str and int name units; anything else is a clear error."""
    with store.stage("u/a") as st:
        for bad in (1.5, None, ("a",), True):
            with pytest.raises(InvalidKeyError, match="unit must be a str or an int"):
                st.done(bad)


def test_attach_joins_epoch_and_is_fenced(store):
    """attach() writes as an existing epoch and is fenced when a newer one claims."""
    first = store.stage("j/a").claim()
    helper = store.attach("j/a", first.epoch)
    assert helper.done("from-helper") is True
    assert first.done("from-helper") is False
    store.stage("j/a").claim()
    with pytest.raises(StaleAttemptError):
        helper.done("late")
    with pytest.raises(StaleAttemptError):
        store.attach("j/a", 1)
    with pytest.raises(ValueError):
        store.attach("j/a", 7)


def test_key_builder():
    """key() maps arbitrary strings to valid, distinct keys."""
    assert key("etl", "manual__2024-01-01T00:00:00+00:00") == (
        "etl/manual__2024-01-01T00=3A00=3A00=2B00=3A00"
    )
    samples = ["a/b", "a=2Fb", "..", ".", "", "x y", "é", "a\\b", "-1", "=", "a" * 400, "a" * 401]
    keys = [key("p", s) for s in samples]
    assert len(set(keys)) == len(samples)
    store = CheckpointStore(f"memory://{uuid.uuid4().hex}")
    for k in keys:
        store.stage(k).claim()  # every built key is valid
    with pytest.raises(InvalidKeyError):
        key()


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("gs://bucket/x", id="unsupported-scheme"),
        pytest.param("bucket/x", id="no-scheme"),
        pytest.param("file://relative/path", id="relative-file"),
        pytest.param("s3://", id="no-bucket"),
    ],
)
def test_bad_store_urls(url):
    """A store URL that cannot work fails at construction with a StoreConfigError."""
    with pytest.raises(StoreConfigError):
        CheckpointStore(url)


def test_credentials_not_in_repr_or_pickle(s3_store_url):
    """Secrets given as storage options never show in repr and the store refuses pickling."""
    import pickle

    url, opts = s3_store_url
    store = CheckpointStore(url, **{**opts, "secret": "TOPSECRET-123"})
    assert "TOPSECRET" not in repr(store) and "TOPSECRET" not in repr(store.stage("a/b"))
    with pytest.raises(TypeError, match="not pickled"):
        pickle.dumps(store)


def test_unwritable_root_is_a_config_error(tmp_path):
    """A store root that cannot be created is a clear StoreConfigError."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreConfigError, match="writable"):
        CheckpointStore(f"file://{blocker}/store")


def test_finish_records_the_final_result_once(store):
    """finish() records a result once; a later attempt sees it; a zombie cannot finish."""
    zombie = store.stage("f/a").claim()
    with store.stage("f/a") as st:
        assert not st.finished and store.finished("f/a") == (False, None)
        assert st.finish({"rows": 10}) is True
        assert st.finish({"rows": 99}) is False
    with pytest.raises(StaleAttemptError):
        zombie.finish("late")
    with store.stage("f/a") as again:
        assert again.finished and again.final_result == {"rows": 10}
    assert store.finished("f/a") == (True, {"rows": 10})


def test_latest_mapped_is_private_and_verified(store):
    """latest(mapped=True) returns the same verified bytes; writing to them never reaches disk."""
    payload = os.urandom(100_000)
    with store.stage("m/a") as st:
        st.save(b"old", step=1)
        st.save(payload, step=2)
        snap = st.latest(mapped=True)
        assert snap.step == 2 and bytes(snap.data) == payload
        if isinstance(snap.data, memoryview):  # file:// maps the file copy-on-write
            snap.data[0] ^= 0xFF
    assert store.stage("m/a").claim().latest().data == payload
    overwrite(store, blob_path(store, "m/a", 2), payload[:50])
    assert store.stage("m/a").claim().latest(mapped=True).step == 1


def test_lost_first_claim_is_implied_by_its_commits(store):
    """A power cut can lose the stage's first claim (written without fsync) but keep a later
    commit: readers count the commit's epoch as claimed, so nothing is lost or re-fenced."""
    with store.stage("p/a") as first:
        assert first.epoch == 1
        first.done("u", result=1)
    overwrite(store, "p/a/@log/000000000001", b"")  # what a power cut leaves of the claim
    view = store.read_view("p/a")
    assert view.corrupt == [1] and view.epoch == 1 and set(view.units) == {"s:u"}
    with store.stage("p/a") as second:
        assert second.epoch == 2 and second.resumed
        assert second.results() == {"u": 1}
        assert second.resume_info["previous_epoch"] == 1


def test_claim_reads_a_log_it_has_not_seen(store):
    """A stage refreshed before others wrote still claims above them (no stale epoch)."""
    seen = store.stage("c/a")
    seen.refresh()  # empty log
    with store.stage("c/a") as other:
        other.done("x")
    with seen:
        assert seen.epoch == 2 and seen.is_done("x")


def test_store_options_are_checked(tmp_path, caplog):
    """file:// takes fsync (a bool or its text form); options only S3 uses are logged, not
    fatal (a connection's S3 options may meet a task's local URL); a bad fsync fails."""
    with pytest.raises(StoreConfigError, match="true or false"):
        CheckpointStore(f"file://{tmp_path}/a", fsync="sometimes")
    assert CheckpointStore(f"file://{tmp_path}/a", fsync="false")._storage.fsync is False
    assert CheckpointStore(f"file://{tmp_path}/a")._storage.fsync is True
    with caplog.at_level("WARNING", logger="faultkit.store"):
        CheckpointStore(f"file://{tmp_path}/a", endpoint_url="http://x")
        CheckpointStore("memory://x", fsync=False)
    assert "['endpoint_url']" in caplog.text and "['fsync']" in caplog.text


def test_keys_under_a_prefix_walk_only_that_folder(store):
    """keys(prefix) finds every stage under a prefix, whether or not it ends at a '/'."""
    for k in ("a/b/c", "a/b/d", "a/bc/e", "a/x", "b"):
        with store.stage(k) as st:
            st.done(0)
    assert store.keys("a/b/") == ["a/b/c", "a/b/d"]
    assert store.keys("a/b") == ["a/b/c", "a/b/d", "a/bc/e"]
    assert store.keys("a/") == ["a/b/c", "a/b/d", "a/bc/e", "a/x"]
    assert store.keys("no such/") == []
