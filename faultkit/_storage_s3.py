"""``s3://`` stores through s3fs: conditional writes (``If-None-Match: *``) give create-if-absent.

A lost create race is answered ``412 PreconditionFailed`` by S3 servers (AWS may also answer
``409 ConditionalRequestConflict`` while another conditional write of the same key is in
flight). Both mean "position taken: read it and try the next", and both become
``FileExistsError`` here. s3fs alone maps only AWS's own spelling of the 412 (with
``Condition: If-None-Match`` in the error body); SeaweedFS, for one, omits it, and s3fs then
raises ``OSError(EINVAL)`` whose ``__cause__`` is the ``ClientError``.

Options are checked when the store is made (:func:`open_s3`): s3fs keeps what it is given and
fails only at the first request, far from the mistake.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import errno
import logging
import os
import re
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import IO, Any, ClassVar, NoReturn
from urllib.parse import urlsplit

from ._errors import StoreConfigError, StoreUnavailableError
from ._storage import ObjectInfo, Storage, check_rel, redact_url, write_error

__all__ = ["FsspecStorage", "ObstoreS3Storage", "open_s3"]

log = logging.getLogger("faultkit.store")

_TAKEN = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
_CREDENTIALS = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
)
# present(): names that are sequence numbers at most this far apart are answered by one LIST.
_WINDOW = 16


def _code(exc: BaseException) -> str:
    """The S3 error code behind an s3fs/botocore or obstore exception ("" if none)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        resp = getattr(e, "response", None)
        if isinstance(resp, dict):
            err = resp.get("Error") or {}
            code = str(err.get("Code") or "")
            status = str((resp.get("ResponseMetadata") or {}).get("HTTPStatusCode") or "")
            return code or status
        if type(e).__module__.startswith("obstore"):
            return _ob_code(e)
        e = e.__cause__ or e.__context__
    return ""


def _taken(exc: BaseException) -> bool:
    """True if ``exc`` says a conditional create lost: the name exists (412) or is being
    created by another writer (409)."""
    return isinstance(exc, FileExistsError) or _code(exc) in _TAKEN


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What a failed S3 request raises: s3fs translates server answers into ``OSError``,
    but a connection that never got an answer surfaces as botocore's own exceptions."""
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:  # pragma: no cover - s3fs always brings botocore
        return (OSError,)
    return (OSError, BotoCoreError)


def _unreachable(exc: BaseException) -> bool:
    """True if ``exc`` (or what it wraps) says the server never answered: a refused or
    broken connection, or a timeout, as opposed to an answer that refused the request."""
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
    except ImportError:  # pragma: no cover - s3fs always brings botocore
        transport: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
    else:
        transport = (ConnectionError, TimeoutError, BotoConnectionError, HTTPClientError)
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, transport) or type(e).__name__ in {
            "ClientConnectionError",
            "ServerDisconnectedError",
            "ServerTimeoutError",
        }:
            return True
        e = e.__cause__ or e.__context__
    return False


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an error's text, bounded: obstore appends a multi-line debug dump."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _seq_window(names: list[str]) -> tuple[str, int] | None:
    """(StartAfter, MaxKeys) of one LIST that covers ``names``, when they are zero-padded
    sequence numbers close together (a log's neighbours); else None."""
    if len(names) < 2:
        return None
    width = len(names[0])
    if not all(n.isascii() and n.isdigit() and len(n) == width for n in names):
        return None
    lo, hi = min(int(n) for n in names), max(int(n) for n in names)
    if hi - lo >= _WINDOW:
        return None
    # The name just below the smallest: StartAfter is exclusive.
    before = str(lo - 1).zfill(width) if lo > 0 else ""
    return before, hi - lo + 1


