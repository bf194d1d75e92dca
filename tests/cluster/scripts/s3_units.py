"""A job on a worker host: records units 0..N-1 (and a snapshot every 5) in an s3:// store.

Usage: s3_units.py ENDPOINT BUCKET KEY N

Each write goes through a RetryPolicy that retries StoreUnavailableError, so a store cut off
for a few seconds delays the job and loses nothing. Prints one line per event:
``CLAIMED e``, ``UNIT u``, ``SAVED u``, ``UNAVAILABLE <message>``, ``FINISHED``.
"""

import sys
import time

from faultkit import CheckpointStore, RetryPolicy, StoreUnavailableError

endpoint, bucket, key, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
store = CheckpointStore(
    f"s3://{bucket}/ck",
    key="faultkit",
    secret="faultkit-secret",
    client_kwargs={"endpoint_url": endpoint, "region_name": "us-east-1"},
    # Bounded: a silent partition must surface as an error in seconds, not minutes.
    config_kwargs={"connect_timeout": 1, "read_timeout": 2, "retries": {"max_attempts": 1}},
    retries=2,
)


def report(exc: BaseException) -> None:
    print(
        "UNAVAILABLE", time.time(), type(exc).__name__, str(exc).splitlines()[0][:1000], flush=True
    )


policy = RetryPolicy(
    on=StoreUnavailableError,
    attempts=200,
    timeout=120,
    wait_initial=0.2,
    wait_max=1.0,
    wait_jitter=0,
)


@policy
def attempt(fn, *args):
    try:
        return fn(*args)
    except StoreUnavailableError as exc:
        report(exc)
        raise


stage = store.stage(key)
attempt(stage.claim)
print("CLAIMED", stage.epoch, flush=True)
for u in range(n):
    if stage.is_done(u):
        continue
    time.sleep(0.05)  # the unit's work
    attempt(stage.done, u)
    print("UNIT", u, flush=True)
    if u % 5 == 4:
        attempt(stage.save, f"state after unit {u}".encode() * 100, u)
        print("SAVED", u, flush=True)
attempt(stage.finish, n)
print("FINISHED", flush=True)
