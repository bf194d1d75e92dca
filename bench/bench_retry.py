"""RetryPolicy's cost against tenacity's ``@retry``, measured in the same run.

Two paths, each as overhead over calling the bare function:

* success: the call succeeds at once (the common case; goal: at most half of tenacity's);
* failure: three failures then a success, with zero waits (at most tenacity's).

Run: ``.venv/bin/python -m bench.bench_retry`` (or ``python bench/bench_retry.py``).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import tenacity

from faultkit import RetryPolicy


def _per_call(fn: Callable[[], Any], n: int, repeats: int) -> float:
    """Seconds per call of ``fn`` over ``n`` calls (the best of ``repeats`` runs)."""
    best = float("inf")
    for _ in range(repeats):
        gc.disable()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        gc.enable()
        best = min(best, dt / n)
    return best


def _interleaved(cases: dict[str, Callable[[], Any]], n: int, rounds: int) -> dict[str, float]:
    """Median over ``rounds`` of each case's per-call time, the cases interleaved (in ABBA
    order) so drifting CPU frequency or neighbours hit all of them alike."""
    samples: dict[str, list[float]] = {k: [] for k in cases}
    names = list(cases)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            samples[name].append(_per_call(cases[name], n, 1))
    return {k: statistics.median(v) for k, v in samples.items()}


def main(quick: bool = False) -> dict[str, float]:
    """Measure and print the ratios; returns them with the raw per-call times."""

    ours = RetryPolicy(on=ConnectionError, attempts=5, wait_initial=0.0, wait_jitter=0.0)
    # Zero waits on both sides, and tenacity gets a no-op sleep: its time.sleep(0) calls are
    # system calls our policy does not make, and they would flatter the comparison.
    theirs = tenacity.retry(
        stop=tenacity.stop_after_attempt(5) | tenacity.stop_before_delay(300),
        wait=tenacity.wait_exponential_jitter(multiplier=0.0, max=60.0, exp_base=2, jitter=0.0),
        retry=tenacity.retry_if_exception_type(ConnectionError),
        reraise=True,
        sleep=lambda _seconds: None,
    )

    def ok() -> int:
        return 1

    bare_ok = ok
    ours_ok = ours(ok)
    theirs_ok = theirs(ok)

    state = {"n": 0}

    def flaky() -> int:
        state["n"] += 1
        if state["n"] % 4:
            raise ConnectionError("flaky")
        return 1

    def bare_flaky() -> int:
        while True:
            try:
                return flaky()
            except ConnectionError:
                continue

    ours_flaky = ours(flaky)
    theirs_flaky = theirs(flaky)

    n_ok, n_fail, rounds = (5_000, 500, 4) if quick else (30_000, 2_000, 8)
    for fn in (ours_ok, theirs_ok, ours_flaky, theirs_flaky):  # warm up, and check they work
        assert fn() == 1

    ok_t = _interleaved({"bare": bare_ok, "ours": ours_ok, "tenacity": theirs_ok}, n_ok, rounds)
    state["n"] = 0
    fail_t = _interleaved(
        {"bare": bare_flaky, "ours": ours_flaky, "tenacity": theirs_flaky}, n_fail, rounds
    )

    def overhead(t: dict[str, float], name: str) -> float:
        return max(t[name] - t["bare"], 1e-12)

    out = {
        "success_overhead_ratio": overhead(ok_t, "ours") / overhead(ok_t, "tenacity"),
        "failure_overhead_ratio": overhead(fail_t, "ours") / overhead(fail_t, "tenacity"),
        "success_ours_us": ok_t["ours"] * 1e6,
        "success_tenacity_us": ok_t["tenacity"] * 1e6,
        "success_bare_us": ok_t["bare"] * 1e6,
        "failure_ours_us": fail_t["ours"] * 1e6,
        "failure_tenacity_us": fail_t["tenacity"] * 1e6,
        "failure_bare_us": fail_t["bare"] * 1e6,
    }
    print("RetryPolicy vs tenacity @retry (per call, overhead over the bare function)")
    print(
        f"  success path: ours {ok_t['ours'] * 1e6:7.3f} us, tenacity "
        f"{ok_t['tenacity'] * 1e6:7.3f} us, bare {ok_t['bare'] * 1e6:7.3f} us -> overhead ratio "
        f"{out['success_overhead_ratio']:.3f}x (limit 1.0x, goal 0.5x)"
    )
    print(
        f"  failure path (3 failures, then success, zero waits): ours "
        f"{fail_t['ours'] * 1e6:7.2f} us, tenacity {fail_t['tenacity'] * 1e6:7.2f} us, bare "
        f"{fail_t['bare'] * 1e6:7.2f} us -> overhead ratio "
        f"{out['failure_overhead_ratio']:.3f}x (limit 1.0x)"
    )
    return out


if __name__ == "__main__":
    main()
