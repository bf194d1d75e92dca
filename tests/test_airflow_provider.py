"""The Airflow provider under ``dag.test()``: packaging, hook, operator, decorator, notifier, DAGs.

A fresh SQLite metadata DB per module; DAGs run in this process through ``dag.test()`` (the
chaos test runs it in child processes it SIGKILLs). Alerts go to a real HTTP receiver.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from faultkit import Alerter, CheckpointStore, degraded, subscribe, unwrap
from faultkit.testing import AlertReceiver

if importlib.util.find_spec("airflow.sdk") is None:
    pytest.skip(
        "apache-airflow is not installed (pip install 'faultkit[airflow]')", allow_module_level=True
    )

from airflow_provider._common import stage_key

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-d0-not-log-7f3a9c"

FLAKY_DAG = """
from __future__ import annotations

import os
from datetime import datetime

from airflow.sdk import DAG, task

from airflow_provider.notifications import FaultkitNotifier
from faultkit import RetryPolicy

STORE = os.environ["FK_UNIT_STORE"]
RETRY = RetryPolicy(on=ConnectionError, attempts=3, wait_initial=0, wait_max=0, wait_jitter=0)
NOTIFY = FaultkitNotifier([os.environ["FK_UNIT_ALERT_URL"]], conn_id=None, store_url=STORE)
ERRORS = {"ConnectionError": ConnectionError, "ValueError": ValueError}

with DAG(
    "fk_unit_flaky", schedule=None, start_date=datetime(2024, 1, 1), catchup=False,
    params={"fail_at": 2, "error": "ConnectionError", "items": [0], "fail_item": 0},
    default_args={"on_retry_callback": NOTIFY, "on_failure_callback": NOTIFY},
) as dag:

    @task
    def items(params=None):
        return list(params["items"])

    @task.resumable(retry=RETRY, store_url=STORE, alerts=[os.environ["FK_UNIT_ALERT_URL"]])
    def work(item, *, stage, params=None, ti=None):
        done_now = []
        for u in stage.pending(range(5)):
            if (u == params["fail_at"] and ti.try_number == 1
                    and item == params["fail_item"]):
                raise ERRORS[params["error"]](f"injected at unit {u}")
            stage.done(u, {"try": ti.try_number})
            done_now.append(u)
        return {"epoch": stage.epoch, "done_now": done_now}

    work.expand(item=items())
"""

SLOW_DAG = """
from __future__ import annotations

import os
import time
from datetime import datetime

from airflow.sdk import DAG

from airflow_provider.operators import ResumablePythonOperator


def slow(*, stage):
    for u in stage.pending(range(8)):
        time.sleep(0.2)
        stage.done(u, os.getpid())
    return {"epoch": stage.epoch, "pids": sorted(set(stage.results().values()))}


with DAG("fk_unit_slow", schedule=None, start_date=datetime(2024, 1, 1), catchup=False) as dag:
    ResumablePythonOperator(task_id="work", python_callable=slow,
                            store_url=os.environ["FK_UNIT_STORE"], retries=3)
"""

# Its store_url is templated: the worker renders it, the DAG processor's callbacks get it raw.
TEMPLATED_DAG = """
from __future__ import annotations

import os
from datetime import datetime

from airflow.sdk import DAG

from airflow_provider.notifications import FaultkitNotifier
from airflow_provider.operators import ResumablePythonOperator

NOTIFY = FaultkitNotifier([os.environ["FK_UNIT_ALERT_URL"]], conn_id=None)


def three_units(*, stage):
    for u in stage.pending(range(3)):
        stage.done(u)
    return stage.epoch


with DAG("fk_unit_templated", schedule=None, start_date=datetime(2024, 1, 1), catchup=False,
         default_args={"on_retry_callback": NOTIFY, "on_failure_callback": NOTIFY}) as dag:
    ResumablePythonOperator(task_id="work", python_callable=three_units, retries=1,
                            store_url=os.environ["FK_UNIT_STORE"] + "-ck-{{ ds_nodash }}")
