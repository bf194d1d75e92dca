"""Alerter: human-readable alerts on Apprise URLs, deduplicated across processes.

Cross-process dedupe is built on the store's create-if-absent primitive. For one alert
identity (kind + key + dedupe key) the markers ``@alerts/<hash>/<n>`` count windows
1, 2, 3, ...; each holds the time it was created. A sender looks at the newest marker: if
it is younger than the window the alert is suppressed, otherwise it creates marker
``n + 1``. Exactly one process can create a given marker, and only the creator sends, so
a zombie and its retry, or fifty processes seeing the same lost worker, produce one alert
per window whatever their clocks say. A sender whose every channel failed removes its
marker so another process may try.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from . import _metrics
from ._errors import AlertConfigError
from ._events import KINDS, Event, subscribe

__all__ = ["DEFAULT_KINDS", "Alerter", "alert_urls", "format_alert"]

log = logging.getLogger("faultkit.alerts")

#: Kinds an attached Alerter forwards by default: the ones a person should hear about.
DEFAULT_KINDS = frozenset(KINDS - {"attempt_failed", "retry_scheduled"})

ALERTS_PREFIX = "@alerts"

# -- secrets never reach a log ------------------------------------------------------------

_secrets_lock = threading.Lock()
_secrets: set[str] = set()
_secret_re: re.Pattern[str] | None = None
_SECRET_PARAMS = re.compile(
    r"(pass|pwd|secret|token|key|auth|sig|webhook|hook|api|cred|session|bearer)", re.I
)
_REDACTED = "***"
_THIRD_PARTY_LOGGERS = ("apprise", "urllib3.connectionpool", "urllib3", "requests")


def _register_secrets(values: Iterable[str]) -> None:
    global _secret_re
    new = {v for v in values if v and len(v) >= 3}
    new |= {unquote(v) for v in new}
    with _secrets_lock:
        if new <= _secrets:
            return
        _secrets.update(new)
        ordered = sorted(_secrets, key=len, reverse=True)
        _secret_re = re.compile("|".join(re.escape(s) for s in ordered))


def redact(text: str) -> str:
    """``text`` with every registered channel secret replaced by ``***``."""
    pattern = _secret_re
    if pattern is None or not text:
        return text
    return pattern.sub(_REDACTED, text)


class _RedactFilter(logging.Filter):
    """Rewrites records of Apprise and its HTTP stack so no channel secret is logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _secret_re is None:
            return True
        try:
            msg = record.getMessage()
        except Exception:  # a broken format string: keep the record as it is
            return True
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


_FILTER = _RedactFilter()
_filters_installed = False


def _install_filters() -> None:
    global _filters_installed
    if _filters_installed:
        return
    for name in _THIRD_PARTY_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    _filters_installed = True


@contextlib.contextmanager
def _apprise_silenced() -> Any:
    """Silence Apprise while it parses a URL: its parse errors print the raw URL."""
    logger = logging.getLogger("apprise")
    before = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = before


def _url_tokens(url: str) -> list[str]:
    return [t for t in re.split(r"[/:@?&=#,+;\s]+", url) if t]


def _guess_secrets(url: str) -> set[str]:
    """Parts of a URL that may be credentials, before Apprise has parsed it."""
    out: set[str] = set()
    try:
        parts = urlsplit(url)
        if parts.password:
            out.add(parts.password)
        if parts.username and parts.password is None and "@" in parts.netloc:
            out.add(parts.username)  # token@host forms (pagerduty://key@key, ...)
        for k, v in parse_qsl(parts.query, keep_blank_values=False):
            if _SECRET_PARAMS.search(k):
                out.add(v)
    except ValueError:
        pass
    # Long opaque path/host segments are tokens in most webhook URLs (Slack, Teams, ...).
    scheme_end = url.find("://")
    for token in _url_tokens(url[scheme_end + 3 :] if scheme_end >= 0 else url):
        if len(token) >= 16 and re.search(r"\d", token) and re.search(r"[A-Za-z]", token):
            out.add(token)
    return out


def _generic_redacted(url: str) -> str:
    """A URL Apprise could not parse, with anything that may be secret masked."""
    text = url
    for s in sorted(_guess_secrets(url), key=len, reverse=True):
        text = text.replace(s, _REDACTED)
    try:
        parts = urlsplit(text)
        if "@" in parts.netloc:
            text = text.replace(parts.netloc, f"{_REDACTED}@{parts.netloc.rsplit('@', 1)[1]}")
    except ValueError:
        return _REDACTED
    return text


