"""The one resumable call every adapter makes (faultkit._resumable), on a real store."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading

import pytest

from faultkit import CheckpointStore, StaleAttemptError, UnsafeCheckpointError
from faultkit._codec import INLINE_LIMIT
from faultkit._log import decode
from faultkit._resumable import call, call_async, store_for


class Body:
    """A task body that marks units done and counts its runs."""

    def __init__(self, result, units=3, fail_at=None):
        self.result, self.units, self.fail_at, self.runs = result, units, fail_at, 0

    def __call__(self, *, stage):
        self.runs += 1
        for u in stage.pending(range(self.units)):
            if u == self.fail_at:
                self.fail_at = None
                raise ConnectionError("lost mid-way")
            stage.done(u)
        return self.result


@pytest.fixture
def fstore(tmp_path):
    return CheckpointStore(f"file://{tmp_path}/store")


@pytest.mark.parametrize(
    "result",
    [
        pytest.param(("a", 1, (2.5, None)), id="tuple"),
        pytest.param({1: "int key", "s": {"nested": [b"bytes"]}}, id="dict"),
        pytest.param(dt.datetime(2024, 1, 1, 12, tzinfo=dt.UTC), id="datetime"),
        pytest.param({"big": "x" * (INLINE_LIMIT + 10)}, id="spilled"),
    ],
)
def test_finished_result_is_replayed_exactly(fstore, result):
    """A finished call returns its recorded result on the next call, same types, no re-run."""
    body = Body(result)
    assert call(body, store=fstore, key="r/k") == result
    again = call(body, store=CheckpointStore(fstore.url), key="r/k")
    assert again == result and type(again) is type(result)
    assert body.runs == 1


def test_failed_call_resumes_its_units(fstore):
    """A body that raised mid-way resumes in the next call, skipping units already done."""
    body = Body("ok", units=5, fail_at=3)
    with pytest.raises(ConnectionError):
        call(body, store=fstore, key="r/crash")
    assert call(body, store=fstore, key="r/crash") == "ok"
    view = fstore.read_view("r/crash")
    assert {r.unit: r.epoch for r in view.units.values()} == {0: 1, 1: 1, 2: 1, 3: 2, 4: 2}


def test_unrecordable_result_is_run_again_with_a_warning(fstore, caplog):
    """A result the codec cannot give back exactly is not recorded: the next call runs the
    body (its units skipped), and a warning says why."""
    body = Body(object())
    with caplog.at_level(logging.WARNING):
        call(body, store=fstore, key="r/obj")
    call(body, store=fstore, key="r/obj")
    assert body.runs == 2
    assert "cannot record exactly" in caplog.text


def test_pickled_results_need_trust(fstore):
    """pickle_result records anything; replaying it without trust is refused."""
    body = Body(threading.Lock)  # a class: not plain data, pickles by reference
    assert call(body, store=fstore, key="r/pk", pickle_ok=True) is threading.Lock
    assert call(body, store=fstore, key="r/pk", pickle_ok=True) is threading.Lock
    assert body.runs == 1
    with pytest.raises(UnsafeCheckpointError):
        call(body, store=fstore, key="r/pk")


def test_expired_or_refreshed_result_runs_afresh(fstore):
    """An expired result, or refresh=True, deletes the stage: the body runs again from its
    first unit, above every epoch of the old run."""
    body = Body("v1")
    call(body, store=fstore, key="r/exp")
    assert call(body, store=fstore, key="r/exp", expire=dt.timedelta(hours=1)) == "v1"
    assert body.runs == 1
    body.result = "v2"
    assert call(body, store=fstore, key="r/exp", expire=dt.timedelta(0)) == "v2"
    assert body.runs == 2
    view = fstore.read_view("r/exp")
    assert len(view.units) == 3 and {r.epoch for r in view.units.values()} == {view.epoch}
    body.result = "v3"
    assert call(body, store=fstore, key="r/exp", refresh=True) == "v3"


def test_zombie_call_cannot_record_over_the_newer_one(fstore):
    """A call whose attempt was superseded mid-body cannot record its result."""
    started, release = threading.Event(), threading.Event()
    out = {}

    def slow(*, stage):
        started.set()
        release.wait(30)
        return "zombie"

    def run():
        try:
            out["zombie"] = call(slow, store=fstore, key="r/z")
        except StaleAttemptError as exc:
            out["zombie"] = exc

    t = threading.Thread(target=run)
    t.start()
    assert started.wait(30)
    assert call(Body("newer"), store=CheckpointStore(fstore.url), key="r/z") == "newer"
    release.set()
    t.join(30)
    assert isinstance(out["zombie"], StaleAttemptError)
    assert fstore.finished("r/z") == (True, {"v": "newer"})


def test_async_call(fstore):
    """call_async runs a coroutine body resumably and replays its result."""
    runs = []

    async def body(x, *, stage):
        runs.append(stage.epoch)
        stage.done(0)
        return (x, stage.epoch)

    assert asyncio.run(call_async(body, (7,), store=fstore, key="r/async")) == (7, 1)
    assert asyncio.run(call_async(body, (7,), store=fstore, key="r/async")) == (7, 1)
    assert runs == [1]


def test_store_for_is_one_store_per_process_and_url(tmp_path):
    """The per-process store cache returns the same store for the same URL and options."""
    a = store_for(f"file://{tmp_path}/s")
    assert store_for(f"file://{tmp_path}/s") is a
    assert store_for(f"file://{tmp_path}/s", {"fsync": False}) is not a


def _records(tmp_path, key):
    folder = tmp_path / "store" / key / "@log"
    return sorted(p.name for p in folder.iterdir())


def test_first_try_writes_its_claim_with_its_first_commit(fstore, tmp_path):
    """A host's first try saves the claim record; a later try claims as usual; both fence."""
    assert call(Body("a", units=2), store=fstore, key="lazy/one", first_try=True) == "a"
    assert len(_records(tmp_path, "lazy/one")) == 3  # done, done, fin: no claim record
    view = fstore.read_view("lazy/one")
    assert [e for e, _s, _t in view.claims] == [1] and view.finished.result is not None
    assert call(Body("b", units=2), store=fstore, key="lazy/two") == "b"
    assert len(_records(tmp_path, "lazy/two")) == 4  # claim, done, done, fin


