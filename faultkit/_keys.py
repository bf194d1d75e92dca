"""Stage keys: "/"-separated segments that can never escape a store's root."""

from __future__ import annotations

import hashlib
import re

from ._errors import InvalidKeyError

__all__ = ["MAX_SEGMENT", "check_key", "check_unit", "key", "unit_id"]

_SEGMENT = re.compile(r"[A-Za-z0-9._=-]+")
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
# File systems cap a name at 255 bytes; leave room for our own suffixes.
MAX_SEGMENT = 200


def check_key(k: str) -> str:
    """Return ``k`` if it is a valid key, else raise :class:`InvalidKeyError`."""
    if not isinstance(k, str):
        raise InvalidKeyError(f"a key must be a str, got {type(k).__name__}: {k!r}")
    if not k:
        raise InvalidKeyError("the key is empty; build one with faultkit.key('etl', dag_id, ...)")
    if "\\" in k:
        raise InvalidKeyError(f"key {k!r} contains a backslash; use '/' between segments")
    if k.startswith("/"):
        raise InvalidKeyError(f"key {k!r} is absolute; keys are relative to the store's root")
    for seg in k.split("/"):
        if seg == "":
            raise InvalidKeyError(f"key {k!r} has an empty segment ('//' or a trailing '/')")
        if seg in (".", ".."):
            raise InvalidKeyError(f"key {k!r} has a {seg!r} segment, which could leave the root")
        if not _SEGMENT.fullmatch(seg):
            raise InvalidKeyError(
                f"key segment {seg!r} of {k!r} has characters outside [A-Za-z0-9._=-]; "
                "build keys from arbitrary strings with faultkit.key(...)"
            )
        if len(seg) > MAX_SEGMENT:
            raise InvalidKeyError(f"key segment of {len(seg)} characters is over {MAX_SEGMENT}")
    return k


def _encode(part: str) -> str:
    if part == "":
        return "="
    out = []
    for i, ch in enumerate(part):
        # A leading "." is encoded so that no segment is ".", ".." or a hidden name.
        if ch in _SAFE and not (ch == "." and i == 0):
            out.append(ch)
        else:
            out.extend(f"={b:02X}" for b in ch.encode("utf-8"))
    enc = "".join(out)
    if len(enc) > MAX_SEGMENT:
        digest = hashlib.sha256(part.encode("utf-8")).hexdigest()[:16]
        # "=H" is never produced by the =XX escape, so shortened names cannot collide.
        enc = f"{enc[: MAX_SEGMENT - 18]}=H{digest}"
    return enc


def key(*parts: object) -> str:
    """Build a valid key from arbitrary values, one segment per part.

    Characters outside ``[A-Za-z0-9._-]`` are written as ``=XX`` (UTF-8 bytes in hex), so
    distinct inputs give distinct keys: ``key("etl", "manual__2024-01-01T00:00:00+00:00")``
    is ``"etl/manual__2024-01-01T00=3A00=3A00=2B00=3A00"``. ``None`` and numbers are
    formatted with ``str``.

    Raises:
        InvalidKeyError: when no part is given.
    """
    if not parts:
        raise InvalidKeyError("faultkit.key() needs at least one part")
    return "/".join(_encode(str(p)) for p in parts)


def check_unit(unit: object) -> str | int:
    """Return ``unit`` if it can name a unit of work (str or int), else raise."""
    if isinstance(unit, bool) or not isinstance(unit, (str, int)):
        raise InvalidKeyError(
            f"a unit must be a str or an int, got {type(unit).__name__}: {unit!r}; "
            "pass an id (e.g. the partition name) rather than the object"
        )
    return unit


def unit_id(unit: str | int) -> str:
    """The canonical string form of a unit (ints and strs never collide)."""
    return f"i:{unit}" if isinstance(unit, int) else f"s:{unit}"
