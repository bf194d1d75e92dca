"""Prefect blocks: where checkpoints live, where alerts go, how to retry.

These are the only Prefect classes that hold credentials; secrets are ``SecretStr`` fields,
so Prefect stores them encrypted-at-rest as block secrets and masks them in the UI, logs and
``repr``.
"""

from __future__ import annotations

import builtins
import importlib
from typing import TYPE_CHECKING, Any

try:
    from prefect.blocks.core import Block
    from pydantic import Field, SecretStr
except ImportError as exc:  # the first module prefect_blocks imports: say what to install
    raise ImportError(
        f"prefect_blocks needs Prefect 3.7 or later ({exc}); install it with: "
        "pip install 'faultkit[prefect]'",
        name=exc.name,
    ) from exc

if TYPE_CHECKING:
    from faultkit import Alerter, CheckpointStore, RetryPolicy

__all__ = ["AlertBlock", "CheckpointStoreBlock", "RetryPolicyBlock"]

_DOCS = "https://github.com/faultkit/faultkit#prefect"
# The logo ships in this package (prefect_blocks/logo.png, 128x128 PNG). Prefect's client
# accepts only an http(s) URL for a block type's logo, so this names the same file in the
# source repository rather than the installed copy.
_LOGO = "https://raw.githubusercontent.com/faultkit/faultkit/main/prefect_blocks/logo.png"