class FsspecStorage(Storage):
    """An fsspec file system with create-if-absent (S3 through s3fs: ``If-None-Match: *``)."""

    def __init__(self, fs: Any, root: str, url: str, remake: Any = None) -> None:
        self._fs, self._fs_pid, self._remake = fs, os.getpid(), remake
        self.root = root.rstrip("/")
        self.url = url
        self.bucket = self.root.split("/", 1)[0]
        self._errors = _transport_errors()

    @property
    def fs(self) -> Any:
        """The s3fs file system of this process, made at first use where none was given: an
        s3fs instance refuses to work in a child forked after it started ("not fork-safe"),
        so a forked child makes its own."""
        if (self._fs is None or self._fs_pid != os.getpid()) and self._remake is not None:
            try:
                self._fs, self._fs_pid = self._remake(), os.getpid()
            except (TypeError, ValueError, KeyError) as exc:
                # s3fs's own checks ("Supply either key or username, not both", ...).
                raise StoreConfigError(f"s3fs refused the options of {self.url!r}: {exc}") from exc
        return self._fs

    def _abs(self, path: str) -> str:
        return f"{self.root}/{check_rel(path)}" if path else self.root

    def _key(self, path: str) -> str:
        """The object key (inside the bucket) of ``path``; "" for a bucket's root."""
        return self._abs(path).partition("/")[2]

    def _prefix(self, folder: str) -> str:
        """The key prefix of the objects directly under ``folder``."""
        key = self._key(folder)
        return f"{key}/" if key else ""

    def _write_error(self, path: str, exc: BaseException) -> Exception:
        code = _code(exc)
        if code == "NoSuchBucket" or (isinstance(exc, FileNotFoundError) and not self.exists()):
            return self._no_bucket_error()
        if code in _CREDENTIALS:
            return self._credentials_error(code)
        return write_error(path, exc, self.url)

    def _no_bucket_error(self) -> StoreConfigError:
        return StoreConfigError(
            f"bucket {self.bucket!r} of {redact_url(self.url)!r} does not exist: create "
            "it (or fix the store URL), then retry the task"
        )

    def _unavailable(self, what: str, exc: BaseException) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"the store {redact_url(self.url)!r} did not answer while {what} "
            f"({type(exc).__name__}: {_first_line(exc)}). Nothing committed is lost; a write "
            "that timed out may have landed, and retrying it is safe. Check the network path "
            "to the S3 endpoint (or raise config_kwargs connect_timeout/read_timeout), then "
            "retry."
        )

    def _credentials_error(self, code: str) -> StoreConfigError:
        return StoreConfigError(
            f"the S3 server refused the credentials for {redact_url(self.url)!r} ({code}): "
            "fix key/secret/token in the store's options, then retry the task"
        )

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """Credentials the server refuses are a configuration error on reads too: a claim
        lists before it writes, and a bare PermissionError would not say what to fix."""
        try:
            yield
        except PermissionError as exc:
            code = _code(exc)
            if code in _CREDENTIALS:
                raise self._credentials_error(code) from exc
            raise
        except FileNotFoundError:
            raise
        except Exception as exc:
            if _unreachable(exc):
                raise self._unavailable("reading", exc) from exc
            raise

    def _raise_write(self, path: str, exc: BaseException) -> NoReturn:
        if _taken(exc):
            raise FileExistsError(errno.EEXIST, "exists", path) from exc
        if _unreachable(exc):
            raise self._unavailable(f"writing {path!r}", exc) from exc
        raise self._write_error(path, exc) from exc

    def exists(self) -> bool:
        try:
            return bool(self.fs.exists(self.bucket))
        except Exception:
            return False

    def create(self, path: str, data: bytes, *, durable: bool = True) -> None:
        # S3 acknowledges a PUT only once it is durable: ``durable`` has nothing to skip.
        try:
            self.fs.pipe_file(self._abs(path), bytes(data), mode="create")
        except self._errors as exc:
            self._raise_write(path, exc)

    @contextlib.contextmanager
    def open_new(self, path: str) -> Iterator[IO[bytes]]:
        try:
            f = self.fs.open(self._abs(path), "xb", block_size=16 << 20)
        except self._errors as exc:
            self._raise_write(path, exc)
        try:
            yield f
        except BaseException:
            # Closing would commit the partial object: abort the upload instead.
            with contextlib.suppress(Exception):
                f.discard()
            raise
        try:
            # Small objects are one conditional PUT here; large ones a conditional
            # CompleteMultipartUpload, which loses a race with the same 412.
            f.close()
        except self._errors as exc:
            self._raise_write(path, exc)

    # s3fs reads an object with more concurrency than one by asking its size first (a HEAD,
    # then the GET): one request more for every record. Records are small: one GET each.
    _ONE_GET: ClassVar[dict[str, int]] = {"max_concurrency": 1}

    def read(self, path: str) -> bytes:
        with self._reading():
            return self.fs.cat_file(self._abs(path), **self._ONE_GET)

    def read_many(self, paths: list[str]) -> dict[str, bytes | None]:
        if not paths:
            return {}
        full = {self._abs(p): p for p in paths}
        with self._reading():
            got = self.fs.cat(list(full), on_error="return", **self._ONE_GET)
        out: dict[str, bytes | None] = {}
        for f, p in full.items():
            v = got.get(f)
            if isinstance(v, FileNotFoundError) or v is None:
                out[p] = None
            elif isinstance(v, BaseException):
                with self._reading():
                    raise v
            else:
                out[p] = v
        return out

    def open_read(self, path: str) -> IO[bytes]:
        with self._reading():
            return self.fs.open(self._abs(path), "rb", block_size=8 << 20, cache_type="none")

    def _ls(self, path: str) -> list[dict[str, Any]]:
        try:
            with self._reading():
                entries = self.fs.ls(self._abs(path), detail=True, refresh=True)
        except FileNotFoundError:
            return []
        base = self._abs(path).rstrip("/") + "/"
        # SeaweedFS lists an empty folder as an object named "<folder>/": not a child.
        return [e for e in entries if e["name"].startswith(base) and e["name"] != base]

    def list(self, path: str) -> list[str]:
        base = self._abs(path).rstrip("/") + "/"
        return sorted({e["name"][len(base) :].strip("/") for e in self._ls(path)})

    cheap_list = False

    def list_from(self, path: str, *, after: str = "", prefix: str = "") -> list[str]:
        """One LIST (paginated) from ``after`` on, under ``prefix``: a log's tail costs a
        page, not a page per thousand records of its history."""
        folder = self._prefix(path)
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": folder + check_rel(prefix) if prefix else folder,
            "Delimiter": "/",
        }
        if after:
            kwargs["StartAfter"] = folder + check_rel(after)
        names: list[str] = []
        with self._reading():
            while True:
                try:
                    resp = self._run(self.fs._call_s3, "list_objects_v2", **kwargs)
                except FileNotFoundError:  # no bucket: as list(), and the first write says so
                    return []
                names += [c["Key"][len(folder) :] for c in resp.get("Contents") or ()]
                token = resp.get("NextContinuationToken")
                if not resp.get("IsTruncated") or not token:
                    break
                kwargs["ContinuationToken"] = token
        return sorted(n for n in names if n and "/" not in n)

    def subdirs(self, path: str) -> list[str]:
        base = self._abs(path).rstrip("/") + "/"
        return sorted(
            e["name"][len(base) :].strip("/") for e in self._ls(path) if e["type"] == "directory"
        )

    def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Await ``fn(*args, **kwargs)`` on s3fs's event loop, from sync code."""
        from fsspec.asyn import sync

        return sync(self.fs.loop, fn, *args, **kwargs)

    async def _head(self, key: str) -> dict[str, Any] | None:
        """HEAD of one object (one request; a "folder" is absent), or None when absent."""
        try:
            return await self.fs._call_s3("head_object", Bucket=self.bucket, Key=key)
        except FileNotFoundError:
            return None

    async def _heads(self, keys: list[str]) -> list[dict[str, Any] | None]:
        # Every HEAD finishes before an error is raised: none is left running unobserved.
        got = await asyncio.gather(*(self._head(k) for k in keys), return_exceptions=True)
        for g in got:
            if isinstance(g, BaseException):
                raise g
        return list(got)  # type: ignore[arg-type]

    def _list_window(self, folder: str, names: list[str], window: tuple[str, int]) -> set[str]:
        """Which of ``names`` one LIST of the window finds; names past a truncated listing
        are asked by HEAD."""
        prefix = self._prefix(folder)
        before, max_keys = window
        kwargs: dict[str, Any] = {"StartAfter": prefix + before} if before else {}
        resp = self._run(
            self.fs._call_s3,
            "list_objects_v2",
            Bucket=self.bucket,
            Prefix=prefix,
            Delimiter="/",
            MaxKeys=max_keys,
            **kwargs,
        )
        keys = [c["Key"] for c in resp.get("Contents") or ()]
        found = {k[len(prefix) :] for k in keys} & set(names)
        if not resp.get("IsTruncated"):
            return found
        # Keys come back in order: everything up to the last one returned is decided.
        seen = keys + [p["Prefix"] for p in resp.get("CommonPrefixes") or ()]
        last = max(seen, default=prefix)[len(prefix) :]
        rest = [n for n in names if n > last]
        return found | self._head_names(folder, rest)

    def _head_names(self, folder: str, names: list[str]) -> set[str]:
        keys = [self._prefix(folder) + check_rel(n) for n in names]
        heads = self._run(self._heads, keys) if keys else []
        return {n for n, h in zip(names, heads, strict=True) if h is not None}

    def present(self, folder: str, names: list[str]) -> set[str]:
        """Which of ``names`` exist directly under ``folder``, in one round trip: a LIST
        when they are nearby sequence numbers, else concurrent HEADs."""
        names = sorted(set(names))
        for n in names:
            if "/" in check_rel(n):
                raise ValueError(f"present() takes names, not paths: {n!r}")
        window = _seq_window(names)
        with self._reading():
            if window is not None:
                return self._list_window(folder, names, window)
            return self._head_names(folder, names)

    def read_and_present(
        self, path: str, folder: str, names: list[str]
    ) -> tuple[bytes | None, set[str]]:
        """The GET and the HEADs in one round trip (concurrent requests)."""
        names = sorted(set(names))
        if _seq_window(names) is not None:  # a LIST answers these: the base's two steps
            return super().read_and_present(path, folder, names)
        keys = [self._prefix(folder) + check_rel(n) for n in names]

        async def cat() -> bytes | None:
            try:
                return await self.fs._cat_file(self._abs(path), **self._ONE_GET)
            except FileNotFoundError:
                return None

        async def both() -> list[Any]:
            # Every request finishes before an error is raised: none is left unobserved.
            got = await asyncio.gather(
                cat(), *(self._head(k) for k in keys), return_exceptions=True
            )
            for g in got:
                if isinstance(g, BaseException):
                    raise g
            return got

        with self._reading():
            data, *heads = self._run(both)
        return data, {n for n, h in zip(names, heads, strict=True) if h is not None}

    def info(self, path: str) -> ObjectInfo:
        # A HEAD of the key itself: one request, and a "folder" (a prefix, or SeaweedFS's
        # directory entry, which answers only with a trailing "/") is not found.
        with self._reading():
            head = self._run(self._head, self._key(path))
        if head is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", path)
        size = int(head.get("ContentLength") or 0)
        modified = head.get("LastModified")
        mtime = modified.timestamp() if hasattr(modified, "timestamp") else 0.0
        # The ETag is a digest of the bytes; the version (if the bucket keeps versions) and
        # time tell apart a rewrite of equal bytes, which the ETag alone would not.
        ident = f"{head.get('ETag', '')}:{head.get('VersionId') or ''}:{size}:{mtime}"
        return ObjectInfo(path, size, float(mtime), ident)

    def delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._abs(path))

    def walk_files(self, path: str) -> Iterator[str]:
        base = self.root + "/"
        with self._reading():
            found = self.fs.find(self._abs(path), refresh=True, detail=True)
        for f, entry in found.items():
            # Folders are not files: s3fs returns a childless folder itself, and SeaweedFS
            # keeps an emptied folder as an object named "<folder>/".
            if entry.get("type") == "directory" or f.endswith("/") or not f.startswith(base):
                continue
            yield f[len(base) :]

    def delete_tree(self, path: str) -> None:
        files = [self._abs(p) for p in self.walk_files(path)]
        if files:
            self.fs.rm(files)


