"""The storage interface under :class:`~faultkit.CheckpointStore`, and how a URL picks one.

A :class:`Storage` is a flat namespace of immutable objects under one root. Everything the
store does is built on these calls, in this order for a commit:

1. :meth:`Storage.open_new` streams a large object (a snapshot's bytes) under a fresh, unique
   name; it becomes visible, complete and durable only when the ``with`` block exits cleanly.
2. :meth:`Storage.create` writes a small object *only if the name is absent* (create-if-absent)
   and raises ``FileExistsError`` otherwise. The object appears whole or not at all. This one
   primitive orders every commit of a stage (see ``_log.py``).
3. :meth:`Storage.present` tells which of a few names exist (a commit checks its neighbours
   in the log, so a record written into a hole left by damage is caught).
4. :meth:`Storage.read` / :meth:`Storage.read_many` / :meth:`Storage.open_read` read objects;
   a missing one raises ``FileNotFoundError`` (``read_many`` maps it to ``None``).
5. :meth:`Storage.list`, :meth:`Storage.subdirs`, :meth:`Storage.info`,
   :meth:`Storage.delete` serve listing, inspection and gc.

Paths are relative, "/"-separated and built by the store from validated keys; every
implementation still refuses absolute paths and ".." so nothing can leave the root, and the
local one never follows a symbolic link inside the root.

Implementations: :class:`~faultkit._storage_local.LocalStorage` (``file://``),
:class:`MemoryStorage` (``memory://``; one process) and
:class:`~faultkit._storage_s3.FsspecStorage` (``s3://`` through s3fs).
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urlsplit

from ._errors import CheckpointWriteError, InvalidKeyError, StoreConfigError

log = logging.getLogger("faultkit.store")

__all__ = [
    "MemoryStorage",
    "ObjectInfo",
    "Storage",
    "open_storage",
    "redact_url",
]


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """Size and modification time of one object.

    ``ident`` changes whenever the object is replaced, modified or has its times reset (a
    local file's inode, size and change time; an S3 object's ETag and time), so a reader can
    tell that bytes it verified earlier are still the same bytes.
    """

    path: str
    size: int
    mtime: float
    ident: str = ""


def check_rel(path: str) -> str:
    """``path`` if it is a relative path inside a root, else :class:`InvalidKeyError`."""
    if not path or path.startswith("/") or "\\" in path or ".." in path.split("/"):
        raise InvalidKeyError(f"storage path {path!r} would leave the store's root")
    if "" in path.split("/"):
        raise InvalidKeyError(f"storage path {path!r} has an empty segment")
    return path


def write_error(path: str, exc: BaseException, url: str = "") -> CheckpointWriteError:
    """A :class:`CheckpointWriteError` that says what the storage refused and what to do."""
    code = getattr(exc, "errno", None) or 0
    where = f" in {redact_url(url)}" if url else ""
    advice = {
        errno.ENOSPC: ("the disk is full", "Free space, then retry the task."),
        errno.EDQUOT: ("the disk quota is exhausted", "Raise the quota, then retry the task."),
        errno.EACCES: ("permission denied", "Fix the permissions, then retry the task."),
        errno.EPERM: ("permission denied", "Fix the permissions, then retry the task."),
        errno.EROFS: ("the file system is read-only", "Remount it writable, then retry."),
        errno.ENOENT: (
            "the bucket or folder does not exist",
            "Create it (or fix the store URL), then retry the task.",
        ),
        errno.ELOOP: (
            "a symbolic link is in the way",
            "faultkit never follows links inside a store: remove the link.",
        ),
    }.get(code)
    if advice is None:
        what, todo = str(exc) or type(exc).__name__, "Retry the task once the storage is back."
    else:
        what, todo = advice
    err = CheckpointWriteError(
        f"could not write {path!r}{where}: {what}; the previous checkpoint is intact. {todo}"
    )
    err.errno = code or None
    return err


class Storage(ABC):
    """A flat namespace of immutable objects under one root (see the module docstring)."""

    url: str

    def exists(self) -> bool:
        """True if the root (folder or bucket) exists."""
        return True

    @abstractmethod
    def create(self, path: str, data: bytes, *, durable: bool = True) -> None:
        """Write ``data`` at ``path`` atomically if ``path`` is absent; durably unless told not.

        ``durable=False`` skips the fsyncs where the backend has them: for a stage's first
        claim (see :meth:`~faultkit.Stage.claim`), never for commits.

        Raises:
            FileExistsError: ``path`` already exists; nothing was written.
            CheckpointWriteError: the storage refused the write.
        """

    @abstractmethod
    def open_new(self, path: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        """A writable file; the object appears at ``path`` (whole, durable) on clean exit."""

    @abstractmethod
    def read(self, path: str) -> bytes:
        """The object's bytes; ``FileNotFoundError`` when absent."""

    def read_many(self, paths: list[str]) -> dict[str, bytes | None]:
        """Read several objects (concurrently where the backend can); absent ones are None."""
        out: dict[str, bytes | None] = {}
        for p in paths:
            try:
                out[p] = self.read(p)
            except FileNotFoundError:
                out[p] = None
        return out

    @abstractmethod
    def open_read(self, path: str) -> IO[bytes]:
        """A readable binary file for ``path``."""

    @abstractmethod
    def list(self, path: str) -> list[str]:
        """Names (not paths) directly under the folder ``path``, sorted; [] when absent."""

    def list_or_missing(self, path: str) -> list[str] | None:
        """:meth:`list`, but None where the folder surely does not exist, and
        :class:`LinkRefusedError` where it, or a folder above it, is a link. A backend
        without folders (object stores) cannot tell absent from empty and returns a list."""
        return self.list(path)

    #: True where listing a folder of many entries is one cheap call (a local folder).
    cheap_list = True

    def list_from(self, path: str, *, after: str = "", prefix: str = "") -> list[str]:
        """Names under the folder ``path`` that sort after ``after`` and start with
        ``prefix``, sorted. Object stores ask only for those (a log's tail, not its history)."""
        return [n for n in self.list(path) if n > after and n.startswith(prefix)]

    def subdirs(self, path: str) -> list[str]:
        """Names of the folders directly under ``path``, sorted."""
        return [n for n in self.list(path) if self.list(f"{path}/{n}" if path else n)]

    def read_and_present(
        self, path: str, folder: str, names: list[str]
    ) -> tuple[bytes | None, set[str]]:
        """``read(path)`` (None when absent) and ``present(folder, names)``; a backend with
        round trips does both at once (a commit's checks of its neighbours)."""
        try:
            data: bytes | None = self.read(path)
        except FileNotFoundError:
            data = None
        return data, self.present(folder, names)

    def present(self, folder: str, names: list[str]) -> set[str]:
        """Which of ``names`` exist as objects directly under ``folder``."""
        out = set()
        for n in names:
            try:
                self.info(f"{folder}/{n}")
            except FileNotFoundError:
                continue
            out.add(n)
        return out

    @abstractmethod
    def info(self, path: str) -> ObjectInfo:
        """Size, mtime and identity; ``FileNotFoundError`` when absent (or not a plain object)."""

    @abstractmethod
    def delete(self, path: str) -> None:
        """Remove one object; absent is fine."""

    def walk_files(self, path: str) -> Iterator[str]:
        """Every object path under the folder ``path`` (recursive)."""
        for name in self.list(path):
            sub = f"{path}/{name}" if path else name
            children = self.list(sub)
            if children:
                yield from self.walk_files(sub)
            else:
                with contextlib.suppress(FileNotFoundError):
                    self.info(sub)
                    yield sub

    def delete_tree(self, path: str) -> None:
        """Remove every object under the folder ``path``."""
        for p in sorted(self.walk_files(path), reverse=True):
            self.delete(p)

    def anomalies(self, path: str = "") -> list[str]:
        """Entries under ``path`` that are neither objects nor folders (symbolic links,
        devices, ...): faultkit never reads, writes or deletes through them."""
        return []

    def tmp_files(self) -> list[ObjectInfo]:
        """Temp files left by writers that were killed (or are still writing)."""
        return []


