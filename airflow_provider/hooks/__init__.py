"""Hooks: :class:`CheckpointHook` turns a ``faultkit`` connection into a checkpoint store."""

from __future__ import annotations

from ._checkpoint import CheckpointHook

__all__ = ["CheckpointHook"]
