"""The storage interface under :class:`~faultkit.CheckpointStore`, and its implementations.

A :class:`Storage` is a flat namespace of immutable objects under one root. Everything the
store does is built on these calls, in this order for a commit:

1. :meth:`Storage.open_new` streams a large object (a snapshot's bytes) under a fresh, unique
   name; it becomes visible, complete and durable only when the ``with`` block exits cleanly.
2. :meth:`Storage.create` writes a small object *only if the name is absent* (create-if-absent)
   and raises ``FileExistsError`` otherwise. The object appears whole or not at all. This one
   primitive orders every commit of a stage (see ``_log.py``).
3. :meth:`Storage.read` / :meth:`Storage.read_many` / :meth:`Storage.open_read` read objects;
   a missing one raises ``FileNotFoundError`` (``read_many`` maps it to ``None``).
4. :meth:`Storage.list`, :meth:`Storage.info`, :meth:`Storage.delete` serve listing and gc.

Paths are relative, "/"-separated and built by the store from validated keys; every
implementation still refuses absolute paths and ".." so nothing can leave the root.

Implementations: :class:`LocalStorage` (``file://``; atomic through ``link(2)``),
:class:`MemoryStorage` (``memory://``; one process) and :class:`FsspecStorage` (``s3://`` through
s3fs, whose ``If-None-Match: *`` writes give create-if-absent).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import stat
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urlsplit

from . import _failpoints
from ._errors import CheckpointWriteError, InvalidKeyError, StoreConfigError

log = logging.getLogger("faultkit.store")

__all__ = [
    "FsspecStorage",
    "LocalStorage",
    "MemoryStorage",
    "ObjectInfo",
    "Storage",
    "open_storage",
    "redact_url",
]


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """Size and modification time of one object."""

    path: str
    size: int
    mtime: float


def _check_rel(path: str) -> str:
    if not path or path.startswith("/") or "\\" in path or ".." in path.split("/"):
        raise InvalidKeyError(f"storage path {path!r} would leave the store's root")
    return path


def _write_error(path: str, exc: OSError) -> CheckpointWriteError:
    what = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exhausted",
        errno.EACCES: "permission denied",
        errno.EROFS: "the file system is read-only",
    }.get(exc.errno or 0, str(exc))
    err = CheckpointWriteError(
        f"could not write {path!r}: {what}; the previous checkpoint is intact. "
        "Free space or fix permissions, then retry the task."
    )
    err.errno = exc.errno
    return err


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Storage(ABC):
    """A flat namespace of immutable objects under one root (see the module docstring)."""

    url: str

    @abstractmethod
    def create(self, path: str, data: bytes, *, durable: bool = True) -> None:
        """Write ``data`` at ``path`` atomically if ``path`` is absent; durably unless told not.

        ``durable=False`` skips the fsyncs where the backend has them: for hints that are
        rebuilt when missing (the key index) and a stage's first claim (see
        :meth:`~faultkit.Stage.claim`), never for commits.

        Raises:
            FileExistsError: ``path`` already exists; nothing was written.
            CheckpointWriteError: the storage refused the write.
        """

    def touch(self, path: str) -> None:
        """Create an empty object at ``path`` unless one exists; not durable (for hints)."""
        try:
            self.info(path)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):
                self.create(path, b"", durable=False)

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
        """Names (not paths) directly under the folder ``path``; [] when absent."""

    @abstractmethod
    def info(self, path: str) -> ObjectInfo:
        """Size and mtime; ``FileNotFoundError`` when absent."""

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


@dataclass(slots=True)
class _FolderFd:
    fd: int
    users: int = 0
    retired: bool = False  # out of the cache: closed when its last user is done


class _FolderFds:
    """Open descriptors of the folders written most recently (at most ``limit``).

    A record is created relative to its folder's descriptor and the same descriptor is
    fsync'd, so the entry made durable is the one in the folder written to, even if the path
    was removed and made again meanwhile, and a commit needs no open/close of its folder.
    A descriptor in use is never closed under its user.
    """

    def __init__(self, limit: int = 64) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._fds: OrderedDict[str, _FolderFd] = OrderedDict()

    @contextlib.contextmanager
    def use(self, path: str) -> Iterator[int]:
        with self._lock:
            h = self._fds.get(path)
            if h is not None:
                self._fds.move_to_end(path)
                h.users += 1
        if h is None:
            h = _FolderFd(os.open(path, os.O_RDONLY | os.O_DIRECTORY), users=1)
            with self._lock:
                if path in self._fds:  # another thread cached one meanwhile: ours is private
                    h.retired = True
                else:
                    self._fds[path] = h
                    while len(self._fds) > self._limit:
                        self._retire(self._fds.popitem(last=False)[1])
        try:
            yield h.fd
        finally:
            with self._lock:
                h.users -= 1
                if h.retired and h.users == 0:
                    os.close(h.fd)

    @staticmethod
    def _retire(h: _FolderFd) -> None:  # called under the lock
        h.retired = True
        if h.users == 0:
            os.close(h.fd)

    def forget(self, path: str) -> None:
        """Drop ``path``'s descriptor (its folder was removed)."""
        with self._lock:
            h = self._fds.pop(path, None)
            if h is not None:
                self._retire(h)

    def close(self) -> None:
        with self._lock:
            while self._fds:
                self._retire(self._fds.popitem()[1])


