"""The ``faultkit_chaos`` pytest fixture (registered through the ``pytest11`` entry point)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from . import POINTS, run_in_child, run_with_kills


@pytest.fixture
def faultkit_chaos():
    """Kill real child processes in a test: ``.run_with_kills(fn, ...)``, ``.run_in_child``."""
    return SimpleNamespace(run_with_kills=run_with_kills, run_in_child=run_in_child, points=POINTS)
