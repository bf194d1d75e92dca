"""Prefect's ephemeral API server must not outlive the process that started it.

With no ``PREFECT_API_URL`` configured, Prefect starts a temporary API server (``uvicorn``) as
a child process. It inherits the parent's stdout and stderr, and nothing stops it when the
parent dies without running its ``atexit`` handlers (SIGKILL, OOM kill, ``os._exit``): it
keeps running with the Prefect database open and the parent's output pipes held, so whatever
waits for the killed run's output (a shell pipe, ``subprocess.run(capture_output=True)``, a CI
step) waits forever, and the user reads it as "the re-run hangs".

:func:`guard` runs when a resumable task or a faultkit flow hook starts in a process that owns
such a server: it starts a small watchdog process per server that waits (``pidfd``) for the
owner to exit and then stops the server (SIGTERM, SIGKILL after 10 s), as Prefect's own
``atexit`` handler would have. It also names, once per process, ephemeral servers left by
owners that died before any watchdog ran, with the command that stops them.

Linux only (``/proc``); elsewhere :func:`guard` does nothing.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from dataclasses import dataclass

__all__ = ["EphemeralServer", "ephemeral_servers", "guard"]

log = logging.getLogger("faultkit.prefect")

_APP = b"prefect.server.api.server:create_app"
_FLAG = b"PREFECT__SERVER_EPHEMERAL=1"

# Runs in its own interpreter (python -S -c): only the standard library, no faultkit.
_WATCHDOG = r"""
import os, select, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the owner, not for us
owner, server = int(sys.argv[1]), int(sys.argv[2])
def is_server():
    try:
        with open(f"/proc/{server}/cmdline", "rb") as f:
            return b"prefect.server.api.server:create_app" in f.read()
    except OSError:
        return False
try:
    sfd = os.pidfd_open(server)
except (AttributeError, OSError):
    sfd = None
try:
    ofd = os.pidfd_open(owner) if os.getppid() == owner else None
except (AttributeError, OSError):
    ofd = None
if ofd is not None and sfd is not None:
    # Until the owner exits, or the server stops first (a normal shutdown).
    if sfd in select.select([ofd, sfd], [], [])[0]:
        sys.exit(0)
else:
    while os.getppid() == owner:
        time.sleep(0.5)
def send(sig):
    try:
        if sfd is not None:
            signal.pidfd_send_signal(sfd, sig)
        elif is_server():
            os.kill(server, sig)
        else:
            return False
    except ProcessLookupError:
        return False
    return True
if send(signal.SIGTERM):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if sfd is not None:
            if select.select([sfd], [], [], 0.1)[0]:
                sys.exit(0)
        elif not is_server():
            sys.exit(0)
        else:
            time.sleep(0.1)
    send(signal.SIGKILL)
"""


@dataclass(frozen=True, slots=True)
class EphemeralServer:
    """A running ephemeral Prefect API server process."""

    pid: int
    ppid: int
    home: str  # its PREFECT_HOME ("" when it had none set)
    orphaned: bool  # its owner is gone (it was re-parented away from a Python process)


_lock = threading.Lock()
_watched: dict[int, subprocess.Popen[bytes]] = {}
_guarded_in = 0  # the pid of the process whose servers are watched (a fork must look again)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _ppid(pid: int) -> int:
    stat = _read(f"/proc/{pid}/stat")
    # "pid (comm) state ppid ...": comm may hold spaces or ')', so split after the last ')'.
    try:
        return int(stat[stat.rindex(b")") + 2 :].split()[1])
    except (ValueError, IndexError):
        return 0


def _is_python(pid: int) -> bool:
    try:
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return False
    return exe.startswith("python")


def ephemeral_servers() -> list[EphemeralServer]:
    """Every ephemeral Prefect API server this user can see (Linux; [] elsewhere)."""
    if not os.path.isdir("/proc/self"):
        return []
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        if _APP not in _read(f"/proc/{pid}/cmdline"):
            continue
        env = _read(f"/proc/{pid}/environ").split(b"\0")
        if _FLAG not in env:
            continue
        home = next((e[13:] for e in env if e.startswith(b"PREFECT_HOME=")), b"")
        ppid = _ppid(pid)
        out.append(
            EphemeralServer(
                pid, ppid, home.decode(errors="replace"), ppid <= 1 or not _is_python(ppid)
            )
        )
    return out


def _uses_ephemeral_server() -> bool:
    try:
        from prefect.settings import get_current_settings

        return not get_current_settings().api.url
    except Exception:  # an unreadable setting: assume a configured server
        return False


def guard() -> None:
    """Make this process's ephemeral servers stop when it dies; name orphaned ones once.

    Cheap after the first call in a process that found its server.
    """
    global _guarded_in
    me = os.getpid()
    if _guarded_in == me or not _uses_ephemeral_server() or not os.path.isdir("/proc/self"):
        return
    servers = ephemeral_servers()
    with _lock:
        if _guarded_in == me:
            return
        for s in servers:
            if s.ppid != me or s.pid in _watched:
                continue
            try:
                _watched[s.pid] = subprocess.Popen(
                    [sys.executable, "-S", "-c", _WATCHDOG, str(me), str(s.pid)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    close_fds=True,
                )
            except OSError as exc:
                log.warning(
                    "could not start the watchdog that stops Prefect's ephemeral server "
                    "(pid %d) if this process is killed: %s",
                    s.pid,
                    exc,
                )
        if not any(s.ppid == me for s in servers):
            return  # the server is not up yet: look again next time
        _guarded_in = me
    orphans = [s for s in servers if s.orphaned]
    if orphans:
        log.warning(
            "%d ephemeral Prefect server(s) left running by flow processes that were killed: "
            "%s. They hold their Prefect database and the output of the killed run open (a "
            "pipe reading it never ends). Stop them with: kill %s. To keep run history across "
            "crashes, run a real server (prefect server start) and set PREFECT_API_URL.",
            len(orphans),
            ", ".join(f"pid {s.pid} (PREFECT_HOME={s.home or '~/.prefect'})" for s in orphans),
            " ".join(str(s.pid) for s in orphans),
        )
