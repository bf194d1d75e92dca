"""Airflow provider for faultkit: resumable operators, ``@task.resumable``, alerts, retries.

Importing this package imports nothing from Airflow; the submodules (``hooks``, ``operators``,
``decorators``, ``notifications``, ``retry``) do.
"""

from __future__ import annotations

from ._provider_info import get_provider_info

__all__ = ["get_provider_info"]
