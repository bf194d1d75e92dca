"""Worker loss on a real Airflow 3.3 deployment: scheduler, API server, DAG processor, executor.

One AIRFLOW_HOME (SQLite metadata DB) and one set of components serve the whole module. The
tests trigger the example DAGs, SIGKILL a task process (or its supervisor) mid-stage and check
what a user cares about: the run succeeds, the retry resumed (epoch 2) without redoing
committed units, the sink holds every row once, the weights equal an uninterrupted run's,
exactly one alert arrived, and no secret reached a task log.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from faultkit import CheckpointStore
from faultkit.testing import AlertReceiver, kill_task_process, wait_until

psutil = pytest.importorskip("psutil")
if importlib.util.find_spec("airflow.sdk") is None:
    pytest.skip(
        "apache-airflow is not installed (pip install 'faultkit[airflow]')", allow_module_level=True
    )

from airflow_provider import get_provider_info  # noqa: E402
from airflow_provider._common import stage_key  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

S3_SECRET = f"s3secret-{uuid.uuid4().hex}"
ALERT_SECRET = f"alertpw{uuid.uuid4().hex[:16]}"
HEARTBEAT_TIMEOUT = 10
REPO = Path(__file__).resolve().parents[1]

LEAKY_DAG = """
from __future__ import annotations

import logging
from datetime import datetime
from urllib.parse import urlsplit

from airflow.sdk import DAG

from airflow_provider.hooks import CheckpointHook
from airflow_provider.operators import ResumablePythonOperator


def leaky(*, stage):
    hook = CheckpointHook()
    # A careless task logs what it read; the masker must hide the credentials.
    logging.getLogger("airflow.task").info("settings %s", hook.settings().storage_options)
    logging.getLogger("airflow.task").info("alerts %s", hook.alert_urls())
    logging.getLogger("airflow.task").info("token %s", urlsplit(hook.alert_urls()[0]).password)
    conn = hook.get_connection("faultkit_default")
    logging.getLogger("airflow.task").info("password %s", conn.password)
    logging.getLogger("airflow.task").info("extra %s", conn.extra_dejson)
    return "ok"


with DAG("fk_unit_leaky", schedule=None, start_date=datetime(2024, 1, 1), catchup=False) as dag:
    ResumablePythonOperator(task_id="work", python_callable=leaky)

"""

# A resumable task whose store_url is templated, alerted on by FaultkitNotifier: the heartbeat-
# timeout callback runs in the DAG processor, with the task as parsed (template unrendered);
# the resumed try reports the lost one too (alerts=), deduplicated in the same store.
TEMPLATED_DAG = """
from __future__ import annotations

import time
from datetime import datetime, timedelta

from airflow.sdk import DAG

from airflow_provider.notifications import FaultkitNotifier
from airflow_provider.operators import ResumablePythonOperator

NOTIFY = FaultkitNotifier()


def slow(*, stage):
    for u in stage.pending(range(16)):
        time.sleep(0.5)
        stage.done(u)
    return stage.epoch


with DAG("fk_templated", schedule=None, start_date=datetime(2024, 1, 1), catchup=False,
         default_args={"on_retry_callback": NOTIFY, "on_failure_callback": NOTIFY}) as dag:
    ResumablePythonOperator(task_id="work", python_callable=slow, retries=2,
                            retry_delay=timedelta(seconds=1), alerts=["ALERT_URL"],
                            store_url="STORE_ROOT/ck-{{ ds_nodash }}")
