"""Exceptions raised by faultkit.

The tree::

    FaultkitError                     base of everything we raise on purpose
    ├── InvalidKeyError (ValueError)  a key or unit id that could escape the store's root
    ├── StaleAttemptError             a newer attempt claimed the stage; this one is fenced
    ├── CorruptCheckpointError        a checkpoint failed its checksum or could not be parsed
    ├── UnsafeCheckpointError         a checkpoint needs pickle (or other code execution) to load
    ├── CheckpointWriteError (OSError) the storage refused a write (disk full, permissions, ...)
    ├── StoreConfigError (ValueError) a store URL or option that cannot work
    └── AlertConfigError (ValueError) an alert channel URL that cannot work

Foreign exceptions (``OSError`` from fsspec, SQLAlchemy errors) are translated at the seam with
``raise ... from`` so the original stays in ``__cause__``.
"""

from __future__ import annotations

__all__ = [
    "AlertConfigError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "FaultkitError",
    "InvalidKeyError",
    "StaleAttemptError",
    "StoreConfigError",
    "UnsafeCheckpointError",
]


class FaultkitError(Exception):
    """Base class of every error faultkit raises on purpose."""


class InvalidKeyError(FaultkitError, ValueError):
    """A key, segment or unit id is not allowed (it could escape the store's root)."""


class StaleAttemptError(FaultkitError):
    """A newer attempt claimed the stage; this older attempt must stop writing.

    Attributes:
        key: the stage key.
        epoch: this attempt's epoch.
        current: the newest epoch seen in the stage's log.
    """

    def __init__(self, message: str, *, key: str = "", epoch: int = 0, current: int = 0) -> None:
        super().__init__(message)
        self.key = key
        self.epoch = epoch
        self.current = current


class CorruptCheckpointError(FaultkitError):
    """A checkpoint failed verification (checksum, size or format)."""


class UnsafeCheckpointError(FaultkitError):
    """A checkpoint would need pickle or other code execution to load; it is refused."""


class CheckpointWriteError(FaultkitError, OSError):
    """The storage refused a write; the previous state is intact."""


class StoreConfigError(FaultkitError, ValueError):
    """A store URL or storage option that cannot work."""


class AlertConfigError(FaultkitError, ValueError):
    """An alert channel URL that cannot work."""
