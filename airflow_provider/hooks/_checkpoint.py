"""CheckpointHook: the one class that reads a ``faultkit`` connection's credentials."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from airflow.sdk import BaseHook

from faultkit import CheckpointStore, StoreConfigError
from faultkit._alerts import alert_urls
from faultkit._resumable import store_for

from .._provider_info import ALERT_URLS_FIELD

__all__ = ["CheckpointHook", "StoreSettings"]

#: The former name of ALERT_URLS_FIELD, still read; Airflow shows its value in clear.
_LEGACY_ALERT_URLS_FIELD = "alert_urls"

# Option names whose values are credentials (also matched as substrings, lower-case).
_SENSITIVE = ("secret", "password", "token", "key", "credential", "session", "sas", "auth")


def _extra(extra: Mapping[str, Any], name: str) -> Any:
    # The connection form may store fields with the legacy "extra__<type>__" prefix.
    value = extra.get(name)
    return extra.get(f"extra__faultkit__{name}") if value in (None, "") else value


def _walk_secrets(value: Any, sensitive: bool = False) -> list[str]:
    if isinstance(value, Mapping):
        out: list[str] = []
        for k, v in value.items():
            out += _walk_secrets(v, sensitive or any(s in str(k).lower() for s in _SENSITIVE))
        return out
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _walk_secrets(v, sensitive)]
    return [value] if sensitive and isinstance(value, str) and value else []


def _url_credentials(url: str) -> list[str]:
    """The URL and its userinfo credential (``user:TOKEN@``, or ``TOKEN@host`` alone)."""
    out = [url]
    try:
        parts = urlsplit(url)
        if parts.password:
            out.append(parts.password)
        elif parts.username and "@" in parts.netloc:
            out.append(parts.username)  # pagerduty://integrationkey@routingkey and the like
    except ValueError:
        pass
    return out


@dataclass(frozen=True)
class StoreSettings:
    """What a ``faultkit`` connection says (secrets are not in the repr).

    Attributes:
        store_url: ``file:///...``, ``memory://name`` or ``s3://bucket/prefix``.
        storage_options: fsspec options (credentials, ``client_kwargs``, ...).
        alert_urls: Apprise URLs for :class:`~airflow_provider.notifications.FaultkitNotifier`.
        dedupe_window: seconds during which one alert is sent once.
    """

    store_url: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    alert_urls: list[str] = field(default_factory=list, repr=False)
    dedupe_window: float = 600.0


class CheckpointHook(BaseHook):
    """Reads a ``faultkit`` connection and opens the checkpoint store it names.

    The connection (UI form, ``AIRFLOW_CONN_FAULTKIT_DEFAULT`` in JSON, or a secrets backend):

    * extra ``store_url``: ``s3://bucket/prefix``, ``file:///shared/ck`` or ``memory://name``;
    * login / password: the S3 access key id / secret access key (optional);
    * extra ``storage_options``: more fsspec options, a JSON object (e.g.
      ``{"client_kwargs": {"endpoint_url": "http://minio:9000"}}``);
    * extra ``alert_urls_secret``: Apprise URLs, a list or one comma-separated string. The
      API and UI show it as ``***``. The former name ``alert_urls`` is still read, with a
      warning: Airflow shows it in clear;
    * extra ``dedupe_window``: seconds (default 600).

    The password, the alert URLs (and their userinfo tokens) and every credential-like
    storage option are registered with Airflow's secrets masker as soon as they are read,
    so they never show in task logs.

    Args:
        faultkit_conn_id: the connection id (default ``faultkit_default``); Airflow passes it
            by this name (``conn_name_attr``) when it builds the hook from a connection.
        conn_id: deprecated spelling of ``faultkit_conn_id``, still accepted.
    """

    conn_name_attr = "faultkit_conn_id"
    default_conn_name = "faultkit_default"
    conn_type = "faultkit"
    hook_name = "faultkit checkpoint store"

    def __init__(
        self,
        faultkit_conn_id: str | None = None,
        *,
        conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        if conn_id is not None:
            if faultkit_conn_id is not None and faultkit_conn_id != conn_id:
                raise TypeError(
                    f"CheckpointHook got faultkit_conn_id={faultkit_conn_id!r} and "
                    f"conn_id={conn_id!r}; pass only faultkit_conn_id"
                )
            warnings.warn(
                "CheckpointHook(conn_id=...) is deprecated; use faultkit_conn_id=...",
                DeprecationWarning,
                stacklevel=2,
            )
            faultkit_conn_id = conn_id
        super().__init__(**kwargs)
        self.faultkit_conn_id = faultkit_conn_id or self.default_conn_name
        self._settings: StoreSettings | None = None

    def __repr__(self) -> str:
        return f"CheckpointHook(faultkit_conn_id={self.faultkit_conn_id!r})"

    def settings(self) -> StoreSettings:
        """Parse the connection once (masking its secrets); raises StoreConfigError if unusable."""
        if self._settings is not None:
            return self._settings
        from airflow.sdk.log import mask_secret

        cid = self.faultkit_conn_id
        conn = self.get_connection(cid)
        extra = conn.extra_dejson
        url = _extra(extra, "store_url") or (conn.host if conn.host and "://" in conn.host else "")
        if not url:
            raise StoreConfigError(
                f"connection {cid!r} names no store: set its extra 'store_url' (e.g. "
                '{"store_url": "s3://bucket/checkpoints"}) or pass store_url= to the operator'
            )
        opts = _extra(extra, "storage_options") or {}
        if isinstance(opts, str):
            try:
                opts = json.loads(opts)
            except ValueError:
                raise StoreConfigError(
                    f"connection {cid!r}: extra 'storage_options' is not a JSON object"
                ) from None
        if not isinstance(opts, dict):
            raise StoreConfigError(
                f"connection {cid!r}: extra 'storage_options' must be a JSON object, "
                f"got {type(opts).__name__}"
            )
        opts = dict(opts)
        if conn.login and url.startswith(("s3://", "s3a://")):
            opts.setdefault("key", conn.login)
        if conn.password:
            mask_secret(conn.password)
            if url.startswith(("s3://", "s3a://")):
                opts.setdefault("secret", conn.password)
        for secret in _walk_secrets(opts):
            mask_secret(secret)
        alerts = _extra(extra, ALERT_URLS_FIELD)
        if alerts in (None, "", []):
            alerts = _extra(extra, _LEGACY_ALERT_URLS_FIELD)
            if alerts not in (None, "", []):
                self.log.warning(
                    "connection %r keeps its alert URLs in extra %r, which Airflow's API and "
                    "UI show in clear; rename the key to %r (or add %r to [core] "
                    "sensitive_var_conn_names)",
                    cid,
                    _LEGACY_ALERT_URLS_FIELD,
                    ALERT_URLS_FIELD,
                    _LEGACY_ALERT_URLS_FIELD,
                )
        alerts = alert_urls(alerts or None)
        for u in alerts:
            for secret in _url_credentials(u):
                mask_secret(secret)
        window = _extra(extra, "dedupe_window")
        self._settings = StoreSettings(
            store_url=url,
            storage_options=opts,
            alert_urls=list(alerts),
            dedupe_window=float(window) if window not in (None, "") else 600.0,
        )
        return self._settings

    def get_store(self) -> CheckpointStore:
        """The :class:`~faultkit.CheckpointStore` this connection names."""
        s = self.settings()
        return store_for(s.store_url, s.storage_options)

    def get_conn(self) -> CheckpointStore:
        """Same as :meth:`get_store` (the name Airflow hooks use)."""
        return self.get_store()

    def alert_urls(self) -> list[str]:
        """The connection's Apprise URLs (possibly empty)."""
        return list(self.settings().alert_urls)

    def test_connection(self) -> tuple[bool, str]:
        """List the store's stages: the UI's "Test" button."""
        try:
            n = len(self.get_store().keys())
        except Exception as exc:
            return False, f"cannot reach the store: {type(exc).__name__}: {exc}"
        return True, f"store reachable; {n} stage(s) recorded"
