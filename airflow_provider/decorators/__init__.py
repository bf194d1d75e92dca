"""Task decorators: ``@task.resumable`` (registered through the provider's ``task-decorators``)."""

from __future__ import annotations

from ._resumable import resumable_task

__all__ = ["resumable_task"]