class _Channel:
    """One Apprise URL: the parsed plugin, a redacted name and the secrets it holds."""

    __slots__ = ("apprise", "name")

    def __init__(self, url: str) -> None:
        import apprise

        _install_filters()
        guessed = _guess_secrets(url)
        _register_secrets(guessed)
        obj = apprise.Apprise()
        try:
            with _apprise_silenced():
                ok = obj.add(url)
        except Exception as exc:
            raise AlertConfigError(
                f"alert channel URL {_generic_redacted(url)!r} could not be parsed "
                f"({type(exc).__name__}); check it against the Apprise URL formats"
            ) from None
        if not ok or len(obj) != 1:
            raise AlertConfigError(
                f"alert channel URL {_generic_redacted(url)!r} is not a valid Apprise URL; "
                "check its scheme and parts (e.g. 'json://host:port/path', "
                "'mailtos://user:pass@smtp.example.com?to=ops@example.com', "
                "'slack://TokenA/TokenB/TokenC')"
            )
        plugin = obj[0]
        private = plugin.url(privacy=True)
        shown = set(_url_tokens(private)) | set(_url_tokens(unquote(private)))
        hidden = {t for t in _url_tokens(unquote(url)) if t not in shown and len(t) >= 4}
        pw = getattr(plugin, "password", None)
        _register_secrets({*hidden, *guessed, *([pw] if isinstance(pw, str) else [])})
        self.apprise = obj
        self.name = redact(private.split("?", 1)[0])

    def __repr__(self) -> str:
        return self.name


# -- the message ----------------------------------------------------------------------

_NOTIFY_TYPE = {
    "attempt_failed": "warning",
    "retry_scheduled": "warning",
    "gave_up": "failure",
    "worker_lost": "failure",
    "resumed": "success",
    "checkpoint_corrupt": "failure",
    "stale_attempt": "warning",
    "degraded": "warning",
}

_NEXT = {
    "attempt_failed": "The orchestrator decides whether to retry, under the task's retry policy.",
    "retry_scheduled": "faultkit retries automatically after the wait; no action needed yet.",
    "gave_up": "No more retries: the task fails. Fix the cause, then clear or re-run the "
    "task; it resumes from its last commit.",
    "worker_lost": "The orchestrator retries the lost tasks; each resumes from its last "
    "commit, and a zombie copy is fenced off. Check the worker's node (OOM, preemption) "
    "if this repeats.",
    "resumed": "The stage continues from its last commit; nothing committed is redone.",
    "checkpoint_corrupt": "The previous valid snapshot is used instead. Run `faultkit verify` "
    "on the store and check the storage for faults.",
    "stale_attempt": "The stale attempt is stopped; the newer attempt owns the stage and "
    "its work stands. Nothing to do unless this repeats.",
    "degraded": "Downstream tasks get the earlier output, marked degraded "
    "(faultkit.degraded(result)). Fix the cause; the next run computes fresh output.",
}


def _lost(event: Event) -> str:
    d = event.details
    k = event.kind
    if k == "resumed":
        secs = d.get("seconds_since_last_commit")
        parts = [
            f"work after the last commit ({secs} s before this attempt started, at most)"
            if secs is not None
            else "nothing had been committed yet"
        ]
        parts.append(
            f"kept: {d.get('units_done', 0)} unit(s) done"
            + (f", snapshot of step {d['last_step']}" if d.get("last_step") is not None else "")
        )
        return "; ".join(parts)
    if k == "checkpoint_corrupt":
        fb = d.get("fallback_step")
        return f"the snapshot of step {d.get('step')}" + (
            f"; resuming from step {fb}" if fb is not None else "; no valid snapshot remains"
        )
    if k == "stale_attempt":
        return f"nothing: the stale write ({d.get('write', 'a write')}) was refused"
    if k in ("retry_scheduled", "attempt_failed"):
        return "this attempt's uncommitted work"
    if k == "gave_up":
        return "the task's result; committed progress is kept for the next run"
    if k == "degraded":
        return (
            f"this run's output: the output of {d.get('source_key')} "
            f"({d.get('age_seconds')} s old) is served instead"
        )
    lost = [f"{name}: {d[name]}" for name in d if "lost" in name]
    return "; ".join(str(x) for x in lost) or "the work of the lost tasks since their last commit"


