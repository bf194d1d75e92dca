"""Overhead of ResumablePythonOperator against PythonOperator: 20 no-op tasks under dag.test().

Both DAGs run in this process against one fresh SQLite metadata DB, alternating, after a
warm-up run of each; the ratio compares median wall times. The resumable DAG uses a file
store, so each task claims an epoch, writes its progress pointer to the task_state_store
and marks itself done.

    .venv/bin/python bench/bench_airflow.py [--tasks 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

TARGET = 1.10

DAGS = """
from __future__ import annotations

import os
from datetime import datetime

from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import DAG

from airflow_provider.operators import ResumablePythonOperator

N = int(os.environ["FK_BENCH_TASKS"])
STORE = os.environ["FK_BENCH_STORE"]


def noop():
    return None


def noop_stage(*, stage):
    return None


with DAG("fk_bench_python", schedule=None, start_date=datetime(2024, 1, 1),
         catchup=False) as python_dag:
    for i in range(N):
        PythonOperator(task_id=f"t{i}", python_callable=noop)

with DAG("fk_bench_resumable", schedule=None, start_date=datetime(2024, 1, 1),
         catchup=False) as resumable_dag:
    for i in range(N):
        ResumablePythonOperator(task_id=f"t{i}", python_callable=noop_stage, store_url=STORE)
"""


def _quiet() -> None:
    import logging

    import structlog

    logging.disable(logging.WARNING)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
        cache_logger_on_first_use=False,
    )


def main(tasks: int = 20, repeats: int = 3) -> dict[str, Any]:
    """Run both DAGs ``repeats`` times (after a warm-up) and print the overhead ratio."""
    from faultkit.testing import local_airflow

    with tempfile.TemporaryDirectory(prefix="faultkit-bench-airflow-") as tmp:
        root = Path(tmp)
        dags = root / "dags"
        dags.mkdir()
        (dags / "fk_bench.py").write_text(textwrap.dedent(DAGS))
        env = {"FK_BENCH_TASKS": str(tasks), "FK_BENCH_STORE": f"file://{root}/store"}
        with local_airflow(root / "home", dags_folder=dags, env=env):
            import os

            os.environ.update(env)
            spec = importlib.util.spec_from_file_location("fk_bench_dags", dags / "fk_bench.py")
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            _quiet()
            times: dict[str, list[float]] = {"python": [], "resumable": []}
            for rep in range(repeats + 1):
                for name, dag in (("python", mod.python_dag), ("resumable", mod.resumable_dag)):
                    t0 = time.perf_counter()
                    dr = dag.test()
                    dt = time.perf_counter() - t0
                    if str(dr.state) != "success":
                        raise RuntimeError(f"{dag.dag_id} ended {dr.state}")
                    if rep:  # the first round warms imports and the DB
                        times[name].append(dt)
    py = statistics.median(times["python"])
    rs = statistics.median(times["resumable"])
    ratio = rs / py
    result = {
        "tasks": tasks,
        "repeats": repeats,
        "python_s": round(py, 3),
        "resumable_s": round(rs, 3),
        "per_task_overhead_ms": round((rs - py) / tasks * 1000, 2),
        "ratio": round(ratio, 3),
        "target": TARGET,
        "ok": ratio <= TARGET,
    }
    print(
        f"{tasks} no-op tasks under dag.test(): PythonOperator {py:.2f} s, "
        f"ResumablePythonOperator (file store) {rs:.2f} s -> ratio {ratio:.3f} "
        f"(target <= {TARGET}) {'OK' if result['ok'] else 'OVER'}"
    )
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    out = main(a.tasks, a.repeats)
    sys.exit(0 if out["ok"] else 1)
