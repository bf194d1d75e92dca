"""RetryPolicy: counts of calls, unwrapped errors, timeouts, async, jitter, failure classes."""

from __future__ import annotations

import asyncio
import os
import pickle
import subprocess
import sys
import time
from datetime import timedelta

import pytest

import faultkit
from faultkit import RetryPolicy, classify, retry_test_mode

FAST = {"wait_initial": 0.0, "wait_jitter": 0.0}


class Flaky:
    """Raises the given exceptions in order, then returns the number of calls."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.raised: list[BaseException] = []

    def __call__(self, *args: object, **kwargs: object) -> int:
        self.calls += 1
        if self.errors:
            exc = self.errors.pop(0)
            self.raised.append(exc)
            raise exc
        return self.calls


def test_retried_until_success(events):
    """A matching error is retried and the call returns the eventual result."""
    fn = Flaky(ConnectionError("a"), TimeoutError("b"))
    policy = RetryPolicy(on=(ConnectionError, TimeoutError), attempts=5, **FAST)
    assert policy.call(fn) == 3
    assert fn.calls == 3
    assert [e.kind for e in events] == ["retry_scheduled", "retry_scheduled"]
    assert events[0].details["attempt"] == 1 and events[0].details["failure_class"] == "code"


def test_not_retried_error_raised_at_once(events):
    """An error outside ``on`` is raised on the first call, unchanged, with no events."""
    err = ValueError("bug")
    fn = Flaky(err)
    wrapped = RetryPolicy(on=ConnectionError, **FAST)(fn)
    with pytest.raises(ValueError) as info:
        wrapped()
    assert info.value is err
    assert fn.calls == 1
    assert events == []


def test_exhausted_reraises_last_error_unwrapped(events):
    """When attempts run out the last exception itself is raised, not a wrapper."""
    fn = Flaky(*(ConnectionError(f"try {i}") for i in range(1, 10)))
    policy = RetryPolicy(on=ConnectionError, attempts=3, **FAST)
    with pytest.raises(ConnectionError) as info:
        policy.call(fn)
    assert fn.calls == 3
    assert info.value is fn.raised[-1]
    assert info.value.__context__ is None  # no "during handling of ..." chain of attempts
    assert [e.kind for e in events] == ["retry_scheduled", "retry_scheduled", "gave_up"]
    assert events[-1].details["reason"] == "code attempts exhausted"
    assert events[-1].details["attempts"] == 3


def test_non_matching_error_after_retries_stops(events):
    """A different, non-retryable error on a retry stops at once and is raised."""
    fn = Flaky(ConnectionError("net"), KeyError("bug"))
    with pytest.raises(KeyError):
        RetryPolicy(on=ConnectionError, attempts=5, **FAST).call(fn)
    assert fn.calls == 2
    assert events[-1].kind == "gave_up" and events[-1].details["reason"] == "not retryable"


def test_predicate_on():
    """``on=`` may be a predicate that looks at the exception."""

    def transient(exc: BaseException) -> bool:
        return isinstance(exc, OSError) and exc.errno == 11

    fn = Flaky(OSError(11, "again"), OSError(11, "again"))
    assert RetryPolicy(on=transient, **FAST).call(fn) == 3
    fn = Flaky(OSError(2, "missing"))
    with pytest.raises(OSError):
        RetryPolicy(on=transient, **FAST).call(fn)
    assert fn.calls == 1


def test_decorator_keeps_name_and_passes_arguments():
    """``@policy`` keeps the function's name and passes arguments through on every attempt."""
    seen = []
    policy = RetryPolicy(on=ConnectionError, **FAST)

    @policy
    def add(a: int, *, b: int) -> int:
        """Add."""
        seen.append((a, b))
        if len(seen) < 2:
            raise ConnectionError
        return a + b

    assert add(1, b=2) == 3
    assert seen == [(1, 2), (1, 2)]
    assert add.__name__ == "add" and add.__doc__ == "Add."


