"""``faultkit demo --engine dask --hosts 3``: the demo on test hosts, checked from its report."""

import json
import os
import subprocess
import sys

import pytest

from faultkit.testing import SeaweedS3Server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _demo(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "faultkit.cli", "demo", *args, "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=540, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip


def test_demo_on_hosts_fences_the_cut_off_worker_and_resumes_the_lost_host(netns_reason, tmp_path):
    if netns_reason:  # the demo builds its own hosts
        pytest.skip(f"test hosts skipped: {netns_reason}")
    reason = SeaweedS3Server.available()
    if reason:
        pytest.skip(f"S3 tests skipped: {reason}")
    r = _demo(tmp_path, "--engine", "dask", "--hosts", "3", "--quick", "--seed", "1")
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["ok"] is True and report["config"]["hosts"] == 3
    etl, train = report["stages"]
    assert etl["rows_present"] == etl["rows_expected"] > 0 and etl["duplicates"] == 0
    assert etl["content_equal"] is True
    assert etl["kills"] == 1 and etl["fenced"] >= 1  # the cut-off zombie was fenced
    cut = [e for e in etl["timeline"] if e["event"] == "cut"]
    attempts = [e for e in etl["timeline"] if e["event"] == "attempt"]
    assert len(cut) == 1 and any(a["fenced"] and a["host"] == cut[0]["host"] for a in attempts)
    assert any(a["host"] != cut[0]["host"] and a["t"] > cut[0]["t"] for a in attempts)
    assert train["kills"] == 1 and train["weights_equal"] is True
    assert train["units_redone"] <= 2 * report["config"]["every_steps"]
    assert report["alerts_received"] == 2  # one per incident
    hosts = {a["host"] for s in (etl, train) for a in s["timeline"] if "host" in a}
    assert hosts <= {"w1", "w2", "w3"} and len(hosts) >= 2
    assert (tmp_path / "out" / "timeline.png").stat().st_size > 1000


def test_demo_hosts_refuses_other_engines_with_the_reason(tmp_path):
    r = _demo(tmp_path, "--engine", "airflow", "--hosts", "3")
    assert r.returncode == 2
    assert "--hosts runs the Dask scenario" in r.stdout, r.stdout
