"""FileSink: each unit's output is one object, created once under a deterministic name."""

from __future__ import annotations

from typing import Any

from .._keys import check_unit, key
from .._storage import open_storage, redact_url
from .._store import Stage

__all__ = ["FileSink"]


class FileSink:
    """Write each unit's bytes once, atomically, at ``<stage key>/<unit>`` under ``url``.

    Creation is create-if-absent, so a zombie and its retry cannot both write a unit and a
    reader never sees a partial file. Works on ``file://``, ``memory://`` and ``s3://``.
    """

    def __init__(self, url: str, **storage_options: Any) -> None:
        self._storage = open_storage(url, **storage_options)
        self.url = self._storage.url

    def __repr__(self) -> str:
        return f"FileSink({redact_url(self.url)!r})"

    @staticmethod
    def path(stage_key: str, unit: str | int) -> str:
        """The object path of ``unit`` of ``stage_key``, relative to the sink's root."""
        return f"{stage_key}/{key(check_unit(unit))}.out"

    def write(self, stage: Stage, unit: str | int, data: bytes) -> bool:
        """Store ``data`` as the output of ``unit``; False if it was already written."""
        if stage.is_done(unit):
            return False
        stage.check()
        p = self.path(stage.key, unit)
        try:
            self._storage.create(p, bytes(data))
        except FileExistsError:
            stage.done(unit, {"path": p, "sink": "already written"})
            return False
        stage.done(unit, {"path": p, "bytes": len(data)})
        return True

    def read(self, stage_key: str, unit: str | int) -> bytes:
        """The bytes written for ``unit`` (``FileNotFoundError`` if none)."""
        return self._storage.read(self.path(stage_key, unit))
