"""faultkit's benchmarks: ``python -m bench [name ...]`` (see ``__main__.py``)."""

from __future__ import annotations

import os


def records_by_hand(folder: str, durable: tuple[bool, ...]) -> None:
    """The floor of a fresh stage's durable work, without faultkit: make ``folder``, then
    write one small record per entry of ``durable``; a durable one is fsync'd, and its
    folder after it (what a commit on a file store costs at least)."""
    os.makedirs(folder)
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i, sync in enumerate(durable, 1):
            fd = os.open(str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dfd)
            try:
                os.write(fd, b"x" * 96)
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if sync:
                os.fsync(dfd)
    finally:
        os.close(dfd)
