"""The DAG of the Airflow cluster test: one resumable task (``dask_tasks.units``: units with a
pause, each recorded in the stage and in the shared events file), retried on a lost worker."""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG
from dask_tasks import units

from airflow_provider.operators import ResumablePythonOperator

with DAG(
    "fk_cluster", schedule=None, start_date=datetime(2024, 1, 1), catchup=False,
    render_template_as_native_obj=True,
) as dag:  # fmt: skip
    ResumablePythonOperator(
        task_id="units",
        python_callable=units,
        op_kwargs={
            "events": "{{ dag_run.conf['events'] }}",
            "n": "{{ dag_run.conf['n'] }}",
            "pause": "{{ dag_run.conf['pause'] }}",
        },
        retries=2,
        retry_delay=timedelta(seconds=1),
    )