"""


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """Migrate a DB and start scheduler, API server and DAG processor once for the module."""
    from faultkit.testing import airflow_env

    home = tmp_path_factory.mktemp("airflow")
    dags = home / "dags"  # the example DAGs as shipped, plus one that logs secrets by mistake
    dags.mkdir()
    for f in ("faultkit_etl.py", "faultkit_train.py"):
        shutil.copy(REPO / "dags" / f, dags / f)
    (dags / "fk_leaky.py").write_text(LEAKY_DAG)
    receiver = AlertReceiver().start()
    (dags / "fk_templated.py").write_text(
        TEMPLATED_DAG.replace("STORE_ROOT", f"file://{home}").replace(
            "ALERT_URL", receiver.url(path="templated")
        )
    )
    store_url = f"file://{home}/store"
    sink_url = f"sqlite:///{home}/sink.db"
    conn = {
        "conn_type": "faultkit",
        "login": "AKIAEXAMPLE",
        "password": S3_SECRET,
        "extra": {
            "store_url": store_url,
            "alert_urls_secret": f"json://alerts:{ALERT_SECRET}@127.0.0.1:{receiver.port}/hook",
        },
    }
    env = {
        "AIRFLOW_CONN_FAULTKIT_DEFAULT": json.dumps(conn),
        "AIRFLOW_VAR_FAULTKIT_SINK_URL": sink_url,
        "FAULTKIT_DEMO_RETRY_WAIT": "1",
    }
    try:
        with airflow_env(
            home / "home", env=env, dags_folder=dags, heartbeat_timeout=HEARTBEAT_TIMEOUT
        ) as af:
            af.wait_parsed(
                "faultkit_etl", "faultkit_train", "fk_unit_leaky", "fk_templated", timeout=240
            )
            yield SimpleNamespace(
                af=af,
                home=home,
                receiver=receiver,
                store=CheckpointStore(store_url),
                sink_url=sink_url,
            )
    finally:
        receiver.stop()


def _task_process(af, run_id: str, task_id: str, map_index: int = -1):
    """The running task process of a TI: its title is 'airflow worker -- <ti id>'."""
    rows = af.query(
        "SELECT id FROM task_instance WHERE run_id = :r AND task_id = :t AND map_index = :m",
        r=run_id,
        t=task_id,
        m=map_index,
    )
    if not rows:
        return None
    # SQLite stores the UUID as 32 hex digits; the process title has the hyphenated form.
    marker = f"airflow worker -- {uuid.UUID(str(rows[0]['id']))}"
    for p in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(p.info["cmdline"] or []):
                return p
        except psutil.Error:
            continue
    return None


def _alerts_for(receiver, run_id: str) -> list[dict]:
    return [m for m in receiver.messages() if run_id in json.dumps(m)]


def _kill_when(dep, run_id, task_id, map_index, ready, what, *, supervisor=False):
    """Wait until ``ready(view)`` holds for the stage, then SIGKILL its task (or supervisor)."""
    k = stage_key(
        "faultkit_etl" if task_id == "load" else "faultkit_train", run_id, task_id, map_index
    )
    wait_until(
        lambda: dep.af.run_state(run_id) in ("success", "failed") or ready(dep.store.read_view(k)),
        240,
        what,
        interval=0.05,
    )
    proc = _task_process(dep.af, run_id, task_id, map_index)
    assert proc is not None, f"no live task process for {task_id}[{map_index}] (it finished first?)"
    view = dep.store.read_view(k)
    target = proc.parent() if supervisor else proc
    assert target is not None and target.pid > 1
    assert kill_task_process(target.pid), "the SIGKILL did not land"
    return k, view, proc


def _sink_check(dep, table: str) -> dict:
    from faultkit.demo import check_sink

    return check_sink(dep.sink_url, table)


def test_etl_task_process_sigkilled_resumes_exactly_once(deployment):
    """A SIGKILLed mapped ETL task is retried, resumes at epoch 2 and loads every row once."""
    dep = deployment
    table = "orders_task_kill"
    run_id = dep.af.trigger(
        "faultkit_etl", {"partitions": 3, "rows": 200, "unit_delay": 0.4, "table": table}
    )
    k, before, _ = _kill_when(
        dep, run_id, "load", 1, lambda v: len(v.units) >= 1, "load[1] to commit a chunk"
    )
    assert 1 <= len(before.units) < 4, "the kill must land mid-stage"

    assert dep.af.wait(run_id, timeout=240) == "success"
    tis = {(t["task_id"], t["map_index"]): t for t in dep.af.task_instances(run_id)}
    assert tis[("load", 1)]["try_number"] == 2
    assert tis[("load", 0)]["try_number"] == 1

    after = dep.store.read_view(k)
    assert after.epoch == 2
    # Chunks committed before the kill kept their epoch-1 record: none was redone.
    for uid in before.units:
        assert after.units[uid].epoch == 1
    assert len(after.units) == 4
    assert _sink_check(dep, table) == {"rows": 600, "distinct": 600, "duplicates": 0}

    alerts = wait_until_alerts(dep.receiver, run_id, 1)
    assert len(alerts) == 1, alerts
    assert "retry scheduled" in alerts[0]["title"] and k in alerts[0]["title"]
    # Whichever path noticed first (the DAG processor's retry callback or the resumed try)
    # wrote it; it names the try and what was lost.
    assert "try 1" in alerts[0]["message"] and "Lost:" in alerts[0]["message"]


def test_train_task_process_sigkilled_resumes_bitwise(deployment):
    """A SIGKILLed training task resumes from its snapshot and ends with identical weights."""
    dep = deployment
    run_id = dep.af.trigger(
        "faultkit_train", {"steps": 60, "every_steps": 10, "step_delay": 0.05, "verify": True}
    )
    k, before, _ = _kill_when(
        dep,
        run_id,
        "train",
        -1,
        lambda v: any(s.step >= 10 for s in v.live_snaps()),
        "the first training snapshot",
    )
    last_step = max(s.step for s in before.live_snaps())
    assert last_step < 59, "the kill must land before training ends"

    assert dep.af.wait(run_id, timeout=300) == "success"  # 'verify' compares the weights
    tis = {t["task_id"]: t for t in dep.af.task_instances(run_id)}
    assert tis["train"]["try_number"] == 2
    assert tis["verify"]["state"] == "success"
    after = dep.store.read_view(k)
    assert after.epoch == 2
    assert all(s.epoch == 1 for s in after.live_snaps() if s.step <= last_step)

    from faultkit.demo import reference_train

    digest = dep.af.query(
        "SELECT value FROM xcom WHERE run_id = :r AND task_id = 'train' AND key = 'return_value'",
        r=run_id,
    )[0]["value"]
    assert json.loads(digest) == reference_train(60, 0)

    alerts = wait_until_alerts(dep.receiver, run_id, 1)
    assert len(alerts) == 1, alerts


def test_supervisor_sigkilled_heartbeat_timeout_one_alert(deployment):
    """Killing the supervisor leads to a heartbeat timeout, one alert, and an exact resume."""
    dep = deployment
    table = "orders_supervisor_kill"
    run_id = dep.af.trigger(
        "faultkit_etl", {"partitions": 2, "rows": 300, "unit_delay": 0.5, "table": table}
    )
    k, before, task_proc = _kill_when(
        dep,
        run_id,
        "load",
        0,
        lambda v: len(v.units) >= 1,
        "load[0] to commit a chunk",
        supervisor=True,
    )
    assert len(before.units) < 6

    assert dep.af.wait(run_id, timeout=300) == "success"
    tis = {(t["task_id"], t["map_index"]): t for t in dep.af.task_instances(run_id)}
    assert tis[("load", 0)]["try_number"] == 2
    after = dep.store.read_view(k)
    assert after.epoch == 2
    for uid in before.units:
        assert after.units[uid].epoch == 1
    assert _sink_check(dep, table) == {"rows": 600, "distinct": 600, "duplicates": 0}

    # The DAG processor ran the retry callback for the heartbeat timeout...
    wait_until(
        lambda: (
            "heartbeat timeout"
            in json.dumps(
                dep.af.query("SELECT event, extra FROM log WHERE run_id = :r", r=run_id)
            ).lower()
        ),
        60,
        "the scheduler to record the heartbeat timeout",
    )
    alerts = wait_until_alerts(dep.receiver, run_id, 1)
    # ... and that path, the orphaned task and the resumed try together sent one alert.
    assert len(alerts) == 1, alerts
    assert "retry scheduled" in alerts[0]["title"]
    if task_proc.is_running():  # an orphan still working is fenced, never duplicated
        task_proc.kill()


def test_no_secret_in_task_logs(deployment):
    """The connection's secrets never appear in task logs, even when a task logs them."""
    run_id = deployment.af.trigger("fk_unit_leaky")
    assert deployment.af.wait(run_id, timeout=120) == "success"
    leaky = deployment.af.task_logs(run_id)
    assert "alerts [" in leaky and "***" in leaky, "the careless task's lines are missing"
    logs = deployment.af.task_logs()
    assert "faultkit stage" in logs, "task logs were not written where expected"
    assert S3_SECRET not in logs
    assert ALERT_SECRET not in logs


