"""Notifications: :class:`FaultkitNotifier` for task and DAG failure/retry callbacks."""

from __future__ import annotations

from ._faultkit import FaultkitNotifier

__all__ = ["FaultkitNotifier"]