"""

# The notifier's URLs and store are templates.
NOTIFY_DAG = """
from __future__ import annotations

import os
from datetime import datetime

from airflow.sdk import DAG, task

from airflow_provider.notifications import FaultkitNotifier

NOTIFY = FaultkitNotifier(
    ["{{ params.alert_base }}/{{ dag.dag_id }}"],
    conn_id=None,
    store_url=os.environ["FK_UNIT_STORE"] + "-notify-{{ ds_nodash }}",
)

with DAG("fk_unit_notify", schedule=None, start_date=datetime(2024, 1, 1), catchup=False,
         params={"alert_base": ""},
         default_args={"on_failure_callback": NOTIFY}) as dag:

    @task
    def boom():
        raise ValueError("boom")

    boom()
"""


# A publish task that falls back to the last good output when it gives up.
DEGRADE_DAG = """
from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow.sdk import DAG, task

from faultkit import Fallback, RetryPolicy, degraded, unwrap

with DAG("fk_unit_degrade", schedule=None, start_date=datetime(2024, 1, 1), catchup=False,
         params={"fail": "", "policy_fail": False}) as dag:

    @task.resumable(store_url=os.environ["FK_UNIT_STORE"], retries=1,
                    retry_delay=timedelta(0), alerts=[os.environ["FK_UNIT_ALERT_URL"]],
                    fallback=Fallback(max_age=timedelta(hours=1)))
    def publish(*, stage, params=None, ti=None):
        with open(os.environ["FK_UNIT_STORE"][len("file://"):] + "-tries", "a") as f:
            f.write(f"{ti.run_id} {ti.try_number}\\n")
        if params["fail"]:
            raise {"reset": ConnectionResetError, "bug": ValueError}[params["fail"]]("dw")
        return {"rows": 42}

    @task
    def report(out):
        d = degraded(out)
        return {"from": d.source_key if d else None, "rows": unwrap(out)["rows"]}

    report(publish())

    @task.resumable(store_url=os.environ["FK_UNIT_STORE"], fallback=True, no_fallback="skip",
                    task_id="publish_or_skip")
    def publish_or_skip(*, stage):
        raise ConnectionResetError("the warehouse is unreachable")

    @task
    def after(out):
        return "ran"

    after(publish_or_skip())

    # The policy retries ConnectionError only: a LookupError fails the task on its first try,
    # which is then its last, although Airflow's retries are not spent.
    @task.resumable(store_url=os.environ["FK_UNIT_STORE"], task_id="publish_policy",
                    retry=RetryPolicy(on=ConnectionError, attempts=3, wait_initial=0.0,
                                      wait_jitter=0.0),
                    fallback=Fallback(max_age=timedelta(hours=1),
                                      on=("infrastructure", LookupError)))
    def publish_policy(*, stage, params=None):
        if params["policy_fail"]:
            raise LookupError("the partition index is gone")
        return {"rows": 7}

    publish_policy()
