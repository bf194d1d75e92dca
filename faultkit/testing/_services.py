"""Start real servers on loopback for tests and demos: moto's S3, PostgreSQL, MLflow."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = [
    "MlflowServer",
    "MotoS3Server",
    "PostgresServer",
    "free_port",
    "journal_append",
    "journal_lines",
    "journaled_done",
    "process_state",
    "wait_until",
]

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(cond: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``cond`` until truthy and return what it returned; after ``timeout`` s raise
    ``TimeoutError`` naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def journal_lines(path: str | os.PathLike[str]) -> list[list[str]]:
    """The lines of a journal file that processes append to (``START pid ...``), each split
    on whitespace; [] while the file does not exist."""
    try:
        with open(path) as f:
            return [ln.split() for ln in f if ln.strip()]
    except FileNotFoundError:
        return []


def journal_append(path: str | os.PathLike[str], line: str) -> None:
    """Append ``line`` to a journal file in one ``O_APPEND`` write, so lines that processes
    append at once never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def journaled_done(journal: str | os.PathLike[str], stage: Any, unit: Any, result: Any) -> bool:
    """``stage.done(unit, result)``, noting the outcome in ``journal`` as
    ``DONE <pid> <unit> <written> <epoch>``, or ``STALE <pid> <unit>`` before the refusal
    is raised: what a test process tells its test about each commit."""
    from faultkit import StaleAttemptError

    try:
        wrote = stage.done(unit, result)
    except StaleAttemptError:
        journal_append(journal, f"STALE {os.getpid()} {unit}")
        raise
    journal_append(journal, f"DONE {os.getpid()} {unit} {wrote} {stage.epoch}")
    return wrote


def process_state(pid: int | str) -> str:
    """The state letter of process ``pid`` in ``/proc`` (``R``, ``S``, ``D``, ``T`` stopped,
    ``Z`` exited but not reaped), or "" once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return ""


def _port_open(port: int, ip: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((ip, port)) == 0


class MotoS3Server:
    """moto's S3 server as a child process on 127.0.0.1 (it honours ``If-None-Match``)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def storage_options(self) -> dict[str, object]:
        return {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
        }

    def start(self) -> MotoS3Server:
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        wait_until(lambda: _port_open(self.port) or self.proc.poll() is not None, 60, "moto server")
        if self.proc.poll() is not None:
            raise RuntimeError("moto server exited at start; is moto[server] installed?")
        return self

    def make_bucket(self, name: str) -> None:
        import boto3

        boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        ).create_bucket(Bucket=name)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> MotoS3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _stop_group(proc: subprocess.Popen[bytes] | None, sig: int, grace: float) -> None:
    """Send ``sig`` to the process group of ``proc`` (a session leader), SIGKILL it after
    ``grace`` seconds, and reap it."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


class PostgresServer:
    """A throwaway PostgreSQL server: ``initdb`` in a temp dir, loopback port, trust auth.

    Runs as the ``postgres`` system user when started as root (PostgreSQL refuses root).
    ``available()`` says whether the binaries are installed. ``host``: a
    :class:`~faultkit.testing.Host` to run it on (it listens on the host's address, port 5432).
    """

    def __init__(self, *, host: Any = None) -> None:
        self.host = host
        self.ip = host.ip if host is not None else "127.0.0.1"
        self.port = 5432 if host is not None else free_port()
        self.dir = ""
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> str | None:
        """None when a server can be started here, else the reason it cannot."""
        if not _pg_bin("initdb") or not _pg_bin("postgres"):
            return "PostgreSQL binaries (initdb, postgres) are not installed"
        if os.geteuid() == 0:
            try:
                import pwd

                pwd.getpwnam("postgres")
            except KeyError:
                return "running as root and there is no 'postgres' user to run the server"
        return None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@{self.ip}:{self.port}/postgres"

    def _as_pg(self, cmd: list[str]) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *cmd]
        return cmd

    def start(self) -> PostgresServer:
        reason = self.available()
        if reason:
            raise RuntimeError(reason)
        self.dir = tempfile.mkdtemp(prefix="faultkit-pg-")
        data = os.path.join(self.dir, "data")
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        subprocess.run(
            self._as_pg(
                [_pg_bin("initdb"), "-D", data, "-U", "postgres", "-A", "trust", "--no-sync"]
            ),
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if self.host is not None:  # clients come from the other test hosts' addresses
            with open(os.path.join(data, "pg_hba.conf"), "a") as f:
                f.write(f"host all all {self.ip.rsplit('.', 1)[0]}.0/24 trust\n")
        popen = self.host.popen if self.host is not None else subprocess.Popen
        self.proc = popen(
            self._as_pg(
                [
                    _pg_bin("postgres"),
                    "-D",
                    data,
                    "-p",
                    str(self.port),
                    "-h",
                    self.ip,
                    "-k",
                    self.dir,
                    "-c",
                    "fsync=off",
                    "-c",
                    "max_connections=100",
                ]
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

        def up() -> bool:
            if self.host is not None:
                return self.host.call(lambda: _port_open(self.port, self.ip))
            return _port_open(self.port)

        wait_until(lambda: up() or self.proc.poll() is not None, 60, "PostgreSQL start")
        if self.proc.poll() is not None:
            raise RuntimeError(f"PostgreSQL exited at start (data dir {data})")
        return self

    def stop(self) -> None:
        _stop_group(self.proc, signal.SIGINT, 20.0)  # a fast shutdown
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MlflowServer:
    """``mlflow server`` on 127.0.0.1: a SQLite backend store and a local artifact root in a
    temp dir (one worker). ``available()`` says whether MLflow's server is installed."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = ""
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> str | None:
        """None when a server can be started here, else the reason it cannot."""
        exe = os.path.join(os.path.dirname(sys.executable), "mlflow")
        if not os.path.exists(exe):
            return "MLflow's server is not installed (pip install 'mlflow>=3.4,<4')"
        return None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> MlflowServer:
        reason = self.available()
        if reason:
            raise RuntimeError(reason)
        self.dir = tempfile.mkdtemp(prefix="faultkit-mlflow-")
        exe = os.path.join(os.path.dirname(sys.executable), "mlflow")
        cmd = [
            exe, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.dir}/mlflow.db",
            "--default-artifact-root", os.path.join(self.dir, "artifacts"),
        ]  # fmt: skip
        with open(os.path.join(self.dir, "server.log"), "wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {self.proc.returncode}; see {self.dir}/server.log"
                )
            import urllib.request

            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_until(up, timeout, f"mlflow server on port {self.port}", interval=0.25)
        return self

    def stop(self) -> None:
        _stop_group(self.proc, signal.SIGTERM, 5.0)  # it keeps nothing a test needs after this
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