class LocalStorage(Storage):
    """A folder on a local (or network) file system.

    A small object is written to an unnamed file (``O_TMPFILE``; a named file in ``@tmp/``
    where the file system has no such thing), fsync'd, then ``link(2)``-ed into place: the
    link fails with ``EEXIST`` if the name exists, so creation is atomic and exclusive, and a
    reader never sees a partly written object. The folder is fsync'd after the link.
    """

    def __init__(self, root: str, *, fsync: bool = True) -> None:
        self.root = os.path.abspath(root)
        self.fsync = bool(fsync)  # False: survive process loss only (see CheckpointStore)
        self.url = f"file://{self.root}"
        self._tmp = os.path.join(self.root, "@tmp")
        self._made: set[str] = set()  # folders known to exist
        self._folders = _FolderFds()
        # Unnamed files linked into place need O_TMPFILE and /proc (Linux).
        self._anon_ok = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")
        try:
            os.makedirs(self._tmp, exist_ok=True)
        except OSError as exc:
            raise StoreConfigError(
                f"cannot use {self.root!r} as a checkpoint store: {exc.strerror}; "
                "pick a writable folder"
            ) from exc
        self._made.update((self.root, self._tmp))

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._folders.close()

    def _abs(self, path: str) -> str:
        return os.path.join(self.root, _check_rel(path))

    def _parent(self, full: str) -> str:
        """The folder of ``full``, made if missing."""
        parent = os.path.dirname(full)
        if parent not in self._made:
            self._mkdirs(parent)
        return parent

    def _mkdirs(self, folder: str) -> None:
        """Make ``folder`` and the folders above it that are missing, one ``mkdir`` each,
        starting below the nearest folder known to exist."""
        missing = []
        d = folder
        while d not in self._made and os.path.dirname(d) != d:
            missing.append(d)
            d = os.path.dirname(d)
        try:
            for d in reversed(missing):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(d)
                self._made.add(d)
        except FileNotFoundError:  # a folder known to exist was removed (delete/gc)
            self._made = {self.root, self._tmp}
            os.makedirs(folder, exist_ok=True)
            self._made.add(folder)

    def _forget(self, folder: str) -> None:
        """``folder`` was removed under us: make it again on the next write."""
        self._made.discard(folder)
        self._folders.forget(folder)

    def _tmp_path(self) -> str:
        return os.path.join(self._tmp, f"{os.getpid()}-{uuid.uuid4().hex}")

    def _fsync_dir(self, path: str) -> None:
        with self._folders.use(path) as fd:
            os.fsync(fd)

    def _publish(self, tmp: str, full: str, durable: bool = True) -> None:
        parent = self._parent(full)
        try:
            try:
                os.link(tmp, full)
            except FileNotFoundError:  # the folder was removed (delete/gc) since we made it
                self._forget(parent)
                self._parent(full)
                os.link(tmp, full)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        _failpoints.hit("storage.linked")
        if durable:
            self._fsync_dir(parent)

    def create(self, path: str, data: bytes, *, durable: bool = True) -> None:
        full = self._abs(path)
        durable = durable and self.fsync
        try:
            if self._anon_ok and self._create_anon(full, data, durable):
                return
            tmp = self._tmp_path()
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    _write_all(fd, data)
                    if durable:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                _failpoints.hit("storage.tmp_written")
                self._publish(tmp, full, durable)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except FileExistsError:
            raise
        except OSError as exc:
            raise _write_error(path, exc) from exc

    def _create_anon(self, full: str, data: bytes, durable: bool) -> bool:
        """Create ``full`` from an unnamed file (``O_TMPFILE``) linked into place.

        Fewer system calls than a named temp file (no unlink, no open of the folder), and a
        writer killed half-way leaves nothing behind. Returns False where the file system
        cannot do it; the caller (and every later call) then uses a named temp file.
        """
        folder, name = os.path.split(full)
        for last in (False, True):
            self._parent(full)
            try:
                with self._folders.use(folder) as dfd:
                    try:
                        fd = os.open(".", os.O_TMPFILE | os.O_WRONLY, 0o644, dir_fd=dfd)
                    except OSError as exc:
                        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                            self._anon_ok = False
                            return False
                        if os.fstat(dfd).st_nlink == 0:  # Linux says EPERM for this
                            raise FileNotFoundError(errno.ENOENT, "folder removed") from exc
                        raise
                    try:
                        _write_all(fd, data)
                        if durable:
                            os.fsync(fd)
                        _failpoints.hit("storage.tmp_written")
                        # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N names the open file.
                        os.link(
                            f"/proc/self/fd/{fd}",
                            name,
                            src_dir_fd=dfd,
                            dst_dir_fd=dfd,
                            follow_symlinks=True,
                        )
                    finally:
                        os.close(fd)
                    _failpoints.hit("storage.linked")
                    if durable:
                        os.fsync(dfd)
                return True
            except FileNotFoundError:  # the folder was removed (delete/gc) since we made it
                self._forget(folder)
                if last:
                    raise
        return False  # not reached

    def touch(self, path: str) -> None:
        full = self._abs(path)
        for last in (False, True):
            try:
                os.mknod(full, 0o644 | stat.S_IFREG)
                return
            except FileExistsError:
                return
            except FileNotFoundError:
                if last:
                    raise
                self._forget(os.path.dirname(full))
                self._parent(full)
            except PermissionError:  # a file system that refuses mknod: an empty create
                with contextlib.suppress(FileExistsError):
                    self.create(path, b"", durable=False)
                return

    @contextlib.contextmanager
    def open_new(self, path: str) -> Iterator[IO[bytes]]:
        full = self._abs(path)
        tmp = self._tmp_path()
        try:
            with open(tmp, "xb") as f:
                yield f
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            self._publish(tmp, full, self.fsync)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, FileExistsError):
                raise
            raise _write_error(path, exc) from exc
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def read(self, path: str) -> bytes:
        with open(self._abs(path), "rb") as f:
            return f.read()

    def open_read(self, path: str) -> IO[bytes]:
        return open(self._abs(path), "rb")

    def map_private(self, path: str) -> mmap.mmap:
        """A private, copy-on-write memory map of the whole object (no copy made)."""
        with open(self._abs(path), "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return mmap.mmap(-1, 1, access=mmap.ACCESS_COPY)
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

    def list(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(self._abs(path) if path else self.root))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def info(self, path: str) -> ObjectInfo:
        st = os.stat(self._abs(path))
        return ObjectInfo(path, st.st_size, st.st_mtime)

    def delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._abs(path))

    def walk_files(self, path: str) -> Iterator[str]:
        base = self._abs(path) if path else self.root
        for dirpath, _dirs, files in os.walk(base):
            rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            for name in files:
                yield name if rel == "." else f"{rel}/{name}"

    def delete_tree(self, path: str) -> None:
        super().delete_tree(path)
        for dirpath, _dirs, _files in sorted(os.walk(self._abs(path)), reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)

    def tmp_files(self) -> list[ObjectInfo]:
        """Temp files (left by writers that were killed, or still writing)."""
        out = []
        for name in self.list("@tmp"):
            with contextlib.suppress(FileNotFoundError):
                out.append(self.info(f"@tmp/{name}"))
        return out


