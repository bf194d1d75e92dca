"""A pickle-free snapshot format: a JSON header describing the state, then raw tensor bytes.

Layout (all integers little-endian)::

    b"FKTORCH\\x01"          8 bytes, the magic
    header length           8 bytes, unsigned
    header                  JSON (UTF-8), padded with spaces so the data starts 64-aligned
    data                    each tensor's bytes, C-contiguous, at a 64-aligned offset

The header holds ``{"v": 1, "tensors": [[dtype, shape, offset, nbytes], ...], "tree": ...}``.
``tree`` is the saved object: JSON values as themselves, everything else as a tagged object
``{"__fk__": tag, ...}`` (tensors by index, tuples, dicts whose keys are not all strings,
NumPy arrays, dtypes, devices, bytes). Anything else is refused when saving, so loading never
needs pickle and never builds an object other than tensors, arrays and plain containers.
"""

from __future__ import annotations

import base64
import collections
import ctypes
import json
import math
import struct
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .._errors import CorruptCheckpointError, UnsafeCheckpointError

__all__ = ["MAGIC", "Encoded", "clone_tensors", "decode", "encode"]

MAGIC = b"FKTORCH\x01"
ALIGN = 64
TAG = "__fk__"
MAX_DEPTH = 100  # nesting of a state tree; deeper is a mistake or a malicious header
_PREFIX = len(MAGIC) + 8