def test_total_timeout_honoured(events):
    """No wait or new attempt starts past ``timeout``, however many attempts are left."""
    fn = Flaky(*(ConnectionError() for _ in range(1000)))
    policy = RetryPolicy(
        on=ConnectionError,
        attempts=1000,
        timeout=0.6,
        wait_initial=0.05,
        wait_exp_base=1.0,
        wait_jitter=0.0,
    )
    t0 = time.monotonic()
    with pytest.raises(ConnectionError):
        policy.call(fn)
    elapsed = time.monotonic() - t0
    assert elapsed < 0.6 + 0.5, elapsed  # generous: the machine is shared
    assert 3 <= fn.calls <= 13, fn.calls
    assert events[-1].kind == "gave_up" and events[-1].details["reason"] == "timeout"


def test_async_retried_exhausted_and_not_retried():
    """Async functions are awaited on every attempt, with the same counts as sync ones."""
    policy = RetryPolicy(on=ConnectionError, attempts=3, **FAST)

    async def run(fn: Flaky) -> int:
        await asyncio.sleep(0)
        return fn()

    ok = Flaky(ConnectionError(), ConnectionError())

    @policy
    async def decorated() -> int:
        return await run(ok)

    assert asyncio.run(decorated()) == 3 and ok.calls == 3

    exhausted = Flaky(*(ConnectionError(str(i)) for i in range(5)))
    with pytest.raises(ConnectionError) as info:
        asyncio.run(policy.call(run, exhausted))
    assert exhausted.calls == 3 and info.value is exhausted.raised[-1]

    wrong = Flaky(ValueError())
    with pytest.raises(ValueError):
        asyncio.run(policy.call(run, wrong))
    assert wrong.calls == 1


def test_async_waits_do_not_block_the_loop():
    """Two retried coroutines wait concurrently: the backoff is asyncio.sleep, not time.sleep."""
    policy = RetryPolicy(on=ConnectionError, attempts=2, wait_initial=1.0, wait_jitter=0.0)

    async def main() -> float:
        fns = [Flaky(ConnectionError()), Flaky(ConnectionError())]
        t0 = time.monotonic()
        await asyncio.gather(*(policy.call(_as_async(f)) for f in fns))
        return time.monotonic() - t0

    assert asyncio.run(main()) < 1.7  # one second each, side by side (2 s if serialised)


def _as_async(fn):
    async def coro() -> int:
        return fn()

    return coro


def test_jitter_and_backoff_bounds(events):
    """Each wait is initial*base**(n-1) plus up to ``wait_jitter``, capped at ``wait_max``."""
    policy = RetryPolicy(
        on=ConnectionError,
        attempts=6,
        wait_initial=0.01,
        wait_exp_base=2.0,
        wait_jitter=0.02,
        wait_max=0.06,
    )
    fn = Flaky(*(ConnectionError() for _ in range(5)))
    t0 = time.monotonic()
    assert policy.call(fn) == 6
    elapsed = time.monotonic() - t0
    waits = [e.details["wait"] for e in events if e.kind == "retry_scheduled"]
    assert len(waits) == 5
    for n, w in enumerate(waits, start=1):
        low = min(0.01 * 2 ** (n - 1), 0.06)
        high = min(low + 0.02, 0.06)
        assert low - 1e-9 <= w <= high + 1e-9, (n, w)
    assert elapsed >= sum(waits) * 0.95  # the waits were really slept
    samples = [policy.wait_for(1) for _ in range(300)]
    assert all(0.01 <= s <= 0.03 for s in samples)
    assert max(samples) - min(samples) > 0.01  # jitter spreads the waits


def test_test_mode_removes_waits_and_caps_attempts():
    """retry_test_mode() makes a slow policy retry at once, and can cap its attempts."""
    slow = RetryPolicy(on=ConnectionError, attempts=4, wait_initial=30.0, wait_jitter=5.0)
    fn = Flaky(ConnectionError(), ConnectionError())
    t0 = time.monotonic()
    with retry_test_mode():
        assert slow.call(fn) == 3
    assert time.monotonic() - t0 < 5.0
    fn = Flaky(*(ConnectionError() for _ in range(5)))
    with retry_test_mode(attempts=2), pytest.raises(ConnectionError):
        slow.call(fn)
    assert fn.calls == 2