class _MemWriter:
    def __init__(self, store: MemoryStorage, path: str) -> None:
        self._store, self._path = store, path
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

    _spaces: dict[str, dict[str, tuple[bytes, float]]] = {}
    # Per space: folder -> {child name: objects under it}, so list() costs the folder's
    # size, not the store's (a claim lists its log folder).
    _trees: dict[str, dict[str, dict[str, int]]] = {}
    _spaces_lock = threading.Lock()

    def __init__(self, name: str) -> None:
        self.url = f"memory://{name}"
        with self._spaces_lock:
            self._objs = self._spaces.setdefault(name, {})
            self._tree = self._trees.setdefault(name, {})
        self._lock = threading.Lock()

    def _index(self, path: str, delta: int) -> None:
        parts = path.split("/")
        for i, child in enumerate(parts):
            folder = "/".join(parts[:i])
            children = self._tree.setdefault(folder, {})
            n = children.get(child, 0) + delta
            if n > 0:
                children[child] = n
            else:
                children.pop(child, None)
                if not children:
                    del self._tree[folder]

    def create(self, path: str, data: bytes, *, durable: bool = True) -> None:
        _check_rel(path)
        with self._spaces_lock:
            if path in self._objs:
                raise FileExistsError(errno.EEXIST, "exists", path)
            self._objs[path] = (bytes(data), time.time())
            self._index(path, 1)

    @contextlib.contextmanager
    def open_new(self, path: str) -> Iterator[IO[bytes]]:
        w = _MemWriter(self, path)
        yield w  # type: ignore[misc]
        self.create(path, b"".join(w._chunks))

    def read(self, path: str) -> bytes:
        try:
            return self._objs[_check_rel(path)][0]
        except KeyError:
            raise FileNotFoundError(errno.ENOENT, "no such object", path) from None

    def open_read(self, path: str) -> IO[bytes]:
        import io

        return io.BytesIO(self.read(path))

    def list(self, path: str) -> list[str]:
        with self._spaces_lock:
            return sorted(self._tree.get(path, ()))

    def info(self, path: str) -> ObjectInfo:
        try:
            data, mtime = self._objs[_check_rel(path)]
        except KeyError:
            raise FileNotFoundError(errno.ENOENT, "no such object", path) from None
        return ObjectInfo(path, len(data), mtime)

    def delete(self, path: str) -> None:
        with self._spaces_lock:
            if self._objs.pop(_check_rel(path), None) is not None:
                self._index(path, -1)


