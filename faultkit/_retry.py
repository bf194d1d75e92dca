"""RetryPolicy: one retry rule for in-process calls, Airflow, Prefect and Dask.

The first attempt calls the function directly; tenacity's strategies (waits, stops, the
call state) are used only after a failure, so the success path costs almost nothing.
tenacity never appears in a public type: the last exception is re-raised unwrapped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import inspect
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from tenacity import RetryCallState
from tenacity.stop import stop_base, stop_before_delay
from tenacity.wait import wait_exponential_jitter

from ._classify import CODE, INFRASTRUCTURE, FailureClass, classify
from ._events import Event, emit

__all__ = ["RetryPolicy", "retry_test_mode"]

F = TypeVar("F", bound=Callable[..., Any])

ExceptionTypes = type[BaseException] | tuple[type[BaseException], ...]
Predicate = Callable[[BaseException], bool]

# Test mode: set by retry_test_mode(); read on the failure path only.
_test_lock = threading.Lock()
_test_mode: list[tuple[bool, int | None]] = [(False, None)]


@contextlib.contextmanager
def retry_test_mode(*, attempts: int | None = None) -> Iterator[None]:
    """Within this block, every :class:`RetryPolicy` retries without waiting.

    For users' test suites: a test that exercises a retry path runs in milliseconds instead
    of sleeping through the real backoff. Applies to all threads; blocks may nest.

    Args:
        attempts: also cap every policy's attempts (per failure class) at this number.
    """
    if attempts is not None and (not isinstance(attempts, int) or attempts < 1):
        raise ValueError(f"attempts must be a positive int or None, got {attempts!r}")
    with _test_lock:
        _test_mode.append((True, attempts))
    try:
        yield
    finally:
        with _test_lock:
            _test_mode.remove((True, attempts))


def _callable_name(fn: Any) -> str:
    fn = inspect.unwrap(fn) if callable(fn) else fn
    mod = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    return f"{mod}.{name}" if mod else name


def _dotted(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _import_dotted(path: str) -> Any:
    mod, _, name = path.rpartition(".")
    parts: list[str] = []
    while mod:
        try:
            obj: Any = importlib.import_module(mod)
            break
        except ImportError:
            mod, _, head = mod.rpartition(".")
            parts.insert(0, head)
    else:
        raise ImportError(f"cannot import {path!r}")
    for attr in [*parts, name]:
        obj = getattr(obj, attr)
    return obj


class _BudgetStop(stop_base):
    """tenacity stop: the failure class of the last attempt has used up its attempts."""

    def __call__(self, retry_state: RetryCallState) -> bool:
        run: _Run = retry_state.faultkit  # type: ignore[attr-defined]
        return run.counts[run.last_class] >= run.budget(run.last_class)


_BUDGET_STOP = _BudgetStop()


def _host_factory(host: str) -> Any:
    """The retry-policy class an installed adapter registers for ``host`` (entry point group
    ``faultkit.retry_policies``), so the core never imports an adapter or an orchestrator."""
    from importlib.metadata import entry_points

    found = list(entry_points(group="faultkit.retry_policies", name=host))
    if not found:
        raise ImportError(
            f"RetryPolicy.{host}() needs faultkit's {host} adapter: pip install "
            f"'faultkit[{host}]' (no 'faultkit.retry_policies' entry point named {host!r})"
        )
    return found[0].load()


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy:
    """Retry a call on the exceptions you name, with bounded exponential backoff.

    Use it as a decorator (``@policy``, sync or ``async def``), call through it
    (``policy.call(fn, *args, **kwargs)``), or translate it for an orchestrator
    (:meth:`airflow`, :meth:`prefect`, :meth:`dask`).

    Args:
        on: what to retry: an exception type, a tuple of them, or a predicate
            ``exc -> bool``. Required, so nothing is retried by accident.
        attempts: total attempts, the first included (``1`` never retries).
        timeout: total seconds from the first attempt; no wait or new attempt starts past it.
            ``None`` for no limit.
        wait_initial: seconds before the first retry.
        wait_max: the longest wait between two attempts.
        wait_exp_base: each wait is ``wait_initial * wait_exp_base ** (attempt - 1)``.
        wait_jitter: up to this many random seconds added to each wait.
        infra_attempts: if set, failures of the infrastructure (see :func:`faultkit.classify`:
            a lost worker, a reset connection, SIGKILL) are always retried, with their own
            budget of this many attempts, so a flaky cluster does not burn the attempts
            meant for bugs. ``attempts`` then counts only the other (code) failures.

    When the attempts or the time run out, the last exception is raised as it was, not
    wrapped. ``retry_scheduled`` and ``gave_up`` events are emitted (see
    :func:`faultkit.events.subscribe`).
    """

    on: ExceptionTypes | Predicate
    attempts: int = 5
    timeout: float | None = 300.0
    wait_initial: float = 1.0
    wait_max: float = 60.0
    wait_exp_base: float = 2.0
    wait_jitter: float = 1.0
    infra_attempts: int | None = None
    _types: tuple[type[BaseException], ...] | None = field(
        init=False, repr=False, compare=False, default=None
    )
    _wait: wait_exponential_jitter = field(init=False, repr=False, compare=False, default=None)
    _stop: stop_base = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        on = self.on
        if isinstance(on, list):
            on = tuple(on)
            object.__setattr__(self, "on", on)
        if isinstance(on, type) and issubclass(on, BaseException):
            on = (on,)
            object.__setattr__(self, "on", on)
        if isinstance(on, tuple):
            bad = [t for t in on if not (isinstance(t, type) and issubclass(t, BaseException))]
            if not on or bad:
                raise TypeError(
                    f"on= must name exception types, got {on!r}; e.g. "
                    "on=(ConnectionError, TimeoutError) or a predicate exc -> bool"
                )
            types: tuple[type[BaseException], ...] | None = on
        elif callable(on):
            types = None
        else:
            raise TypeError(
                f"on= must be an exception type, a tuple of them or a predicate, got {on!r}"
            )
        object.__setattr__(self, "_types", types)
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise ValueError(f"attempts must be an int >= 1, got {self.attempts!r}")
        if self.infra_attempts is not None and (
            not isinstance(self.infra_attempts, int) or self.infra_attempts < 1
        ):
            raise ValueError(
                f"infra_attempts must be an int >= 1 or None, got {self.infra_attempts!r}"
            )
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {self.timeout!r}")
        for name in ("wait_initial", "wait_max", "wait_jitter"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
        if not self.wait_exp_base >= 1:
            raise ValueError(f"wait_exp_base must be >= 1, got {self.wait_exp_base!r}")
        object.__setattr__(
            self,
            "_wait",
            wait_exponential_jitter(
                multiplier=self.wait_initial,
                max=self.wait_max,
                exp_base=self.wait_exp_base,
                jitter=self.wait_jitter,
            ),
        )
        stop: stop_base = _BUDGET_STOP
        if self.timeout is not None:
            stop = stop | stop_before_delay(self.timeout)
        object.__setattr__(self, "_stop", stop)

    # -- deciding --------------------------------------------------------------------

    def matches(self, exc: BaseException) -> bool:
        """True if ``exc`` is one this policy retries (``on=``, or infrastructure when
        ``infra_attempts`` is set)."""
        if self.infra_attempts is not None and classify(exc) == INFRASTRUCTURE:
            return True
        types = self._types
        if types is not None:
            return isinstance(exc, types)
        return bool(self.on(exc))  # type: ignore[operator]

    def failure_class(self, exc: BaseException) -> FailureClass:
        """The budget ``exc`` counts against: ``"infrastructure"`` only with ``infra_attempts``."""
        if self.infra_attempts is not None:
            return classify(exc)
        return CODE

    def budget(self, cls: FailureClass) -> int:
        """Attempts allowed for failures of class ``cls`` (test mode may cap it)."""
        n = self.infra_attempts if cls == INFRASTRUCTURE and self.infra_attempts else self.attempts
        capped, cap = _test_mode[-1]
        return min(n, cap) if capped and cap is not None else n

    def wait_for(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (jitter included)."""
        rs = RetryCallState(None, None, (), {})
        rs.attempt_number = attempt
        return float(self._wait(rs))

    # -- calling ---------------------------------------------------------------------

    def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Call ``fn(*args, **kwargs)`` under this policy.

        For an ``async def`` function this returns an awaitable; await it.
        """
        if inspect.iscoroutinefunction(fn):
            return self._acall(fn, args, kwargs)
        t0 = time.monotonic()
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not self.matches(exc):
                raise
            first = exc
        return self._retry(fn, args, kwargs, first, t0)

    def __call__(self, fn: F) -> F:
        """Decorate ``fn`` (sync or async) so every call goes through this policy."""
        if not callable(fn):
            raise TypeError(f"@RetryPolicy(...) decorates a function, got {fn!r}")
        matches = self.matches
        retry = self._retry
        mono = time.monotonic
        if inspect.iscoroutinefunction(fn):
            aretry = self._aretry

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                t0 = mono()
                try:
                    return await fn(*args, **kwargs)
                except Exception as exc:
                    if not matches(exc):
                        raise
                    first = exc
                return await aretry(fn, args, kwargs, first, t0)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = mono()
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if not matches(exc):
                    raise
                first = exc
            return retry(fn, args, kwargs, first, t0)

        return wrapper  # type: ignore[return-value]

    async def _acall(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        t0 = time.monotonic()
        try:
            return await fn(*args, **kwargs)
        except Exception as exc:
            if not self.matches(exc):
                raise
            first = exc
        return await self._aretry(fn, args, kwargs, first, t0)

    def _retry(
        self, fn: Callable[..., Any], args: tuple, kwargs: dict, exc: Exception, t0: float
    ) -> Any:
        run = _Run(self, fn, args, kwargs, t0)
        while True:
            delay = run.after_failure(exc)  # raises exc when it is the last
            if delay > 0:
                time.sleep(delay)
            run.next_attempt()
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                exc = e
            if not self.matches(exc):
                run.give_up(exc, retryable=False)
                raise exc

    async def _aretry(
        self, fn: Callable[..., Any], args: tuple, kwargs: dict, exc: Exception, t0: float
    ) -> Any:
        run = _Run(self, fn, args, kwargs, t0)
        while True:
            delay = run.after_failure(exc)
            await asyncio.sleep(delay)
            run.next_attempt()
            try:
                return await fn(*args, **kwargs)
            except Exception as e:
                exc = e
            if not self.matches(exc):
                run.give_up(exc, retryable=False)
                raise exc

    # -- orchestrators ---------------------------------------------------------------

    def would_retry(
        self,
        exc: BaseException,
        *,
        failures: Mapping[str, int],
        elapsed: float = 0.0,
        attempt: int = 1,
    ) -> bool:
        """Whether :meth:`decide` would retry this failure (same arguments), without its
        event: how a host tells, before it decides, that this try is the last."""
        if not self.matches(exc):
            return False
        cls = self.failure_class(exc)
        if failures.get(cls, 0) >= self.budget(cls):
            return False
        delay = 0.0 if _test_mode[-1][0] else self.wait_for(attempt)
        return self.timeout is None or elapsed + delay < self.timeout

    def decide(
        self,
        exc: BaseException,
        *,
        failures: Mapping[str, int],
        elapsed: float,
        attempt: int,
        key: str = "",
    ) -> float | None:
        """Decide about a failure seen by an orchestrator (one source of truth for adapters).

        Args:
            exc: the exception of the attempt that just failed.
            failures: failures so far per class, this one included
                (``{"code": n, "infrastructure": m}``).
            elapsed: seconds since the first attempt started.
            attempt: the number of the attempt that failed (1-based, all classes).
            key: a stable name for events (a stage key, a task id).

        Returns:
            seconds to wait before the next attempt, or ``None`` to fail now. Emits the
            ``retry_scheduled`` or ``gave_up`` event.
        """
        if not self.matches(exc):
            if attempt > 1:
                _emit_gave_up(self, key, exc, attempt, elapsed, "not retryable")
            return None
        cls = self.failure_class(exc)
        delay = 0.0 if _test_mode[-1][0] else self.wait_for(attempt)
        if failures.get(cls, 0) >= self.budget(cls):
            _emit_gave_up(self, key, exc, attempt, elapsed, f"{cls} attempts exhausted")
            return None
        if self.timeout is not None and elapsed + delay >= self.timeout:
            _emit_gave_up(self, key, exc, attempt, elapsed, "timeout")
            return None
        _emit_retry(self, key, exc, attempt, delay, elapsed, cls)
        return delay

    def _total_retries(self) -> int:
        return self.attempts - 1 + (self.infra_attempts - 1 if self.infra_attempts else 0)

    def airflow(self) -> dict[str, Any]:
        """Keyword arguments for an Airflow 3.3 ``BaseOperator`` (or ``@task``).

        ``retries``, ``retry_delay``, ``retry_exponential_backoff`` (the multiplier),
        ``max_retry_delay`` and ``retry_policy``: an Airflow ``RetryPolicy`` that fails at
        once on exceptions outside ``on`` and waits exactly as this policy does. Airflow's own
        delay settings apply where the policy is not consulted (a worker lost without a
        Python exception). The ``retry_policy`` class comes from the Airflow adapter, found
        through the ``faultkit.retry_policies`` entry point (the core imports no adapter).
        """
        return {
            "retries": self._total_retries(),
            "retry_delay": timedelta(seconds=self.wait_initial),
            "retry_exponential_backoff": float(self.wait_exp_base)
            if self.wait_initial > 0 and self.wait_exp_base != 1
            else 0.0,
            "max_retry_delay": timedelta(seconds=self.wait_max),
            "retry_policy": _host_factory("airflow")(self),
        }

    def prefect(self) -> dict[str, Any]:
        """Keyword arguments for a Prefect 3 ``@task``.

        ``retries``, ``retry_delay_seconds`` (this policy's backoff, one delay per retry),
        ``retry_jitter_factor`` (``wait_jitter`` relative to ``wait_initial``; Prefect's
        jitter is proportional) and ``retry_condition_fn`` (retries only what ``on``
        names, within the per-class budgets).
        """
        retries = self._total_retries()
        delays = [
            round(min(self.wait_initial * self.wait_exp_base**i, self.wait_max), 3)
            for i in range(min(max(retries, 1), 50))
        ]
        jitter = (
            round(self.wait_jitter / self.wait_initial, 3)
            if self.wait_jitter > 0 and self.wait_initial > 0
            else None
        )
        policy = self

        def retry_condition_fn(task: Any, task_run: Any, state: Any) -> bool:
            """Prefect asks this after a failed run: retry only what the policy retries."""
            exc = getattr(state, "data", None)
            if not isinstance(exc, BaseException):
                try:
                    exc = state.result(raise_on_failure=False)
                except Exception as err:  # a result that cannot be read: judge that error
                    exc = err
            if not isinstance(exc, BaseException):
                return False
            attempt = int(getattr(task_run, "run_count", 1) or 1)
            cls = policy.failure_class(exc)
            # Prefect keeps no per-class history: count every earlier run against this class.
            return (
                policy.decide(
                    exc,
                    failures={cls: attempt},
                    elapsed=0.0,
                    attempt=attempt,
                    key=str(getattr(task_run, "name", "") or getattr(task, "name", "")),
                )
                is not None
            )

        return {
            "retries": retries,
            "retry_delay_seconds": delays if retries else 0,
            "retry_jitter_factor": jitter,
            "retry_condition_fn": retry_condition_fn,
        }

    def dask(self) -> dict[str, Any]:
        """Keyword arguments for ``Client.submit``/``compute``: ``{"retries": attempts - 1}``.

        Dask retries any exception and keeps lost-worker retries apart
        (``distributed.scheduler.allowed-failures``), so only the code budget is translated.
        To honour ``on=`` on Dask, wrap the function with this policy instead.
        """
        return {"retries": self.attempts - 1}

    # -- serialisation ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description (``on`` as dotted import paths).

        Raises:
            ValueError: ``on`` is a lambda or a nested function, which cannot be named.
        """
        if self._types is not None:
            on: Any = [_dotted(t) for t in self._types]
            kind = "types"
        else:
            name = getattr(self.on, "__qualname__", "")
            if not name or "<" in name:
                raise ValueError(
                    f"cannot serialise on={self.on!r}: define the predicate at module level "
                    "(or pass exception types) so another process can import it"
                )
            on, kind = _dotted(self.on), "predicate"
        return {"on": on, "on_kind": kind, **self._kwargs()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RetryPolicy:
        """The policy :meth:`to_dict` described (imports the exception types/predicate)."""
        data = dict(data)
        kind = data.pop("on_kind", "types")
        on = data.pop("on")
        if kind == "predicate":
            data["on"] = _import_dotted(on)
        else:
            data["on"] = tuple(_import_dotted(p) for p in ([on] if isinstance(on, str) else on))
        return cls(**data)

    def __reduce__(self) -> Any:
        # Rebuild through __init__ so the derived strategy fields are recomputed.
        return (_rebuild, (self.on, self._kwargs()))

    def _kwargs(self) -> dict[str, Any]:
        return {
            "attempts": self.attempts,
            "timeout": self.timeout,
            "wait_initial": self.wait_initial,
            "wait_max": self.wait_max,
            "wait_exp_base": self.wait_exp_base,
            "wait_jitter": self.wait_jitter,
            "infra_attempts": self.infra_attempts,
        }


def _rebuild(on: Any, kwargs: dict[str, Any]) -> RetryPolicy:
    return RetryPolicy(on=on, **kwargs)


class _Run:
    """One retried call: tenacity's call state plus per-class failure counts."""

    __slots__ = ("counts", "fn", "key", "last_class", "policy", "rs")

    def __init__(
        self, policy: RetryPolicy, fn: Callable[..., Any], args: tuple, kwargs: dict, t0: float
    ) -> None:
        self.policy = policy
        self.fn = fn
        self.key = ""
        rs = RetryCallState(None, fn, args, kwargs)
        rs.start_time = t0
        rs.faultkit = self  # type: ignore[attr-defined]
        self.rs = rs
        self.counts = {CODE: 0, INFRASTRUCTURE: 0}
        self.last_class: FailureClass = CODE

    def budget(self, cls: FailureClass) -> int:
        return self.policy.budget(cls)

    def _key(self) -> str:
        if not self.key:
            self.key = _callable_name(self.fn)
        return self.key

    def after_failure(self, exc: Exception) -> float:
        """Record the failed attempt; return the wait before the next one, or raise ``exc``."""
        rs = self.rs
        rs.set_exception((type(exc), exc, exc.__traceback__))
        cls = self.policy.failure_class(exc)
        self.last_class = cls
        self.counts[cls] += 1
        rs.upcoming_sleep = 0.0 if _test_mode[-1][0] else self.policy._wait(rs)
        if self.policy._stop(rs):
            self.give_up(exc, retryable=True)
            raise exc
        _emit_retry(
            self.policy,
            self._key(),
            exc,
            rs.attempt_number,
            rs.upcoming_sleep,
            rs.seconds_since_start or 0.0,
            cls,
        )
        return rs.upcoming_sleep

    def next_attempt(self) -> None:
        self.rs.idle_for += self.rs.upcoming_sleep
        self.rs.prepare_for_next_attempt()

    def give_up(self, exc: BaseException, *, retryable: bool) -> None:
        rs = self.rs
        elapsed = time.monotonic() - rs.start_time
        if not retryable:
            reason = "not retryable"
        elif self.counts[self.last_class] >= self.budget(self.last_class):
            reason = f"{self.last_class} attempts exhausted"
        else:
            reason = "timeout"
        _emit_gave_up(self.policy, self._key(), exc, rs.attempt_number, elapsed, reason)


def _short(exc: BaseException) -> str:
    text = repr(exc)
    return text if len(text) <= 300 else text[:297] + "..."


def _emit_retry(
    policy: RetryPolicy,
    key: str,
    exc: BaseException,
    attempt: int,
    delay: float,
    elapsed: float,
    cls: FailureClass,
) -> None:
    budget = policy.budget(cls)
    emit(
        Event(
            "retry_scheduled",
            key,
            f"attempt {attempt} of {key} failed with {_short(exc)} ({cls}); "
            f"retrying in {delay:.2f} s (budget {budget} {cls} attempts)",
            {
                "attempt": attempt,
                "next_attempt": attempt + 1,
                "wait": round(delay, 6),
                "elapsed": round(elapsed, 6),
                "error": _short(exc),
                "error_type": _dotted(type(exc)),
                "failure_class": cls,
                "budget": budget,
            },
            dedupe_key=str(attempt),
        )
    )


def _emit_gave_up(
    policy: RetryPolicy, key: str, exc: BaseException, attempt: int, elapsed: float, reason: str
) -> None:
    emit(
        Event(
            "gave_up",
            key,
            f"{key} failed after {attempt} attempt(s) in {elapsed:.1f} s ({reason}); "
            f"last error {_short(exc)}. No more retries: the error is raised to the caller.",
            {
                "attempts": attempt,
                "elapsed": round(elapsed, 6),
                "reason": reason,
                "error": _short(exc),
                "error_type": _dotted(type(exc)),
                "failure_class": classify(exc),
            },
        )
    )