def _fact(value: Any) -> str:
    if isinstance(value, (list, tuple)) and len(value) > 10:
        value = [*value[:10], f"... {len(value) - 10} more"]
    text = json.dumps(value, default=str)
    return text if len(text) <= 500 else text[:497] + "..."


def format_alert(event: Event, *, host: str | None = None) -> tuple[str, str]:
    """The title and body of the alert for ``event``: what failed, where, what was lost,
    what happens next."""
    title = f"faultkit: {event.kind.replace('_', ' ')} - {event.key}"
    where = event.details.get("host") or host or socket.gethostname()
    facts = ", ".join(
        f"{k}={_fact(v)}" for k, v in event.details.items() if k not in ("members", "keys")
    )
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(event.time))
    body = (
        f"{event.message}\n\n"
        f"What: {event.kind} at {when}\n"
        f"Where: {event.key} (reported from host {where}, pid {os.getpid()})\n"
        f"What was lost: {_lost(event)}\n"
        f"What happens next: {_NEXT.get(event.kind, '')}\n"
        + (f"Details: {facts}\n" if facts else "")
    )
    return title, body


# -- the alerter ----------------------------------------------------------------------


def _unwrap_url(url: Any) -> str:
    # pydantic's SecretStr (Prefect blocks) and similar wrappers
    getter = getattr(url, "get_secret_value", None)
    value = getter() if callable(getter) else url
    if not isinstance(value, str) or not value:
        raise AlertConfigError(
            f"an alert channel URL must be a non-empty string, got {type(value).__name__}"
        )
    return value


def alert_urls(value: Any) -> list[str]:
    """The one syntax for a list of alert channels, used everywhere (the Airflow connection,
    ``FAULTKIT_ALERT``, Prefect blocks, ``alerts=`` arguments).

    ``value`` is ``None`` (no channel), a list or tuple of URLs, or one string holding one
    or more Apprise URLs separated by whitespace, newlines or commas. As in Apprise, a comma
    inside a URL's query (``mailto://...?to=a@x.org,b@x.org``) belongs to that URL. Items may
    be ``SecretStr``-like (``get_secret_value()``) and may themselves hold several URLs.
    """
    if value is None:
        return []
    items = [value] if isinstance(value, str) or hasattr(value, "get_secret_value") else value
    if not isinstance(items, (list, tuple)):
        raise AlertConfigError(
            f"alert URLs must be a string or a list of strings, got {type(value).__name__}"
        )
    from apprise.utils.parse import parse_urls

    out: list[str] = []
    for item in items:
        out.extend(u for u in parse_urls(_unwrap_url(item)) if u)
    return out


