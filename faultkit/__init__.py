"""faultkit: stages that resume exactly once after their worker is lost."""

from __future__ import annotations

from ._errors import (
    AlertConfigError,
    CheckpointWriteError,
    CorruptCheckpointError,
    FaultkitError,
    InvalidKeyError,
    StaleAttemptError,
    StoreConfigError,
    UnsafeCheckpointError,
)
from ._events import Event, subscribe
from ._keys import key
from ._store import CheckpointStore, Snapshot, Stage

__version__ = "0.1.0"

__all__ = [
    "AlertConfigError",
    "CheckpointStore",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "Event",
    "FaultkitError",
    "InvalidKeyError",
    "Snapshot",
    "Stage",
    "StaleAttemptError",
    "StoreConfigError",
    "UnsafeCheckpointError",
    "key",
    "subscribe",
]