def wait_until_alerts(receiver: AlertReceiver, run_id: str, n: int) -> list[dict]:
    """Wait for ``n`` alerts about ``run_id``, then give a duplicate time to show up."""
    wait_until(lambda: len(_alerts_for(receiver, run_id)) >= n, 60, f"{n} alert(s) for {run_id}")
    # A duplicate would come from another process within a second or two of the first.
    try:
        wait_until(lambda: len(_alerts_for(receiver, run_id)) > n, 3, "a duplicate alert")
    except TimeoutError:
        pass
    return _alerts_for(receiver, run_id)


def test_templated_store_heartbeat_timeout_one_alert_with_real_progress(deployment):
    """A lost try of a task with a templated store_url gives one alert stating its progress."""
    dep = deployment
    run_id = f"manual__{uuid.uuid4().hex[:12]}"
    dep.af.cli(
        "dags",
        "trigger",
        "fk_templated",
        "--run-id",
        run_id,
        "--logical-date",
        "2024-03-05T00:00:00+00:00",
    )
    store = CheckpointStore(f"file://{dep.home}/ck-20240305")
    k = stage_key("fk_templated", run_id, "work", -1)
    wait_until(
        lambda: (
            dep.af.run_state(run_id) in ("success", "failed") or len(store.read_view(k).units) >= 2
        ),
        240,
        "fk_templated.work to commit two units",
        interval=0.05,
    )
    proc = _task_process(dep.af, run_id, "work")
    assert proc is not None, "no live task process (it finished first?)"
    # The supervisor first (no heartbeat, no report: a heartbeat timeout), then the orphaned
    # task, so the progress the alert must state stops changing.
    assert kill_task_process(proc.parent().pid), "the supervisor's SIGKILL did not land"
    assert kill_task_process(proc.pid), "the task's SIGKILL did not land"
    done = len(store.read_view(k).units)
    assert 2 <= done < 16, "the kill must land mid-stage"

    assert dep.af.wait(run_id, timeout=300) == "success"
    assert store.read_view(k).epoch == 2
    wait_until(
        lambda: bool(
            dep.af.query(
                "SELECT 1 FROM log WHERE run_id = :r AND event = 'heartbeat timeout'", r=run_id
            )
        ),
        60,
        "the scheduler to record the heartbeat timeout",
    )
    # The DAG processor's callback and the resumed try each build the alert; whichever
    # comes second finds it already sent in the stage's store and logs the suppression.
    wait_until(
        lambda: (
            f"for {k} suppressed" in dep.af.task_logs()
            or len(_alerts_for(dep.receiver, run_id)) > 1
        ),
        120,
        "the second path (DAG processor callback or resumed try) to report the lost try",
    )
    alerts = wait_until_alerts(dep.receiver, run_id, 1)
    assert len(alerts) == 1, alerts
    assert "retry scheduled" in alerts[0]["title"] and k in alerts[0]["title"]
    assert f"Kept: {done} unit(s) done" in alerts[0]["message"], alerts[0]["message"]
    assert not list(dep.home.glob("*{{*")), "an unrendered store_url named a store"