# -- the log's hot path through obstore ---------------------------------------------------

# obstore runs its requests on a Rust runtime whose threads do not survive fork(): a child
# forked after its parent made one request hangs at its own first request. The process that
# started the runtime is remembered; any other process (a fork child) uses s3fs instead.
_RUNTIME_PID = 0
_LOOPS = threading.local()  # one event loop per thread, to await several requests at once
_MAX_INFLIGHT = 64  # requests one call has in flight at a time
_FEW = 4  # up to this many requests go out from threads; more from an event loop
_OB_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")
_OB_UNREACHABLE = ("error sending request", "timed out", "timeout", "connection", "connect")
# obstore creates an object in one PUT up to this size; larger ones go through s3fs, whose
# conditional CompleteMultipartUpload loses a race as a single PUT does.
_OB_SINGLE_PUT = 5 << 20


def _ob_code(exc: BaseException) -> str:
    """The S3 error code in an obstore error's message ("" if none)."""
    m = _OB_CODE.search(str(exc))
    return m.group(1) if m else ""


def _ob_unreachable(exc: BaseException) -> bool:
    """True if an obstore error says the server never answered (refused, reset, timed out)."""
    from obstore.exceptions import GenericError

    text = str(exc).lower()
    return isinstance(exc, GenericError) and any(w in text for w in _OB_UNREACHABLE)


