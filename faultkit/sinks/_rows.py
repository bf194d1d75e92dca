"""Checking the rows given to SqlSink.write, and the column types of a table made from them."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa

from .._errors import SinkInputError

__all__ = ["check_rows", "column_type"]

_TYPES: list[tuple[type, Any]] = [
    (bool, sa.Boolean),
    (int, sa.BigInteger),
    (float, sa.Float),
    (decimal.Decimal, sa.Numeric),
    (str, sa.Text),
    ((bytes, bytearray, memoryview), sa.LargeBinary),  # type: ignore[list-item]
    (dt.datetime, sa.DateTime),
    (dt.date, sa.Date),
    (dt.time, sa.Time),
    (uuid.UUID, sa.Uuid),
]
_VALUE_TYPES = (
    type(None),
    *(t for py, _ in _TYPES for t in (py if isinstance(py, tuple) else (py,))),
)


def check_rows(rows: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows as dicts and their columns (in the first row's order), or SinkInputError."""
    if isinstance(rows, (str, bytes, bytearray, memoryview, Mapping)) or not isinstance(
        rows, Iterable
    ):
        raise SinkInputError(
            f"SqlSink.write takes a list of rows (dicts of column -> value), not a "
            f"{type(rows).__name__}; wrap a single row in a list: sink.write(stage, unit, [row])"
        )
    out: list[dict[str, Any]] = []
    cols: list[str] = []
    first: set[str] = set()
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise SinkInputError(
                f"row {i} is a {type(row).__name__}, not a mapping of column -> value; pass "
                "dicts such as {'id': 1, 'name': 'x'}. Nothing was written."
            )
        row = dict(row)
        for k, v in row.items():
            if not isinstance(k, str) or not k:
                raise SinkInputError(
                    f"row {i} has a column name {k!r}; column names are non-empty strings. "
                    "Nothing was written."
                )
            if not isinstance(v, _VALUE_TYPES):
                raise SinkInputError(
                    f"row {i}, column {k!r}: a {type(v).__name__} value ({v!r:.80}) cannot be "
                    "stored; convert it to str, int, float, bool, bytes, Decimal, a date/time "
                    "or None (e.g. json.dumps for structures). Nothing was written."
                )
        if i == 0:
            cols, first = list(row), set(row)
        elif set(row) != first:
            extra, missing = sorted(set(row) - first), sorted(first - set(row))
            raise SinkInputError(
                f"row {i} has other columns than row 0 (extra {extra}, missing {missing}); "
                "give every row of a unit the same keys (None for a missing value). Nothing "
                "was written."
            )
        out.append(row)
    return out, cols


def column_type(table: str, column: str, rows: list[dict[str, Any]]) -> Any:
    for row in rows:
        v = row[column]
        if v is None:
            continue
        for py, col in _TYPES:
            if isinstance(v, py):
                return col
    raise SinkInputError(
        f"cannot create table {table!r}: column {column!r} is None in every row, so its type "
        "is unknown; create the table yourself (CREATE TABLE ...) before the first write, or "
        "give the first unit a value for it. Nothing was written."
    )
