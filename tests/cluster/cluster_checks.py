"""What the cluster tests share: their events files, and the raw-log check of a stage run on
the store host (``scripts/s3_check.py``)."""

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from faultkit.testing import journal_lines

SCRIPTS = Path(__file__).parent / "scripts"


def read_events(path: Path) -> list[list[str]]:
    """The events file's lines, split (``START host ...``, ``UNIT ...``, ``STALE ...``)."""
    return journal_lines(path)


@contextlib.contextmanager
def logs_on_failure(logs: Callable[[], list[Path]], tail: int = 6000) -> Iterator[None]:
    """On a failure inside the block, print the end of each log ``logs()`` names (pytest
    shows it with the failure), so an intermittent failure leaves its evidence behind."""
    try:
        yield
    except BaseException:
        for path in logs():
            text = path.read_text(errors="replace") if path.exists() else "(missing)"
            print(f"\n===== {path} (last {tail} chars) =====\n{text[-tail:]}")
        raise


def s3_report(store_host, s3, bucket: str, key: str, env: dict) -> dict:
    """``s3_check.py``'s report of stage ``key`` (or ``{key: report}`` under ``key/``)."""
    got = store_host.run(
        [sys.executable, str(SCRIPTS / "s3_check.py"), s3.endpoint, bucket, key],
        capture_output=True,
        text=True,
        env=env,
    )
    assert got.returncode == 0, got.stderr[-3000:]
    return json.loads(got.stdout)


def assert_once_and_fenced(rep: dict, n: int) -> None:
    """Every one of ``n`` units recorded exactly once, no damage, the stage finished, and no
    record of epoch 1 after the claim of epoch 2 (the zombie's writes landed nowhere)."""
    assert rep["units"] == list(range(n))
    assert sorted(rep["done"]) == sorted(str(u) for u in range(n))
    assert set(rep["done"].values()) == {1}, rep["done"]
    assert rep["corrupt"] == [] and rep["damaged"] == [] and rep["anomalies"] == []
    assert rep["finished"] is True
    claim2 = next(seq for seq, t, e in rep["log"] if t == "claim" and e == 2)
    assert not [r for r in rep["log"] if r[0] > claim2 and r[2] == 1], rep["log"]