"""


@pytest.fixture(scope="module")
def receiver():
    """A real HTTP alert receiver shared by the module."""
    with AlertReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory, receiver):
    """A migrated SQLite metadata DB, the example DAGs and the test DAGs in one dags folder."""
    from faultkit.testing import local_airflow

    root = tmp_path_factory.mktemp("airflow-unit")
    dags = root / "dags"
    dags.mkdir()
    for f in ("faultkit_etl.py", "faultkit_train.py"):
        shutil.copy(REPO / "dags" / f, dags / f)
    for name, text in (
        ("fk_unit_flaky", FLAKY_DAG),
        ("fk_unit_slow", SLOW_DAG),
        ("fk_unit_templated", TEMPLATED_DAG),
        ("fk_unit_notify", NOTIFY_DAG),
        ("fk_unit_degrade", DEGRADE_DAG),
    ):
        (dags / f"{name}.py").write_text(textwrap.dedent(text))
    conn = {
        "conn_type": "faultkit",
        "login": "minio",
        "password": SECRET,
        "extra": {
            "store_url": f"file://{root}/store",
            "storage_options": {"client_kwargs": {"endpoint_url": "http://127.0.0.1:1"}},
            "alert_urls_secret": f"json://user:{SECRET}x@127.0.0.1:{receiver.port}/hook",
        },
    }
    env = {
        "FK_UNIT_STORE": f"file://{root}/unit-store",
        "FK_UNIT_ALERT_URL": receiver.url(),
        "AIRFLOW_CONN_FAULTKIT_DEFAULT": json.dumps(conn),
        "FAULTKIT_SINK_URL": f"sqlite:///{root}/sink.db",
        "FAULTKIT_DEMO_RETRY_WAIT": "0",
    }
    with local_airflow(root / "home", dags_folder=dags, env=env) as home:
        os.environ.update(env)
        yield SimpleHome(root, dags, home)
        for k in env:
            os.environ.pop(k, None)


class SimpleHome:
    def __init__(self, root: Path, dags: Path, home: Path) -> None:
        self.root, self.dags, self.home = root, dags, home

    def dag(self, name: str):
        spec = importlib.util.spec_from_file_location(f"fkdag_{name}", self.dags / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        return mod.dag


def _tis(dr) -> dict:
    return {(ti.task_id, ti.map_index): ti for ti in dr.get_task_instances()}


def _xcom(dr, task_id: str, map_index: int = -1):
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as s:
        row = (
            s.query(XComModel)
            .filter_by(
                dag_id=dr.dag_id,
                run_id=dr.run_id,
                task_id=task_id,
                map_index=map_index,
                key="return_value",
            )
            .one()
        )
        return row.value if not isinstance(row.value, str) else json.loads(row.value)


# -- packaging ---------------------------------------------------------------------------


def test_provider_info_valid_against_airflow_schema():
    """get_provider_info() validates against Airflow's runtime and provider.yaml schemas."""
    import airflow
    import jsonschema

    from airflow_provider import get_provider_info

    info = get_provider_info()
    base = Path(airflow.__file__).parent
    jsonschema.validate(info, json.loads((base / "provider_info.schema.json").read_text()))
    dev = json.loads((base / "provider.yaml.schema.json").read_text())
    jsonschema.validate(info["connection-types"], dev["properties"]["connection-types"])
    assert info["package-name"] == "faultkit"


def test_providers_manager_registers_everything(airflow_home):
    """Airflow discovers the provider: connection type with labelled fields, decorator, notifier."""
    from airflow.providers_manager import ProvidersManager
    from airflow.sdk import task

    pm = ProvidersManager()
    assert "faultkit" in pm.providers
    from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

    hook = ProvidersManagerTaskRuntime().hooks["faultkit"]
    assert hook.hook_class_name == "airflow_provider.hooks.CheckpointHook"
    widgets = pm._connection_form_widgets_from_metadata
    assert widgets["extra__faultkit__store_url"].field["schema"]["title"] == "Store URL"
    assert widgets["extra__faultkit__alert_urls_secret"].is_sensitive
    assert "host" in pm._field_behaviours_from_metadata["faultkit"]["hidden_fields"]
    assert "airflow_provider.notifications.FaultkitNotifier" in pm.notification
    from airflow_provider.decorators import resumable_task

    assert task.resumable is resumable_task


# -- hook ------------------------------------------------------------------------------


def test_hook_reads_env_connection_and_masks_secrets(airflow_home, monkeypatch):
    """A JSON AIRFLOW_CONN_* connection opens the store; its secrets are registered for masking."""
    from airflow.sdk._shared.secrets_masker import redact

    from airflow_provider.hooks import CheckpointHook

    hook = CheckpointHook()
    s = hook.settings()
    assert s.store_url == f"file://{airflow_home.root}/store"
    assert "secret" not in s.storage_options  # login/password are S3 credentials only
    assert len(s.alert_urls) == 1
    monkeypatch.setenv(
        "AIRFLOW_CONN_FK_S3",
        json.dumps(
            {
                "conn_type": "faultkit",
                "login": "AKIA",
                "password": SECRET,
                "extra": {"store_url": "s3://bucket/ck"},
            }
        ),
    )
    s3 = CheckpointHook("fk_s3").settings()
    assert s3.storage_options == {"key": "AKIA", "secret": SECRET}
    assert SECRET not in repr(s) and SECRET not in repr(hook)
    assert SECRET not in str(redact(f"leak {SECRET} and {s.alert_urls[0]}"))
    with hook.get_store().stage("hook/probe") as st:
        st.done("u")
    assert hook.test_connection()[0]


