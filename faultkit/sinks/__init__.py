"""Exactly-once sinks: a unit's output lands once, whatever attempts and zombies do."""

from __future__ import annotations

from .._errors import SinkBusyError, SinkInputError
from ._file import FileSink
from ._sql import SqlSink

__all__ = ["FileSink", "SinkBusyError", "SinkInputError", "SqlSink"]
