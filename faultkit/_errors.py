"""Exceptions raised by faultkit.

The tree::

    FaultkitError                      base of everything we raise on purpose
    ├── InvalidKeyError (ValueError)   a key or unit id that could escape the store's root
    ├── StaleAttemptError              a newer attempt claimed the stage; this one is fenced
    ├── CorruptCheckpointError         a checkpoint failed its checksum or could not be parsed
    ├── UnsafeCheckpointError          a checkpoint needs pickle (or other code) to load
    ├── LinkRefusedError (OSError)     a symbolic link inside a store, never followed
    ├── CheckpointWriteError (OSError) the storage refused a write (disk full, permissions, ...)
    │   └── SinkBusyError (TimeoutError)  a sink's lock was not obtained within its lock wait
    ├── StoreUnavailableError (ConnectionError)  the store did not answer (network, timeout)
    ├── StoreConfigError (ValueError)  a store URL or option that cannot work
    │   └── SinkInputError             rows or data a sink cannot write
    └── AlertConfigError (ValueError)  an alert channel URL that cannot work

Foreign exceptions (``OSError`` from fsspec, SQLAlchemy errors) are translated at the seam with
``raise ... from`` so the original stays in ``__cause__``.
"""

from __future__ import annotations

import errno

__all__ = [
    "AlertConfigError",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "FaultkitError",
    "InvalidKeyError",
    "LinkRefusedError",
    "SinkBusyError",
    "SinkInputError",
    "StaleAttemptError",
    "StoreConfigError",
    "StoreUnavailableError",
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


class StoreUnavailableError(FaultkitError, ConnectionError):
    """The store did not answer: the connection failed or timed out (a partition, a server
    down). Nothing committed is lost. A read can simply be retried; a write that timed out
    may or may not have landed, and retrying it is safe: a unit already recorded is not
    recorded twice, a claim or snapshot that landed is superseded. Retry policies count it
    as an infrastructure failure."""


class StoreConfigError(FaultkitError, ValueError):
    """A store URL or storage option that cannot work."""


class LinkRefusedError(FaultkitError, OSError):
    """A symbolic link (or other non-plain entry) stands where faultkit expected its own file
    or folder; faultkit never follows it. Attributes: ``path`` (relative to the store)."""

    def __init__(self, path: str) -> None:
        super().__init__(
            errno.ELOOP,
            f"{path!r} inside the store is a symbolic link or not a plain file; faultkit never "
            "follows links inside a store (remove it; `faultkit verify` lists every such entry)",
        )
        self.path = path


class SinkBusyError(CheckpointWriteError, TimeoutError):
    """A sink's database lock was not obtained within the sink's lock wait.

    Another writer holds it: a long transaction, or a stopped (SIGSTOP, frozen VM) older
    attempt. Nothing was written. It is a :class:`TimeoutError`, so a
    :class:`~faultkit.RetryPolicy` with ``on=(TimeoutError, ...)`` (and the orchestrator's
    own retry) tries again; a killed holder's lock is freed by the operating system.
    """


class SinkInputError(StoreConfigError):
    """Rows or data a sink cannot write (a column the table lacks, rows that are not
    mappings, bytes of the wrong type, values the database refuses); nothing was written."""


class AlertConfigError(FaultkitError, ValueError):
    """An alert channel URL that cannot work."""
