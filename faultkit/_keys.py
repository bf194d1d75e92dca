"""Stage keys and unit ids: names that can never escape a store's root, and one identity
for a unit everywhere (the stage's log, ``SqlSink``, ``FileSink``)."""

from __future__ import annotations

import hashlib
import re

from ._errors import InvalidKeyError

__all__ = [
    "MAX_KEY",
    "MAX_SEGMENT",
    "MAX_UNIT",
    "check_key",
    "check_unit",
    "key",
    "key_parts",
    "unit_id",
    "unit_ref",
    "unit_segment",
]

_SEGMENT = re.compile(r"[A-Za-z0-9._=-]+")
# A part made only of these (and not starting with ".") is its own segment: no escaping.
_PLAIN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
# File systems cap a name at 255 bytes; leave room for our own suffixes.
MAX_SEGMENT = 200
# S3 caps an object key at 1,024 bytes; leave room for the store's prefix and our suffixes.
MAX_KEY = 512
# A unit id is stored in every record of it; a longer one is a mistake (pass an id).
MAX_UNIT = 4096
_DIGEST = 32  # hex characters of SHA-256 kept where a name is shortened (128 bits)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:_DIGEST]


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
    if len(k) > MAX_KEY:
        raise InvalidKeyError(
            f"key of {len(k)} characters is over {MAX_KEY}; build it with faultkit.key(...), "
            "which shortens long keys by hashing their tail"
        )
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
            raise InvalidKeyError(
                f"key segment of {len(seg)} characters is over {MAX_SEGMENT}; build keys "
                "with faultkit.key(...), which hashes long parts"
            )
    return k


def _encode(part: str) -> str:
    if len(part) <= MAX_SEGMENT and _PLAIN.fullmatch(part):
        return part  # the common case (ids, dates without a colon), checked in C
    if part == "":
        return "="
    out = []
    for i, ch in enumerate(part):
        # A leading "." is encoded so that no segment is ".", ".." or a hidden name.
        if ch in _SAFE and not (ch == "." and i == 0):
            out.append(ch)
        else:
            out.extend(f"={b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    enc = "".join(out)
    if len(enc) > MAX_SEGMENT:
        # "=H" is never produced by the =XX escape, so shortened names cannot collide.
        enc = f"{enc[: MAX_SEGMENT - _DIGEST - 2]}=H{_digest(part)}"
    return enc


def key(*parts: object) -> str:
    """Build a valid key from arbitrary values, one segment per part.

    Characters outside ``[A-Za-z0-9._-]`` are written as ``=XX`` (UTF-8 bytes in hex), so
    distinct inputs give distinct keys: ``key("etl", "manual__2024-01-01T00:00:00+00:00")``
    is ``"etl/manual__2024-01-01T00=3A00=3A00=2B00=3A00"``. ``None`` and numbers are
    formatted with ``str``. Any input works on every backend: a part longer than a file name
    allows keeps a readable prefix and a hash, and a key longer than
    ``MAX_KEY`` (512) characters keeps its leading segments and replaces the rest with one
    segment holding their hash (``=H`` and 32 hex digits).

    Raises:
        InvalidKeyError: when no part is given.
    """
    if not parts:
        raise InvalidKeyError("faultkit.key() needs at least one part")
    segs = [_encode(str(p)) for p in parts]
    if sum(map(len, segs)) + len(segs) - 1 <= MAX_KEY:
        return "/".join(segs)
    tail_len = 2 + _DIGEST
    kept: list[str] = []
    used = 0
    for s in segs:
        if used + len(s) + 1 + tail_len > MAX_KEY:
            break
        kept.append(s)
        used += len(s) + 1
    rest = "/".join(segs[len(kept) :])
    return "/".join([*kept, f"=H{_digest(rest)}"])


_ESCAPES = re.compile(r"(?:=[0-9A-F]{2})+")


def key_parts(k: str) -> list[str]:
    """The parts :func:`key` was given, for display: ``=XX`` escapes decoded; a hashed
    part or tail (``...=H<hex>``) stays as it is."""

    def unescape(m: re.Match[str]) -> str:
        raw = bytes(int(m.group(0)[i + 1 : i + 3], 16) for i in range(0, len(m.group(0)), 3))
        return raw.decode("utf-8", "surrogatepass")

    out = []
    for seg in k.split("/"):
        if seg == "=":
            out.append("")
        elif "=H" in seg:
            out.append(seg)
        else:
            try:
                out.append(_ESCAPES.sub(unescape, seg))
            except UnicodeDecodeError:
                out.append(seg)
    return out


def check_unit(unit: object) -> str | int:
    """Return ``unit`` if it can name a unit of work (str or int), else raise."""
    if isinstance(unit, bool) or not isinstance(unit, (str, int)):
        raise InvalidKeyError(
            f"a unit must be a str or an int, got {type(unit).__name__}: {unit!r}; "
            "pass an id (e.g. the partition name) rather than the object"
        )
    if isinstance(unit, str) and len(unit) > MAX_UNIT:
        raise InvalidKeyError(
            f"a unit id of {len(unit)} characters is over {MAX_UNIT}; pass a short id (e.g. "
            "the partition name or a hash of the input) rather than the data"
        )
    return unit


def unit_id(unit: str | int) -> str:
    """The canonical string form of a unit (ints and strs never collide: 5 is not "5")."""
    return f"i:{unit}" if isinstance(unit, int) else f"s:{unit}"


def unit_ref(unit: str | int) -> str:
    """:func:`unit_id` shortened to at most 200 characters (a column or index value)."""
    uid = unit_id(unit)
    if len(uid) <= MAX_SEGMENT:
        return uid
    return f"{uid[: MAX_SEGMENT - _DIGEST - 2]}=H{_digest(uid)}"


def unit_segment(unit: str | int) -> str:
    """A file name for ``unit``: its string escaped as :func:`key` does, an int as ``=I5``
    (``=I`` is never produced by escaping, so 5 and "5" differ)."""
    if isinstance(unit, int):
        text = f"=I{unit}"
        return text if len(text) <= MAX_SEGMENT else f"=IH{_digest(text)}"
    return _encode(unit)
