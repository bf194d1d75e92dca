"""The test hosts clean up after a test run that was killed before its teardown."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from faultkit.testing import process_state, wait_until
from faultkit.testing._netns import _ip, sweep_stale

OWNER = """
import sys, time
from faultkit.testing import Network
net = Network()
net.host("a").popen(["sleep", "600"])
print(net.prefix, flush=True)
time.sleep(600)
"""


def _namespaces(prefix: str) -> list[str]:
    return [
        n for n in _ip("ip", "netns", "list", check=False).stdout.split() if n.startswith(prefix)
    ]


def test_namespaces_of_a_killed_run_are_swept(netns_reason):
    """SIGKILL the process that made a network (no teardown runs): the next Network made
    removes its namespaces and kills the processes left in them."""
    if netns_reason:
        pytest.skip(f"test hosts skipped: {netns_reason}")
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    try:
        prefix = owner.stdout.readline().strip()
        assert prefix, "the owner did not start its network"
        left = _ip("ip", "netns", "pids", f"{prefix}-a", check=False).stdout.split()
        assert left, "no process was running in the host"
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(30)
    assert _namespaces(prefix + "-"), "the killed run left nothing: nothing was tested"
    gone = sweep_stale()
    assert set(gone) >= {f"{prefix}-a", f"{prefix}-sw"}
    assert not _namespaces(prefix + "-")
    for pid in left:  # dead: gone, or a zombie waiting for init to reap it
        wait_until(lambda pid=pid: process_state(pid) in ("", "Z"), 10, f"process {pid} to die")