# -- operator / decorator / notifier under dag.test() --------------------------------------


def test_retryable_error_resumes_in_try_two(airflow_home, receiver):
    """A retryable error mid-way fails try 1; try 2 resumes at epoch 2 and redoes no unit."""
    before = len(receiver.messages())
    dr = airflow_home.dag("fk_unit_flaky").test(run_conf={"fail_at": 2, "error": "ConnectionError"})
    assert dr.state == "success"
    ti = _tis(dr)[("work", 0)]
    assert ti.try_number == 2
    out = _xcom(dr, "work", 0)
    assert out == {"epoch": 2, "done_now": [2, 3, 4]}  # units 0 and 1 were not redone
    view = CheckpointStore(os.environ["FK_UNIT_STORE"]).read_view(
        stage_key("fk_unit_flaky", dr.run_id, "work", 0)
    )
    assert {r.unit: r.epoch for r in view.units.values()} == {0: 1, 1: 1, 2: 2, 3: 2, 4: 2}
    # on_retry_callback (worker) and the resumed try both reported try 1: one alert.
    alerts = receiver.wait_for(before + 1, 30)[before:]
    assert len(alerts) == 1
    assert "retry scheduled" in alerts[0]["title"]
    assert "try 1 of 3 raised ConnectionError" in alerts[0]["message"]


def test_non_retryable_error_fails_at_once(airflow_home, receiver):
    """An error outside the policy's on= fails on try 1 and is reported as final, not a retry."""
    before = len(receiver.messages())
    dr = airflow_home.dag("fk_unit_flaky").test(run_conf={"fail_at": 1, "error": "ValueError"})
    assert dr.state == "failed"
    ti = _tis(dr)[("work", 0)]
    assert ti.try_number == 1 and ti.state == "failed"
    alerts = receiver.wait_for(before + 1, 30)[before:]
    titles = [a["title"] for a in alerts]
    assert any("gave up" in t for t in titles), titles
    assert not any("retry scheduled" in t for t in titles), titles


def test_task_that_gives_up_serves_the_last_runs_output(airflow_home, receiver):
    """Run 1 publishes; in run 2 both tries fail on the infrastructure: the task succeeds
    with run 1's output, marked so the downstream task tells it apart (through XCom), with a
    DEGRADED log line, a faultkit_degraded XCom and one degraded alert. A code bug fails."""
    before = len(receiver.messages())
    dag = airflow_home.dag("fk_unit_degrade")
    tries = Path(os.environ["FK_UNIT_STORE"][len("file://") :] + "-tries")
    dr1 = dag.test(run_conf={"fail": ""})
    assert dr1.state == "success"
    assert _xcom(dr1, "report") == {"from": None, "rows": 42}
    dr2 = dag.test(run_conf={"fail": "reset"})
    assert dr2.state == "success"
    ti = _tis(dr2)[("publish", -1)]
    assert ti.try_number == 2 and ti.state == "success"
    source = stage_key("fk_unit_degrade", dr1.run_id, "publish", -1)
    assert _xcom(dr2, "report") == {"from": source, "rows": 42}
    assert tries.read_text().splitlines()[-3:] == [
        f"{dr1.run_id} 1",
        f"{dr2.run_id} 1",
        f"{dr2.run_id} 2",
    ]  # both tries of run 2 ran and failed
    alerts = [m for m in receiver.wait_for(before + 1, 30)[before:] if "degraded" in m["title"]]
    assert len(alerts) == 1 and source in alerts[0]["message"]
    dr3 = dag.test(run_conf={"fail": "bug"})
    assert dr3.state == "failed"
    assert [m for m in receiver.messages()[before:] if "degraded" in m["title"]] == alerts
    # no_fallback="skip": nothing earlier to serve, so it and its downstream are skipped.
    tis = _tis(dr1)
    assert tis[("publish_or_skip", -1)].state == "skipped"
    assert tis[("after", -1)].state == "skipped"