@pytest.mark.parametrize(
    "failure, expected",
    [
        pytest.param(ConnectionResetError(), "infrastructure", id="connection-reset"),
        pytest.param(BrokenPipeError(), "infrastructure", id="broken-pipe"),
        pytest.param(type("KilledWorker", (Exception,), {})(), "infrastructure", id="dask-killed"),
        pytest.param(type("CommClosedError", (OSError,), {})(), "infrastructure", id="comm-closed"),
        pytest.param(ValueError("bad row"), "code", id="value-error"),
        pytest.param(ConnectionRefusedError(), "code", id="refused-is-config"),
        pytest.param(-9, "infrastructure", id="sigkill-status"),
        pytest.param(137, "infrastructure", id="oom-kill-shell-status"),
        pytest.param(-15, "infrastructure", id="sigterm-preempt"),
        pytest.param(1, "code", id="exit-1"),
        pytest.param("OOMKilled", "infrastructure", id="oom-reason"),
        pytest.param("worker-lost", "infrastructure", id="worker-lost-reason"),
        pytest.param("Preempted by the cloud", "infrastructure", id="preempted"),
        pytest.param("AssertionError", "code", id="code-reason"),
    ],
)
def test_classify(failure, expected):
    """Failures are classed as infrastructure (lost worker, kill, reset) or code."""
    assert classify(failure) == expected


def test_classify_follows_the_cause_chain():
    """An error raised from a connection reset is an infrastructure failure."""
    try:
        try:
            raise ConnectionResetError("peer went away")
        except ConnectionResetError as exc:
            raise RuntimeError("fetch failed") from exc
    except RuntimeError as outer:
        assert classify(outer) == "infrastructure"


def test_infra_failures_have_their_own_budget(events):
    """Infrastructure failures spend ``infra_attempts``, not the attempts meant for bugs."""
    errors = [ConnectionResetError(), ConnectionResetError(), ConnectionResetError(), ValueError()]
    split = RetryPolicy(on=ValueError, attempts=2, infra_attempts=4, **FAST)
    fn = Flaky(*errors)
    assert split.call(fn) == 5  # 3 infra failures (< 4) and 1 code failure (< 2)
    classes = [e.details["failure_class"] for e in events if e.kind == "retry_scheduled"]
    assert classes == ["infrastructure"] * 3 + ["code"]

    shared = RetryPolicy(on=(ValueError, ConnectionResetError), attempts=2, **FAST)
    fn = Flaky(
        *[ConnectionResetError(), ConnectionResetError(), ConnectionResetError(), ValueError()]
    )
    with pytest.raises(ConnectionResetError):
        shared.call(fn)
    assert fn.calls == 2  # without a split the flaky cluster burnt the budget

    fn = Flaky(*(ConnectionResetError() for _ in range(9)))
    with pytest.raises(ConnectionResetError):
        split.call(fn)
    assert fn.calls == 4
    assert events[-1].details["reason"] == "infrastructure attempts exhausted"


def test_policy_is_frozen_keyword_only_and_validated():
    """Configuration is keyword-only, immutable and checked with clear messages."""
    with pytest.raises(TypeError):
        RetryPolicy(ConnectionError)  # type: ignore[misc]
    with pytest.raises(TypeError):
        RetryPolicy()  # type: ignore[call-arg]
    policy = RetryPolicy(on=ConnectionError)
    with pytest.raises(AttributeError):
        policy.attempts = 9  # type: ignore[misc]
    for bad in (
        {"attempts": 0},
        {"timeout": 0},
        {"wait_initial": -1},
        {"wait_exp_base": 0.5},
        {"infra_attempts": 0},
    ):
        with pytest.raises(ValueError):
            RetryPolicy(on=ConnectionError, **bad)
    with pytest.raises(TypeError, match="on="):
        RetryPolicy(on=(ConnectionError, "nope"))  # type: ignore[arg-type]


