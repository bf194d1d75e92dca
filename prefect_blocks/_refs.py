"""Picklable references to a store, an alerter or a retry policy, resolved where they run.

A ``CheckpointStore`` refuses to be pickled (it may hold credentials), but Prefect ships task
functions to other processes (Dask workers, ``ProcessPoolTaskRunner``). A reference travels
instead, and the store is built once per process where the task runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from faultkit._alerts import alert_urls
from faultkit._resumable import store_for

if TYPE_CHECKING:
    from faultkit import Alerter, CheckpointStore, RetryPolicy

__all__ = ["AlertRef", "PolicyRef", "StoreRef", "policy_of"]


def _is_url(value: str) -> bool:
    return "://" in value or value.startswith(("/", "."))


def _load_block(cls: Any, name: str) -> Any:
    """Load a block by ``name`` or ``type-slug/name``.

    Always the synchronous load: ``Block.load`` returns a coroutine when called from an async
    task or flow, and the callers here (an async task's wrapper, Prefect reading a task's
    retry options) need the block itself.
    """
    slug = cls.get_block_type_slug()
    if "/" in name:
        given, _, name = name.partition("/")
        if given != slug:
            raise ValueError(
                f"{name!r} names a {given!r} block; a {cls.__name__} ({slug!r}) was expected"
            )
    return cls.load(name, _sync=True)


class StoreRef:
    """What ``store=`` was given: a URL, a block name, a block or a ``CheckpointStore``."""

    def __init__(self, url: str | None = None, block: Any = None, block_name: str | None = None):
        self.url = url
        self.block = block
        self.block_name = block_name
        self._store: CheckpointStore | None = None

    @classmethod
    def of(cls, value: Any) -> StoreRef:
        """Wrap ``value`` (URL, block name, ``CheckpointStoreBlock`` or ``CheckpointStore``)."""
        from faultkit import CheckpointStore

        from ._blocks import CheckpointStoreBlock

        if isinstance(value, StoreRef):
            return value
        if isinstance(value, CheckpointStore):
            ref = cls(url=value.url)
            ref._store = value
            return ref
        if isinstance(value, CheckpointStoreBlock):
            return cls(block=value)
        if isinstance(value, str) and value:
            return cls(url=value) if _is_url(value) else cls(block_name=value)
        raise TypeError(
            "store= takes a URL ('file:///var/lib/ck'), a CheckpointStoreBlock name, a "
            f"CheckpointStoreBlock or a faultkit.CheckpointStore; got {type(value).__name__}"
        )

    def __getstate__(self) -> dict[str, Any]:
        # The live store stays behind; the other process builds its own from the URL/block.
        return {"url": self.url, "block": self.block, "block_name": self.block_name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _store=None)

    def get(self) -> CheckpointStore:
        """The store, built once per process and reference."""
        if self._store is not None:
            return self._store

        block = self.block
        if block is None and self.block_name is not None:
            from ._blocks import CheckpointStoreBlock

            block = _load_block(CheckpointStoreBlock, self.block_name)
        if block is not None:
            url, opts = block.url, block.options()
        else:
            url, opts = self.url, {}
        store = store_for(url, opts)  # the core's cache: one per process, URL and options
        self._store = store
        return store

    def __repr__(self) -> str:
        from faultkit._storage import redact_url

        what = self.block_name or (
            f"{type(self.block).__name__}(...)" if self.block is not None else redact_url(self.url)
        )
        return f"StoreRef({what!r})"


class AlertRef:
    """What ``alerts=`` was given: URLs, an ``AlertBlock`` (or its name) or an ``Alerter``."""

    def __init__(self, value: Any, store: StoreRef | None) -> None:
        from faultkit import Alerter

        from ._blocks import AlertBlock

        if isinstance(value, str):
            value = alert_urls(value) if _is_url(value) else value
        if isinstance(value, Alerter):
            self._alerter: Alerter | None = value
            self._spec: Any = None
        elif isinstance(value, (AlertBlock, str)) or (
            isinstance(value, (list, tuple)) and all(isinstance(u, str) for u in value)
        ):
            self._alerter = None
            self._spec = list(value) if isinstance(value, tuple) else value
        else:
            raise TypeError(
                "alerts= takes Apprise URLs, an AlertBlock (or its name) or a faultkit.Alerter; "
                f"got {type(value).__name__}"
            )
        self.store = store

    def __getstate__(self) -> dict[str, Any]:
        if self._spec is None:
            raise TypeError(
                "a faultkit.Alerter is not shipped to other processes; pass alerts= as an "
                "AlertBlock, its name or a list of URLs instead"
            )
        return {"_spec": self._spec, "store": self.store}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _alerter=None)

    def get(self) -> Alerter:
        """The alerter, built once per process and reference."""
        if self._alerter is not None:
            return self._alerter
        from faultkit import Alerter

        from ._blocks import AlertBlock

        spec = self._spec
        if isinstance(spec, str):
            spec = _load_block(AlertBlock, spec)
        store = self.store.get() if self.store is not None else None
        if isinstance(spec, AlertBlock):
            alerter = spec.get_alerter(store=store)
        else:
            alerter = Alerter(spec, store=store) if store is not None else Alerter(spec)
        self._alerter = alerter
        return alerter

    def __repr__(self) -> str:
        return "AlertRef(<redacted>)"


class PolicyRef:
    """What ``retry=`` was given: a ``RetryPolicy``, a ``RetryPolicyBlock`` or its name.

    The type is checked at once; a block name is loaded only by :meth:`get`, so decorating a
    task or a flow needs no Prefect API.
    """

    def __init__(self, value: Any) -> None:
        from ._blocks import RetryPolicyBlock

        if not (
            (isinstance(value, str) and value)
            or isinstance(value, RetryPolicyBlock)
            or hasattr(value, "prefect")
        ):
            raise TypeError(
                "retry= takes a faultkit.RetryPolicy, a RetryPolicyBlock or its name; "
                f"got {type(value).__name__}"
            )
        self.value = value

    @classmethod
    def of(cls, value: Any) -> PolicyRef | None:
        """Wrap ``value`` (None passes)."""
        if value is None or isinstance(value, PolicyRef):
            return value
        return cls(value)

    def get(self) -> RetryPolicy:
        """The policy; a block name is loaded from the Prefect API on every call."""
        from ._blocks import RetryPolicyBlock

        value = self.value
        if isinstance(value, str):
            value = _load_block(RetryPolicyBlock, value)
        if isinstance(value, RetryPolicyBlock):
            return value.get_policy()
        return value

    def __repr__(self) -> str:
        what = self.value if isinstance(self.value, str) else type(self.value).__name__
        return f"PolicyRef({what!r})"


def policy_of(value: Any) -> RetryPolicy | None:
    """A ``RetryPolicy`` from a policy, a ``RetryPolicyBlock`` or its name (None passes)."""
    ref = PolicyRef.of(value)
    return ref.get() if ref is not None else None
