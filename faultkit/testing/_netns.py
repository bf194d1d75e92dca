"""Test hosts on one machine: Linux network namespaces joined by a bridge.

Each :class:`Host` is a network namespace with one veth link to a bridge that lives in a
namespace of its own (the "switch"), so nothing in the caller's namespace changes: no
interface, route or address is added outside the namespaces made here. Processes run inside
a host through ``ip netns exec``. A host can be cut off from everyone (its switch port goes
down: packets vanish, as when a cable is pulled) or from one other host (both drop packets
to the other: a partition, silent, not a refusal). :meth:`Network.close` kills every process
left in the namespaces and removes them, also after a failed test.

Needs root (or ``CAP_NET_ADMIN``) and iproute2's ``ip``; :func:`netns_unavailable` says
why not where they are missing.

Example::

    with Network() as net:
        store, worker = net.host("store"), net.host("worker")
        proc = worker.popen([sys.executable, "job.py", store.ip])
        net.cut(store, worker)     # a partition between the two
        net.heal(store, worker)
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ._services import wait_until

__all__ = ["Host", "Network", "netns_unavailable"]

_T = TypeVar("_T")
_CLONE_NEWNET = 0x40000000
_counter = itertools.count()
_NOWHERE = "02:00:5e:fa:17:00"  # a locally administered address no host is given
_lock = threading.Lock()


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30)


def netns_unavailable() -> str | None:
    """None when network namespaces can be made here, else the reason they cannot."""
    if shutil.which("ip") is None:
        return "'ip' is missing: install iproute2 (apt-get install iproute2)"
    name = f"fkprobe{os.getpid()}"
    try:
        made = subprocess.run(
            ["ip", "netns", "add", name], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"'ip netns add' failed: {exc}"
    if made.returncode != 0:
        return f"cannot create network namespaces (needs root): {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    return None


class Host:
    """One test host: a network namespace with address :attr:`ip` on the network's bridge."""

    def __init__(self, net: Network, name: str, index: int) -> None:
        self.net = net
        self.name = name
        self.ns = f"{net.prefix}-{name}"
        self.ip = f"{net.subnet}.{index}"
        self.dev = f"{net.prefix}h{index}"  # inside the host
        self.port = f"{net.prefix}p{index}"  # its end in the switch
        self.procs: list[subprocess.Popen[Any]] = []

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.ip})"

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside this host; :meth:`Network.close` kills it if it still runs."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.argv(argv), **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` inside this host to completion (``timeout=`` defaults to 120 s)."""
        kwargs.setdefault("timeout", 120)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.argv(argv), **kwargs)

    def call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` in a thread of this process that has entered the host's network
        namespace, and return its result. A socket made there stays in the host: a server
        bound by ``fn`` listens on the host's address while this process serves it."""
        out: list[Any] = []

        def enter_and_run() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                with open(f"/run/netns/{self.ns}") as f:
                    if libc.setns(f.fileno(), _CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns into {self.ns}: {os.strerror(err)}")
                out.append((True, fn()))
            except BaseException as exc:  # handed to the caller
                out.append((False, exc))

        t = threading.Thread(target=enter_and_run, name=f"netns-{self.name}")
        t.start()
        t.join()
        ok, value = out[0]
        if not ok:
            raise value
        return value

    def pids(self) -> list[int]:
        """Every process running in this host's namespace."""
        got = _ip("ip", "netns", "pids", self.ns, check=False)
        return [int(p) for p in got.stdout.split() if p.isdigit()]

    def kill_all(self, sig: int = signal.SIGKILL) -> list[int]:
        """Signal every process in the host (a whole machine lost); returns their pids."""
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pids


class Network:
    """Hosts as network namespaces on one bridge; see the module docstring."""

    def __init__(self, subnet: str = "10.213.0") -> None:
        with _lock:
            n = next(_counter)
        # Interface names have at most 15 bytes: "fk<pid><n>p<index>".
        self.prefix = f"fk{os.getpid() % 100000}{n}"
        sweep_stale()
        os.makedirs(_OWNERS, exist_ok=True)
        with open(os.path.join(_OWNERS, self.prefix), "w") as f:
            f.write(str(os.getpid()))
        self.subnet = subnet
        self.switch = f"{self.prefix}-sw"
        self.hosts: dict[str, Host] = {}
        self._drops: set[tuple[str, str]] = set()
        self._made: list[str] = []
        subprocess.run(["ip", "netns", "add", self.switch], check=True, timeout=30)
        self._made.append(self.switch)
        _ip("ip", "link", "add", "br0", "type", "bridge", ns=self.switch)
        _ip("ip", "link", "set", "br0", "up", ns=self.switch)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def host(self, name: str) -> Host:
        """Make host ``name`` (addresses ``<subnet>.1``, ``.2``, … in order of creation)."""
        if name in self.hosts:
            return self.hosts[name]
        h = Host(self, name, len(self.hosts) + 1)
        subprocess.run(["ip", "netns", "add", h.ns], check=True, timeout=30)
        self._made.append(h.ns)
        self.hosts[name] = h
        _ip(
            "ip", "link", "add", h.dev, "netns", h.ns,
            "type", "veth", "peer", "name", h.port, "netns", self.switch,
        )  # fmt: skip
        _ip("ip", "link", "set", "lo", "up", ns=h.ns)
        _ip("ip", "addr", "add", f"{h.ip}/24", "dev", h.dev, ns=h.ns)
        _ip("ip", "link", "set", h.dev, "up", ns=h.ns)
        _ip("ip", "link", "set", h.port, "master", "br0", ns=self.switch)
        _ip("ip", "link", "set", h.port, "up", ns=self.switch)
        return h

    # -- faults ------------------------------------------------------------------------

    def isolate(self, host: Host) -> None:
        """Cut ``host`` off from every other host (its switch port goes down)."""
        _ip("ip", "link", "set", host.port, "down", ns=self.switch)

    def rejoin(self, host: Host) -> None:
        """Undo :meth:`isolate`."""
        _ip("ip", "link", "set", host.port, "up", ns=self.switch)

    def _drop(self, src: Host, dst: Host, on: bool) -> None:
        """Make what ``src`` sends to ``dst`` vanish: ``src`` resolves ``dst``'s address to
        a hardware address no host has, so the bridge floods those frames and every host
        discards them (no refusal, no error: a silent loss). Needs nothing but iproute2,
        unlike tc or nftables drop rules, which need kernel features not every kernel has."""
        if on:
            _ip(
                "ip", "neigh", "replace", dst.ip, "lladdr", _NOWHERE, "dev", src.dev,
                "nud", "permanent", ns=src.ns,
            )  # fmt: skip
            self._drops.add((src.name, dst.name))
        else:
            _ip("ip", "neigh", "del", dst.ip, "dev", src.dev, ns=src.ns, check=False)
            self._drops.discard((src.name, dst.name))

    def cut(self, a: Host, b: Host) -> None:
        """Partition ``a`` and ``b``: packets between them vanish both ways; each still
        reaches every other host."""
        self._drop(a, b, True)
        self._drop(b, a, True)

    def heal(self, a: Host, b: Host) -> None:
        """Undo :meth:`cut`."""
        self._drop(a, b, False)
        self._drop(b, a, False)

    # -- teardown ----------------------------------------------------------------------

    def close(self) -> None:
        """Kill every process in the hosts, then remove links and namespaces. Idempotent."""
        for h in self.hosts.values():
            for p in h.procs:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
            h.kill_all()
        for h in self.hosts.values():
            with contextlib.suppress(Exception):
                wait_until(lambda h=h: not h.pids(), 20, f"the processes of {h!r} to exit", 0.05)
            for p in h.procs:
                with contextlib.suppress(Exception):
                    p.wait(10)
        for ns in reversed(self._made):
            # Removing a namespace removes its end of each veth pair, and with it the pair.
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._made.clear()
        self.hosts.clear()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(_OWNERS, self.prefix))


_OWNERS = "/run/faultkit-netns"  # one file per Network: its prefix, holding the owner's pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Remove the namespaces (and kill the processes) of Networks whose owning process died
    without closing them (a test run killed hard); returns the namespaces removed."""
    try:
        owners = os.listdir(_OWNERS)
    except FileNotFoundError:
        return []
    listed = _ip("ip", "netns", "list", check=False).stdout.split()
    gone = []
    for prefix in owners:
        path = os.path.join(_OWNERS, prefix)
        try:
            with open(path) as f:
                pid = int(f.read().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        if pid and _alive(pid):
            continue
        mine = [n for n in listed if n.startswith(prefix + "-")]
        for ns in mine:
            for p in _ip("ip", "netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(p), signal.SIGKILL)
        for ns in sorted(mine, key=lambda n: n.endswith("-sw")):  # the switch last
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
            gone.append(ns)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return gone