def _ob_taken(exc: BaseException) -> bool:
    from obstore.exceptions import AlreadyExistsError, PreconditionError

    return isinstance(exc, AlreadyExistsError | PreconditionError) or _ob_code(exc) in _TAKEN


def _gather(coros: list[Any]) -> list[Any]:
    """Await ``coros`` together on this thread's own loop; every one finishes before an
    error is raised (none is left running unobserved)."""
    loop = getattr(_LOOPS, "loop", None)
    if loop is None or loop.is_closed():
        loop = _LOOPS.loop = asyncio.new_event_loop()
    sem = asyncio.Semaphore(_MAX_INFLIGHT)

    async def one(c: Any) -> Any:
        async with sem:
            return await c

    async def all_() -> list[Any]:
        return await asyncio.gather(*(one(c) for c in coros), return_exceptions=True)

    got = loop.run_until_complete(all_())
    for g in got:
        if isinstance(g, BaseException) and not isinstance(g, FileNotFoundError):
            raise g
    return got


_POOL: tuple[int, Any] = (0, None)  # (pid, executor) for a commit's few concurrent checks
_POOL_LOCK = threading.Lock()


def _pool() -> Any:
    """A small thread pool of this process. A commit's checks (a GET and a HEAD) go out
    together from two threads: an event loop per call costs more than the second request."""
    global _POOL
    pid, pool = _POOL
    if pid != os.getpid():
        from concurrent.futures import ThreadPoolExecutor

        with _POOL_LOCK:
            if _POOL[0] != os.getpid():
                _POOL = (os.getpid(), ThreadPoolExecutor(4, thread_name_prefix="faultkit-s3"))
            pool = _POOL[1]
    return pool


