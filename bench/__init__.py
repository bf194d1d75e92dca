"""faultkit's benchmarks: ``python -m bench [name ...]`` (see ``__main__.py``)."""

from __future__ import annotations

import os


def records_by_hand(folder: str, durable: tuple[bool, ...], *, layout: bool = False) -> None:
    """The floor of a fresh stage's durable work, without faultkit: make ``folder``, then
    write one small record per entry of ``durable``; a durable one is fsync'd, and its
    folder after it (what a commit on a file store costs at least).

    ``layout=True`` does it the way the ``file://`` store lays a stage out and creates a
    record: the records go in a second folder (``@log``) made inside ``folder``, and each is
    written to an unnamed file (``O_TMPFILE``, Linux), fsync'd, then linked into place (so it
    appears whole, and only if its name is free) before the folder is fsync'd. The
    difference between the two is the price of that layout and of an atomic, exclusive
    create; what faultkit costs above the second is its own lookups and Python."""
    os.makedirs(folder)
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if layout:
            os.mkdir("@log", dir_fd=dfd)
            log_fd = os.open("@log", os.O_RDONLY | os.O_DIRECTORY, dir_fd=dfd)
            os.close(dfd)
            dfd = log_fd
        for i, sync in enumerate(durable, 1):
            if layout:
                fd = os.open(".", os.O_TMPFILE | os.O_WRONLY, 0o644, dir_fd=dfd)
            else:
                fd = os.open(str(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dfd)
            try:
                os.write(fd, b"x" * 96)
                if sync:
                    os.fsync(fd)
                if layout:
                    os.link(f"/proc/self/fd/{fd}", str(i), dst_dir_fd=dfd, follow_symlinks=True)
            finally:
                os.close(fd)
            if sync:
                os.fsync(dfd)
    finally:
        os.close(dfd)
