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
from collections.abc import Iterator
from typing import IO, Any, ClassVar, NoReturn
from urllib.parse import urlsplit

from ._errors import StoreConfigError, StoreUnavailableError
from ._storage import ObjectInfo, Storage, check_rel, redact_url, write_error

__all__ = ["FsspecStorage", "open_s3"]

log = logging.getLogger("faultkit.store")

_TAKEN = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
_CREDENTIALS = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
)
# present(): names that are sequence numbers at most this far apart are answered by one LIST.
_WINDOW = 16


def _code(exc: BaseException) -> str:
    """The S3 error code behind an s3fs/botocore exception ("" if none)."""
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

    def __init__(self, fs: Any, root: str, url: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = url
        self.bucket = self.root.split("/", 1)[0]
        self._errors = _transport_errors()

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
            return StoreConfigError(
                f"bucket {self.bucket!r} of {redact_url(self.url)!r} does not exist: create "
                "it (or fix the store URL), then retry the task"
            )
        if code in _CREDENTIALS:
            return self._credentials_error(code)
        return write_error(path, exc, self.url)

    def _unavailable(self, what: str, exc: BaseException) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"the store {redact_url(self.url)!r} did not answer while {what} "
            f"({type(exc).__name__}: {exc}). Nothing committed is lost; a write that timed "
            "out may have landed, and retrying it is safe. Check the network path to the S3 "
            "endpoint (or raise config_kwargs connect_timeout/read_timeout), then retry."
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
    try:
        import s3fs
    except ImportError as exc:
        raise StoreConfigError("s3:// stores need s3fs: pip install 'faultkit[s3]'") from exc
    bucket_prefix = rest.strip("/")
    if not bucket_prefix:
        raise StoreConfigError(f"S3 URL 's3://{rest}' names no bucket: s3://bucket/prefix")
    bucket = bucket_prefix.split("/", 1)[0]
    opts = {"use_listings_cache": False, "skip_instance_cache": True, **check_options(options)}
    retries = opts.pop("retries", None)
    if retries is not None and retries < 1:
        raise StoreConfigError(f"retries={retries!r}: s3fs makes at least one try; use 1 or more")
    try:
        fs = s3fs.S3FileSystem(**opts)
        _send_bodies_at_once(fs)  # makes the client: botocore checks its options here
    except (TypeError, ValueError, KeyError) as exc:
        # s3fs's own checks ("Supply either key or username, not both", ...).
        raise StoreConfigError(f"s3fs refused the options of 's3://{rest}': {exc}") from exc
    if retries is not None:
        fs.retries = retries
    storage = FsspecStorage(fs, bucket_prefix, f"s3://{bucket_prefix}")
    if not create and not storage.exists():
        raise StoreConfigError(
            f"no store at 's3://{bucket_prefix}': bucket {bucket!r} does not exist or is not "
            "reachable with these credentials; create it (or fix the URL or credentials)"
        )
    return storage