def test_a_failure_the_retry_policy_will_not_retry_is_the_last_try(airflow_home):
    """With retry=, a failure outside the policy's on= ends the task on its first try: the
    fallback is served then, although Airflow's retries are not spent."""
    dag = airflow_home.dag("fk_unit_degrade")
    dr1 = dag.test(run_conf={"fail": ""})
    dr2 = dag.test(run_conf={"fail": "", "policy_fail": True})
    assert dr2.state == "success"
    ti = _tis(dr2)[("publish_policy", -1)]
    assert ti.try_number == 1 and ti.max_tries == 2 and ti.state == "success"
    source = stage_key("fk_unit_degrade", dr1.run_id, "publish_policy", -1)
    out = _xcom(dr2, "publish_policy")
    assert degraded(out).source_key == source and unwrap(out) == {"rows": 7}


def test_mapped_keys_distinct_per_index_stable_across_tries(airflow_home):
    """Mapped instances get one stage each; the failing one keeps its key into try 2."""
    dr = airflow_home.dag("fk_unit_flaky").test(
        run_conf={"items": [10, 11, 12], "fail_item": 11, "fail_at": 3}
    )
    assert dr.state == "success"
    store = CheckpointStore(os.environ["FK_UNIT_STORE"])
    keys = store.keys(stage_key("fk_unit_flaky", dr.run_id, "work", 0).rsplit("/", 1)[0] + "/")
    assert keys == [stage_key("fk_unit_flaky", dr.run_id, "work", i) for i in range(3)]
    epochs = [store.read_view(k).epoch for k in keys]
    assert epochs == [1, 2, 1]
    assert _tis(dr)[("work", 1)].try_number == 2
    pointer = _pointer(dr, "work", 1)
    assert pointer["status"] == "done" and pointer["epoch"] == 2 and pointer["units_done"] == 5


def _pointer(dr, task_id: str, map_index: int) -> dict:
    from airflow.utils.session import create_session
    from sqlalchemy import text

    with create_session() as s:
        value = s.execute(
            text(
                "SELECT value FROM task_state_store WHERE dag_id=:d AND run_id=:r AND "
                "task_id=:t AND map_index=:m AND key='faultkit'"
            ),
            {"d": dr.dag_id, "r": dr.run_id, "t": task_id, "m": map_index},
        ).scalar_one()
    return json.loads(value) if isinstance(value, str) else value


def test_example_etl_dag_runs(airflow_home):
    """faultkit_etl loads every partition exactly once under dag.test()."""
    dr = airflow_home.dag("faultkit_etl").test(run_conf={"partitions": 3, "rows": 120})
    assert dr.state == "success"
    check = _xcom(dr, "check")
    assert check["rows"] == check["expected"] == 360 and check["duplicates"] == 0


def test_example_etl_dag_publishes_degraded_when_the_etl_gives_up(airflow_home):
    """faultkit_etl: a healthy run publishes its summary; a run whose partition source is
    down gives up on that load, and publish serves the healthy run's summary, marked; the
    next healthy run publishes afresh."""
    dag = airflow_home.dag("faultkit_etl")
    conf = {"partitions": 2, "rows": 100, "outage": None}  # dag.test() keeps the last conf
    good = dag.test(run_conf=conf)
    assert good.state == "success"
    fresh = _xcom(good, "publish")
    assert degraded(fresh) is None and fresh["orders"] == 200 and fresh["revenue"] > 0

    out = dag.test(run_conf={**conf, "outage": 1})
    tis = _tis(out)
    assert tis[("load", 1)].state == "failed" and tis[("load", 0)].state == "success"
    assert tis[("load", 1)].try_number == 3  # the ETL did try: its retries are spent
    assert tis[("check", -1)].state == "upstream_failed"
    assert tis[("publish", -1)].state == "success"
    served = _xcom(out, "publish")
    d = degraded(served)
    assert d is not None and d.source_key == stage_key("faultkit_etl", good.run_id, "publish", -1)
    assert unwrap(served) == fresh and "EtlIncompleteError" in d.reason

    again = dag.test(run_conf=conf)
    assert again.state == "success"
    recovered = _xcom(again, "publish")
    assert degraded(recovered) is None and recovered["orders"] == 200
    assert recovered["table"] != fresh["table"]  # its own run's table


