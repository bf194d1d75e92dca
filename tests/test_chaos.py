"""faultkit.chaos on a real job: kills land on a stage at work, and the report proves resumes."""

from __future__ import annotations

import threading

import pytest

from faultkit import CheckpointStore, chaos


def job(url: str, units: int) -> dict:
    """A stage of ``units`` units, each taking a moment; returns who did what."""
    with CheckpointStore(url).stage("chaos/job") as st:
        for u in st.pending(range(units)):
            threading.Event().wait(0.05)  # the unit's work
            st.done(u, {"epoch": st.epoch})
        return {"epoch": st.epoch, "done": sorted(st.results())}


def idle(url: str) -> str:
    """A job that never commits anything."""
    return url


def test_kills_wait_for_progress_and_each_is_followed_by_a_resume(tmp_path):
    """By default each kill lands after the attempt's first commit; every kill is followed by
    an attempt that resumed, and the units end up done exactly once."""
    url = f"file://{tmp_path}/store"
    report = chaos.run_with_kills(job, url, 30, kills=3, seed=7, max_delay=0.2, timeout=240)
    assert report.kills == 3
    assert report.kills_mid_stage == 3
    assert report.resumes == 3
    assert all(a.commits >= 1 for a in report.attempts if a.killed)
    assert report.result["done"] == list(range(30))
    view = CheckpointStore(url).read_view("chaos/job")
    epochs = {r.result["epoch"] for r in view.units.values()}
    assert len(epochs) >= 2  # the work really was split across attempts
    assert view.epoch == len(report.attempts)


def test_job_that_never_commits_says_why_no_kill_landed(tmp_path):
    """A job with nothing to commit finishes before a kill can land: a clear error, not a
    report claiming kills."""
    with pytest.raises(RuntimeError, match="first committed unit"):
        chaos.run_with_kills(idle, f"file://{tmp_path}", kills=1, max_attempts=2, timeout=120)