class FsspecStorage(Storage):
    """An fsspec file system with create-if-absent (S3 through s3fs: ``If-None-Match: *``)."""

    def __init__(self, fs: Any, root: str, url: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = url

    def _abs(self, path: str) -> str:
        return f"{self.root}/{_check_rel(path)}" if path else self.root

    def create(self, path: str, data: bytes, *, durable: bool = True) -> None:
        try:
            self.fs.pipe_file(self._abs(path), bytes(data), mode="create")
        except FileExistsError:
            raise
        except OSError as exc:
            raise _write_error(path, exc) from exc

    @contextlib.contextmanager
    def open_new(self, path: str) -> Iterator[IO[bytes]]:
        try:
            f = self.fs.open(self._abs(path), "xb", block_size=16 << 20)
        except OSError as exc:
            raise _write_error(path, exc) from exc
        try:
            yield f
        except BaseException:
            # Closing would commit the partial object: abort the upload instead.
            with contextlib.suppress(Exception):
                f.discard()
            raise
        try:
            f.close()
        except FileExistsError:
            raise
        except OSError as exc:
            raise _write_error(path, exc) from exc

    def read(self, path: str) -> bytes:
        return self.fs.cat_file(self._abs(path))

    def read_many(self, paths: list[str]) -> dict[str, bytes | None]:
        if not paths:
            return {}
        full = {self._abs(p): p for p in paths}
        got = self.fs.cat(list(full), on_error="return")
        out: dict[str, bytes | None] = {}
        for f, p in full.items():
            v = got.get(f)
            if isinstance(v, FileNotFoundError) or v is None:
                out[p] = None
            elif isinstance(v, BaseException):
                raise v
            else:
                out[p] = v
        return out

    def open_read(self, path: str) -> IO[bytes]:
        return self.fs.open(self._abs(path), "rb", block_size=8 << 20, cache_type="none")

    def list(self, path: str) -> list[str]:
        try:
            entries = self.fs.ls(self._abs(path), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        base = self._abs(path).rstrip("/") + "/"
        return sorted(e[len(base) :].strip("/") for e in entries if e.startswith(base))

    def info(self, path: str) -> ObjectInfo:
        inf = self.fs.info(self._abs(path), refresh=True)
        if inf.get("type") == "directory":
            raise FileNotFoundError(errno.ENOENT, "is a folder", path)
        mtime = inf.get("LastModified") or inf.get("mtime") or 0.0
        if hasattr(mtime, "timestamp"):
            mtime = mtime.timestamp()
        return ObjectInfo(path, int(inf.get("size") or 0), float(mtime))

    def delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._abs(path))

    def walk_files(self, path: str) -> Iterator[str]:
        base = self.root + "/"
        for f in self.fs.find(self._abs(path), refresh=True):
            yield f[len(base) :] if f.startswith(base) else f

    def delete_tree(self, path: str) -> None:
        files = [self._abs(p) for p in self.walk_files(path)]
        if files:
            self.fs.rm(files)


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
    return {"fsync": bool(fsync)}


def open_storage(url: str, **options: Any) -> Storage:
    """Build the :class:`Storage` for ``url``; ``options`` go to fsspec (credentials, endpoint)."""
    if not isinstance(url, str) or not url:
        raise StoreConfigError(f"a store URL is required, e.g. 'file:///var/lib/ck'; got {url!r}")
    if "://" not in url:
        if url.startswith("/") or url.startswith("."):
            return LocalStorage(url, **_local_options(url, options))
        raise StoreConfigError(
            f"store URL {redact_url(url)!r} has no scheme; use file:///path, memory://name "
            "or s3://bucket/prefix"
        )
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    if scheme == "file":
        if not rest.startswith("/"):
            raise StoreConfigError(f"file URL {url!r} must be absolute: file:///path/to/store")
        return LocalStorage(rest, **_local_options(url, options))
    if scheme == "memory":
        _ignore_options(url, options)
        return MemoryStorage(rest.strip("/") or "default")
    if scheme in ("s3", "s3a"):
        try:
            import s3fs
        except ImportError as exc:
            raise StoreConfigError("s3:// stores need s3fs: pip install 'faultkit[s3]'") from exc
        bucket_prefix = rest.strip("/")
        if not bucket_prefix:
            raise StoreConfigError(
                f"S3 URL {redact_url(url)!r} names no bucket: s3://bucket/prefix"
            )
        opts = {"use_listings_cache": False, "skip_instance_cache": True, **options}
        fs = s3fs.S3FileSystem(**opts)
        return FsspecStorage(fs, bucket_prefix, f"s3://{bucket_prefix}")
    raise StoreConfigError(
        f"store URL scheme {scheme!r} is not supported; faultkit needs an atomic "
        "create-if-absent, which it has on file://, memory:// and s3://"
    )