def test_example_train_dag_runs(airflow_home):
    """faultkit_train trains and its weights equal the in-process reference run."""
    pytest.importorskip("torch")
    dr = airflow_home.dag("faultkit_train").test(
        run_conf={"steps": 20, "every_steps": 5, "verify": True}
    )
    assert dr.state == "success"
    assert _tis(dr)[("verify", -1)].state == "success"


# -- chaos: a real SIGKILL of a process running dag.test() -----------------------------------

LOGICAL = dt.datetime(2024, 6, 1, tzinfo=dt.UTC)


def run_slow_dag() -> dict:
    """Child-process entry: run fk_unit_slow for a fixed logical date (same run id each time)."""
    dags = Path(os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    spec = importlib.util.spec_from_file_location("fkdag_slow_child", dags / "fk_unit_slow.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    dr = mod.dag.test(logical_date=LOGICAL, run_after=LOGICAL)
    return {"state": str(dr.state), "run_id": dr.run_id}


def test_sigkilled_dag_test_resumes_in_same_run(airflow_home, faultkit_chaos):
    """SIGKILLed mid-stage by the chaos fixture, the same DAG run resumes without redoing units."""
    store = CheckpointStore(os.environ["FK_UNIT_STORE"])

    def units_done() -> int:
        keys = store.keys("fk_unit_slow/")
        return len(store.read_view(keys[0]).units) if keys else 0

    report = faultkit_chaos.run_with_kills(
        run_slow_dag,
        kills=1,
        seed=3,
        ready=lambda: units_done() >= 2,
        max_delay=0.3,
        timeout=240,
    )
    assert report.kills == 1
    assert report.result["state"] == "success"
    (k,) = store.keys("fk_unit_slow/")
    view = store.read_view(k)
    assert view.epoch == 2
    by_epoch = [r.epoch for r in sorted(view.units.values(), key=lambda r: r.unit)]
    assert by_epoch == sorted(by_epoch) and by_epoch[0] == 1 and by_epoch[-1] == 2
    pids = {r.result for r in view.units.values()}
    assert len(pids) == 2  # two processes did the work, each unit exactly once


# -- the adapter's seams with Airflow ---------------------------------------------------------

PACKAGE = REPO / "airflow_provider"
MODULES = sorted(
    ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    for p in PACKAGE.rglob("*.py")
)


@pytest.mark.parametrize("module", [pytest.param(m, id=m) for m in MODULES])
def test_import_without_airflow_names_the_extra(module):
    """Importing any provider module without Airflow raises an ImportError naming the extra."""
    code = (
        "import sys; sys.modules['airflow'] = None\n"
        f"try:\n    import {module}\n"
        "except ImportError as exc:\n    print(type(exc).__name__, exc)\n"
        "else:\n    print('imported')\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("ImportError "), r.stdout
    assert "pip install 'faultkit[airflow]'" in r.stdout


def test_provider_imports_only_public_airflow_sdk_names():
    """RetryPolicy and RetryDecision come from airflow.sdk, never airflow.sdk.definitions."""
    import ast

    from airflow.sdk import RetryDecision, RetryPolicy

    from airflow_provider.retry import FaultkitRetryPolicy
    from faultkit import RetryPolicy as FaultkitPolicy

    private = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            private += [
                f"{path.name}: {n}" for n in names if n.startswith("airflow.sdk.definitions")
            ]
    assert private == []
    policy = FaultkitRetryPolicy(FaultkitPolicy(on=ValueError, attempts=2, wait_initial=0))
    assert isinstance(policy, RetryPolicy)
    assert isinstance(policy.evaluate(ValueError("x"), 1, 1), RetryDecision)


def test_airflow_builds_hook_under_faultkit_conn_id(airflow_home):
    """Connection.get_hook() passes the id as faultkit_conn_id; conn_id= works, deprecated."""
    from airflow.sdk import Connection

    from airflow_provider.hooks import CheckpointHook

    assert CheckpointHook.conn_name_attr == "faultkit_conn_id"
    hook = Connection(conn_id="faultkit_default", conn_type="faultkit").get_hook()
    assert isinstance(hook, CheckpointHook)
    assert hook.faultkit_conn_id == "faultkit_default"
    assert hook.get_store().url == f"file://{airflow_home.root}/store"
    assert CheckpointHook("other").faultkit_conn_id == "other"
    with pytest.warns(DeprecationWarning, match="faultkit_conn_id"):
        old = CheckpointHook(conn_id="faultkit_default")
    assert old.faultkit_conn_id == "faultkit_default"
    assert old.settings().store_url == hook.settings().store_url
    with pytest.raises(TypeError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        CheckpointHook("a", conn_id="b")


def test_legacy_alert_urls_extra_still_read_with_a_warning(airflow_home, monkeypatch, capsys):
    """A connection with the old 'alert_urls' key still alerts, and is told to rename it."""
    from airflow_provider.hooks import CheckpointHook

    url = "json://127.0.0.1:9/legacy"
    monkeypatch.setenv(
        "AIRFLOW_CONN_FK_LEGACY",
        json.dumps(
            {"conn_type": "faultkit", "extra": {"store_url": "memory://l", "alert_urls": url}}
        ),
    )
    assert CheckpointHook("fk_legacy").alert_urls() == [url]
    out = capsys.readouterr()
    assert "rename the key to 'alert_urls_secret'" in out.out + out.err


def test_retry_policy_alert_is_keyed_by_the_stage_key(airflow_home):
    """The retry policy's retry_scheduled alert carries the stage key, as every other alert."""
    with AlertReceiver() as own:
        alerter = Alerter([own.url()])
        policy_events = []

        def forward(event):
            if event.kind == "retry_scheduled" and "next_attempt" in event.details:
                policy_events.append(event)
                alerter.send(event)

        unsubscribe = subscribe(forward)
        try:
            dr = airflow_home.dag("fk_unit_flaky").test(
                run_conf={"fail_at": 1, "error": "ConnectionError"}
            )
        finally:
            unsubscribe()
        assert dr.state == "success"
        assert len(policy_events) == 1, policy_events
        (alert,) = own.wait_for(1, 30)
    k = stage_key("fk_unit_flaky", dr.run_id, "work", 0)
    assert alert["title"].rsplit(" - ", 1)[1] == k
    assert policy_events[0].key == k


def test_notifier_renders_its_fields_per_callback():
    """urls, conn_id and store_url are templates, rendered anew for every callback."""
    from airflow_provider.notifications import FaultkitNotifier

    n = FaultkitNotifier(
        ["json://127.0.0.1:9/{{ params.path }}"],
        conn_id="{{ params.conn }}",
        store_url="file:///ck/{{ ds_nodash }}",
        dedupe_window=5,
    )
    assert set(n.template_fields) == {"urls", "conn_id", "store_url"}
    n.render_template_fields({"params": {"path": "a", "conn": "fk_a"}, "ds_nodash": "20240601"})
    assert (n.urls, n.conn_id, n.store_url) == (
        ["json://127.0.0.1:9/a"],
        "fk_a",
        "file:///ck/20240601",
    )
    # The same instance serves the next callback (default_args): it renders from the templates.
    n.render_template_fields({"params": {"path": "b", "conn": "fk_b"}, "ds_nodash": "20240602"})
    assert (n.urls, n.conn_id, n.store_url) == (
        ["json://127.0.0.1:9/b"],
        "fk_b",
        "file:///ck/20240602",
    )


def test_templated_notifier_alerts_where_its_templates_say(airflow_home, receiver):
    """The failure callback posts to the rendered URL and dedupes in the rendered store."""
    day = dt.datetime(2024, 7, 3, tzinfo=dt.UTC)
    before = len(receiver.messages())
    dr = airflow_home.dag("fk_unit_notify").test(
        logical_date=day,
        run_after=day,
        run_conf={"alert_base": receiver.url(path="notify")},
    )
    assert dr.state == "failed"
    alerts = [a for a in receiver.wait_for(before + 1, 30)[before:] if dr.run_id in json.dumps(a)]
    assert [a["_path"] for a in alerts] == ["/notify/fk_unit_notify"]
    assert "gave up" in alerts[0]["title"]
    store_root = Path(os.environ["FK_UNIT_STORE"].removeprefix("file://") + "-notify-20240703")
    assert store_root.is_dir() and any(store_root.rglob("*"))
    assert not list(airflow_home.root.glob("*{{*")), "an unrendered template named a store"


def _heartbeat_timeout_request(dr, task_id: str):
    """The callback request the scheduler sends the DAG processor when a try stops heartbeating."""
    from airflow.api_fastapi.execution_api.datamodels.taskinstance import (
        DagRun as DRDataModel,
    )
    from airflow.api_fastapi.execution_api.datamodels.taskinstance import TIRunContext
    from airflow.callbacks.callback_requests import TaskCallbackRequest
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState

    with create_session() as s:
        ti = (
            s.query(TaskInstance)
            .filter_by(dag_id=dr.dag_id, run_id=dr.run_id, task_id=task_id)
            .one()
        )
        return TaskCallbackRequest(
            filepath=ti.dag_model.relative_fileloc or "",
            bundle_name="dags-folder",
            bundle_version=None,
            ti=ti,
            msg="Task Instance did not send heartbeats (test)",
            task_callback_type=TaskInstanceState.UP_FOR_RETRY,
            context_from_server=TIRunContext(
                dag_run=DRDataModel.model_validate(ti.dag_run, from_attributes=True),
                max_tries=ti.max_tries,
                variables=[],
                connections=[],
                xcom_keys_to_clear=[],
            ),
        )


def test_dag_processor_callback_reads_the_rendered_store(airflow_home, receiver):
    """A heartbeat-timeout callback run as the DAG processor runs it reports real progress."""
    import structlog
    from airflow.dag_processing.dagbag import BundleDagBag
    from airflow.dag_processing.processor import _execute_task_callbacks

    day = dt.datetime(2024, 7, 2, tzinfo=dt.UTC)
    dr = airflow_home.dag("fk_unit_templated").test(logical_date=day, run_after=day)
    assert dr.state == "success"
    k = stage_key("fk_unit_templated", dr.run_id, "work", -1)
    rendered = CheckpointStore(os.environ["FK_UNIT_STORE"] + "-ck-20240702")
    assert len(rendered.read_view(k).units) == 3  # the try's progress, in the rendered store

    before = len(receiver.messages())
    dagbag = BundleDagBag(  # as the DAG processor parses a file for its callbacks
        dag_folder=str(airflow_home.dags / "fk_unit_templated.py"),
        bundle_path=airflow_home.dags,
        bundle_name="dags-folder",
        load_op_links=False,
    )
    _execute_task_callbacks(dagbag, _heartbeat_timeout_request(dr, "work"), structlog.get_logger())
    alerts = [a for a in receiver.wait_for(before + 1, 30)[before:] if dr.run_id in json.dumps(a)]
    assert len(alerts) == 1, alerts
    assert "retry scheduled" in alerts[0]["title"]
    assert "Kept: 3 unit(s) done" in alerts[0]["message"], alerts[0]["message"]
    assert not list(airflow_home.root.glob("*{{*")), "an unrendered template named a store"
