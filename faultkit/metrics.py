"""Prometheus metrics of resumes, fenced writes, checkpoints, lost work and alerts."""

from __future__ import annotations

from ._metrics import enable, observe_save, registry, start_http_server

__all__ = ["enable", "observe_save", "registry", "start_http_server"]
