"""A Prefect task whose retry options come from a faultkit retry policy, resolved on first use.

``resumable_task(retry="block-name")`` must not reach the Prefect API when its module is
imported (``prefect deploy``, CI and unit tests import flow modules with no server), yet the
task's ``retries``, ``retry_delay_seconds``, ``retry_jitter_factor`` and ``retry_condition_fn``
come from the block's policy.

Prefect 3.7 reads those four attributes of the ``Task`` object only at run time:

1. when the task run is created (``Task.create_run``/``create_local_run``,
   ``PrefectClient.create_task_run``, ``task_engine``), which records them as the run's
   ``empirical_policy``;
2. when the task engine handles a failure (``can_retry`` calls ``retry_condition_fn``,
   ``handle_retry`` compares the run count with ``retries`` and picks the delay);
3. in ``Task.with_options``, which copies them into a new task.

:class:`ResumableTask` makes them data descriptors: the first read in (1) or (2) loads the
policy (the block, once per task object and process, wherever the task runs: the flow's
process, a Dask worker) and every later read returns the same values, so the recorded policy
and the engine agree. :meth:`ResumableTask.with_options` copies without loading. Options given
explicitly (``resumable_task(..., retries=2)``, ``with_options(retries=2)``) win and are
never taken from the policy.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from prefect.tasks import Task
from prefect.utilities.annotations import NotSet

from ._refs import PolicyRef

__all__ = ["RETRY_OPTIONS", "ResumableTask"]

RETRY_OPTIONS = ("retries", "retry_delay_seconds", "retry_jitter_factor", "retry_condition_fn")

_lock = threading.Lock()
# True while with_options copies a task: the descriptors then return the stored values.
_copying: ContextVar[bool] = ContextVar("faultkit_copying_task", default=False)


class _PolicyOption:
    """A retry option of a :class:`ResumableTask`: from the policy until it is set explicitly."""

    name: str

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, task: Any, owner: type | None = None) -> Any:
        if task is None:
            return self
        state = task.__dict__
        if self.name in state.get("_faultkit_lazy", ()) and not _copying.get():
            return task._faultkit_options()[self.name]
        return state.get(self.name)

    def __set__(self, task: Any, value: Any) -> None:
        state = task.__dict__
        state[self.name] = value
        lazy = state.get("_faultkit_lazy")
        if lazy and self.name in lazy:  # set after construction: the user's value wins
            state["_faultkit_lazy"] = lazy - {self.name}


def _given(name: str, options: dict[str, Any]) -> bool:
    """Did ``with_options`` get ``name``? (Prefect's own NotSet/None conventions.)"""
    value = options.get(name, NotSet)
    return value is not NotSet and value is not None


class ResumableTask(Task):
    """A ``prefect.Task`` whose unset retry options are read from a faultkit policy at run time.

    Built by :func:`prefect_blocks.resumable_task`; see the module docstring for when the
    policy is loaded.
    """

    retries = _PolicyOption()
    retry_delay_seconds = _PolicyOption()
    retry_jitter_factor = _PolicyOption()
    retry_condition_fn = _PolicyOption()

    def __init__(self, fn: Callable[..., Any], *, policy: PolicyRef | None, **options: Any):
        lazy: set[str] = set()
        delay_fn = None
        if policy is not None:
            lazy = {n for n in RETRY_OPTIONS if options.get(n) is None}
            delay = options.get("retry_delay_seconds")
            if callable(delay) and "retries" in lazy:
                # Prefect calls it with the number of retries, which only the policy knows.
                delay_fn = options.pop("retry_delay_seconds")
                lazy.add("retry_delay_seconds")
        super().__init__(fn, **options)
        self._faultkit_policy = policy
        self._faultkit_delay_fn = delay_fn
        self._faultkit_resolved: dict[str, Any] | None = None
        self._faultkit_lazy = frozenset(lazy)

    def _faultkit_options(self) -> dict[str, Any]:
        """The policy's task options, loaded on the first call (once per task and process)."""
        resolved = self._faultkit_resolved
        if resolved is None:
            with _lock:
                resolved = self._faultkit_resolved
                if resolved is None:
                    assert self._faultkit_policy is not None
                    resolved = dict(self._faultkit_policy.get().prefect())
                    if self._faultkit_delay_fn is not None:
                        resolved["retry_delay_seconds"] = self._faultkit_delay_fn(
                            resolved["retries"]
                        )
                    self._faultkit_resolved = resolved
        return resolved

    def with_options(self, **options: Any) -> ResumableTask:
        """``Task.with_options``, keeping the options that come from the policy lazy."""
        lazy = {n for n in self._faultkit_lazy if not _given(n, options)}
        delay_fn, resolved = self._faultkit_delay_fn, self._faultkit_resolved
        if "retries" in lazy and callable(options.get("retry_delay_seconds")):
            delay_fn, resolved = options.pop("retry_delay_seconds"), None
            lazy.add("retry_delay_seconds")
        token = _copying.set(True)
        try:
            plain = super().with_options(**options)
        finally:
            _copying.reset(token)
        new = object.__new__(type(self))
        new.__dict__.update(plain.__dict__)
        new._faultkit_policy = self._faultkit_policy
        new._faultkit_delay_fn = delay_fn
        new._faultkit_resolved = resolved
        new._faultkit_lazy = frozenset(lazy)
        return new
