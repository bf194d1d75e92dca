"""A real Airflow 3.3 deployment on loopback: metadata DB, scheduler, API server, DAG processor.

Used by the tests, the benchmarks and ``faultkit demo --engine airflow``::

    with airflow_env(tmpdir, env={"AIRFLOW_VAR_FAULTKIT_SINK_URL": url}) as af:
        run_id = af.trigger("faultkit_etl", {"partitions": 4})
        assert af.wait(run_id) == "success"

Everything runs as child processes of the caller, in their own process groups, configured only
through environment variables (nothing is written to the user's ``airflow.cfg``). The executor
is ``LocalExecutor``; the metadata DB is SQLite in the temp folder unless ``db_url`` names
another one (e.g. a :class:`faultkit.testing.PostgresServer`). With ``host=`` the components
run on a test host (:class:`faultkit.testing.Host`) and listen on its address; with
``celery_broker=`` the executor is the ``CeleryExecutor`` and :meth:`AirflowEnv.celery_worker`
starts ``airflow celery worker`` on other hosts. :func:`local_airflow` is the
light form for ``dag.test()``: a migrated SQLite DB and no components.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ._services import _port_open, free_port

__all__ = ["AirflowEnv", "airflow_env", "kill_task_process", "local_airflow"]


REPO = Path(__file__).resolve().parents[2]
COMPONENTS = ("scheduler", "api-server", "dag-processor")
TERMINAL = frozenset({"success", "failed"})


def _wait(cond: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _airflow_bin() -> str:
    cand = Path(sys.executable).with_name("airflow")
    return str(cand) if cand.exists() else "airflow"


class AirflowEnv:
    """A running deployment: trigger DAG runs, wait for them, read task instances and logs.

    Attributes:
        home: the ``AIRFLOW_HOME`` folder (logs under ``home/logs``).
        env: the environment every component (and :meth:`cli`) runs with.
        api_url: the API server's base URL.
        db_url: the metadata DB's SQLAlchemy URL.
    """

    def __init__(
        self, home: Path, env: dict[str, str], api_port: int, db_url: str, host: Any = None
    ) -> None:
        self.home = home
        self.env = env
        self.api_port = api_port
        self.host = host
        self.ip = host.ip if host is not None else "127.0.0.1"
        self.api_url = f"http://{self.ip}:{api_port}"
        self.db_url = db_url
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._runs: dict[str, str] = {}
        self._engine: Any = None

    # -- processes ---------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 180, check: bool = True) -> str:
        """Run ``airflow ARGS`` with this deployment's environment; returns stdout."""
        run = self.host.run if self.host is not None else subprocess.run
        proc = run(
            [_airflow_bin(), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.home,
        )
        if check and proc.returncode:
            raise RuntimeError(
                f"'airflow {' '.join(args)}' exited {proc.returncode}:\n{proc.stderr[-3000:]}"
            )
        return proc.stdout

    def start(self, components: tuple[str, ...] = COMPONENTS) -> None:
        """Start the components as children in their own process groups."""
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        popen = self.host.popen if self.host is not None else subprocess.Popen
        for name in components:
            out = open(logs / f"{name}.out", "ab")
            self.procs[name] = popen(
                [_airflow_bin(), name],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.home,
                start_new_session=True,
            )
            out.close()
        _wait(lambda: self._api_up() or self._dead(), 180, "the Airflow API server")
        self.check_alive()

    def _api_up(self) -> bool:
        return self._call(lambda: _port_open(self.api_port, self.ip))

    def _call(self, fn: Any) -> Any:
        """``fn()``, inside the deployment's host when it has one (its address is there)."""
        return self.host.call(fn) if self.host is not None else fn()

    def celery_worker(self, host: Any, name: str, env: Mapping[str, str] | None = None) -> Any:
        """Start ``airflow celery worker`` (one task at a time) on test host ``host``."""
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"worker-{name}.out", "ab") as out:
            proc = host.popen(
                [_airflow_bin(), "celery", "worker", "--concurrency", "1",
                 "--celery-hostname", f"{name}@%h", "--skip-serve-logs"],
                env={**self.env, **dict(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.home, start_new_session=True,
            )  # fmt: skip
        self.procs[f"worker-{name}"] = proc
        return proc

    def _dead(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is not None]

    def check_alive(self) -> None:
        """Raise ``RuntimeError`` (with their output) if any component has exited."""
        dead = self._dead()
        if dead:
            tail = "".join(self.component_log(n)[-2000:] for n in dead)
            raise RuntimeError(f"Airflow component(s) {dead} exited; their output ends:\n{tail}")

    def component_log(self, name: str) -> str:
        """What a component wrote to stdout/stderr so far."""
        p = self.home / "logs" / f"{name}.out"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self) -> None:
        """SIGTERM each component's process group, then SIGKILL what is left."""
        for p in self.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, deadline - time.monotonic()))
        for p in self.procs.values():
            # The group may still hold executor workers or task processes.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)
        if self._engine is not None:
            self._engine.dispose()

    # -- metadata DB ---------------------------------------------------------------------

    def query(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        """Run a read-only SQL query on the metadata DB."""
        import sqlalchemy as sa

        def run() -> list[dict[str, Any]]:
            if self._engine is None:
                self._engine = sa.create_engine(self.db_url)
            with self._engine.connect() as c:
                return [dict(r._mapping) for r in c.execute(sa.text(sql), params)]

        return self._call(run)

    def wait_parsed(self, *dag_ids: str, timeout: float = 180) -> None:
        """Wait until the DAG processor has serialised every DAG in ``dag_ids``."""

        def parsed() -> bool:
            self.check_alive()
            rows = self.query("SELECT DISTINCT dag_id FROM serialized_dag")
            return set(dag_ids) <= {r["dag_id"] for r in rows}

        try:
            _wait(parsed, timeout, f"the DAG processor to parse {sorted(dag_ids)}", interval=0.5)
        except TimeoutError:
            errors = self.query("SELECT filename, stacktrace FROM import_error")
            raise TimeoutError(
                f"DAGs {sorted(dag_ids)} not parsed; import errors: {errors}"
            ) from None

    # -- runs ------------------------------------------------------------------------------

    def trigger(self, dag_id: str, conf: Mapping[str, Any] | None = None) -> str:
        """Trigger a run of ``dag_id`` with ``conf`` (through the CLI); returns its run id."""
        self.wait_parsed(dag_id)
        run_id = f"manual__{uuid.uuid4().hex[:12]}"
        conf_json = json.dumps(dict(conf or {}))
        self.cli("dags", "trigger", dag_id, "--run-id", run_id, "--conf", conf_json)
        self._runs[run_id] = dag_id
        return run_id

    def run_state(self, run_id: str) -> str | None:
        """The DAG run's state (``queued``, ``running``, ``success``, ``failed``) or None."""
        rows = self.query("SELECT state FROM dag_run WHERE run_id = :r", r=run_id)
        return rows[0]["state"] if rows else None

    def wait(self, run_id: str, timeout: float = 300) -> str:
        """Wait until the run is ``success`` or ``failed``; returns that state."""

        def done() -> str | None:
            self.check_alive()
            state = self.run_state(run_id)
            return state if state in TERMINAL else None

        return _wait(done, timeout, f"DAG run {run_id!r} to finish", interval=0.5)

    def task_instances(self, run_id: str) -> list[dict[str, Any]]:
        """``task_id``, ``map_index``, ``state``, ``try_number``, ``pid`` of every TI of a run."""
        return self.query(
            "SELECT task_id, map_index, state, try_number, max_tries, pid, hostname "
            "FROM task_instance WHERE run_id = :r ORDER BY task_id, map_index",
            r=run_id,
        )

    def task_logs(self, run_id: str | None = None) -> str:
        """Every task log written so far (of one run, or all runs), concatenated."""
        root = self.home / "logs"
        parts = []
        for p in sorted(root.rglob("*.log")):
            if run_id is None or f"run_id={run_id}" in str(p):
                parts.append(f"==> {p.relative_to(root)} <==\n{p.read_text(errors='replace')}")
        return "\n".join(parts)


def _config(
    home: Path, api_port: int, db_url: str, heartbeat_timeout: float, dags: Path,
    ip: str = "127.0.0.1", celery_broker: str | None = None,
) -> dict:  # fmt: skip
    a = "AIRFLOW__"
    celery = {}
    if celery_broker:
        celery = {
            f"{a}CORE__EXECUTOR": "CeleryExecutor",
            f"{a}CELERY__BROKER_URL": celery_broker,
            f"{a}CELERY__RESULT_BACKEND": "db+" + db_url,
            f"{a}CELERY__WORKER_CONCURRENCY": "1",
            f"{a}CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
            f"{a}CELERY__SYNC_PARALLELISM": "1",
        }
    return {
        "AIRFLOW_HOME": str(home),
        f"{a}CORE__DAGS_FOLDER": str(dags),
        f"{a}CORE__LOAD_EXAMPLES": "False",
        f"{a}CORE__EXECUTOR": "LocalExecutor",
        f"{a}CORE__PARALLELISM": "4",
        f"{a}CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        f"{a}CORE__EXECUTION_API_SERVER_URL": f"http://{ip}:{api_port}/execution/",
        f"{a}CORE__FERNET_KEY": "",
        f"{a}CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        f"{a}CORE__KILLED_TASK_CLEANUP_TIME": "5",
        f"{a}DATABASE__SQL_ALCHEMY_CONN": db_url,
        f"{a}DATABASE__CHECK_MIGRATIONS": "False",
        f"{a}API__HOST": ip,
        f"{a}API__PORT": str(api_port),
        f"{a}API__BASE_URL": f"http://{ip}:{api_port}",
        f"{a}API__WORKERS": "1",
        f"{a}API__SECRET_KEY": secrets.token_hex(16),
        f"{a}API_AUTH__JWT_SECRET": secrets.token_hex(32),
        f"{a}SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
        f"{a}SCHEDULER__JOB_HEARTBEAT_SEC": "1",
        f"{a}SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.2",
        f"{a}SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(int(heartbeat_timeout)),
        f"{a}SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "1",
        f"{a}SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "30",
        f"{a}SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        f"{a}WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
        f"{a}DAG_PROCESSOR__PARSING_PROCESSES": "1",
        f"{a}DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        f"{a}DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "60",
        f"{a}DAG_PROCESSOR__PRINT_STATS_INTERVAL": "600",
        f"{a}DAG_PROCESSOR__BUNDLE_REFRESH_CHECK_INTERVAL": "1",
        f"{a}LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        f"{a}LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        f"{a}LOGGING__COLORED_CONSOLE_LOG": "False",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "NO_PROXY": f"{ip},127.0.0.1,localhost",
        "no_proxy": f"{ip},127.0.0.1,localhost",
        **celery,
    }


@contextlib.contextmanager
def airflow_env(
    tmpdir: str | os.PathLike[str],
    *,
    env: Mapping[str, str] | None = None,
    dags_folder: str | os.PathLike[str] | None = None,
    db_url: str | None = None,
    heartbeat_timeout: float = 300,
    components: tuple[str, ...] = COMPONENTS,
    host: Any = None,
    celery_broker: str | None = None,
) -> Iterator[AirflowEnv]:
    """Migrate a fresh metadata DB and run scheduler, API server and DAG processor.

    Args:
        tmpdir: becomes ``AIRFLOW_HOME`` (created if missing).
        env: extra environment (``AIRFLOW_CONN_*``, ``AIRFLOW_VAR_*``, ``AIRFLOW__...``).
        dags_folder: defaults to the repository's ``dags/``.
        db_url: metadata DB; defaults to SQLite in ``tmpdir``.
        heartbeat_timeout: ``[scheduler] task_instance_heartbeat_timeout`` in seconds: how
            long a task whose supervisor vanished stays ``running`` before it is retried.
        components: which Airflow commands to start.
        host: a :class:`~faultkit.testing.Host` to run the components on (they listen on its
            address; this process reaches them, and the DB, through its namespace).
        celery_broker: a broker URL: run the ``CeleryExecutor`` (the result backend is the
            metadata DB, which must then be PostgreSQL); start workers with
            :meth:`AirflowEnv.celery_worker`.

    Yields:
        The running :class:`AirflowEnv`; everything is stopped on exit.
    """
    home = Path(tmpdir).resolve()
    home.mkdir(parents=True, exist_ok=True)
    api_port = 8080 if host is not None else free_port()
    db_url = db_url or f"sqlite:///{home / 'airflow.db'}"
    dags = Path(dags_folder) if dags_folder else REPO / "dags"
    full = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW__", "AIRFLOW_CONN_"))}
    ip = host.ip if host is not None else "127.0.0.1"
    full.update(_config(home, api_port, db_url, heartbeat_timeout, dags, ip, celery_broker))
    full.update(env or {})
    af = AirflowEnv(home, full, api_port, db_url, host)
    af.cli("db", "migrate", timeout=300)
    try:
        af.start(components)
        yield af
    finally:
        af.stop()


@contextlib.contextmanager
def local_airflow(
    tmpdir: str | os.PathLike[str],
    *,
    dags_folder: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[Path]:
    """Point this process at a fresh SQLite metadata DB, for ``dag.test()`` (no components).

    Sets the environment (so child processes inherit it), runs ``airflow db migrate`` and
    re-reads Airflow's settings if Airflow was already imported. The environment is
    restored on exit.

    Yields:
        ``AIRFLOW_HOME``.
    """
    home = Path(tmpdir).resolve()
    home.mkdir(parents=True, exist_ok=True)
    new = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(Path(dags_folder) if dags_folder else REPO / "dags"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__DATABASE__CHECK_MIGRATIONS": "False",
        "AIRFLOW__CORE__FERNET_KEY": "",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        **dict(env or {}),
    }
    old = {k: os.environ.get(k) for k in new}
    os.environ.update(new)
    try:
        proc = subprocess.run(
            [_airflow_bin(), "db", "migrate"],
            env=dict(os.environ),
            capture_output=True,
            text=True,
            timeout=300,
            cwd=home,
        )
        if proc.returncode:
            raise RuntimeError(f"'airflow db migrate' failed:\n{proc.stderr[-3000:]}")
        if "airflow.settings" in sys.modules:
            from airflow import settings

            settings.configure_vars()
            settings.configure_orm()
        yield home
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def kill_task_process(pid: int, *, timeout: float = 30.0) -> bool:
    """SIGKILL a live Airflow task process (or supervisor) and wait until it is gone.

    Returns:
        True if the signal reached a running process and that process then ended; False if
        ``pid`` had already exited (or is a zombie) or is not an Airflow process.
    """
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE or "airflow" not in " ".join(proc.cmdline()):
            return False
        proc.send_signal(signal.SIGKILL)  # psutil refuses if the pid was reused meanwhile
    except psutil.Error:
        return False

    def gone() -> bool:
        try:
            return proc.status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True

    _wait(gone, timeout, f"task process {pid} to end after SIGKILL", interval=0.05)
    return True
