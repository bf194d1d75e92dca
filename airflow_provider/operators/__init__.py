"""Operators: :class:`ResumablePythonOperator` hands its callable a fenced faultkit stage."""

from __future__ import annotations

from ._resumable import ResumablePythonOperator

__all__ = ["ResumablePythonOperator"]