def test_pickle_and_dict_round_trip():
    """A policy survives pickling (to Dask workers) and to_dict/from_dict (Airflow)."""
    policy = RetryPolicy(
        on=(ConnectionError, TimeoutError),
        attempts=7,
        timeout=None,
        wait_initial=0.5,
        infra_attempts=3,
    )
    assert pickle.loads(pickle.dumps(policy)) == policy
    assert RetryPolicy.from_dict(policy.to_dict()) == policy
    fn = Flaky(ConnectionError())
    assert pickle.loads(pickle.dumps(policy)).wait_for(1) >= 0.5
    with retry_test_mode():
        assert pickle.loads(pickle.dumps(policy)).call(fn) == 2
    with pytest.raises(ValueError, match="module level"):
        RetryPolicy(on=lambda e: True).to_dict()


def test_translations():
    """airflow(), prefect() and dask() carry the same attempts and backoff."""
    policy = RetryPolicy(
        on=ConnectionError,
        attempts=4,
        wait_initial=2.0,
        wait_max=10.0,
        wait_exp_base=3.0,
        wait_jitter=1.0,
    )
    pf = policy.prefect()
    assert pf["retries"] == 3
    assert pf["retry_delay_seconds"] == [2.0, 6.0, 10.0]
    assert pf["retry_jitter_factor"] == 0.5
    assert callable(pf["retry_condition_fn"])
    assert policy.dask() == {"retries": 3}
    split = RetryPolicy(on=ConnectionError, attempts=3, infra_attempts=5)
    assert split.prefect()["retries"] == 6
    af = policy.airflow()
    assert af["retries"] == 3
    assert af["retry_delay"] == timedelta(seconds=2)
    assert af["retry_exponential_backoff"] == 3.0
    assert af["max_retry_delay"] == timedelta(seconds=10)
    assert af["retry_policy"].policy == policy


def test_importing_faultkit_imports_no_orchestrator():
    """``import faultkit`` (and its public modules) loads no orchestrator or heavy engine."""
    code = (
        "import sys, faultkit, faultkit.events, faultkit.metrics\n"
        "heavy = ('airflow', 'prefect', 'dask', 'distributed', 'torch', 'apprise',"
        " 'prometheus_client')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in heavy}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ.copy(),
        check=True,
    )
    assert out.stdout.strip() == "[]"


def test_public_exports():
    """The facade exports the retry, alert and classification names."""
    for name in ("RetryPolicy", "Alerter", "classify", "retry_test_mode"):
        assert name in faultkit.__all__ and hasattr(faultkit, name)
    assert faultkit.__all__ == sorted(faultkit.__all__)


def test_would_retry_agrees_with_decide_and_emits_nothing():
    """would_retry answers as decide does (on=, per-class budgets, timeout), silently."""
    from faultkit import subscribe

    p = RetryPolicy(on=(ConnectionError, TimeoutError), attempts=2, infra_attempts=3,
                    wait_initial=0.0, wait_jitter=0.0, timeout=10.0)  # fmt: skip
    seen = []
    unsubscribe = subscribe(seen.append)
    try:
        cases = []
        for exc in (ConnectionResetError("x"), TimeoutError("t"), ValueError("v")):
            for n in range(5):
                for elapsed in (0.0, 11.0):
                    failures = {p.failure_class(exc): n}
                    cases.append(p.would_retry(exc, failures=failures, elapsed=elapsed))
        assert not seen
        i = 0
        for exc in (ConnectionResetError("x"), TimeoutError("t"), ValueError("v")):
            for n in range(5):
                for elapsed in (0.0, 11.0):
                    failures = {p.failure_class(exc): n}
                    got = p.decide(exc, failures=failures, elapsed=elapsed, attempt=n or 1)
                    assert (got is not None) == cases[i], (exc, n, elapsed)
                    i += 1
        assert any(cases) and not all(cases)
    finally:
        unsubscribe()