class Alerter:
    """Sends events to people on Apprise URLs (Slack, e-mail, PagerDuty, Teams, webhooks, ...).

    Args:
        urls: one Apprise URL or several; each is one channel. Credentials in them never
            appear in logs, errors or reprs.
        store: a :class:`~faultkit.CheckpointStore` shared by every process that may send
            the same alert; with it, one event (kind + key + dedupe key) is delivered once
            across all of them per ``dedupe_window``. Without it, once per process.
        dedupe_window: seconds during which the same event is not sent again.
        kinds: event kinds that :meth:`attach` forwards (default :data:`DEFAULT_KINDS`:
            everything but ``attempt_failed`` and ``retry_scheduled``).
        delivery_attempts: tries per channel before its failure is logged and dropped.
        delivery_wait: seconds before the first re-try of a channel; doubles, at most 5 s.

    Raises:
        AlertConfigError: a URL is not a valid Apprise URL (the message shows it redacted).
    """

    def __init__(
        self,
        urls: str | Sequence[Any],
        *,
        store: Any = None,
        dedupe_window: float = 600.0,
        kinds: Iterable[str] | None = None,
        delivery_attempts: int = 3,
        delivery_wait: float = 0.5,
    ) -> None:
        raw = alert_urls(urls)
        if not raw:
            raise AlertConfigError("an Alerter needs at least one channel URL")
        self._channels = [_Channel(u) for u in raw]
        if store is not None and not hasattr(store, "_storage"):
            raise TypeError(
                f"store= must be a faultkit CheckpointStore, got {type(store).__name__}"
            )
        self._store = store
        if not dedupe_window >= 0:
            raise ValueError(f"dedupe_window must be >= 0 seconds, got {dedupe_window!r}")
        self.dedupe_window = float(dedupe_window)
        wanted = frozenset(DEFAULT_KINDS if kinds is None else kinds)
        unknown = wanted - KINDS
        if unknown:
            raise ValueError(
                f"unknown event kind(s) {sorted(unknown)}; expected some of {sorted(KINDS)}"
            )
        self.kinds = wanted
        if delivery_attempts < 1:
            raise ValueError(f"delivery_attempts must be >= 1, got {delivery_attempts!r}")
        self._attempts = int(delivery_attempts)
        self._wait = max(0.0, float(delivery_wait))
        self._lock = threading.Lock()
        self._recent: dict[str, float] = {}
        self._outbox: _Outbox | None = None

    def __repr__(self) -> str:
        store = f", store={self._store!r}" if self._store is not None else ""
        names = [c.name for c in self._channels]
        return f"Alerter({names!r}{store}, dedupe_window={self.dedupe_window:g})"

    def __reduce__(self) -> Any:
        raise TypeError(
            "an Alerter holds channel credentials and is not pickled; pass its URLs "
            "(from a secret) to the other process and build an Alerter there"
        )

    @property
    def channels(self) -> list[str]:
        """The channels, redacted."""
        return [c.name for c in self._channels]

    # -- dedupe --------------------------------------------------------------------------

    def _local_seen(self, identity: str, now: float) -> bool:
        with self._lock:
            t = self._recent.get(identity)
            if t is not None and now - t < self.dedupe_window:
                return True
            if len(self._recent) > 4096:
                self._recent = {
                    k: v for k, v in self._recent.items() if now - v < self.dedupe_window
                }
            return False

    def _remember(self, identity: str, now: float) -> None:
        with self._lock:
            self._recent[identity] = now

    def _claim(self, identity: str) -> str | None:
        """Win the right to send ``identity`` now; the marker's path, or None if suppressed.

        Without a store the marker is in-process only and the returned path is ``""``.
        """
        now = time.time()
        if self._local_seen(identity, now):
            return None
        if self._store is None or self.dedupe_window == 0:
            self._remember(identity, now)
            return ""
        storage = self._store._storage
        folder = f"{ALERTS_PREFIX}/{hashlib.sha256(identity.encode()).hexdigest()[:32]}"
        names = [int(n) for n in storage.list(folder) if n.isdigit()]
        n = max(names, default=0)
        body = json.dumps({"t": now, "pid": os.getpid(), "host": socket.gethostname()}).encode()
        for _ in range(100):  # each turn sees a newer marker; 100 windows in one call is absurd
            target = 1
            if n > 0:
                try:
                    created = float(json.loads(storage.read(f"{folder}/{n:012d}"))["t"])
                except FileNotFoundError:
                    created = None  # released by a sender whose channels all failed
                except (ValueError, KeyError, TypeError):
                    created = 0.0  # unreadable marker: treat its window as over
                if created is None:
                    target = n
                elif now - created < self.dedupe_window:
                    self._remember(identity, created)
                    return None
                else:
                    target = n + 1
            path = f"{folder}/{target:012d}"
            try:
                storage.create(path, body)
            except FileExistsError:
                n = target
                continue
            self._remember(identity, now)
            for old in names:  # keep the last two windows, drop older markers
                if old < target - 1:
                    with contextlib.suppress(Exception):
                        storage.delete(f"{folder}/{old:012d}")
            return path
        log.warning("alert dedupe for %s did not settle; sending anyway", identity.split("\x00")[0])
        return ""

    def _release(self, identity: str, path: str | None) -> None:
        with self._lock:
            self._recent.pop(identity, None)
        if path and self._store is not None:
            with contextlib.suppress(Exception):
                self._store._storage.delete(path)

    # -- delivery --------------------------------------------------------------------

    def _deliver(self, channel: _Channel, title: str, body: str, notify_type: str) -> bool:
        err = "it answered with a failure"
        for attempt in range(1, self._attempts + 1):
            try:
                if channel.apprise.notify(body=body, title=title, notify_type=notify_type):
                    return True
            except Exception as exc:  # apprise plugins may raise; never let it escape
                err = f"{type(exc).__name__}: {redact(str(exc))}"
            if attempt < self._attempts:
                time.sleep(min(self._wait * 2 ** (attempt - 1), 5.0))
        log.warning(
            "alert %r could not be delivered to %s after %d attempt(s) (%s); it is dropped "
            "for this channel. Check the channel's URL and service.",
            title,
            channel.name,
            self._attempts,
            err,
        )
        return False

    def _claim_or_local(self, identity: str) -> str | None:
        """:meth:`_claim`, falling back to in-process dedupe when the store fails: an
        alert that may be duplicated beats one that is lost with the storage."""
        try:
            return self._claim(identity)
        except Exception as exc:
            log.warning(
                "alert dedupe store %r failed (%s); deduplicating in this process only",
                self._store,
                redact(f"{type(exc).__name__}: {exc}"),
            )
            now = time.time()
            if self._local_seen(identity, now):
                return None
            self._remember(identity, now)
            return ""

    def _send(self, event: Event, extra_identities: Sequence[str] = ()) -> bool:
        identity = event.identity
        path = self._claim_or_local(identity)
        if path is None:
            log.info(
                "alert %s for %s suppressed: already sent within %g s",
                event.kind,
                event.key,
                self.dedupe_window,
            )
            _metrics.count_alert(event.kind, "suppressed")
            return False
        for other in extra_identities:  # members of a group: later single sends are dupes
            self._claim_or_local(other)
        title, body = format_alert(event)
        notify_type = _NOTIFY_TYPE.get(event.kind, "info")
        delivered = [self._deliver(c, title, body, notify_type) for c in self._channels]
        if any(delivered):
            _metrics.count_alert(event.kind, "sent")
            return True
        self._release(identity, path)
        _metrics.count_alert(event.kind, "failed")
        return False

    def send(self, event: Event) -> bool:
        """Deliver ``event`` to every channel unless it was already sent within the window.

        Returns:
            True if this call delivered it to at least one channel; False if it was
            suppressed as a duplicate or every channel failed (logged). Never raises for
            delivery or storage failures, so an alert never changes a task's outcome.
        """
        if not isinstance(event, Event):
            raise TypeError(f"send() takes a faultkit Event, got {type(event).__name__}")
        try:
            return self._send(event)
        except Exception as exc:
            log.warning(
                "alert %s for %s failed: %s",
                event.kind,
                event.key,
                redact(f"{type(exc).__name__}: {exc}"),
            )
            return False

    def send_group(
        self,
        events: Sequence[Event],
        *,
        key: str | None = None,
        dedupe_key: str | None = None,
        message: str | None = None,
    ) -> bool:
        """Send several related events as one alert (50 tasks lost with one worker: one page).

        Args:
            events: the events, usually of one kind.
            key: what the group is about (a worker address); default: the events' common
                key, else their common dedupe key.
            dedupe_key: the group's dedupe key (default: the events' common dedupe key).
            message: the alert's first sentence (default: built from the events).

        Returns:
            as :meth:`send`. With a store, the group is sent once across processes, and
            the member events are marked sent, so sending one of them later is suppressed.
        """
        events = list(events)
        if not events:
            return False
        if len(events) == 1 and key is None and message is None:
            return self.send(events[0])
        try:
            first = events[0]
            keys = sorted({e.key for e in events})
            dkeys = {e.dedupe_key for e in events}
            common_dk = next(iter(dkeys)) if len(dkeys) == 1 else None
            gkey = (
                key
                or (keys[0] if len(keys) == 1 else common_dk)
                or hashlib.sha256(
                    "\x00".join(sorted(e.identity for e in events)).encode()
                ).hexdigest()[:16]
            )
            shown = ", ".join(keys[:10]) + (f" (+{len(keys) - 10} more)" if len(keys) > 10 else "")
            msg = message or (
                f"{len(events)} {first.kind.replace('_', ' ')} event(s) for {gkey}: "
                f"{first.message} Affected: {shown}."
            )
            lost: dict[str, Any] = {}
            for e in events:
                for k, v in e.details.items():
                    if "lost" in k and isinstance(v, (int, float)) and not isinstance(v, bool):
                        lost[k] = lost.get(k, 0) + v
            group = Event(
                first.kind,
                gkey,
                msg,
                {
                    "count": len(events),
                    "keys": keys[:200],
                    **lost,
                    "members": [dict(e.details) for e in events[:20]],
                },
                dedupe_key=dedupe_key if dedupe_key is not None else common_dk,
                time=min(e.time for e in events),
            )
            return self._send(group, [e.identity for e in events])
        except Exception as exc:
            log.warning(
                "alert group of %d event(s) failed: %s",
                len(events),
                redact(f"{type(exc).__name__}: {exc}"),
            )
            return False

    # -- subscription ----------------------------------------------------------------

    def post(self, event: Event) -> None:
        """Send ``event`` from a background thread and return at once: a slow or unreachable
        channel never delays the caller (the task). What is queued is sent before the
        process exits (bounded by :meth:`flush`'s wait)."""
        if not isinstance(event, Event):
            raise TypeError(f"post() takes a faultkit Event, got {type(event).__name__}")
        with self._lock:
            if self._outbox is None:
                self._outbox = _Outbox(self)
            outbox = self._outbox
        outbox.put(event)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every posted event was sent; True if done within ``timeout`` s."""
        outbox = self._outbox
        return True if outbox is None else outbox.flush(timeout)

    def _on_event(self, event: Event) -> None:
        if event.kind in self.kinds:
            self.post(event)

    def attach(self, *, group_window: float = 0.0) -> Callable[[], None]:
        """Send every emitted event of :attr:`kinds` from now on; returns an unsubscribe.

        Delivery always happens in a background thread, so an event emitted by a task (a
        resume, a fenced zombie) never waits for a channel.

        Args:
            group_window: above 0, events of one kind that share a dedupe key (or key) and
                arrive within this many seconds are sent as one alert; unsubscribing (or
                exiting) flushes what is pending.
        """
        if group_window <= 0:
            return subscribe(self._on_event)
        batcher = _Batcher(self, float(group_window))
        unsub = subscribe(batcher.add)

        def unsubscribe() -> None:
            unsub()
            batcher.close()

        return unsubscribe


class _Outbox:
    """A queue of events an Alerter sends from one daemon thread, drained at exit."""

    LIMIT = 1000  # queued events at most; beyond, new ones are dropped (and logged)

    def __init__(self, alerter: Alerter) -> None:
        self.alerter = alerter
        self.cond = threading.Condition()
        self.items: list[Event] = []
        self.busy = 0
        self.thread = threading.Thread(target=self._run, name="faultkit-alerts", daemon=True)
        self.thread.start()
        ref = weakref.ref(self)
        atexit.register(lambda: (o := ref()) is not None and o.flush(10.0))

    def put(self, event: Event) -> None:
        with self.cond:
            if len(self.items) >= self.LIMIT:
                log.warning(
                    "alert %s for %s dropped: %d alerts queued",
                    event.kind,
                    event.key,
                    len(self.items),
                )
                return
            self.items.append(event)
            self.cond.notify_all()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.items:
                    self.cond.wait()
                event = self.items.pop(0)
                self.busy += 1
            try:
                self.alerter.send(event)
            finally:
                with self.cond:
                    self.busy -= 1
                    self.cond.notify_all()

    def flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.items or self.busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
        return True


class _Batcher:
    """Collects events per (kind, dedupe key or key) for ``window`` seconds, then sends."""

    def __init__(self, alerter: Alerter, window: float) -> None:
        self.alerter = alerter
        self.window = window
        self.cond = threading.Condition()
        self.groups: dict[tuple[str, str], tuple[float, list[Event]]] = {}
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="faultkit-alerts", daemon=True)
        self.thread.start()
        ref = weakref.ref(self)
        atexit.register(lambda: (b := ref()) is not None and b.close())

    def add(self, event: Event) -> None:
        if event.kind not in self.alerter.kinds:
            return
        gid = (event.kind, event.dedupe_key or event.key)
        with self.cond:
            if self.closed:
                return
            _, items = self.groups.setdefault(gid, (time.monotonic(), []))
            items.append(event)
            self.cond.notify()

    def _due(self, force: bool) -> list[list[Event]]:
        now = time.monotonic()
        out = []
        for gid, (start, items) in list(self.groups.items()):
            if force or now - start >= self.window:
                out.append(items)
                del self.groups[gid]
        return out

    def _flush(self, batches: list[list[Event]]) -> None:
        for items in batches:
            if len(items) == 1:
                self.alerter.send(items[0])
            else:
                self.alerter.send_group(items)

    def _run(self) -> None:
        while True:
            with self.cond:
                if self.closed:
                    return
                if self.groups:
                    oldest = min(start for start, _ in self.groups.values())
                    timeout = max(0.0, oldest + self.window - time.monotonic())
                else:
                    timeout = None
                self.cond.wait(timeout)
                batches = self._due(False)
            self._flush(batches)

    def close(self, timeout: float = 30.0) -> None:
        with self.cond:
            if self.closed:
                return
            self.closed = True
            batches = self._due(True)
            self.cond.notify()
        self.thread.join(timeout)
        self._flush(batches)