def _in_async_code() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class ObstoreS3Storage(FsspecStorage):
    """An ``s3://`` store whose log path (create, read, listing the log, the commit's
    neighbour checks) goes through obstore, Rust's ``object_store``: a request costs a
    fraction of s3fs's Python overhead, and several go out at once without a Python thread
    each. Everything else (large objects, deletes, walks, ``info``, streaming reads) stays on
    s3fs, made at its first use.

    Used where obstore can do what the options say (see :func:`obstore_config`); in a
    process forked after obstore's runtime started, and inside a running event loop, the
    same calls go through s3fs.
    """

    def __init__(
        self, fs: Any, root: str, url: str, config: dict[str, Any], remake: Any = None
    ) -> None:
        super().__init__(fs, root, url, remake)
        self._config = config
        self._ob: Any = None
        self._ob_pid = 0

    def _client(self, *, concurrent: bool = False) -> Any:
        """The obstore client for this process, or None where obstore must not be used."""
        global _RUNTIME_PID
        pid = os.getpid()
        if _RUNTIME_PID not in (0, pid) or (concurrent and _in_async_code()):
            return None
        if self._ob is None or self._ob_pid != pid:
            from obstore.store import S3Store

            self._ob, self._ob_pid = S3Store(self.bucket, **self._config), pid
        _RUNTIME_PID = pid
        return self._ob

    def _ob_error(self, what: str, path: str, exc: BaseException) -> Exception:
        """The faultkit error for an obstore error (reads: ``path`` is "")."""
        from obstore.exceptions import PermissionDeniedError, UnauthenticatedError

        code = _ob_code(exc)
        if code in _CREDENTIALS:
            return self._credentials_error(code)
        if code == "NoSuchBucket":
            return self._no_bucket_error()
        if _ob_unreachable(exc):
            return self._unavailable(what, exc)
        text = _first_line(exc)
        if isinstance(exc, PermissionDeniedError | UnauthenticatedError):
            err: OSError = PermissionError(errno.EACCES, f"{code or 'AccessDenied'}: {text}")
        else:
            err = OSError(errno.EIO, f"S3 request failed ({code or 'no S3 error code'}): {text}")
        return write_error(path, err, self.url) if path else err

    def create(self, path: str, data: bytes, *, durable: bool = True) -> None:
        ob = self._client()
        if ob is None or len(data) > _OB_SINGLE_PUT:
            return super().create(path, data, durable=durable)
        import obstore

        try:
            obstore.put(ob, self._key(path), bytes(data), mode="create", use_multipart=False)
        except FileNotFoundError as exc:  # a 404 to a PUT: the bucket is gone
            raise self._ob_error(f"writing {path!r}", path, exc) from exc
        except Exception as exc:
            if _ob_taken(exc):
                raise FileExistsError(errno.EEXIST, "exists", path) from exc
            raise self._ob_error(f"writing {path!r}", path, exc) from exc

    def _ob_read_error(self, exc: BaseException) -> Exception:
        # A missing object, or bucket, reads as absent, as through s3fs: a claim of a store
        # whose bucket is gone finds nothing, and its first write says what to fix.
        if isinstance(exc, FileNotFoundError):
            return exc
        return self._ob_error("reading", "", exc)

    def read(self, path: str) -> bytes:
        ob = self._client()
        if ob is None:
            return super().read(path)
        data = self._ob_get_or_none(ob, self._key(path))
        if data is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", path)
        return data

    async def _ob_get(self, ob: Any, key: str) -> bytes | None:
        import obstore

        try:
            got = await obstore.get_async(ob, key)
            return bytes(await got.bytes_async())
        except FileNotFoundError:
            return None

    async def _ob_head(self, ob: Any, key: str) -> bool:
        import obstore

        try:
            await obstore.head_async(ob, key)
        except FileNotFoundError:
            return False
        return True

    def _ob_gather(self, coros: list[Any]) -> list[Any]:
        try:
            return _gather(coros)
        except Exception as exc:
            raise self._ob_read_error(exc) from exc

    def read_many(self, paths: list[str]) -> dict[str, bytes | None]:
        ob = self._client(concurrent=True)
        if ob is None or not paths:
            return super().read_many(paths)
        got = self._ob_gather([self._ob_get(ob, self._key(p)) for p in paths])
        return dict(zip(paths, got, strict=True))

    def list(self, path: str) -> list[str]:
        ob = self._client()
        if ob is None:
            return super().list(path)
        import obstore

        folder = self._prefix(path)
        try:
            got = obstore.list_with_delimiter(ob, folder.rstrip("/") or None)
        except Exception as exc:
            err = self._ob_read_error(exc)
            if isinstance(err, FileNotFoundError):
                return []
            raise err from exc
        names = [o["path"] for o in got["objects"]] + list(got["common_prefixes"])
        return sorted({n[len(folder) :].strip("/") for n in names if n.startswith(folder)} - {""})

    def list_from(self, path: str, *, after: str = "", prefix: str = "") -> list[str]:
        """The names under ``path`` after ``after`` that start with ``prefix``: one listing
        from there on, stopped where the names leave ``prefix``."""
        ob = self._client()
        if ob is None:
            return super().list_from(path, after=after, prefix=prefix)
        import obstore

        folder = self._prefix(path)
        start = folder + check_rel(after) if after else ""
        if prefix:
            # Just below every name that starts with ``prefix`` ("sum" for "sum-").
            start = max(start, folder + check_rel(prefix)[:-1])
        names: list[str] = []
        try:
            stream = obstore.list(ob, folder.rstrip("/") or None, offset=start or None)
            for chunk in stream:
                for o in chunk:
                    n = o["path"][len(folder) :]
                    if prefix and not n.startswith(prefix):
                        if n > prefix:
                            return sorted(names)
                        continue
                    if n and "/" not in n:
                        names.append(n)
        except Exception as exc:
            err = self._ob_read_error(exc)
            if isinstance(err, FileNotFoundError):
                return []
            raise err from exc
        return sorted(names)

    def _ob_exists(self, ob: Any, key: str) -> bool:
        import obstore

        try:
            obstore.head(ob, key)
        except FileNotFoundError:
            return False
        except Exception as exc:
            raise self._ob_read_error(exc) from exc
        return True

    def _ob_get_or_none(self, ob: Any, key: str) -> bytes | None:
        import obstore

        try:
            return bytes(obstore.get(ob, key).bytes())
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._ob_read_error(exc) from exc

    def _together(self, first: Any, rest: list[Any]) -> list[Any]:
        """Run ``first()`` here and each of ``rest`` on the pool, all at once; every one
        finishes before an error is raised."""
        from concurrent.futures import wait

        futures = [_pool().submit(f) for f in rest]
        try:
            out = [first()]
        finally:
            wait(futures)
        return out + [f.result() for f in futures]

    def present(self, folder: str, names: list[str]) -> set[str]:
        """Which of ``names`` exist directly under ``folder``: HEADs at once, one round
        trip for the few names a commit asks about."""
        ob = self._client(concurrent=True)
        if ob is None:
            return super().present(folder, names)
        names = sorted(set(names))
        for n in names:
            if "/" in check_rel(n):
                raise ValueError(f"present() takes names, not paths: {n!r}")
        if not names:
            return set()
        keys = [self._prefix(folder) + n for n in names]
        if len(keys) <= _FEW:
            heads = self._together(
                lambda: self._ob_exists(ob, keys[0]),
                [lambda k=k: self._ob_exists(ob, k) for k in keys[1:]],
            )
        else:
            heads = self._ob_gather([self._ob_head(ob, k) for k in keys])
        return {n for n, h in zip(names, heads, strict=True) if h}

    def read_and_present(
        self, path: str, folder: str, names: list[str]
    ) -> tuple[bytes | None, set[str]]:
        """The GET and the HEADs in one round trip (requests at once)."""
        ob = self._client(concurrent=True)
        if ob is None:
            return super().read_and_present(path, folder, names)
        names = sorted(set(names))
        prefix = self._prefix(folder)
        keys = [prefix + check_rel(n) for n in names]
        key = self._key(path)
        if len(keys) < _FEW:
            data, *heads = self._together(
                lambda: self._ob_get_or_none(ob, key),
                [lambda k=k: self._ob_exists(ob, k) for k in keys],
            )
        else:
            data, *heads = self._ob_gather(
                [self._ob_get(ob, key)] + [self._ob_head(ob, k) for k in keys]
            )
        return data, {n for n, h in zip(names, heads, strict=True) if h}


