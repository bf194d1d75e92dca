"""``file://`` stores: a folder on a local (or network) file system.

A small object is written to an unnamed file (``O_TMPFILE``; a named file in ``@tmp/`` where
the file system has no such thing), fsync'd, then ``link(2)``-ed into place: the link fails
with ``EEXIST`` if the name exists, so creation is atomic and exclusive, a reader never sees a
partly written object, and a writer killed half-way leaves nothing. The folder is fsync'd
after the link.

Nothing outside the root is touched: every path is opened one folder at a time, relative to
the folder above it, with ``O_NOFOLLOW``, so a symbolic link planted inside the store (say a
stage's ``@blobs`` pointing at ``/etc``) is refused, never followed; :meth:`anomalies` reports
such links. The root itself may be a link (that is the user's configuration).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import IO, TypeVar

from . import _failpoints
from ._errors import LinkRefusedError, StoreConfigError
from ._storage import ObjectInfo, Storage, check_rel, write_error

__all__ = ["LinkRefusedError", "LocalStorage"]

T = TypeVar("T")

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _mkdir(fd: int, name: str) -> bool:
    """Make folder ``name`` under ``fd``; False if something by that name exists already."""
    try:
        os.mkdir(name, 0o755, dir_fd=fd)
    except FileExistsError:
        return False
    return True


def _split(path: str) -> tuple[str, str]:
    folder, _, name = check_rel(path).rpartition("/")
    return folder, name


class _Absent(FileNotFoundError):
    """A folder is not there, checked under a parent that is still linked."""


class _Fd:
    """A folder's descriptor, closed when the last reference to it goes: the cache's, or a
    thread's that is using it. So an evicted or forgotten folder is never closed under a
    thread still using it, and taking one from the cache needs no lock."""

    __slots__ = ("fd", "owned", "used")

    def __init__(self, fd: int, owned: bool = True) -> None:
        self.fd = fd
        self.owned = owned  # the store's root is closed by the store
        self.used = True  # used since the cache last passed it (see _Dirs._adopt)

    def __del__(self) -> None:
        if self.owned:
            try:  # no module-level helper: this may run while the interpreter shuts down
                os.close(self.fd)
            except Exception:  # closed already, or os is gone at exit
                pass


class _Dirs:
    """Descriptors of folders inside the root, opened one name at a time with ``O_NOFOLLOW``.

    The recently used are kept open (at most ``limit``), so a commit needs no lookup of its
    folder. A record is created relative to its folder's descriptor and the same descriptor
    is fsync'd, so the entry made durable is the one in the folder written to.

    Looking a folder up in the cache takes no lock: hundreds of threads (Prefect runs each
    task in its own) committing at once would otherwise queue on it, each hand-over a
    context switch. Only adding and removing entries lock; a handle (:class:`_Fd`) keeps its
    descriptor open for as long as anyone holds it. Eviction gives a second chance to the
    entries used since it last passed them (the clock algorithm, over the dict's order).
    """

    def __init__(self, root_fd: int, limit: int = 64) -> None:
        self._root = _Fd(root_fd, owned=False)
        self._limit = limit
        self._lock = threading.Lock()  # adding and removing entries
        self._fds: dict[str, _Fd] = {}

    def get(self, folder: str, create: bool) -> _Fd:
        """A handle of ``folder`` ("" is the root); missing folders are made if ``create``,
        else ``FileNotFoundError``. Hold the handle while using its descriptor."""
        if not folder:
            return self._root
        h = self._fds.get(folder)
        if h is None:
            h = self._open(folder, create)
            self._adopt(folder, h)
        else:
            h.used = True
        return h

    def _open(self, folder: str, create: bool) -> _Fd:
        """A new handle of ``folder``, walked from the nearest cached folder above it.

        The folder above the target is cached too, and so is the deepest one found when a
        folder on the way is missing: a fresh stage is looked up several times before it is
        made, and hundreds of stages under one run folder each cost a lookup, not a walk from
        the root. A missing folder under a folder known to be linked raises
        :class:`_Absent`: it is really not there (no stale descriptor to forget and retry)."""
        parts = folder.split("/")
        start, h, cached = 0, self._root, False
        for i in range(len(parts) - 1, 0, -1):
            above = self._fds.get("/".join(parts[:i]))
            if above is not None:
                above.used = True
                start, h, cached = i, above, True
                break
        made = False  # the folder above was made on this walk: what is under it is new
        for i in range(start, len(parts)):
            try:
                nxt, made = self._step(h.fd, parts[i], create, "/".join(parts[: i + 1]), made)
            except FileNotFoundError as exc:
                if create:
                    raise
                if i > start:  # opened on this walk, so linked: keep it for the next lookup
                    self._adopt("/".join(parts[:i]), h)
                elif cached and os.fstat(h.fd).st_nlink == 0:
                    raise  # a cached folder was removed: the caller forgets it and retries
                raise _Absent(errno.ENOENT, "no such folder", folder) from exc
            if i > start and i == len(parts) - 1:
                self._adopt("/".join(parts[:i]), h)
            h = _Fd(nxt)
        return h

    def _adopt(self, folder: str, h: _Fd) -> None:
        """Cache ``h`` as ``folder``'s handle, unless another thread cached one meanwhile."""
        with self._lock:
            if folder in self._fds:
                return
            self._fds[folder] = h
            fds = self._fds
            while len(fds) > self._limit:
                name = next(iter(fds))
                old = fds.pop(name)
                if old.used:  # used since the last pass: a second chance, at the back
                    old.used = False
                    fds[name] = old

    @staticmethod
    def _step(fd: int, name: str, create: bool, path: str, new: bool = False) -> tuple[int, bool]:
        """Open folder ``name`` under ``fd`` (made first if ``create``), never through a
        link; ``(descriptor, whether this call made it)``. ``new`` (the folder above was
        just made) tries to make it before looking (one call fewer; an existing one, made by
        a racing writer, is opened all the same)."""
        made = create and new and _mkdir(fd, name)
        for _ in range(16):  # a folder removed by another process right after we made it
            try:
                return os.open(name, _DIR, dir_fd=fd), made
            except FileNotFoundError:
                if not create:
                    raise
                made = _mkdir(fd, name)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise LinkRefusedError(path) from exc
                raise
        raise FileNotFoundError(errno.ENOENT, "folder removed while it was being made", path)

    def forget(self, folder: str) -> None:
        """Drop the handles of ``folder`` and every folder under it (they were removed)."""
        with self._lock:
            for name in [f for f in self._fds if f == folder or f.startswith(folder + "/")]:
                del self._fds[name]

    def forget_path(self, folder: str) -> None:
        """Drop the handles of ``folder`` and of every folder above it."""
        parts = folder.split("/")
        for i in range(1, len(parts) + 1):
            self.forget("/".join(parts[:i]))

    def close(self) -> None:
        with self._lock:
            self._fds.clear()


class LocalStorage(Storage):
    """A folder on a local (or network) file system; see the module docstring."""

    def __init__(self, root: str, *, fsync: bool = True, create: bool = True) -> None:
        self.root = os.path.abspath(root)
        self.fsync = bool(fsync)  # False: survive process loss only (see CheckpointStore)
        self.url = f"file://{self.root}"
        if create:
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as exc:
                raise StoreConfigError(
                    f"cannot use {self.root!r} as a checkpoint store: {exc.strerror}; "
                    "pick a writable folder"
                ) from exc
        elif not os.path.isdir(self.root):
            raise StoreConfigError(
                f"no store at {self.url!r}: the folder does not exist. Check the path (this "
                "command never creates a store)"
            )
        try:
            self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise StoreConfigError(
                f"cannot open {self.root!r} as a checkpoint store: {exc.strerror}"
            ) from exc
        self._dirs = _Dirs(self._root_fd)
        # Unnamed files linked into place need O_TMPFILE and /proc (Linux).
        self._anon_ok = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._dirs.close()
            os.close(self._root_fd)

    # -- plumbing ----------------------------------------------------------------------

    def _in(self, folder: str, create: bool, fn: Callable[[int], T]) -> T:
        """Run ``fn(folder_fd)``; once more with a fresh descriptor if the cached folder was
        removed under us (by delete/gc in another process) and made again."""
        for last in (False, True):
            try:
                h = self._dirs.get(folder, create)
            except FileNotFoundError as exc:
                if last or not folder or isinstance(exc, _Absent):
                    raise
                self._dirs.forget_path(folder)  # a cached folder above it was removed
                continue
            try:
                return fn(h.fd)
            except FileNotFoundError:
                if last or not folder or os.fstat(h.fd).st_nlink != 0:
                    raise
            self._dirs.forget(folder)
        raise AssertionError("not reached")

    def _open_file(self, path: str) -> tuple[int, int]:
        """A descriptor of regular file ``path`` (never through a link) and its size."""
        folder, name = _split(path)

        def op(dfd: int) -> int:
            try:
                return os.open(name, _FILE, dir_fd=dfd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise LinkRefusedError(path) from exc
                raise

        fd = self._in(folder, False, op)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise LinkRefusedError(path)
        return fd, st.st_size

    # -- Storage -----------------------------------------------------------------------

    def exists(self) -> bool:
        return os.path.isdir(self.root)

    def create(self, path: str, data: bytes, *, durable: bool = True) -> None:
        folder, name = _split(path)
        durable = durable and self.fsync
        try:
            if self._anon_ok and self._in(
                folder, True, lambda dfd: self._create_anon(dfd, name, data, durable)
            ):
                return
            tmp = self._named_tmp(data, durable)
            try:
                self._in(folder, True, lambda dfd: self._link_tmp(tmp, dfd, name, durable))
            finally:
                with contextlib.suppress(OSError):
                    self._in("@tmp", False, lambda t: os.unlink(tmp, dir_fd=t))
        except FileExistsError:
            raise
        except OSError as exc:
            raise write_error(path, exc, self.url) from exc

    def _create_anon(self, dfd: int, name: str, data: bytes, durable: bool) -> bool:
        """Create ``name`` from an unnamed file (``O_TMPFILE``) linked into place; False
        where the file system cannot (the caller then uses a named temp file)."""
        try:
            fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o644, dir_fd=dfd)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                self._anon_ok = False
                return False
            if os.fstat(dfd).st_nlink == 0:  # Linux says EPERM for a removed folder
                raise FileNotFoundError(errno.ENOENT, "folder removed") from exc
            raise
        try:
            _write_all(fd, data)
            if durable:
                os.fsync(fd)
            _failpoints.hit("storage.tmp_written")
            # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N names the open file itself.
            os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dfd, follow_symlinks=True)
        finally:
            os.close(fd)
        _failpoints.hit("storage.linked")
        if durable:
            os.fsync(dfd)
        return True

    def _named_tmp(self, data: bytes, durable: bool) -> str:
        name = f"{os.getpid()}-{uuid.uuid4().hex}"

        def op(t: int) -> None:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=t)
            try:
                _write_all(fd, data)
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)

        try:
            self._in("@tmp", True, op)
        except BaseException:
            with contextlib.suppress(OSError):
                self._in("@tmp", False, lambda t: os.unlink(name, dir_fd=t))
            raise
        _failpoints.hit("storage.tmp_written")
        return name

    def _link_tmp(self, tmp: str, dfd: int, name: str, durable: bool) -> None:
        t = self._dirs.get("@tmp", False)  # held until the link is made
        os.link(tmp, name, src_dir_fd=t.fd, dst_dir_fd=dfd, follow_symlinks=False)
        _failpoints.hit("storage.linked")
        if durable:
            os.fsync(dfd)

    @contextlib.contextmanager
    def open_new(self, path: str) -> Iterator[IO[bytes]]:
        folder, name = _split(path)
        tmp: str | None = None
        try:
            fd = -1
            if self._anon_ok:

                def anon(dfd: int) -> int:
                    try:
                        return os.open(
                            ".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o644, dir_fd=dfd
                        )
                    except OSError as exc:
                        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                            return -1
                        if os.fstat(dfd).st_nlink == 0:
                            raise FileNotFoundError(errno.ENOENT, "folder removed") from exc
                        raise

                fd = self._in(folder, True, anon)
            if fd < 0:
                tmp = f"{os.getpid()}-{uuid.uuid4().hex}"
                fd = self._in(
                    "@tmp",
                    True,
                    lambda t: os.open(
                        tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=t
                    ),
                )
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
                if tmp is None:
                    src = f"/proc/self/fd/{f.fileno()}"
                    self._in(folder, True, lambda dfd: self._link_proc(src, dfd, name))
            if tmp is not None:
                self._in(folder, True, lambda dfd: self._link_tmp(tmp, dfd, name, self.fsync))
        except FileExistsError:
            raise
        except OSError as exc:
            raise write_error(path, exc, self.url) from exc
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    self._in("@tmp", False, lambda t: os.unlink(tmp, dir_fd=t))

    def _link_proc(self, src: str, dfd: int, name: str) -> None:
        os.link(src, name, dst_dir_fd=dfd, follow_symlinks=True)
        _failpoints.hit("storage.linked")
        if self.fsync:
            os.fsync(dfd)

    def read(self, path: str) -> bytes:
        fd, size = self._open_file(path)
        try:  # objects never change once linked: read the size fstat saw, unbuffered
            chunks, got = [], 0
            while True:
                chunk = os.read(fd, (size - got) or 65536)  # 0 bytes: read to the end
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
                if got == size:
                    break
            return b"".join(chunks)
        finally:
            os.close(fd)

    def open_read(self, path: str) -> IO[bytes]:
        return os.fdopen(self._open_file(path)[0], "rb")

    def map_private(self, path: str) -> mmap.mmap:
        """A private, copy-on-write memory map of the whole object (no copy made)."""
        fd, size = self._open_file(path)
        try:
            if size == 0:
                return mmap.mmap(-1, 1, access=mmap.ACCESS_COPY)
            return mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
        finally:
            os.close(fd)

    def _entries(self, folder: str) -> list[os.DirEntry[str]]:
        """The entries of ``folder`` through a private descriptor (a shared one would share
        its read offset with other threads); ``FileNotFoundError`` when it is missing,
        :class:`LinkRefusedError` when it or a folder above it is a link."""

        def op(dfd: int) -> list[os.DirEntry[str]]:
            own = os.open(".", _DIR, dir_fd=dfd)
            try:
                with os.scandir(own) as it:
                    return list(it)
            finally:
                os.close(own)

        return self._in(folder, False, op)

    def _scan(self, folder: str) -> list[os.DirEntry[str]]:
        """:meth:`_entries`, [] when the folder is missing or is a link."""
        try:
            return self._entries(folder)
        except (FileNotFoundError, NotADirectoryError, LinkRefusedError):
            return []

    def list(self, path: str) -> list[str]:
        if path:
            check_rel(path)
        return sorted(e.name for e in self._scan(path))

    def list_or_missing(self, path: str) -> list[str] | None:
        try:
            return sorted(e.name for e in self._entries(check_rel(path)))
        except FileNotFoundError:
            return None

    def subdirs(self, path: str) -> list[str]:
        if path:
            check_rel(path)
        return sorted(e.name for e in self._scan(path) if e.is_dir(follow_symlinks=False))

    def present(self, folder: str, names: list[str]) -> set[str]:
        def op(dfd: int) -> set[str]:
            out = set()
            for n in names:
                with contextlib.suppress(FileNotFoundError):
                    os.stat(n, dir_fd=dfd, follow_symlinks=False)
                    out.add(n)
            return out

        try:
            return self._in(check_rel(folder), False, op)
        except (FileNotFoundError, LinkRefusedError):
            return set()

    def info(self, path: str) -> ObjectInfo:
        folder, name = _split(path)
        try:
            st = self._in(
                folder, False, lambda dfd: os.stat(name, dir_fd=dfd, follow_symlinks=False)
            )
        except LinkRefusedError as exc:
            raise FileNotFoundError(errno.ENOENT, str(exc), path) from exc
        if not stat.S_ISREG(st.st_mode):
            raise FileNotFoundError(errno.ENOENT, "not a plain file", path)
        ident = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
        return ObjectInfo(path, st.st_size, st.st_mtime, ident)

    def delete(self, path: str) -> None:
        folder, name = _split(path)
        with contextlib.suppress(FileNotFoundError, LinkRefusedError):
            self._in(folder, False, lambda dfd: os.unlink(name, dir_fd=dfd))

    def walk_files(self, path: str) -> Iterator[str]:
        for e in self._scan(path):
            sub = f"{path}/{e.name}" if path else e.name
            if e.is_dir(follow_symlinks=False):
                yield from self.walk_files(sub)
            elif e.is_file(follow_symlinks=False):
                yield sub

    def anomalies(self, path: str = "") -> list[str]:
        out = []
        for e in self._scan(path):
            sub = f"{path}/{e.name}" if path else e.name
            if e.is_dir(follow_symlinks=False):
                out.extend(self.anomalies(sub))
            elif not e.is_file(follow_symlinks=False):
                out.append(sub)
        return out

    def delete_tree(self, path: str) -> None:
        folder, name = _split(path)

        def rm(dfd: int, entry: str) -> None:
            try:
                sub = os.open(entry, _DIR, dir_fd=dfd)
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # a link or a file: unlink it
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry, dir_fd=dfd)
                    return
                raise
            try:
                with os.scandir(sub) as it:
                    entries = list(it)
                for e in entries:
                    if e.is_dir(follow_symlinks=False):
                        rm(sub, e.name)
                    else:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(e.name, dir_fd=sub)
            finally:
                os.close(sub)
            with contextlib.suppress(FileNotFoundError, OSError):
                os.rmdir(entry, dir_fd=dfd)

        self._dirs.forget(path)
        with contextlib.suppress(FileNotFoundError, LinkRefusedError):
            self._in(folder, False, lambda dfd: rm(dfd, name))

    def tmp_files(self) -> list[ObjectInfo]:
        out = []
        for name in self.list("@tmp"):
            with contextlib.suppress(FileNotFoundError):
                out.append(self.info(f"@tmp/{name}"))
        return out