def test_first_try_overtaken_before_its_first_commit_writes_nothing(fstore):
    """Two attempts read the same empty log: the lazy one commits nothing once the other
    claimed the epoch number it expected, and the newer one's work stands."""
    first = fstore.stage("lazy/race").claim(lazy=True)
    newer = fstore.stage("lazy/race").claim()
    assert first._epoch == newer.epoch == 1
    newer.done(0, "newer")
    with pytest.raises(StaleAttemptError):
        first.done(1, "zombie")
    with pytest.raises(StaleAttemptError):
        first.save(b"zombie", step=5)
    with pytest.raises(StaleAttemptError):
        first.check()
    view = fstore.read_view("lazy/race")
    assert {r.unit: r.result for r in view.units.values()} == {0: "newer"} and not view.snaps


def test_ordered_first_try_takes_over_from_an_older_run_that_committed_first(fstore):
    """Two runs of one task read the same empty log (Dask: a zombie of a lost worker and
    its rerun, numbered by the scheduler). The older one commits first; the newer one's
    first commit then claims above it (a claim record, durable), skips what the older
    finished, and fences it."""
    older = fstore.stage("ord/a").claim(lazy=True, order=5)
    newer = fstore.stage("ord/a").claim(lazy=True, order=9)
    assert older._epoch == newer._epoch == 1 and older._lazy and newer._lazy
    assert older.done(0, "older")
    assert not newer.done(0, "newer")  # took over at epoch 2; unit 0 was done already
    assert newer.epoch == 2 and not newer._lazy
    assert newer.done(1, "newer")
    with pytest.raises(StaleAttemptError):
        older.done(2, "zombie")
    with pytest.raises(StaleAttemptError):
        older.save(b"zombie", step=5)
    newer.finish("ok")
    view = fstore.read_view("ord/a")
    assert {r.unit: (r.result, r.epoch) for r in view.units.values()} == {
        0: ("older", 1),
        1: ("newer", 2),
    }
    assert [e for e, _s, _t in view.claims] == [1, 2] and not view.snaps
    bodies = [
        decode(fstore._storage.read(f"ord/a/@log/{n}")) for n in ("000000000001", "000000000002")
    ]
    assert (bodies[0]["t"], bodies[0]["o"]) == ("done", 5)  # the older run's claim rode here
    assert bodies[1]["t"] == "claim" and bodies[1]["e"] == 2 and "o" not in bodies[1]


def test_ordered_first_try_of_an_older_run_loses_to_a_newer_first_commit(fstore):
    """The newer run commits first: the older one's first commit is refused and it writes
    nothing; the newer keeps epoch 1 with no claim record of its own."""
    older = fstore.stage("ord/b").claim(lazy=True, order=3)
    newer = fstore.stage("ord/b").claim(lazy=True, order=4)
    assert newer.done(0, "newer")
    with pytest.raises(StaleAttemptError):
        older.done(0, "older")
    with pytest.raises(StaleAttemptError):
        older.finish("older")
    newer.finish("newer")
    view = fstore.read_view("ord/b")
    assert [e for e, _s, _t in view.claims] == [1] and view.finished.result == "newer"
    assert {r.unit: r.result for r in view.units.values()} == {0: "newer"}