_DTYPES: dict[str, torch.dtype] = {
    str(dt).removeprefix("torch."): dt
    for dt in (
        getattr(torch, name, None)
        for name in (
            "float64",
            "float32",
            "float16",
            "bfloat16",
            "complex128",
            "complex64",
            "int64",
            "int32",
            "int16",
            "int8",
            "uint8",
            "uint16",
            "uint32",
            "uint64",
            "bool",
            "float8_e4m3fn",
            "float8_e5m2",
            "float8_e4m3fnuz",
            "float8_e5m2fnuz",
        )
    )
    if isinstance(dt, torch.dtype)
}


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (the caller keeps ``t`` alive)."""
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


@dataclass(slots=True)
class Encoded:
    """A state tree split into its header and the tensors to stream after it."""

    header: bytes
    tensors: list[torch.Tensor]
    offsets: list[int]
    data_size: int
    _keep: list[Any] = field(default_factory=list, repr=False)

    @property
    def size(self) -> int:
        """Total bytes of the snapshot."""
        return len(self.header) + self.data_size

    def chunks(self) -> Iterator[memoryview | bytes]:
        """The snapshot as byte chunks; tensors are streamed from their own memory."""
        yield self.header
        pos = 0
        for t, off in zip(self.tensors, self.offsets, strict=True):
            if off > pos:
                yield bytes(off - pos)
                pos = off
            nbytes = t.numel() * t.element_size()
            if not nbytes:
                continue
            c = t.detach()
            if c.device.type != "cpu":
                c = c.cpu()
            c = c.contiguous()
            yield _byte_view(c)
            del c  # the view was consumed by the writer before the generator resumed
            pos += nbytes
        if self.data_size > pos:
            yield bytes(self.data_size - pos)

    def copy_into(
        self, staging: torch.Tensor, pick: Callable[[torch.Tensor], bool] | None = None
    ) -> None:
        """Copy the tensors ``pick`` accepts (default: all) into ``staging`` at their offsets."""
        for t, off in zip(self.tensors, self.offsets, strict=True):
            nbytes = t.numel() * t.element_size()
            if nbytes and (pick is None or pick(t)):
                staging[off : off + nbytes].view(t.dtype).view(t.shape).copy_(t.detach())

    def staged_chunks(self, staging: torch.Tensor) -> Iterator[memoryview | bytes]:
        """The snapshot as chunks, with the tensor bytes taken from ``staging``."""
        yield self.header
        if self.data_size:
            yield _byte_view(staging[: self.data_size])


class _Encoder:
    def __init__(self, what: str) -> None:
        self.what = what
        self.tensors: list[torch.Tensor] = []
        self._np = sys.modules.get("numpy")

    def fail(self, path: str, obj: Any) -> TypeError:
        return TypeError(
            f"{self.what}: {path} is a {type(obj).__module__}.{type(obj).__qualname__}, which "
            "cannot be saved without pickle. State must hold tensors, NumPy arrays, numbers, "
            "strings, bools, None, lists, tuples and dicts; convert it in state_dict()."
        )

    def tensor(self, t: torch.Tensor, path: str) -> int:
        if t.layout != torch.strided or t.is_quantized or t.is_meta or t.is_nested:
            raise TypeError(
                f"{self.what}: {path} is a {t.layout} tensor on {t.device}; only dense tensors "
                "can be saved (sharded/DTensor state is not supported yet)"
            )
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            raise self.fail(path, t)
        if str(t.dtype).removeprefix("torch.") not in _DTYPES:
            raise TypeError(f"{self.what}: {path} has dtype {t.dtype}, which is not supported")
        self.tensors.append(t.detach())
        return len(self.tensors) - 1

    def enc(self, obj: Any, path: str, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise TypeError(
                f"{self.what}: {path[:80]}... is nested deeper than {MAX_DEPTH} levels; "
                "flatten the state in state_dict()"
            )
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            return float(obj)
        if isinstance(obj, torch.Tensor):
            return {TAG: "tensor", "i": self.tensor(obj, path)}
        if isinstance(obj, torch.dtype):
            return {TAG: "dtype", "v": str(obj).removeprefix("torch.")}
        if isinstance(obj, torch.device):
            return {TAG: "device", "v": str(obj)}
        if isinstance(obj, (bytes, bytearray)):
            return {TAG: "bytes", "v": base64.b64encode(bytes(obj)).decode()}
        np = self._np
        if np is not None:
            if isinstance(obj, np.ndarray):
                if obj.dtype.hasobject or obj.dtype.kind not in "biufc":
                    raise self.fail(path, obj)
                arr = np.ascontiguousarray(obj)
                t = torch.from_numpy(arr.reshape(-1).view(np.uint8))
                return {
                    TAG: "ndarray",
                    "i": self.tensor(t, path),
                    "dtype": arr.dtype.str,
                    "shape": list(arr.shape),
                }
            if isinstance(obj, np.generic) and obj.dtype.kind in "biuf":
                return self.enc(obj.item(), path, depth)
        if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
            return {
                TAG: "tuple",
                "v": [self.enc(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(obj)],
            }
        if isinstance(obj, list):
            return [self.enc(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(obj)]
        if isinstance(obj, torch.Size):
            return {TAG: "tuple", "v": [int(v) for v in obj]}
        if isinstance(obj, dict) and type(obj) in (dict, collections.OrderedDict):
            meta = getattr(obj, "_metadata", None)
            if type(obj) is dict and all(type(k) is str for k in obj) and TAG not in obj:
                return {k: self.enc(v, f"{path}[{k!r}]", depth + 1) for k, v in obj.items()}
            out: dict[str, Any] = {
                TAG: "odict" if type(obj) is collections.OrderedDict else "dict",
                "v": [
                    [
                        self.enc(k, f"{path} key", depth + 1),
                        self.enc(v, f"{path}[{k!r}]", depth + 1),
                    ]
                    for k, v in obj.items()
                ],
            }
            if meta is not None:
                out["meta"] = self.enc(meta, f"{path}._metadata", depth + 1)
            return out
        raise self.fail(path, obj)


def encode(tree: Any, *, what: str = "checkpoint") -> Encoded:
    """Split ``tree`` into a header and its tensors; raises TypeError for unsafe objects."""
    e = _Encoder(what)
    body = e.enc(tree, "state")
    offsets: list[int] = []
    entries = []
    pos = 0
    for t in e.tensors:
        nbytes = t.numel() * t.element_size()
        offsets.append(pos)
        entries.append([str(t.dtype).removeprefix("torch."), list(t.shape), pos, nbytes])
        pos = _align(pos + nbytes)
    raw = json.dumps(
        {"v": 1, "byteorder": sys.byteorder, "tensors": entries, "tree": body},
        separators=(",", ":"),
    ).encode()
    padded = raw + b" " * (_align(_PREFIX + len(raw)) - _PREFIX - len(raw))
    header = MAGIC + struct.pack("<Q", len(padded)) + padded
    return Encoded(header, e.tensors, offsets, pos)


def _refuse(data: memoryview) -> None:
    head = bytes(data[:4])
    if head[:1] == b"\x80" or head == b"PK\x03\x04":
        kind = "a torch.save/zip archive" if head == b"PK\x03\x04" else "a pickle"
        raise UnsafeCheckpointError(
            f"the snapshot is {kind}, which needs pickle (and so could run code) to load; "
            "it was refused and nothing was loaded. Only snapshots written by "
            "TrainingCheckpointer are loaded; delete the snapshot if you did not write it."
        )
    raise UnsafeCheckpointError(
        f"the snapshot does not start with {MAGIC!r} (it starts with {head!r}): it was not "
        "written by TrainingCheckpointer and is not loaded"
    )


def decode(data: bytes | bytearray | memoryview) -> Any:
    """Rebuild a tree saved by :func:`encode`; tensors share ``data``'s memory (read-only).

    Raises:
        UnsafeCheckpointError: ``data`` is not in this format (e.g. a pickle).
        CorruptCheckpointError: the header is malformed or points outside ``data``.
    """
    view = memoryview(data).cast("B")
    if bytes(view[: len(MAGIC)]) != MAGIC:
        _refuse(view)
    if len(view) < _PREFIX:
        raise CorruptCheckpointError("snapshot is shorter than its header")
    (hlen,) = struct.unpack("<Q", view[len(MAGIC) : _PREFIX])
    if _PREFIX + hlen > len(view):
        raise CorruptCheckpointError(f"snapshot header length {hlen} exceeds its size")
    try:
        header = json.loads(bytes(view[_PREFIX : _PREFIX + hlen]))
        if header.get("v") != 1:
            raise CorruptCheckpointError(f"unknown snapshot format version {header.get('v')!r}")
        if header.get("byteorder") != sys.byteorder:
            raise CorruptCheckpointError(
                f"snapshot was written on a {header.get('byteorder')}-endian machine"
            )
        entries = header["tensors"]
        tree = header["tree"]
    except RecursionError as exc:
        raise CorruptCheckpointError(
            f"snapshot header is nested deeper than this Python can parse (limit {MAX_DEPTH})"
        ) from exc
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        raise CorruptCheckpointError(f"snapshot header is malformed: {exc}") from exc
    base = _PREFIX + hlen
    tensors: list[torch.Tensor] = []
    with warnings.catch_warnings():
        # The buffer may be immutable bytes; callers copy what they will modify.
        warnings.filterwarnings("ignore", message=".*buffer is not writable.*")
        for entry in entries:
            tensors.append(_tensor(data, entry, base, len(view)))
    return _Decoder(tensors).dec(tree)


def _tensor(data: Any, entry: Any, base: int, total: int) -> torch.Tensor:
    try:
        dname, shape, off, nbytes = entry
        dtype = _DTYPES[dname]
        shape = [int(s) for s in shape]
        off, nbytes = int(off), int(nbytes)
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpointError(f"snapshot tensor entry {entry!r} is malformed") from exc
    itemsize = torch.empty((), dtype=dtype).element_size()
    if (
        any(s < 0 for s in shape)
        or math.prod(shape) * itemsize != nbytes
        or off < 0
        or base + off + nbytes > total
    ):
        raise CorruptCheckpointError(f"snapshot tensor entry {entry!r} does not fit the data")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(data, dtype=torch.uint8, count=nbytes, offset=base + off)
    return raw.view(dtype).view(shape)


class _Decoder:
    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors

    def tensor(self, i: Any) -> torch.Tensor:
        if type(i) is not int or not 0 <= i < len(self.tensors):
            raise CorruptCheckpointError(f"snapshot refers to tensor {i!r}, which it lacks")
        return self.tensors[i]

    def dec(self, obj: Any, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise CorruptCheckpointError(f"snapshot state is nested deeper than {MAX_DEPTH}")
        d = depth + 1
        if isinstance(obj, list):
            return [self.dec(v, d) for v in obj]
        if not isinstance(obj, dict):
            return obj
        tag = obj.get(TAG)
        if tag is None:
            return {k: self.dec(v, d) for k, v in obj.items()}
        try:
            if tag == "tensor":
                return self.tensor(obj["i"])
            if tag == "tuple":
                return tuple(self.dec(v, d) for v in obj["v"])
            if tag in ("dict", "odict"):
                out: dict[Any, Any] = {} if tag == "dict" else collections.OrderedDict()
                for k, v in obj["v"]:
                    k = self.dec(k, d)
                    if isinstance(k, (list, dict)):
                        raise CorruptCheckpointError("snapshot has an unhashable dict key")
                    out[k] = self.dec(v, d)
                if "meta" in obj and tag == "odict":
                    out._metadata = self.dec(obj["meta"], d)  # type: ignore[attr-defined]
                return out
            if tag == "dtype":
                return _DTYPES[obj["v"]]
            if tag == "device":
                return torch.device(str(obj["v"]))
            if tag == "bytes":
                return base64.b64decode(obj["v"])
            if tag == "ndarray":
                return self._ndarray(obj)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CorruptCheckpointError(f"snapshot holds a malformed {tag!r} entry") from exc
        raise CorruptCheckpointError(f"snapshot holds an unknown entry type {tag!r}")

    def _ndarray(self, obj: dict[str, Any]) -> Any:
        import numpy as np

        dt = np.dtype(str(obj["dtype"]))
        if dt.hasobject or dt.kind not in "biufc":
            raise CorruptCheckpointError(f"snapshot holds an array of dtype {dt!r}")
        raw = self.tensor(obj["i"])
        shape = tuple(int(s) for s in obj["shape"])
        # A copy: NumPy state is small, and the array must own writable memory.
        return np.frombuffer(raw.numpy().tobytes(), dtype=dt).reshape(shape).copy()


def clone_tensors(tree: Any) -> Any:
    """A copy of ``tree`` whose tensors own their memory (writable, independent of the data)."""
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, list):
        return [clone_tensors(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(clone_tensors(v) for v in tree)
    if isinstance(tree, dict):
        out = type(tree)((k, clone_tensors(v)) for k, v in tree.items())
        if hasattr(tree, "_metadata"):
            out._metadata = tree._metadata  # type: ignore[attr-defined]
        return out
    return tree
