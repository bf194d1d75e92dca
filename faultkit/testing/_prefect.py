"""A real Prefect stack on loopback for the tests, the benchmarks and the demo: server,
blocks, served flows.

``PrefectStack`` starts ``prefect server start`` in a temporary ``PREFECT_HOME`` (SQLite) on a
free 127.0.0.1 port, saves the ``faultkit-demo`` blocks, runs ``flows/serve.py`` (which
creates the crash-retry automations and serves ``etl`` and ``train``), and can start flow
runs, wait for their states, find the process running one, and SIGKILL things::

    with PrefectStack(store_url=..., alert_urls=[...], retry=policy) as stack:
        run_id = stack.run("faultkit-etl/etl", {"sink_url": ...})
        stack.wait(run_id, "COMPLETED", timeout=120)

``faultkit demo --engine prefect`` (``faultkit/demo/_prefect.py``) runs both deployments on
such a stack and SIGKILLs their flow-run processes while they work.

Prefect is imported lazily; it needs ``pip install 'faultkit[prefect]'``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ._services import free_port, wait_until

if TYPE_CHECKING:
    from .._store import CheckpointStore

_T = TypeVar("_T")

__all__ = ["BLOCK", "PrefectStack", "flows_dir", "units_done"]


BLOCK = "faultkit-demo"

# Server services the crash-retry path does not use (triggers and the task-run recorder stay).
_IDLE_SERVICES = (
    "EVENT_PERSISTER",
    "EVENT_LOGGER",
    "FOREMAN",
    "LATE_RUNS",
    "PAUSE_EXPIRATIONS",
    "CANCELLATION_CLEANUP",
    "REPOSSESSOR",
    "CLEANUP_RECONCILER",
)


def flows_dir() -> Path:
    """The checkout's ``flows/`` directory (the example flows are not installed)."""
    root = Path(__file__).resolve().parents[2]
    path = root / "flows"
    if not (path / "serve.py").exists():
        raise FileNotFoundError(
            f"the example flows are not at {str(path)!r}; run the Prefect demo from a "
            "checkout of faultkit (they live in its flows/ directory)"
        )
    return path


