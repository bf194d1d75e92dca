"""The client of the Dask cluster test, run on the scheduler host.

Usage: dask_job.py SCHEDULER_ADDRESS EVENTS KEY N PAUSE [units|train]

Submits one resumable task (``dask_tasks.units`` or ``dask_tasks.train``) and prints
``SCOPE <scope>`` then ``RESULT <json>``.
"""

import json
import sys

import dask_tasks
from distributed import Client

from dask_plugins import client_scope, resumable

addr, events, key, n, pause = sys.argv[1:6]
fn = getattr(dask_tasks, sys.argv[6] if len(sys.argv) > 6 else "units")
with Client(addr, timeout=60) as client:
    print("SCOPE", client_scope(client), flush=True)
    fut = client.submit(resumable(fn), events, int(n), float(pause), key=key, pure=False)
    print("RESULT", json.dumps(fut.result(timeout=300)), flush=True)
