"""Inspect a stage in an s3:// store from a host that reaches it; prints one JSON object.

Usage: s3_check.py ENDPOINT BUCKET KEY, or KEY/ for ``{key: report}`` of every stage under
it.

Reads every raw log record (not only the replayed view), so a unit recorded twice or a
record that fails its checksum shows up, and checks every snapshot's data.
"""

import json
import sys
from collections import Counter

from faultkit import CheckpointStore
from faultkit._log import decode

endpoint, bucket, key = sys.argv[1], sys.argv[2], sys.argv[3]
store = CheckpointStore(
    f"s3://{bucket}/ck",
    must_exist=True,
    key="faultkit",
    secret="faultkit-secret",
    client_kwargs={"endpoint_url": endpoint, "region_name": "us-east-1"},
)
storage = store._storage


def report(key: str) -> dict:
    # the log's records (compaction's summaries and hints are not records)
    names = sorted((n for n in storage.list(f"{key}/@log") if n.isdigit()), key=int)
    kinds: Counter[str] = Counter()
    done: Counter[str] = Counter()
    corrupt = []
    log = []  # [seq, type, epoch] of every readable record
    for name in names:
        try:
            body = decode(storage.read(f"{key}/@log/{name}"))
        except Exception as exc:  # report, do not stop: the test asserts on it
            corrupt.append(f"{name}: {exc}")
            continue
        kinds[body["t"]] += 1
        log.append([int(name), body["t"], body.get("e")])
        if body["t"] == "done":
            done[str(body["u"])] += 1
    view = store.read_view(key)
    rep = store.report(key)
    latest = store.stage(key).latest()
    return {
        "records": len(names),
        "log": log,
        "kinds": dict(kinds),
        "done": dict(done),
        "corrupt": corrupt,
        "damaged": [f"{d.seq}:{d.kind}" for d in view.damaged],
        "units": sorted(int(r.unit) for r in view.units.values()),
        "finished": view.finished is not None,
        "snapshots": [[r.step, err] for r, err in rep.snapshots],
        "anomalies": rep.anomalies,
        "latest": None if latest is None else [latest.step, bytes(latest.data).decode()[:40]],
    }


if key.endswith("/"):
    print(json.dumps({k: report(k) for k in store.keys(key.rstrip("/"))}))
else:
    print(json.dumps(report(key)))
