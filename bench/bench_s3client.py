"""Which S3 client for the log's hot path: s3fs (what the store uses) or obstore?

Run: ``.venv/bin/python -m bench s3client`` (needs ``pip install obstore``; skipped without it).

On one SeaweedFS server on loopback, the same run, ABBA order, every round printed:

1. a create-if-absent PUT of a 120-byte record (``If-None-Match: *``), one at a time: a commit;
2. reading 500 such records concurrently: what a claim reads after the newest summary;
3. a lost create race: what each client raises (the store must see "position taken").

These numbers moved the log's requests to obstore (``faultkit._storage_s3.ObstoreS3Storage``);
s3fs stays for snapshots, deletes, and stores given options only s3fs understands.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from typing import Any

RECORD = b'{"e":1,"id":"i:0","r":null,"t":"done","u":0}\n' + b"0" * 72


def _s3fs_client(opts: dict[str, Any]) -> Any:
    import s3fs

    return s3fs.S3FileSystem(**opts)


def _obstore_client(server: Any, bucket: str) -> Any:
    from obstore.store import S3Store

    o = server.storage_options()
    return S3Store(
        bucket,
        endpoint=o["client_kwargs"]["endpoint_url"],
        access_key_id=o["key"],
        secret_access_key=o["secret"],
        region="us-east-1",
        client_options={"allow_http": True},
    )


def main(puts: int = 200, reads: int = 500, rounds: int = 4) -> dict[str, Any]:
    try:
        import obstore
    except ImportError:
        print("   skipped: obstore is not installed (pip install obstore)")
        return {"skipped": "obstore not installed"}
    from faultkit.testing import SeaweedS3Server

    reason = SeaweedS3Server.available()
    if reason:
        print(f"   skipped: {reason}")
        return {"skipped": reason}
    out: dict[str, Any] = {}
    with SeaweedS3Server() as server:
        bucket = f"cl-{uuid.uuid4().hex[:8]}"
        server.make_bucket(bucket)
        fs = _s3fs_client(server.storage_options())
        ob = _obstore_client(server, bucket)

        def put_s3fs(path: str) -> None:
            with fs.open(f"{bucket}/{path}", "xb") as f:
                f.write(RECORD)

        def put_obstore(path: str) -> None:
            obstore.put(ob, path, RECORD, mode="create")

        def read_s3fs(paths: list[str]) -> None:
            got = fs.cat([f"{bucket}/{p}" for p in paths])
            assert len(got) == len(paths)

        def read_obstore(paths: list[str]) -> None:
            async def all_() -> list[Any]:
                return await asyncio.gather(*(obstore.get_async(ob, p) for p in paths))

            got = asyncio.run(all_())
            assert len(got) == len(paths)

        # the records both read
        for i in range(reads):
            put_obstore(f"read/{i:012d}")
        paths = [f"read/{i:012d}" for i in range(reads)]
        put_t: dict[str, list[float]] = {"s3fs": [], "obstore": []}
        read_t: dict[str, list[float]] = {"s3fs": [], "obstore": []}
        n = 0
        for r in range(rounds):
            for which in ("s3fs", "obstore") if r % 2 == 0 else ("obstore", "s3fs"):
                put = put_s3fs if which == "s3fs" else put_obstore
                t0 = time.perf_counter()
                for _ in range(puts // rounds):
                    n += 1
                    put(f"put/{which}/{n:012d}")
                put_t[which].append((time.perf_counter() - t0) / (puts // rounds) * 1000)
                t0 = time.perf_counter()
                (read_s3fs if which == "s3fs" else read_obstore)(paths)
                read_t[which].append(time.perf_counter() - t0)
                print(
                    f"   round {r} {which:>7}: conditional PUT {put_t[which][-1]:.2f} ms, "
                    f"{reads} concurrent GETs {read_t[which][-1]:.3f} s"
                )
        for which in ("s3fs", "obstore"):
            out[f"{which}_put_ms"] = statistics.median(put_t[which])
            out[f"{which}_read_s"] = statistics.median(read_t[which])
        print(
            f"   conditional PUT, median: s3fs {out['s3fs_put_ms']:.2f} ms, obstore "
            f"{out['obstore_put_ms']:.2f} ms ({out['obstore_put_ms'] / out['s3fs_put_ms']:.2f}x)"
        )
        print(
            f"   {reads} concurrent GETs, median: s3fs {out['s3fs_read_s']:.3f} s, obstore "
            f"{out['obstore_read_s']:.3f} s ({out['obstore_read_s'] / out['s3fs_read_s']:.2f}x)"
        )
        # 3. a lost create race
        put_obstore("race/1")
        for which, put in (("s3fs", put_s3fs), ("obstore", put_obstore)):
            try:
                put("race/1")
                got = "no error (overwrote!)"
            except Exception as exc:  # what the client raises is the measurement
                got = f"{type(exc).__module__}.{type(exc).__name__}"
            out[f"{which}_lost_race"] = got
            print(f"   lost create race, {which}: {got}")
    return out


if __name__ == "__main__":
    main()
