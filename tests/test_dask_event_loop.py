"""The scheduler keeps answering while WorkerLossPlugin's store or alert channel hangs."""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import os
import signal
import socket
import threading
import time

import dask
import pytest
from distributed import Client, LocalCluster

from dask_plugins import WorkerLossPlugin
from faultkit.testing import wait_until

pytestmark = pytest.mark.timeout(300)

ANSWER_WITHIN = 3.0  # seconds a scheduler call may take while the store hangs


class HungMount:
    """A FUSE mount whose server never answers: every access blocks, as on a hung NFS mount.

    :meth:`release` aborts it: blocked and later accesses fail with ``ENOTCONN``.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None

    @staticmethod
    def unavailable() -> str | None:
        if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
            return "mounting a FUSE file system needs root and /dev/fuse"
        return None

    def __enter__(self) -> HungMount:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = os.open("/dev/fuse", os.O_RDWR)
        opts = f"fd={self.fd},rootmode=40000,user_id=0,group_id=0".encode()
        if libc.mount(b"faultkit-hung", self.path.encode(), b"fuse", 0, opts) != 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            pytest.skip(f"cannot mount a FUSE file system here: {os.strerror(err)}")
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # the connection aborts: blocked calls return ENOTCONN
            self.fd = None
            ctypes.CDLL(None, use_errno=True).umount2(self.path.encode(), 2)  # MNT_DETACH

    def __exit__(self, *exc: object) -> None:
        self.release()


class BlackHole:
    """A TCP server on loopback that accepts connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.conns.append(self.sock.accept()[0])

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def _answers(pool: concurrent.futures.Executor, fn, what: str):
    """``fn()``, which must return within ANSWER_WITHIN seconds."""
    t0 = time.monotonic()
    try:
        return pool.submit(fn).result(timeout=ANSWER_WITHIN)
    except concurrent.futures.TimeoutError:
        raise AssertionError(
            f"the scheduler did not answer {what} within {ANSWER_WITHIN} s "
            f"({time.monotonic() - t0:.1f} s): its event loop waits on the store"
        ) from None


def _counts(dask_scheduler) -> dict:
    return dask_scheduler.plugins[WorkerLossPlugin.name].report()["counts"]


def _block() -> None:
    time.sleep(600)


def _kill_worker_running(client: Client, key: str, pool) -> None:
    """SIGKILL the worker process running task ``key``."""

    def running() -> list[str]:
        processing = _answers(pool, client.processing, "processing")
        return [addr for addr, keys in processing.items() if key in keys]

    wait_until(running, 60, "the task to run")
    [addr] = running()
    pid = client.run(os.getpid, workers=[addr])[addr]
    os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    "hang",
    [
        pytest.param("nfs", id="file-store-on-hung-mount"),
        pytest.param("s3", id="s3-store-and-channel-never-answer"),
    ],
)
def test_scheduler_answers_while_store_and_channel_hang(tmp_path, alert_receiver, hang):
    """With a store (and a channel) that never answer, the scheduler still answers at once
    when the plugin starts and after workers are lost; the losses are counted."""
    if hang == "nfs" and HungMount.unavailable():
        pytest.skip(HungMount.unavailable())
    hole, mount = BlackHole(), None
    try:
        if hang == "nfs":
            mnt = tmp_path / "mnt"
            mnt.mkdir()
            # Configured while the mount answered; it hangs by the time the scheduler opens it.
            plugin = WorkerLossPlugin([alert_receiver.url()], f"file://{mnt}/store")
            mount = HungMount(str(mnt)).__enter__()
        else:
            plugin = WorkerLossPlugin(
                [f"json://127.0.0.1:{hole.port}/hook"],
                "s3://bucket/ck",
                endpoint_url=f"http://127.0.0.1:{hole.port}",
                key="k",
                secret="s",
            )
        _lose_workers_while_hung(plugin, mount, hole, alert_receiver)
    finally:
        if mount is not None:
            mount.release()
        hole.close()


def _lose_workers_while_hung(plugin, mount, hole, receiver) -> None:
    pool = concurrent.futures.ThreadPoolExecutor(4)

    def workers_lost() -> int:
        counts = _answers(pool, lambda: client.run_on_scheduler(_counts), "run_on_scheduler")
        return counts.get("workers_lost", 0)

    with (
        dask.config.set({"distributed.deploy.lost-worker-timeout": "1h"}),
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        try:
            _answers(pool, lambda: client.register_plugin(plugin), "register_plugin")
            fut = client.submit(_block, pure=False)
            for lost in (1, 2):
                client.wait_for_workers(2, timeout=120)
                _kill_worker_running(client, fut.key, pool)
                wait_until(lambda n=lost: workers_lost() >= n, 60, f"worker loss {lost}")
                _answers(pool, client.scheduler_info, "scheduler_info")
            if mount is not None:
                # Once the mount fails instead of hanging, the alerts still go out.
                mount.release()
                receiver.wait_for(2, timeout=60)
                assert all("was lost" in m["message"] for m in receiver.messages())
            fut.cancel()
        finally:
            # Before the cluster closes: a scheduler stuck on the store could not close.
            if mount is not None:
                mount.release()
            hole.close()
            pool.shutdown(wait=False, cancel_futures=True)
