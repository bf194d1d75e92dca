"""The bundled pipeline used by ``faultkit demo``, dags/ and flows/: an ETL and a training stage.

Torch is imported only when the training half is used.
"""

from __future__ import annotations

from typing import Any

from ._etl import (
    PUBLISH_FALLBACK,
    TABLE,
    EtlIncompleteError,
    SourceDownError,
    check_sink,
    etl_partition,
    expected_rows,
    generate_orders,
    publish,
    run_table,
)

__all__ = [
    "PUBLISH_FALLBACK",
    "TABLE",
    "EtlIncompleteError",
    "SourceDownError",
    "check_sink",
    "etl_partition",
    "expected_rows",
    "generate_orders",
    "publish",
    "reference_train",
    "run_table",
    "train",
    "weights_digest",
]

_TRAIN = ("reference_train", "train", "weights_digest")


def __getattr__(name: str) -> Any:
    if name in _TRAIN:
        from . import _train

        return getattr(_train, name)
    raise AttributeError(f"module 'faultkit.demo' has no attribute {name!r}")