# Expected type of each s3fs/fsspec option: (types, words for the message). None is always
# allowed and means "s3fs's default".
_STR = ((str,), "a string")
_BOOL = ((bool,), "True or False")
_DICT = ((dict,), "a dict")
_INT = ((int,), "a positive int")
_NUM = ((int, float), "a number of seconds")
_OPTION_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "key": _STR,
    "secret": _STR,
    "token": _STR,
    "username": _STR,
    "password": _STR,
    "profile": _STR,
    "endpoint_url": _STR,
    "default_cache_type": _STR,
    "anon": _BOOL,
    "use_ssl": _BOOL,
    "requester_pays": _BOOL,
    "version_aware": _BOOL,
    "default_fill_cache": _BOOL,
    "cache_regions": _BOOL,
    "fixed_upload_size": _BOOL,
    "local_expiry_check": _BOOL,
    "use_listings_cache": _BOOL,
    "skip_instance_cache": _BOOL,
    "client_kwargs": _DICT,
    "config_kwargs": _DICT,
    "s3_additional_kwargs": _DICT,
    "default_block_size": _INT,
    "max_concurrency": _INT,
    "max_paths": _INT,
    "listings_expiry_time": _NUM,
    # s3fs's own retries of a timed-out or broken request (5 by default, with backoff): a
    # class attribute that faultkit sets on the instance. retries=1 with short botocore
    # timeouts surfaces a partition as StoreUnavailableError in seconds.
    "retries": _INT,
}
_CLIENT_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "endpoint_url": _STR,
    "region_name": _STR,
    "aws_access_key_id": _STR,
    "aws_secret_access_key": _STR,
    "aws_session_token": _STR,
    "use_ssl": _BOOL,
    "verify": ((bool, str), "True, False or a CA bundle path"),
}
_SECRETS = frozenset(
    {"key", "secret", "token", "password", "aws_secret_access_key", "aws_session_token"}
)
# Taken by s3fs (or the botocore session it makes) but not checked here: objects, not data.
_UNCHECKED = frozenset(
    {"session", "loop", "asynchronous", "session_vars", "event_hooks", "include_builtin_handlers"}
)
# Options of file:// stores: a plugin or connection configured for one may meet an s3:// URL.
_LOCAL_ONLY = frozenset({"fsync"})


def _check_type(where: str, name: str, value: Any, spec: tuple[tuple[type, ...], str]) -> None:
    types, words = spec
    # bool is an int to isinstance(): True must not pass for a block size, nor 1 for a flag.
    ok = bool in types if isinstance(value, bool) else isinstance(value, types)
    if ok and spec is _INT:
        ok = value > 0
    if not ok:
        shown = "" if name in _SECRETS else f"={value!r}"
        raise StoreConfigError(
            f"S3 option {where}{name}{shown} must be {words}, not {type(value).__name__}"
        )


