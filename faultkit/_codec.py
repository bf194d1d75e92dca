"""The one codec for a finished task's result: what it accepts, it gives back exactly.

Accepted, and returned with the same types and values: ``None``, ``bool``, ``int``,
``float`` (NaN and infinities too), ``str``, ``bytes``, ``list``, ``tuple``, ``dict`` (any
accepted, hashable keys, order kept), ``set``, ``frozenset``, ``datetime.datetime`` /
``date`` / ``time`` / ``timedelta``, ``uuid.UUID``, ``decimal.Decimal`` and
``pathlib.PurePath`` (as the same class), nested in any way. Subclasses (an ``IntEnum``, a
``NamedTuple``, a pydantic model) are not: they would come back as their base type.

A result that fits in ``INLINE_LIMIT`` bytes of tagged JSON is stored in the stage's
``finish`` record; a larger one is spilled to a snapshot (checksummed like any other). A
result the codec does not accept is recorded with pickle only when the caller trusts the
store (``pickle_ok=True``: loading runs code from the store); otherwise it is not recorded,
and a re-run calls the function again (its finished units are still skipped).
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import math
import pathlib
import pickle
import uuid
from typing import TYPE_CHECKING, Any

from ._errors import CorruptCheckpointError, UnsafeCheckpointError

if TYPE_CHECKING:
    from ._stage import Stage

__all__ = ["INLINE_LIMIT", "NOT_RECORDED", "decode", "encode", "record", "replay"]

INLINE_LIMIT = 64 << 10
TAG = "__fk__"
_MAX_DEPTH = 200
NOT_RECORDED = object()  # what encode() returns for a value it does not accept

_PATHS = {c.__name__: c for c in (pathlib.PurePosixPath, pathlib.PureWindowsPath)}
_PATHS.update({c.__name__: c for c in (pathlib.PosixPath, pathlib.WindowsPath)})


class _Refused(Exception):
    pass


def _enc(v: Any, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise _Refused
    t = type(v)
    d = depth + 1
    if v is None or t in (bool, str):
        return v
    if t is int:
        return v if abs(v) < 1 << 53 else {TAG: "int", "v": str(v)}
    if t is float:
        return v if math.isfinite(v) else {TAG: "float", "v": repr(v)}
    if t is list:
        return [_enc(x, d) for x in v]
    if t is tuple:
        return {TAG: "tuple", "v": [_enc(x, d) for x in v]}
    if t is dict:
        if all(type(k) is str for k in v) and TAG not in v:
            return {k: _enc(x, d) for k, x in v.items()}
        return {TAG: "dict", "v": [[_enc(k, d), _enc(x, d)] for k, x in v.items()]}
    if t in (set, frozenset):
        items = [_enc(x, d) for x in v]
        items.sort(key=lambda x: json.dumps(x, sort_keys=True))
        return {TAG: t.__name__, "v": items}
    if t is bytes:
        return {TAG: "bytes", "v": base64.b64encode(v).decode()}
    if t in (dt.datetime, dt.date, dt.time):
        return {TAG: t.__name__, "v": v.isoformat()}
    if t is dt.timedelta:
        return {TAG: "timedelta", "v": [v.days, v.seconds, v.microseconds]}
    if t is uuid.UUID:
        return {TAG: "uuid", "v": str(v)}
    if t is decimal.Decimal:
        return {TAG: "decimal", "v": str(v)}
    if t.__name__ in _PATHS and _PATHS[t.__name__] is t:
        return {TAG: "path", "c": t.__name__, "v": str(v)}
    raise _Refused


def _dec(v: Any) -> Any:
    if isinstance(v, list):
        return [_dec(x) for x in v]
    if not isinstance(v, dict):
        return v
    tag = v.get(TAG)
    if tag is None:
        return {k: _dec(x) for k, x in v.items()}
    x = v["v"]
    if tag == "tuple":
        return tuple(_dec(i) for i in x)
    if tag == "dict":
        return {_dec(k): _dec(i) for k, i in x}
    if tag in ("set", "frozenset"):
        return (set if tag == "set" else frozenset)(_dec(i) for i in x)
    if tag == "int":
        return int(x)
    if tag == "float":
        return float(x)
    if tag == "bytes":
        return base64.b64decode(x)
    if tag == "datetime":
        return dt.datetime.fromisoformat(x)
    if tag == "date":
        return dt.date.fromisoformat(x)
    if tag == "time":
        return dt.time.fromisoformat(x)
    if tag == "timedelta":
        return dt.timedelta(days=x[0], seconds=x[1], microseconds=x[2])
    if tag == "uuid":
        return uuid.UUID(x)
    if tag == "decimal":
        return decimal.Decimal(x)
    if tag == "path":
        return _PATHS[v["c"]](x)
    raise ValueError(f"unknown result tag {tag!r}")


def encode(value: Any) -> Any:
    """``value`` as JSON-ready data that :func:`decode` turns back into an equal value of
    the same types, or :data:`NOT_RECORDED` if the codec does not accept it."""
    try:
        return _enc(value, 0)
    except (_Refused, RecursionError):
        return NOT_RECORDED


def decode(data: Any) -> Any:
    """The value :func:`encode` was given."""
    return _dec(data)


def record(stage: Stage, value: Any, *, pickle_ok: bool = False) -> bool:
    """Record ``value`` as the stage's result (``stage.finish``); False if it was not
    accepted (and ``pickle_ok`` is off), so a re-run will call the function again."""
    data = encode(value)
    if data is not NOT_RECORDED:
        text = json.dumps(data, separators=(",", ":"), allow_nan=False)
        if len(text) <= INLINE_LIMIT:
            stage.finish({"v": data})
            return True
        blob, fmt = text.encode(), "json"
    elif pickle_ok:
        blob, fmt = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL), "pickle"
    else:
        return False
    snap = stage.save(blob, step=0, meta={"faultkit": "result", "format": fmt})
    stage.finish({"snapshot": snap.checksum, "format": fmt})
    return True


def replay(stage: Stage, *, pickle_ok: bool = False) -> tuple[bool, Any]:
    """``(True, result)`` if the stage finished with a readable recorded result, else
    ``(False, None)`` (not finished, or finished without a result this codec can give back).

    Raises:
        UnsafeCheckpointError: the result was pickled and ``pickle_ok`` is off.
    """
    if not stage.finished:
        return False, None
    rec = stage.final_result
    if not isinstance(rec, dict):
        return False, None
    if "v" in rec:
        return True, decode(rec["v"])
    fmt = rec.get("format")
    if fmt == "pickle" and not pickle_ok:
        raise UnsafeCheckpointError(
            f"stage {stage.key!r} recorded a pickled result, and loading it would run code "
            "from the store; pass pickle_result=True only if you trust the store"
        )
    if fmt not in ("json", "pickle"):
        return False, None
    mine = [r for r in stage.snapshots() if r.checksum == rec.get("snapshot")]
    try:
        data = stage._read_verified(mine[-1]) if mine else None
    except CorruptCheckpointError:
        data = None
    if data is None:
        return False, None
    if fmt == "pickle":
        return True, pickle.loads(data)
    return True, decode(json.loads(bytes(data)))