class _MemWriter:
    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def write(self, data: Any) -> int:
        b = bytes(data)
        self._chunks.append(b)
        return len(b)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class MemoryStorage(Storage):
    """Objects in this process's memory; ``memory://NAME`` stores of one process share data."""

    _spaces: dict[str, dict[str, tuple[bytes, float, int]]] = {}
    # Per space: folder -> {child name: objects under it}, so list() costs the folder's
    # size, not the store's (a claim lists its log folder).
    _trees: dict[str, dict[str, dict[str, int]]] = {}
    _spaces_lock = threading.Lock()
    _serial = 0

    def __init__(self, name: str, *, create: bool = True) -> None:
        self.url = f"memory://{name}"
        with self._spaces_lock:
            if not create and name not in self._spaces:
                raise StoreConfigError(
                    f"no store at {self.url!r}: memory:// stores live in one process and "
                    "this one has none by that name"
                )
            self._objs = self._spaces.setdefault(name, {})
            self._tree = self._trees.setdefault(name, {})

    def _index(self, path: str, delta: int) -> None:
        folder = ""
        for child in path.split("/"):
            children = self._tree.setdefault(folder, {})
            n = children.get(child, 0) + delta
            if n > 0:
                children[child] = n
            else:
                children.pop(child, None)
                if not children:
                    del self._tree[folder]
            folder = f"{folder}/{child}" if folder else child

    def create(self, path: str, data: bytes, *, durable: bool = True) -> None:
        check_rel(path)
        with self._spaces_lock:
            if path in self._objs or path in self._tree:
                raise FileExistsError(errno.EEXIST, "exists", path)
            MemoryStorage._serial += 1
            self._objs[path] = (bytes(data), time.time(), MemoryStorage._serial)
            self._index(path, 1)

    @contextlib.contextmanager
    def open_new(self, path: str) -> Iterator[IO[bytes]]:
        w = _MemWriter()
        yield w  # type: ignore[misc]
        self.create(path, b"".join(w._chunks))

    def read(self, path: str) -> bytes:
        try:
            return self._objs[check_rel(path)][0]
        except KeyError:
            raise FileNotFoundError(errno.ENOENT, "no such object", path) from None

    def open_read(self, path: str) -> IO[bytes]:
        return io.BytesIO(self.read(path))

    def list(self, path: str) -> list[str]:
        with self._spaces_lock:
            return sorted(self._tree.get(path, ()))

    def subdirs(self, path: str) -> list[str]:
        prefix = f"{path}/" if path else ""
        with self._spaces_lock:
            return sorted(n for n in self._tree.get(path, ()) if f"{prefix}{n}" in self._tree)

    def present(self, folder: str, names: list[str]) -> set[str]:
        return {n for n in names if f"{folder}/{n}" in self._objs}

    def info(self, path: str) -> ObjectInfo:
        try:
            data, mtime, serial = self._objs[check_rel(path)]
        except KeyError:
            raise FileNotFoundError(errno.ENOENT, "no such object", path) from None
        return ObjectInfo(path, len(data), mtime, f"{serial}:{len(data)}")

    def delete(self, path: str) -> None:
        with self._spaces_lock:
            if self._objs.pop(check_rel(path), None) is not None:
                self._index(path, -1)


