"""faultkit: stages that resume exactly once after their worker is lost."""

from __future__ import annotations

from ._alerts import Alerter
from ._classify import classify
from ._degraded import Degraded, Fallback, degraded, unwrap
from ._errors import (
    AlertConfigError,
    CheckpointWriteError,
    CorruptCheckpointError,
    FaultkitError,
    InvalidKeyError,
    LinkRefusedError,
    SinkBusyError,
    SinkInputError,
    StaleAttemptError,
    StoreConfigError,
    StoreUnavailableError,
    UnsafeCheckpointError,
)
from ._events import Event, subscribe
from ._keys import key
from ._retry import RetryPolicy, retry_test_mode
from ._store import CheckpointStore, Snapshot, Stage

__version__ = "0.1.0"

__all__ = [
    "AlertConfigError",
    "Alerter",
    "CheckpointStore",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "Degraded",
    "Event",
    "Fallback",
    "FaultkitError",
    "InvalidKeyError",
    "LinkRefusedError",
    "RetryPolicy",
    "SinkBusyError",
    "SinkInputError",
    "Snapshot",
    "Stage",
    "StaleAttemptError",
    "StoreConfigError",
    "StoreUnavailableError",
    "UnsafeCheckpointError",
    "classify",
    "degraded",
    "key",
    "retry_test_mode",
    "subscribe",
    "unwrap",
]
