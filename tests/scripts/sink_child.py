"""Child process for the sink tests: run one ETL partition through SqlSink, maybe killed."""

from __future__ import annotations

import argparse
import json
import os

from faultkit import CheckpointStore, StaleAttemptError
from faultkit.demo import etl_partition


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True)
    p.add_argument("--sink", required=True)
    p.add_argument("--key", default="etl/p0")
    p.add_argument("--partition", type=int, default=0)
    p.add_argument("--rows", type=int, default=100)
    p.add_argument("--chunk", type=int, default=10)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    store = CheckpointStore(a.store)
    with store.stage(a.key) as stage:
        with open(a.out + ".claimed", "w") as f:
            f.write(str(stage.epoch))
        try:
            res = etl_partition(stage, a.partition, a.sink, rows=a.rows, chunk=a.chunk)
        except StaleAttemptError as exc:
            res = {"stale": exc.current, "epoch": stage.epoch}
    with open(a.out, "w") as f:
        json.dump(res, f)
    os._exit(0)


if __name__ == "__main__":
    main()