def redact_url(url: str) -> str:
    """``url`` with any user:password part replaced by ``***``."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return parts._replace(netloc=f"***@{host}").geturl()


def _ignore_options(url: str, options: dict[str, Any]) -> None:
    """Options a local or in-memory store has no use for are logged, not fatal: an Airflow
    connection or a Dask plugin may carry S3 options while a task's own URL is local."""
    if options:
        log.warning(
            "%s ignores storage options %s (they are for s3:// stores; a file:// store "
            "takes only fsync=True|False)",
            redact_url(url),
            sorted(options),
        )


def _local_options(url: str, options: dict[str, Any]) -> dict[str, Any]:
    options = dict(options)
    fsync = options.pop("fsync", True)
    _ignore_options(url, options)
    if isinstance(fsync, str):  # from a connection's or block's JSON/text options
        if fsync.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise StoreConfigError(f"fsync must be true or false, not {fsync!r}")
        fsync = fsync.lower() in ("true", "1", "yes")
    if not isinstance(fsync, bool):
        raise StoreConfigError(
            f"fsync must be True or False, not {fsync!r} ({type(fsync).__name__}); leave it "
            "out for durable commits"
        )
    return {"fsync": fsync}


def open_storage(url: str, *, create: bool = True, **options: Any) -> Storage:
    """Build the :class:`Storage` for ``url``; ``options`` go to fsspec (credentials, endpoint).

    With ``create=False`` a store that does not exist yet is a :class:`StoreConfigError`
    and nothing is made (for inspection: a mistyped path must not look like an empty store).
    """
    if not isinstance(url, str) or not url:
        raise StoreConfigError(f"a store URL is required, e.g. 'file:///var/lib/ck'; got {url!r}")
    if "://" not in url:
        if url.startswith(("/", ".")):
            from ._storage_local import LocalStorage

            return LocalStorage(url, create=create, **_local_options(url, options))
        scheme = url.partition(":")[0]
        if scheme in ("file", "s3", "memory") and url.startswith(f"{scheme}:"):
            fixed = f"{scheme}:///{url[len(scheme) + 1 :].lstrip('/')}"
            if scheme != "file":
                fixed = f"{scheme}://{url[len(scheme) + 1 :].lstrip('/')}"
            raise StoreConfigError(
                f"store URL {redact_url(url)!r} is missing the '//' after {scheme + ':'!r}; "
                f"write {redact_url(fixed)!r}"
            )
        raise StoreConfigError(
            f"store URL {redact_url(url)!r} has no scheme; use file:///path, memory://name "
            "or s3://bucket/prefix"
        )
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    if scheme == "file":
        if not rest.startswith("/"):
            raise StoreConfigError(
                f"file URL {url!r} must be absolute: file:///path/to/store (three slashes)"
            )
        from ._storage_local import LocalStorage

        return LocalStorage(rest, create=create, **_local_options(url, options))
    if scheme == "memory":
        _ignore_options(url, options)
        return MemoryStorage(rest.strip("/") or "default", create=create)
    if scheme in ("s3", "s3a"):
        from ._storage_s3 import open_s3

        return open_s3(rest, create=create, **options)
    raise StoreConfigError(
        f"store URL scheme {scheme!r} is not supported; faultkit needs an atomic "
        "create-if-absent, which it has on file://, memory:// and s3://"
    )