def _check_endpoint(where: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise StoreConfigError(
            f"S3 option {where}endpoint_url={redact_url(url)!r} must be an http:// or https:// "
            "URL, e.g. 'http://127.0.0.1:8333'"
        )


def _check_client_kwargs(client: dict[str, Any]) -> None:
    for name, value in client.items():
        if value is not None and name in _CLIENT_TYPES:
            _check_type("client_kwargs.", name, value, _CLIENT_TYPES[name])
    if isinstance(client.get("endpoint_url"), str):
        _check_endpoint("client_kwargs.", client["endpoint_url"])


def _check_config_kwargs(config: dict[str, Any]) -> None:
    """botocore builds its Config at the first request: build one now to fail here."""
    try:
        from aiobotocore.config import AioConfig

        AioConfig(**config)
    except ImportError:  # pragma: no cover - s3fs always brings aiobotocore
        return
    except (TypeError, ValueError) as exc:
        raise StoreConfigError(f"S3 option config_kwargs is not a botocore Config: {exc}") from exc


def _unknown_option(name: str) -> StoreConfigError:
    known = sorted(_OPTION_TYPES.keys() | _UNCHECKED)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return StoreConfigError(
        f"unknown S3 option {name!r}: {hint}s3fs takes key, secret, token, anon, "
        "client_kwargs, config_kwargs, s3_additional_kwargs, ... (see s3fs.S3FileSystem); "
        "the region and endpoint go in client_kwargs={'region_name': ..., 'endpoint_url': ...}"
    )


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """The s3fs options in ``options``, type-checked.

    s3fs hands names it does not know to botocore's session, which fails at the first
    request: refuse them here instead. Options of ``file://`` stores are logged and
    dropped, as a ``file://`` store does with S3 options.

    Raises:
        StoreConfigError: an option is unknown or has the wrong type or value; the message
            names it and what it needs (never a secret's value).
    """
    out: dict[str, Any] = {}
    for name, value in options.items():
        if name in _LOCAL_ONLY:
            log.warning("s3:// stores ignore storage option %r (it is for file:// stores)", name)
            continue
        if name not in _OPTION_TYPES and name not in _UNCHECKED:
            raise _unknown_option(name)
        if value is not None and name in _OPTION_TYPES:
            _check_type("", name, value, _OPTION_TYPES[name])
        out[name] = value
    if out.get("asynchronous"):
        raise StoreConfigError("S3 option asynchronous=True is not supported: faultkit calls s3fs")
    if isinstance(out.get("endpoint_url"), str):
        _check_endpoint("", out["endpoint_url"])
    if out.get("client_kwargs"):
        _check_client_kwargs(out["client_kwargs"])
    if out.get("config_kwargs"):
        _check_config_kwargs(out["config_kwargs"])
    return out


# What obstore can take over from s3fs's options. Anything else (a botocore session, SSE
# headers, a CA bundle, a requester-pays bucket, ...) keeps the whole store on s3fs.
_OB_TOP = frozenset(
    {"key", "secret", "token", "anon", "endpoint_url", "client_kwargs", "config_kwargs"}
    | {"retries", "use_listings_cache", "skip_instance_cache", "use_ssl"}
)
_OB_CLIENT = frozenset(
    {"endpoint_url", "region_name", "aws_access_key_id", "aws_secret_access_key"}
    | {"aws_session_token", "verify", "use_ssl"}
)
_OB_CONFIG = frozenset({"connect_timeout", "read_timeout", "retries"})
_CLIENTS = ("auto", "obstore", "s3fs")


def obstore_config(opts: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """``S3Store`` keyword arguments that do what the s3fs options ``opts`` say, or
    (None, why not). Credentials, endpoint and region come from the options, else from the
    standard ``AWS_*`` variables, as botocore takes them; a profile or an instance role
    (botocore's other sources) and a region s3fs would look up keep the store on s3fs."""
    try:
        import obstore  # noqa: F401
    except ImportError:
        return None, "obstore is not installed"
    extra = sorted(set(opts) - _OB_TOP)
    ck = dict(opts.get("client_kwargs") or {})
    cfg = dict(opts.get("config_kwargs") or {})
    extra += [f"client_kwargs.{k}" for k in sorted(set(ck) - _OB_CLIENT)]
    extra += [f"config_kwargs.{k}" for k in sorted(set(cfg) - _OB_CONFIG)]
    if isinstance(ck.get("verify"), str):
        extra.append("client_kwargs.verify (a CA bundle)")
    if extra:
        return None, f"s3fs options obstore does not take: {', '.join(extra)}"
    env = os.environ
    conf: dict[str, Any] = {}
    if opts.get("anon"):
        conf["skip_signature"] = True
    else:
        key = opts.get("key") or ck.get("aws_access_key_id")
        secret = opts.get("secret") or ck.get("aws_secret_access_key")
        token = opts.get("token") or ck.get("aws_session_token")
        if not (key and secret):
            key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
            token = env.get("AWS_SESSION_TOKEN")
        if not (key and secret):
            return None, "credentials come from a profile or an instance role (botocore's)"
        conf.update(access_key_id=key, secret_access_key=secret)
        if token:
            conf["session_token"] = token
        elif env.get("AWS_SESSION_TOKEN"):
            return None, "AWS_SESSION_TOKEN is set beside explicit credentials"
    endpoint = (
        opts.get("endpoint_url")
        or ck.get("endpoint_url")
        or env.get("AWS_ENDPOINT_URL_S3")
        or env.get("AWS_ENDPOINT_URL")
    )
    region = ck.get("region_name") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if not region and not endpoint:
        return None, "the bucket's region is not given (s3fs looks it up)"
    conf["region"] = region or "us-east-1"
    client: dict[str, Any] = {}
    if endpoint:
        conf["endpoint"] = endpoint
        client["allow_http"] = endpoint.startswith("http://")
    if ck.get("verify") is False:
        client["allow_invalid_certificates"] = True
    # Timeouts as botocore's (connect, then each read); obstore bounds the whole request.
    try:
        connect = float(cfg.get("connect_timeout") or 60)
        read = float(cfg.get("read_timeout") or 60)
    except (TypeError, ValueError) as exc:
        raise StoreConfigError(
            f"S3 option config_kwargs connect_timeout/read_timeout must be seconds: {exc}"
        ) from exc
    client["connect_timeout"] = timedelta(seconds=connect)
    client["timeout"] = timedelta(seconds=connect + read)
    # s3fs tries a request ``retries`` times (5 by default); obstore counts the retries.
    tries = int(opts.get("retries") or 5)
    retry = {"max_retries": max(tries - 1, 0), "retry_timeout": timedelta(seconds=120)}
    return {"config": conf, "client_options": client, "retry_config": retry}, ""


def _drop_expect(params: dict[str, Any], **_: Any) -> None:
    params.get("headers", {}).pop("Expect", None)


def _send_bodies_at_once(fs: Any) -> None:
    """Send request bodies without ``Expect: 100-continue``.

    botocore asks for it on every PUT with a body; aiohttp then waits for the server's
    "100 Continue" with no timeout at all (``connect_timeout``/``read_timeout`` do not
    cover that wait), so a partition that drops packets mid-commit hangs the writer
    forever instead of raising. Without the header the body follows at once and the read
    timeout bounds the wait for the answer. Registered after botocore's own handler, on
    the client and on its session (clients made later, per bucket region, copy it).
    """
    if getattr(fs, "asynchronous", False):
        return  # an async caller owns the session; nothing to hook before it starts
    fs.connect()
    fs.s3.meta.events.register("before-call.s3", _drop_expect)
    fs.session.register("before-call.s3", _drop_expect)


def open_s3(rest: str, *, create: bool = True, **options: Any) -> FsspecStorage:
    """The storage of ``s3://<rest>`` (``rest`` is ``bucket/prefix``).

    Raises:
        StoreConfigError: s3fs is missing, the URL names no bucket, an option is wrong, or
            (with ``create=False``) the bucket does not exist.
    """
    import importlib.util

    # Found, not imported: s3fs (aiobotocore, aiohttp) takes most of a second to import, and
    # a store whose log goes through obstore imports it only when a request needs it.
    if importlib.util.find_spec("s3fs") is None:
        raise StoreConfigError("s3:// stores need s3fs: pip install 'faultkit[s3]'")
    bucket_prefix = rest.strip("/")
    if not bucket_prefix:
        raise StoreConfigError(f"S3 URL 's3://{rest}' names no bucket: s3://bucket/prefix")
    bucket = bucket_prefix.split("/", 1)[0]
    options = dict(options)
    client = options.pop("client", "auto")
    if client not in _CLIENTS:
        raise StoreConfigError(
            f"S3 option client={client!r} must be one of {', '.join(map(repr, _CLIENTS))}: "
            "'auto' (the default) sends the log's requests through obstore where the options "
            "allow it, 's3fs' sends everything through s3fs"
        )
    opts = {"use_listings_cache": False, "skip_instance_cache": True, **check_options(options)}
    ob_config, why = obstore_config(opts) if client != "s3fs" else (None, "client='s3fs'")
    if ob_config is None and client == "obstore":
        raise StoreConfigError(
            f"S3 option client='obstore' cannot be honoured for 's3://{bucket_prefix}': {why}; "
            "use client='auto' to fall back to s3fs, or change the options"
        )
    retries = opts.pop("retries", None)
    if retries is not None and retries < 1:
        raise StoreConfigError(f"retries={retries!r}: s3fs makes at least one try; use 1 or more")

    def make_fs() -> Any:
        import s3fs

        fs = s3fs.S3FileSystem(**opts)
        _send_bodies_at_once(fs)  # makes the client: botocore checks its options here
        if retries is not None:
            fs.retries = retries
        return fs

    url = f"s3://{bucket_prefix}"
    storage: FsspecStorage
    if ob_config is not None:
        # s3fs (and botocore's models, most of a fresh process's start-up) only when a
        # request needs it: a task's claim and commits do not.
        storage = ObstoreS3Storage(None, bucket_prefix, url, ob_config, make_fs)
    else:
        log.debug("%s: every request through s3fs (%s)", url, why)
        storage = FsspecStorage(None, bucket_prefix, url, make_fs)
        storage.fs  # noqa: B018 - made now, so s3fs's own checks of the options fail here
    if not create and not storage.exists():
        raise StoreConfigError(
            f"no store at 's3://{bucket_prefix}': bucket {bucket!r} does not exist or is not "
            "reachable with these credentials; create it (or fix the URL or credentials)"
        )
    return storage
