"""S3 requests per resumable task, counted on SeaweedFS (the same calls go to AWS S3).

Run: ``.venv/bin/python -m bench.bench_requests``. Counts the requests one
``faultkit._resumable.call`` sends, each case through a fresh ``CheckpointStore`` (as a fresh
worker process would): a first try of a task that commits 3 units; a retry that resumes a
stage with 2 of its 3 units done; and a task whose stage finished earlier (its recorded
result is returned). The store sends its log's requests through obstore (counted by wrapping
its calls) and the rest through s3fs (read off botocore's ``before-send`` event): PUT, GET of
an object, LIST, HEAD, DELETE.
"""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

UNITS = 3


# obstore's calls and the request each sends (a listing of a log: one page, < 1,000 names).
_OBSTORE_CALLS = {
    "put": "PUT",
    "get": "GET",
    "get_async": "GET",
    "head": "HEAD",
    "head_async": "HEAD",
    "list": "LIST",
    "list_with_delimiter": "LIST",
    "delete": "DELETE",
}


def _count(store: Any) -> Counter[str]:
    """Every request ``store`` sends from now on, by kind: through s3fs (botocore's
    ``before-send`` event) and through obstore (its calls, wrapped)."""
    import obstore

    sent: Counter[str] = Counter()
    for name, kind in _OBSTORE_CALLS.items():
        real = getattr(obstore, name)
        real = getattr(real, "__wrapped__", real)

        def counted(*a: Any, _real: Any = real, _kind: str = kind, **k: Any) -> Any:
            sent[_kind] += 1
            return _real(*a, **k)

        counted.__wrapped__ = real  # type: ignore[attr-defined]
        setattr(obstore, name, counted)
    fs = store._storage.fs
    store._storage._run(fs.set_session)

    def on_send(request: Any, **_: Any) -> None:
        kind = request.method
        if kind == "GET" and "list-type=" in request.url:
            kind = "LIST"
        sent[kind] += 1

    fs.s3.meta.events.register("before-send.s3", on_send)
    return sent


def _task(*, stage: Any) -> int:
    for u in stage.pending(range(UNITS)):
        stage.done(u, u * u)
    return sum(stage.results().values())


def _partial(*, stage: Any) -> int:
    for u in range(UNITS - 1):
        stage.done(u, u * u)
    raise ConnectionError("the worker was lost")


def main() -> dict[str, Any]:
    from faultkit import CheckpointStore
    from faultkit._resumable import call
    from faultkit.testing import SeaweedS3Server

    reason = SeaweedS3Server.available()
    if reason:
        print(f"   skipped: {reason}")
        return {"skipped": reason}
    out: dict[str, Any] = {}
    with SeaweedS3Server() as server:
        opts = server.storage_options()
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        server.make_bucket(bucket)
        url = f"s3://{bucket}/ck"

        def fresh() -> tuple[Any, Counter[str]]:
            store = CheckpointStore(url, **opts)
            store._storage.exists()  # the store's own set-up is not the task's
            return store, _count(store)

        store, sent = fresh()
        call(_task, store=store, key="req/first", first_try=True)
        out["first try"] = dict(sent)

        store, _ = fresh()
        try:
            call(_partial, store=store, key="req/resume", first_try=True)
        except ConnectionError:
            pass
        store, sent = fresh()
        call(_task, store=store, key="req/resume")
        out["retry, 1 unit left"] = dict(sent)

        store, sent = fresh()
        call(_task, store=store, key="req/first")
        out["finished earlier"] = dict(sent)
    for case, got in out.items():
        print(f"   {case}: {sum(got.values())} requests {dict(sorted(got.items()))}")
    return out


if __name__ == "__main__":
    main()
