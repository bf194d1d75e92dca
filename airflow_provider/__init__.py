"""Airflow provider for faultkit: resumable operators, ``@task.resumable``, alerts, retries.

Importing this package imports nothing from Airflow (the providers manager calls
:func:`get_provider_info` while Airflow is still starting); the submodules (``hooks``,
``operators``, ``decorators``, ``notifications``, ``retry``) do. Without Airflow 3.3 every
import of the package or a submodule raises an ImportError that says what to install.
"""

from __future__ import annotations

import importlib.util

from ._provider_info import get_provider_info

__all__ = ["get_provider_info"]


def _require_airflow() -> None:
    try:
        # Finds airflow.sdk without running it (only the top-level package is imported).
        found = importlib.util.find_spec("airflow.sdk") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ImportError(
            "faultkit's Airflow provider needs Apache Airflow 3.3 (its Task SDK, airflow.sdk): "
            "pip install 'faultkit[airflow]'"
        )


_require_airflow()