def _api(af, method: str, path: str, body: dict | None = None):
    """One JSON request to the API server (all users are admins in this deployment)."""
    req = urllib.request.Request(
        af.api_url + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=60) as r:
        return json.loads(r.read() or b"null")


def test_connection_api_hides_alert_tokens(deployment):
    """The REST API shows a connection's Slack/PagerDuty tokens as ***; a UI edit keeps them."""
    af = deployment.af
    fields = get_provider_info()["connection-types"][0]["conn-fields"]
    # The key the UI's connection form stores the "Alert URLs" field under.
    (alert_key,) = [name for name, f in fields.items() if f["label"] == "Alert URLs"]
    slack = f"xoxb{uuid.uuid4().hex}"
    pagerduty = f"pd{uuid.uuid4().hex}"
    urls = f"slack://T0AAAA/B0BBBB/{slack}/#ops, pagerduty://{pagerduty}@R0UT1NGKEY1234"
    extra = {"store_url": f"file://{deployment.home}/api-store", alert_key: urls}
    _api(
        af,
        "POST",
        "/api/v2/connections",
        {"connection_id": "fk_alerting", "conn_type": "faultkit", "extra": json.dumps(extra)},
    )
    shown = _api(af, "GET", "/api/v2/connections/fk_alerting")
    listed = _api(af, "GET", "/api/v2/connections")
    for text in (json.dumps(shown), json.dumps(listed)):
        assert slack not in text and pagerduty not in text
    assert json.loads(shown["extra"])[alert_key] == "***"
    assert json.loads(shown["extra"])["store_url"] == extra["store_url"]

    # The UI's edit form sends back what it was shown: the tokens must survive that.
    _api(af, "PATCH", "/api/v2/connections/fk_alerting", {**shown, "description": "edited"})
    (row,) = af.query("SELECT extra, description FROM connection WHERE conn_id = 'fk_alerting'")
    assert row["description"] == "edited"
    assert json.loads(row["extra"])[alert_key] == urls
