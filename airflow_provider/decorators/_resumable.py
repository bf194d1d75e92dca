"""``@task.resumable``: the TaskFlow form of :class:`ResumablePythonOperator`."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk.bases.decorator import DecoratedOperator, task_decorator_factory

from ..operators import ResumablePythonOperator
from ..operators._resumable import apply_retry

if TYPE_CHECKING:
    from airflow.sdk.bases.decorator import TaskDecorator

__all__ = ["resumable_task"]


class _ResumableDecoratedOperator(DecoratedOperator, ResumablePythonOperator):
    """Wraps a function so it runs as a :class:`ResumablePythonOperator`."""

    template_fields: Sequence[str] = ResumablePythonOperator.template_fields
    template_fields_renderers = {"templates_dict": "json", "op_args": "py", "op_kwargs": "py"}
    custom_operator_name: str = "@task.resumable"

    def __init__(
        self, *, python_callable: Callable[..., Any], op_args: Any, op_kwargs: Any, **kwargs: Any
    ) -> None:
        op_kwargs = dict(op_kwargs or {})
        # ``stage`` is supplied at run time, like a context value; give the signature check a
        # placeholder so ``def fn(partition, *, stage)`` needs no default.
        params = inspect.signature(python_callable).parameters
        if "stage" in params and "stage" not in op_kwargs:
            op_kwargs["stage"] = None
        super().__init__(
            kwargs_to_upstream={
                "python_callable": python_callable,
                "op_args": op_args,
                "op_kwargs": op_kwargs,
            },
            python_callable=python_callable,
            op_args=op_args,
            op_kwargs=op_kwargs,
            **kwargs,
        )


def resumable_task(
    python_callable: Callable[..., Any] | None = None,
    multiple_outputs: bool | None = None,
    **kwargs: Any,
) -> TaskDecorator:
    """Turn a function taking ``stage=`` into a resumable task (``@task.resumable(...)``).

    Accepts the arguments of :class:`~airflow_provider.operators.ResumablePythonOperator`
    (``store_conn_id``, ``store_url``, ``retry``, ``alerts``) and of ``@task``::

        @task.resumable(retry=RetryPolicy(on=ConnectionError, attempts=4))
        def load(partition: int, *, stage):
            for chunk in stage.pending(range(10)):
                ...
                stage.done(chunk)

        load.expand(partition=[0, 1, 2])
    """
    # Applied here too: a mapped task is instantiated only on the worker, and the scheduler
    # must know its retries from the partial arguments.
    return task_decorator_factory(
        python_callable=python_callable,
        multiple_outputs=multiple_outputs,
        decorated_operator_class=_ResumableDecoratedOperator,
        **apply_retry(kwargs.pop("retry", None), kwargs),
    )