@pytest.mark.parametrize("orders", [(7, 7), (None, 8), (8, None)], ids=["same", "none-a", "none-b"])
def test_ordered_first_try_without_a_known_older_order_is_fenced(fstore, orders):
    """Equal orders, or a commit that carries none, give no takeover: the later writer is
    fenced exactly as an unordered lazy claim is."""
    first = fstore.stage("ord/c").claim(lazy=True, order=orders[0])
    second = fstore.stage("ord/c").claim(lazy=True, order=orders[1])
    assert first.done(0, "first")
    with pytest.raises(StaleAttemptError):
        second.done(1, "second")
    assert [e for e, _s, _t in fstore.read_view("ord/c").claims] == [1]


def test_ordered_first_try_on_a_log_with_records_claims_at_once(fstore, tmp_path):
    """An ordered lazy claim is lazy only on an empty log: with an earlier run's records it
    writes its claim at once, fencing whoever may still be writing."""
    with fstore.stage("ord/d") as st:
        st.done(0)
    before = _records(tmp_path, "ord/d")
    again = fstore.stage("ord/d").claim(lazy=True, order=10)
    assert not again._lazy and again._epoch == 2
    assert len(_records(tmp_path, "ord/d")) == len(before) + 1
    with pytest.raises(StaleAttemptError):
        st.done(1)


def test_ordered_takeover_fences_the_older_runs_sink(fstore, tmp_path):
    """The older run wrote a unit through a SqlSink (SQLite) under its lazy claim; the
    newer one's takeover fences the sink, so the older's next write is refused and the
    table holds each unit once."""
    import sqlalchemy as sa

    from faultkit.sinks import SqlSink

    url = f"sqlite:///{tmp_path}/sink.db"
    sink = SqlSink(url, "rows", lock_wait=5)
    older = fstore.stage("ord/sink").claim(lazy=True, order=1)
    newer = fstore.stage("ord/sink").claim(lazy=True, order=2)
    assert sink.write(older, 0, [{"u": 0, "by": "older"}])
    assert sink.write(newer, 1, [{"u": 1, "by": "newer"}])
    assert newer.epoch == 2
    with pytest.raises(StaleAttemptError):
        sink.write(older, 2, [{"u": 2, "by": "older"}])
    with sa.create_engine(url).connect() as conn:
        rows = sorted(conn.execute(sa.text("SELECT u, by FROM rows")).all())
    assert rows == [(0, "older"), (1, "newer")]


def test_takeover_that_cannot_fence_leaves_the_attempt_as_it_was(fstore, tmp_path):
    """The newer run's takeover must fence the older run's sink first; while another
    connection holds the SQLite database's write lock it fails with SinkBusyError, writes no
    claim, and the attempt stays as it was, so the same write succeeds once the lock is
    free."""
    import sqlite3

    from faultkit import SinkBusyError
    from faultkit.sinks import SqlSink

    url = f"sqlite:///{tmp_path}/sink.db"
    sink = SqlSink(url, "rows", lock_wait=0.5)
    older = fstore.stage("ord/busy").claim(lazy=True, order=1)
    newer = fstore.stage("ord/busy").claim(lazy=True, order=2)
    assert sink.write(older, 0, [{"u": 0}])
    holder = sqlite3.connect(tmp_path / "sink.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(SinkBusyError):
            sink.write(newer, 1, [{"u": 1}])
        assert newer._lazy and newer._epoch == 1
        assert [e for e, _s, _t in fstore.read_view("ord/busy").claims] == [1]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert sink.write(newer, 1, [{"u": 1}])
    assert newer.epoch == 2
    with pytest.raises(StaleAttemptError):
        sink.write(older, 2, [{"u": 2}])


def test_lazy_claim_shows_its_epoch_by_writing_it(fstore):
    """Reading .epoch writes the claim, so other processes can attach to the epoch."""
    st = fstore.stage("lazy/attach").claim(lazy=True)
    with pytest.raises(ValueError):
        fstore.attach("lazy/attach", 1)  # nothing in the log yet
    assert st.epoch == 1
    helper = fstore.attach("lazy/attach", 1)
    assert helper.done("u") and not st.done("u")
    assert fstore.stage("lazy/attach").claim().epoch == 2
    with pytest.raises(StaleAttemptError):
        helper.done("v")


def test_lazy_claim_on_a_damaged_log_is_written_at_once(fstore, tmp_path):
    """Damage, a reset or sinks to fence need the claim's full work: it is not deferred."""
    with fstore.stage("lazy/dmg") as st:
        st.done(0)
        st.done(1)
    (tmp_path / "store" / "lazy/dmg" / "@log" / "000000000002").write_bytes(b"garbage")
    st = fstore.stage("lazy/dmg").claim(lazy=True)
    assert not st._lazy and st.epoch == 3  # above the damaged position, in the log now
    assert fstore.read_view("lazy/dmg").epoch == 3