class PrefectStack:
    """A Prefect server, the ``faultkit-demo`` blocks and a process serving the flows.

    Args:
        store_url: the checkpoint store the flows use (saved as a ``CheckpointStoreBlock``).
        alert_urls: Apprise URLs for the ``AlertBlock``.
        retry: a ``faultkit.RetryPolicy`` saved as the ``RetryPolicyBlock`` (its
            ``infra_attempts`` is the crash-retry budget). Default: 3 runs in all.
        workdir: where the server's home and logs go (a temp dir, removed on exit, if None).
        heartbeat_grace: seconds without a heartbeat before a run is declared Crashed.
        zombies: create the heartbeat (zombie) automation too. Without it only runs whose
            runner saw the process die are marked Crashed; with it, on SQLite, a state event
            whose trigger evaluation loses the write lock four times is dropped and the next
            re-run of that flow run waits out Prefect's 15-minute causal-ordering lookback.
        poll_seconds: how often the serving process looks for runs to start.
        host: a :class:`~faultkit.testing.Host` to run the server on (it listens on the
            host's address; this process's API calls go through the host's namespace).
        serve: also run ``flows/serve.py`` (off when workers of a work pool run the flows).
        db_url: the server's database (``postgresql+asyncpg://...``), as a production server
            runs; default a SQLite file in ``workdir``. On SQLite one writer at a time holds
            the lock, and a trigger evaluation that loses it four times is dropped, so a
            loaded machine can miss a heartbeat window (see ``prefect_blocks._crash``).
    """

    def __init__(
        self,
        *,
        store_url: str,
        alert_urls: Sequence[str] = (),
        retry: Any = None,
        workdir: str | os.PathLike[str] | None = None,
        heartbeat_grace: float = 45.0,
        poll_seconds: float = 1.0,
        zombies: bool = True,
        host: Any = None,
        serve: bool = True,
        db_url: str | None = None,
    ) -> None:
        self.store_url = store_url
        self.alert_urls = list(alert_urls)
        self.retry = retry
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="faultkit-prefect-"))
        self.heartbeat_grace = heartbeat_grace
        self.poll_seconds = poll_seconds
        self.zombies = zombies
        self.host = host
        self.serve = serve
        self.db_url = db_url
        self.port = 4200 if host is not None else free_port()
        self.server: subprocess.Popen[bytes] | None = None
        self.serving: subprocess.Popen[bytes] | None = None
        self._serves = 0
        self._stack = contextlib.ExitStack()

    # -- environment -------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        ip = self.host.ip if self.host is not None else "127.0.0.1"
        return f"http://{ip}:{self.port}/api"

    def env(self) -> dict[str, str]:
        """Environment for processes that talk to this server."""
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env.update(
            {
                "PREFECT_HOME": str(self.workdir / "home"),
                "PREFECT_API_URL": self.api_url,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_UI_ENABLED": "false",
                "PREFECT_RUNNER_POLL_FREQUENCY": str(max(1, round(self.poll_seconds))),
                "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
                "PREFECT_API_DATABASE_CONNECTION_URL": (
                    self.db_url or f"sqlite+aiosqlite:///{self.workdir / 'home' / 'prefect.db'}"
                ),
                "PREFECT_LOGGING_LEVEL": "INFO",
                # SQLite takes one writer at a time: a trigger evaluation that loses the lock
                # four times is dropped, and every later state event of that flow run then
                # waits 15 minutes for it (causal ordering), so no crashed run is re-run.
                # Keep the writers to what the crash-retry path needs.
                "PREFECT_LOGGING_TO_API_ENABLED": "false",
                **{f"PREFECT_SERVER_SERVICES_{s}_ENABLED": "false" for s in _IDLE_SERVICES},
                "FAULTKIT_HEARTBEAT_GRACE": str(self.heartbeat_grace),
                "FAULTKIT_ZOMBIES": "1" if self.zombies else "0",
                "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    @contextlib.contextmanager
    def client_settings(self) -> Iterator[None]:
        """Point this process's Prefect client at the server (a settings context)."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
            yield

    def call(self, fn: Callable[[], _T]) -> _T:
        """``fn()`` with this process's Prefect client pointed at the server, run inside the
        server's host when it has one (so its sockets reach the host's address)."""

        def in_settings() -> _T:
            with self.client_settings():
                return fn()

        return self.host.call(in_settings) if self.host is not None else in_settings()

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> PrefectStack:
        try:
            self.start_server()
            if self.host is None:
                self._stack.enter_context(self.client_settings())
            self.call(self.save_blocks)
            if self.serve:
                self.start_serving()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _log(self, name: str) -> Any:
        return open(self.workdir / name, "ab")

    def start_server(self, timeout: float = 120.0) -> None:
        """Start ``prefect server start`` and wait until ``/api/health`` answers."""
        (self.workdir / "home").mkdir(parents=True, exist_ok=True)
        prefect = str(Path(sys.executable).with_name("prefect"))
        ip = self.host.ip if self.host is not None else "127.0.0.1"
        cmd = [prefect, "server", "start", "--host", ip, "--port", str(self.port)]
        popen = self.host.popen if self.host is not None else subprocess.Popen
        with self._log("server.log") as out:
            self.server = popen(
                cmd,
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def healthy() -> bool:
            if self.server is not None and self.server.poll() is not None:
                raise RuntimeError(
                    f"the Prefect server exited with {self.server.returncode}; see "
                    f"{self.workdir / 'server.log'}"
                )

            def get() -> bool:
                try:
                    with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                        return r.status == 200
                except OSError:
                    return False

            return self.host.call(get) if self.host is not None else get()

        wait_until(healthy, timeout, f"the Prefect server on port {self.port}", interval=0.3)

    def save_blocks(self) -> None:
        """Save the ``faultkit-demo`` store, alert and retry blocks on the server."""
        from prefect_blocks import AlertBlock, CheckpointStoreBlock, RetryPolicyBlock

        CheckpointStoreBlock(url=self.store_url).save(BLOCK, overwrite=True)
        AlertBlock(urls=self.alert_urls, dedupe_window=3600).save(BLOCK, overwrite=True)
        p = self.retry
        fields: dict[str, Any] = {"attempts": 3, "wait_initial": 0.5, "wait_jitter": 0.0}
        if p is not None:
            fields = {
                "attempts": p.attempts,
                "timeout": p.timeout or 1e9,
                "wait_initial": p.wait_initial,
                "wait_max": p.wait_max,
                "wait_exp_base": p.wait_exp_base,
                "wait_jitter": p.wait_jitter,
                "infra_attempts": p.infra_attempts,
            }
        RetryPolicyBlock(retry_on=["infrastructure"], **fields).save(BLOCK, overwrite=True)

    def start_serving(self, timeout: float = 120.0) -> subprocess.Popen[bytes]:
        """Start ``flows/serve.py`` and wait until both deployments exist."""
        self._serves += 1
        with self._log(f"serve-{self._serves}.log") as out:
            self.serving = subprocess.Popen(
                [sys.executable, str(flows_dir() / "serve.py")],
                env=self.env(),
                cwd=str(flows_dir().parent),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until(
            lambda: self._deployments_ready(self._serves),
            timeout,
            "flows/serve.py to serve the etl and train deployments",
            interval=0.5,
        )
        return self.serving

    def _deployments_ready(self, generation: int) -> bool:
        if self.serving is not None and self.serving.poll() is not None:
            raise RuntimeError(
                f"flows/serve.py exited with {self.serving.returncode}; see "
                f"{self.workdir / f'serve-{generation}.log'}"
            )
        return self._have_deployments()

    def _have_deployments(self) -> bool:
        from prefect import get_client

        with get_client(sync_client=True) as client:
            try:
                client.read_deployment_by_name("faultkit-etl/etl")
                client.read_deployment_by_name("faultkit-train/train")
            except Exception:
                return False
        return True

    def kill_serving(self) -> list[int]:
        """SIGKILL the serving process and every process under it (a lost worker)."""
        import psutil

        if self.serving is None:
            return []
        procs = []
        with contextlib.suppress(psutil.NoSuchProcess):
            parent = psutil.Process(self.serving.pid)
            procs = [*parent.children(recursive=True), parent]
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        self.serving.wait(timeout=30)
        psutil.wait_procs(procs, timeout=30)
        return [p.pid for p in procs]

    def close(self) -> None:
        """Stop everything this stack started and remove its temp dir."""
        self._stack.close()
        for proc in (self.serving, self.server):
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)
        self.serving = self.server = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- runs --------------------------------------------------------------------------

    def run(self, deployment: str, parameters: Mapping[str, Any] | None = None) -> str:
        """Start a run of ``"flow/deployment"``; returns the flow run id."""
        from prefect import get_client

        def create() -> str:
            with get_client(sync_client=True) as client:
                dep = client.read_deployment_by_name(deployment)
                fr = client.create_flow_run_from_deployment(
                    dep.id, parameters=dict(parameters or {})
                )
            return str(fr.id)

        return self.call(create)

    def flow_run(self, flow_run_id: str) -> Any:
        """The flow run as the server has it now."""
        from prefect import get_client

        def read() -> Any:
            with get_client(sync_client=True) as client:
                return client.read_flow_run(flow_run_id)

        return self.call(read)

    def states(self, flow_run_id: str) -> list[Any]:
        """Every state the run has been in, oldest first."""
        from prefect import get_client

        def read() -> list[Any]:
            with get_client(sync_client=True) as client:
                return client.read_flow_run_states(flow_run_id)

        return sorted(self.call(read), key=lambda s: s.timestamp)

    def task_runs(self, flow_run_id: str) -> dict[str, Any]:
        """The flow run's task runs by name, each with its state as the server has it."""
        from prefect import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        def read() -> dict[str, Any]:
            flt = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            with get_client(sync_client=True) as client:
                return {tr.name: tr for tr in client.read_task_runs(flow_run_filter=flt)}

        return self.call(read)

    def wait(
        self,
        flow_run_id: str,
        state: str = "COMPLETED",
        timeout: float = 180.0,
        fail_on: Sequence[str] = ("FAILED", "CANCELLED"),
    ) -> Any:
        """Wait until the run is in ``state`` (a type name); a state in ``fail_on`` raises.

        ``CRASHED`` is not in ``fail_on`` by default: a crashed run is re-run.
        """
        seen: dict[str, Any] = {}

        def reached() -> bool:
            fr = self.flow_run(flow_run_id)
            seen["run"] = fr
            st = fr.state
            if st is None:
                return False
            if st.type.value == state:
                return True
            if st.type.value in fail_on:
                raise AssertionError(
                    f"flow run {flow_run_id} ended {st.type.value} ({st.message!r}), "
                    f"expected {state}; see {self.workdir}"
                )
            return False

        wait_until(reached, timeout, f"flow run {flow_run_id} to be {state}", interval=0.5)
        return seen["run"]

    def wait_history(self, flow_run_id: str, state: str, timeout: float = 180.0) -> Any:
        """Wait until the run has *been* in ``state`` (it may have left it since: a
        ``CRASHED`` run is rescheduled at once); returns that state."""
        found: list[Any] = []

        def seen() -> bool:
            found[:] = [s for s in self.states(flow_run_id) if s.type.value == state]
            return bool(found)

        wait_until(seen, timeout, f"flow run {flow_run_id} to pass through {state}", interval=0.5)
        return found[-1]

    def flow_run_process(self) -> Any:
        """The process running a flow under the serving process (a ``psutil.Process``)."""
        import psutil

        if self.serving is None:
            return None
        try:
            kids = psutil.Process(self.serving.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return None
        for p in kids:
            with contextlib.suppress(psutil.Error):
                cmd = " ".join(p.cmdline())
                if "spawn_main" in cmd or "prefect.engine" in cmd:
                    return p
        return None

    def kill_flow_run(self, proc: Any = None, timeout: float = 30.0) -> int | None:
        """SIGKILL the flow-run process (``proc``, else the one under the serving process).

        Only that process dies: the runner sees exit code -9 and marks the run Crashed at
        once, with no heartbeat grace to wait out.

        Returns:
            the pid killed, or None when no flow-run process was running.
        """
        import psutil

        proc = proc if proc is not None else self.flow_run_process()
        if proc is None:
            return None
        try:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=timeout)
        except psutil.NoSuchProcess:
            pass
        return int(proc.pid)

    def state_types(self, flow_run_id: str) -> list[str]:
        """The type names of every state the run has been in, oldest first."""
        return [s.type.value for s in self.states(flow_run_id)]


def units_done(store: CheckpointStore, prefix: str) -> dict[str, int]:
    """Units done per stage key under ``prefix``."""
    return {k: len(store.read_view(k).units) for k in store.keys(prefix)}
