"""FaultkitRetryPolicy: a faultkit RetryPolicy as an Airflow 3.3 ``retry_policy``.

Airflow consults ``retry_policy.evaluate`` in the worker when a task raises. This policy
asks the faultkit policy (:meth:`faultkit.RetryPolicy.decide`): an exception outside
``on=`` fails the task at once, a matching one is retried after exactly the policy's wait,
within the per-class budgets. Failures are counted per class in the task's state store
(it survives between tries), so a worker lost mid-run does not spend the attempts meant
for bugs. Usually built for you by ``faultkit.RetryPolicy(...).airflow()``.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from airflow.sdk import RetryDecision
from airflow.sdk import RetryPolicy as AirflowRetryPolicy

from faultkit import RetryPolicy

from ._common import ti_stage_key

__all__ = ["FaultkitRetryPolicy"]

_STATE_KEY = "faultkit.retry"


def _stage_key(context: Any) -> str:
    """The task's stage key (the key of every other alert about it), for events."""
    ti = context.get("ti") if hasattr(context, "get") else None
    return ti_stage_key(ti) if ti is not None else ""


class FaultkitRetryPolicy(AirflowRetryPolicy):
    """An Airflow ``RetryPolicy`` that obeys a :class:`faultkit.RetryPolicy`.

    Args:
        policy: the faultkit policy (``on=``, attempts, waits, ``infra_attempts``).
    """

    def __init__(self, policy: RetryPolicy) -> None:
        if not isinstance(policy, RetryPolicy):
            raise TypeError(f"FaultkitRetryPolicy takes a faultkit.RetryPolicy, got {policy!r}")
        self.policy = policy

    def __repr__(self) -> str:
        return f"FaultkitRetryPolicy({self.policy!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FaultkitRetryPolicy) and other.policy == self.policy

    def __hash__(self) -> int:
        return hash(self.policy)

    def _history(self, context: Any, cls: str, try_number: int) -> tuple[dict[str, Any], Any]:
        """Per-class failure counts and first-try time, from the task state store."""
        store = None
        state: dict[str, Any] = {}
        try:
            store = context["task_state_store"] if context is not None else None
            if store is not None:
                got = store.get(_STATE_KEY)
                state = dict(got) if isinstance(got, dict) else {}
        except Exception:  # no state store (older API server, tests): count tries instead
            store = None
        if store is None:
            # Without history every earlier try counts against this failure's class.
            state = {"code": 0, "infrastructure": 0, cls: max(0, try_number - 1)}
        if "first" not in state:
            ti = context.get("ti") if hasattr(context, "get") else None
            start = getattr(ti, "start_date", None)
            state["first"] = start.timestamp() if start is not None else time.time()
        return state, store

    def _counted(
        self, exception: BaseException, try_number: int, context: Any
    ) -> tuple[str, dict[str, Any], Any, dict[str, int], float]:
        """This failure's class, the history with it counted (and the state store it came
        from), the per-class failure counts and the seconds since the first try."""
        cls = self.policy.failure_class(exception)
        state, store = self._history(context, cls, try_number)
        state[cls] = int(state.get(cls, 0)) + 1
        failures = {c: int(state.get(c, 0)) for c in ("code", "infrastructure")}
        return cls, state, store, failures, max(0.0, time.time() - float(state["first"]))

    def would_retry(self, exception: BaseException, try_number: int, context: Any = None) -> bool:
        """Whether :meth:`evaluate` would retry this failure; reads the history, writes
        nothing and emits no event (how the operator tells that a try is the last)."""
        if not self.policy.matches(exception):
            return False
        _, _, _, failures, elapsed = self._counted(exception, try_number, context)
        return self.policy.would_retry(
            exception, failures=failures, elapsed=elapsed, attempt=try_number
        )

    def evaluate(
        self,
        exception: BaseException,
        try_number: int,
        max_tries: int,
        context: Any = None,
    ) -> RetryDecision:
        """Retry (with the faultkit wait) what ``on=`` names within budget; fail the rest."""
        policy = self.policy
        if not policy.matches(exception):
            return RetryDecision.fail(
                reason=f"{type(exception).__name__} is not retried by {policy!r}"
            )
        cls, state, store, failures, elapsed = self._counted(exception, try_number, context)
        if store is not None:
            try:
                store.set(_STATE_KEY, state)
            except Exception:  # counting is best effort; the decision still stands
                pass
        delay = policy.decide(
            exception,
            failures=failures,
            elapsed=elapsed,
            attempt=try_number,
            key=_stage_key(context),
        )
        if delay is None:
            return RetryDecision.fail(
                reason=f"{type(exception).__name__}: {cls} attempts or time exhausted "
                f"under {policy!r}"
            )
        return RetryDecision.retry(
            delay=timedelta(seconds=delay),
            reason=f"{type(exception).__name__} is retried by faultkit ({cls} failure "
            f"{state[cls]} of {policy.budget(cls)})",
        )

    def serialize(self) -> dict[str, Any]:
        """JSON for DAG serialization: the faultkit policy with ``on`` as import paths."""
        return {
            "__type": "airflow_provider.retry.FaultkitRetryPolicy",
            "policy": self.policy.to_dict(),
        }

    @classmethod
    def deserialize(cls, data: dict[str, Any]) -> FaultkitRetryPolicy:
        """The policy :meth:`serialize` described."""
        return cls(RetryPolicy.from_dict(data["policy"]))
