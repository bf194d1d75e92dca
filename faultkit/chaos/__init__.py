"""Fault injection for your own tests: run work in a child process and kill it for real.

    from faultkit import chaos
    report = chaos.run_with_kills(my_stage_fn, store_url, kills=3, seed=1,
                                  ready=lambda: progress_made())
    assert report.kills == 3 and report.result == expected

Kill at named failpoints inside faultkit (``failpoints="done.committed=kill@3"``, see
:data:`POINTS`) or at random moments once ``ready()`` says the child is working. A pytest
fixture, ``faultkit_chaos``, is registered automatically when faultkit is installed.
"""

from __future__ import annotations

from .._failpoints import POINTS, InjectedFault, arm, disarm
from ._runner import ChaosReport, ChildResult, run_in_child, run_with_kills

__all__ = [
    "POINTS",
    "ChaosReport",
    "ChildResult",
    "InjectedFault",
    "arm",
    "disarm",
    "run_in_child",
    "run_with_kills",
]
