"""`faultkit demo` end to end, reduced in size, on each engine: kills land, nothing is lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _demo(tmp_path, engine: str, kills: int = 2) -> dict:
    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "faultkit.cli",
            "demo",
            "--engine",
            engine,
            "--quick",
            "--kills",
            str(kills),
            "--seed",
            "3",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "COLUMNS": "160"},
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert (out / "timeline.png").stat().st_size > 1000
    return json.loads((out / "report.json").read_text())


def _check(report: dict, engine: str, kills: int) -> None:
    assert report["engine"] == engine and report["ok"] is True
    stages = {s["name"]: s for s in report["stages"]}
    assert set(stages) == {"etl", "train"}
    for s in stages.values():
        assert s["kills"] >= kills, f"{s['name']}: only {s['kills']} kills landed"
        assert s["attempts"] >= s["kills"] + 1
    etl = stages["etl"]
    assert etl["rows_present"] == etl["rows_expected"] > 0 and etl["duplicates"] == 0
    assert etl["content_equal"] is True and etl["weights_equal"] is None
    assert stages["train"]["weights_equal"] is True
    assert report["alerts_received"] == sum(s["kills"] for s in stages.values())
    nightly = report["nightly"]
    assert [r["published"] for r in nightly["runs"]] == ["fresh", "degraded", "fresh"]
    assert nightly["runs"][1]["partitions_gave_up"] == [1]
    assert nightly["runs"][1]["served_from"] == "demo/nightly-1/publish"
    assert nightly["degraded_alerts_received"] == 1
    m = report["mlflow"]  # the training stage's kills left one run, each step's loss once
    assert m["runs"] == 1 and m["status"] == "FINISHED" and m["all_steps"] and not m["duplicates"]


@pytest.mark.parametrize(
    "engine",
    [
        pytest.param("local", id="local"),
        pytest.param("dask", id="dask"),
        pytest.param("airflow", id="airflow", marks=pytest.mark.slow),
        pytest.param("prefect", id="prefect", marks=pytest.mark.slow),
    ],
)
def test_demo_engine(tmp_path, engine):
    """The demo kills workers for real and verifies rows, duplicates, weights and alerts.

    One kill per stage on the orchestrated engines (each costs a heartbeat timeout or a
    crash detection; their chaos tests kill more often), two on the local one."""
    kills = 2 if engine == "local" else 1
    _check(_demo(tmp_path, engine, kills), engine, kills)