class CheckpointStoreBlock(Block):
    """Where a flow's fenced checkpoints live: a file, memory or S3 store.

    Credentials go in the secret fields (``key``/``secret``/``token``); other fsspec options
    (``endpoint_url``, ``region_name``, ...) go in ``storage_options``.
    """

    _block_type_name = "Faultkit Checkpoint Store"
    _block_type_slug = "faultkit-checkpoint-store"
    _logo_url = _LOGO
    _documentation_url = _DOCS
    _description = "A fenced, checksummed checkpoint store (file://, memory:// or s3://)."
    _code_example = """
```python
from prefect_blocks import CheckpointStoreBlock

store_block = CheckpointStoreBlock.load("BLOCK_NAME")
store = store_block.get_store()
```
"""

    url: str = Field(
        default=...,
        description="Store URL: file:///path, memory://name or s3://bucket/prefix.",
        examples=["file:///var/lib/faultkit", "s3://my-bucket/checkpoints"],
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Non-secret fsspec options, e.g. {'client_kwargs': {'endpoint_url': "
            "'http://127.0.0.1:9000'}}; put credentials in the secret fields."
        ),
    )
    key: SecretStr | None = Field(
        default=None, description="Access key id for S3 (fsspec option 'key')."
    )
    secret: SecretStr | None = Field(
        default=None, description="Secret access key for S3 (fsspec option 'secret')."
    )
    token: SecretStr | None = Field(
        default=None, description="Session token for S3 (fsspec option 'token')."
    )

    def options(self) -> dict[str, Any]:
        """The fsspec options, secrets revealed (never log this)."""
        opts = dict(self.storage_options)
        for name in ("key", "secret", "token"):
            value = getattr(self, name)
            if value is not None:
                opts[name] = value.get_secret_value()
        return opts

    def get_store(self) -> CheckpointStore:
        """A :class:`faultkit.CheckpointStore` for this block."""
        from faultkit import CheckpointStore

        return CheckpointStore(self.url, **self.options())


class AlertBlock(Block):
    """Where faultkit alerts go: Apprise URLs (Slack, e-mail, webhooks, ...), kept secret."""

    _block_type_name = "Faultkit Alerts"
    _block_type_slug = "faultkit-alerts"
    _logo_url = _LOGO
    _documentation_url = _DOCS
    _description = "Deduplicated alerts (worker lost, gave up, ...) sent to Apprise URLs."
    _code_example = """
```python
from prefect_blocks import AlertBlock

alert_block = AlertBlock.load("BLOCK_NAME")
alerter = alert_block.get_alerter()
```
"""

    urls: list[SecretStr] = Field(
        default=...,
        description=(
            "Apprise URLs, e.g. 'slack://T/B/C' or 'mailto://user:pass@host'; they often "
            "embed tokens, so they are stored as secrets."
        ),
    )
    dedupe_window: float = Field(
        default=600.0,
        description="Seconds during which the same event (kind, key, dedupe key) is sent once.",
    )
    kinds: list[str] | None = Field(
        default=None,
        description=(
            "Event kinds to send when attached to faultkit's events (None: faultkit's default)."
        ),
    )

    def get_alerter(self, store: Any = None) -> Alerter:
        """A :class:`faultkit.Alerter` for these URLs.

        Args:
            store: a ``CheckpointStore``, URL or :class:`CheckpointStoreBlock`; with one, an
                event is delivered once across every process that shares the store.
        """
        from faultkit import Alerter

        from ._refs import StoreRef

        kwargs: dict[str, Any] = {"dedupe_window": self.dedupe_window}
        if self.kinds is not None:
            kwargs["kinds"] = tuple(self.kinds)
        if store is not None:
            kwargs["store"] = StoreRef.of(store).get()
        return Alerter([u.get_secret_value() for u in self.urls], **kwargs)


def _resolve_exception(name: str) -> type[BaseException]:
    """``'ConnectionError'`` or ``'package.module.Error'`` -> the exception class."""
    module, _, attr = name.rpartition(".")
    try:
        owner = importlib.import_module(module) if module else builtins
        obj = getattr(owner, attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(
            f"retry_on names {name!r}, which cannot be imported; use a builtin name "
            "('ConnectionError') or a dotted path ('requests.exceptions.Timeout')"
        ) from exc
    if not (isinstance(obj, type) and issubclass(obj, BaseException)):
        raise ValueError(f"retry_on names {name!r}, which is not an exception class: {obj!r}")
    return obj


class RetryPolicyBlock(Block):
    """A faultkit retry policy kept on the server, so every flow retries the same way."""

    _block_type_name = "Faultkit Retry Policy"
    _block_type_slug = "faultkit-retry-policy"
    _logo_url = _LOGO
    _documentation_url = _DOCS
    _description = "Bounded retries (attempts, backoff, which errors) and a crash-retry budget."
    _code_example = """
```python
from prefect_blocks import RetryPolicyBlock

retry_block = RetryPolicyBlock.load("BLOCK_NAME")
policy = retry_block.get_policy()
```
"""

    retry_on: list[str] = Field(
        default_factory=lambda: ["infrastructure"],
        description=(
            "What to retry: exception class names ('ConnectionError', 'pkg.mod.Error'), or "
            "'infrastructure' for whatever faultkit.classify calls an infrastructure error."
        ),
    )
    attempts: int = Field(default=5, ge=1, description="Total attempts, the first included.")
    timeout: float = Field(default=300.0, gt=0, description="Total seconds across all attempts.")
    wait_initial: float = Field(default=1.0, ge=0, description="First wait, in seconds.")
    wait_max: float = Field(default=60.0, ge=0, description="Longest wait, in seconds.")
    wait_exp_base: float = Field(default=2.0, ge=1, description="Growth factor of the waits.")
    wait_jitter: float = Field(default=1.0, ge=0, description="Random extra wait, in seconds.")
    infra_attempts: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Total runs of a flow run whose worker was lost (crashed), the first included; "
            "None means the same as attempts."
        ),
    )

    def get_policy(self) -> RetryPolicy:
        """The :class:`faultkit.RetryPolicy` this block describes."""
        from faultkit import RetryPolicy

        types = tuple(_resolve_exception(n) for n in self.retry_on if n != "infrastructure")
        on: Any = types
        if "infrastructure" in self.retry_on:
            from faultkit import classify

            def on(exc: BaseException) -> bool:
                return isinstance(exc, types) or classify(exc) == "infrastructure"

        return RetryPolicy(
            on=on,
            attempts=self.attempts,
            timeout=self.timeout,
            wait_initial=self.wait_initial,
            wait_max=self.wait_max,
            wait_exp_base=self.wait_exp_base,
            wait_jitter=self.wait_jitter,
            infra_attempts=self.infra_attempts,
        )
