"""The ``faultkit`` command on a real store: ls, show, verify (exit 1 on corruption), gc."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from faultkit import CheckpointStore


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "faultkit.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def populated(tmp_path):
    url = f"file://{tmp_path}/store"
    store = CheckpointStore(url)
    with store.stage("etl/run1/p0") as st:
        st.done(0)
        st.done(1)
    with store.stage("train/run1") as st:
        for step in (10, 20, 30):
            st.save(f"weights-{step}".encode() * 100, step=step)
    store.stage("train/run1").claim()
    return url, store


def test_ls_and_show_json(populated):
    """ls lists every stage with epochs and counts; show details one stage."""
    url, _ = populated
    r = _cli("ls", url, "--json")
    assert r.returncode == 0, r.stderr
    rows = {x["key"]: x for x in json.loads(r.stdout)}
    assert rows["etl/run1/p0"]["units_done"] == 2
    assert rows["train/run1"]["epoch"] == 2 and rows["train/run1"]["last_step"] == 30
    r = _cli("show", url, "train/run1", "--json")
    info = json.loads(r.stdout)
    assert [c["epoch"] for c in info["claims"]] == [1, 2]
    assert [s["step"] for s in info["snapshots_detail"]] == [10, 20, 30]
    assert all(s["ok"] for s in info["snapshots_detail"])
    human = _cli("ls", url)
    assert human.returncode == 0 and "train/run1" in human.stdout


def test_verify_exits_nonzero_on_corruption(populated):
    """verify passes a healthy store and exits 1 naming the corrupt snapshot."""
    url, store = populated
    assert _cli("verify", url).returncode == 0
    rec = store.read_view("train/run1").live_snaps()[-1]
    path = os.path.join(url[len("file://") :], "train/run1/@blobs", rec.blob)
    with open(path, "r+b") as f:
        f.seek(5)
        f.write(b"X")
    r = _cli("verify", url, "--json")
    assert r.returncode == 1
    snaps = json.loads(r.stdout)["stages"]["train/run1"]["snapshots"]
    assert [s["ok"] for s in snaps] == [True, True, False]
    assert "CORRUPT" in _cli("verify", url, "train/run1").stdout


def test_gc_keeps_newest(populated):
    """gc --keep 1 removes older snapshots and keeps the newest valid one."""
    url, store = populated
    r = _cli("gc", url, "train/run1", "--keep", "1", "--json")
    assert r.returncode == 0
    assert json.loads(r.stdout)["train/run1"]["kept"] == [30]
    assert [s.step for s in store.read_view("train/run1").live_snaps()] == [30]


def test_bad_url_is_a_clear_error():
    """An unsupported store URL exits 2 with a message saying what works."""
    r = _cli("ls", "gs://nope")
    assert r.returncode == 2 and "file://" in r.stderr


def test_gc_older_than_deletes_old_finished_stages_only(tmp_path):
    """gc --older-than removes finished stages past the age and keeps unfinished ones and
    recent results; a bad duration is a usage error."""
    url = f"file://{tmp_path}/store"
    store = CheckpointStore(url)
    for k in ("old/done", "new/done", "old/running"):
        with store.stage(k) as st:
            st.done(0)
            if k.endswith("done"):
                st.finish("ok")
    r = _cli("gc", url, "--older-than", "1h", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"deleted": []}
    r = _cli("gc", url, "old", "--older-than", "0s", "--json")
    assert json.loads(r.stdout) == {"deleted": ["old/done"]}
    assert store.keys() == ["new/done", "old/running"]
    assert _cli("gc", url, "--older-than", "soon").returncode == 2


@pytest.mark.parametrize("cmd", [[], ["ls"], ["show"], ["verify"], ["gc"], ["demo"]])
def test_help_is_plain_text_and_names_every_argument(cmd):
    """--help shows no RST markup, and every positional argument has help text."""
    r = _cli(*cmd, "--help")
    text = " ".join(r.stdout.split())
    assert r.returncode == 0 and "``" not in text
    if cmd and cmd[0] in ("ls", "show", "verify", "gc"):
        assert "STORE_URL" in text and "never created by this command" in text
    if cmd and cmd[0] in ("show", "verify", "gc"):
        assert "faultkit.key" in text
