"""Tampering with a store behind its back, the way bit rot, a careless admin or an attacker
would: shared by the store suites."""

from __future__ import annotations

import os

from faultkit import CheckpointStore
from faultkit._log import seq_name
from faultkit._storage import MemoryStorage
from faultkit._storage_local import LocalStorage
from faultkit._storage_s3 import FsspecStorage


def overwrite(store: CheckpointStore, path: str, data: bytes) -> None:
    """Replace an object's bytes (simulated bit rot)."""
    s = store._storage
    if isinstance(s, LocalStorage):
        with open(os.path.join(s.root, path), "wb") as f:
            f.write(data)
    elif isinstance(s, MemoryStorage):
        MemoryStorage._serial += 1
        s._objs[path] = (data, s._objs[path][1], MemoryStorage._serial)
    else:
        assert isinstance(s, FsspecStorage)
        s.fs.pipe_file(f"{s.root}/{path}", data)


def flip(store: CheckpointStore, path: str, at: int = 5) -> None:
    """Flip one bit of an object."""
    data = bytearray(store._storage.read(path))
    data[at % len(data)] ^= 0x01
    overwrite(store, path, bytes(data))


def remove(store: CheckpointStore, path: str) -> None:
    """Delete an object (a lost record)."""
    store._storage.delete(path)


def log_path(k: str, seq: int) -> str:
    return f"{k}/@log/{seq_name(seq)}"


def blob_path(store: CheckpointStore, k: str, step: int) -> str:
    rec = next(r for r in store.read_view(k).live_snaps() if r.step == step)
    return f"{k}/@blobs/{rec.blob}"


def claim_seq(store: CheckpointStore, k: str, epoch: int) -> int:
    """Where the claim of ``epoch`` sits in the log."""
    return next(s for e, s, _ in store.read_view(k).claims if e == epoch)


def objects(store: CheckpointStore) -> list[str]:
    """Every object path in the store."""
    return sorted(store._storage.walk_files(""))
