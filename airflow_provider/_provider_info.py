"""What Airflow's ``apache_airflow_provider`` entry point reads about this provider."""

from __future__ import annotations

from typing import Any

__all__ = ["ALERT_URLS_FIELD", "get_provider_info"]

#: The connection extra holding the Apprise URLs. Airflow's API and UI hide an extra's value
#: only when its *name* matches a sensitive field name (``secret``, ``token``, ``password``, ...
#: plus ``[core] sensitive_var_conn_names``); ``format: password`` in the connection form
#: changes only the input widget. So the name carries "secret": GET /api/v2/connections shows
#: ``***``, and a PATCH that sends ``***`` back (the UI's edit form) keeps the stored value.
ALERT_URLS_FIELD = "alert_urls_secret"


def get_provider_info() -> dict[str, Any]:
    """Provider metadata, valid against Airflow's ``provider_info.schema.json``.

    Imports nothing from Airflow: the providers manager calls it while it is still starting.
    """
    return {
        "package-name": "faultkit",
        "name": "faultkit",
        "description": (
            "Fenced checkpoints, retries and deduplicated alerts: tasks that lose their worker "
            "are retried and resume where they stopped, with effects landing exactly once."
        ),
        "integrations": [
            {
                "integration-name": "faultkit",
                "external-doc-url": "https://pypi.org/project/faultkit/",
                "tags": ["software"],
            }
        ],
        "hooks": [{"integration-name": "faultkit", "python-modules": ["airflow_provider.hooks"]}],
        "operators": [
            {"integration-name": "faultkit", "python-modules": ["airflow_provider.operators"]}
        ],
        "connection-types": [
            {
                "connection-type": "faultkit",
                "hook-class-name": "airflow_provider.hooks.CheckpointHook",
                "hook-name": "faultkit checkpoint store",
                "ui-field-behaviour": {
                    "hidden-fields": ["host", "port", "schema"],
                    "relabeling": {
                        "login": "S3 access key id (optional)",
                        "password": "S3 secret access key (optional)",
                    },
                    "placeholders": {
                        "description": "checkpoints of the nightly ETL",
                        "extra": '{"store_url": "s3://bucket/checkpoints"}',
                    },
                },
                "conn-fields": {
                    "store_url": {
                        "label": "Store URL",
                        "description": "Where checkpoints live: s3://bucket/prefix, "
                        "file:///shared/checkpoints or memory://name.",
                        "schema": {"type": "string", "format": "url"},
                    },
                    "storage_options": {
                        "label": "Storage options (JSON)",
                        "description": "Extra fsspec options, e.g. "
                        '{"client_kwargs": {"endpoint_url": "http://minio:9000"}}.',
                        "schema": {"type": ["object", "null"], "format": "json"},
                    },
                    ALERT_URLS_FIELD: {  # a sensitive name: see ALERT_URLS_FIELD
                        "label": "Alert URLs",
                        "description": "Apprise URLs (Slack, e-mail, PagerDuty, webhooks), "
                        "comma-separated. They hold tokens: the API, the UI and task logs "
                        "show them as ***.",
                        "schema": {"type": ["string", "null"], "format": "password"},
                    },
                    "dedupe_window": {
                        "label": "Alert dedupe window (s)",
                        "description": "The same alert is sent once within this many seconds.",
                        "schema": {"type": ["integer", "null"], "default": 600, "minimum": 0},
                    },
                },
            }
        ],
        "notifications": ["airflow_provider.notifications.FaultkitNotifier"],
        "task-decorators": [
            {"name": "resumable", "class-name": "airflow_provider.decorators.resumable_task"}
        ],
    }
