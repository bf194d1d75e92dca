"""Create the work pool, deploy ``prefect_etl.etl`` to it from this directory, and set up
faultkit's crash-retry automations. Run on a host that reaches the server
(``PREFECT_API_URL``). Usage: prefect_setup.py POOL HEARTBEAT_GRACE
"""

import sys
from pathlib import Path

from prefect import Flow, get_client
from prefect.client.schemas.actions import WorkPoolCreate

from prefect_blocks import setup_crash_retry

pool, grace = sys.argv[1], float(sys.argv[2])
with get_client(sync_client=True) as client:
    client.create_work_pool(WorkPoolCreate(name=pool, type="process"), overwrite=True)
flow = Flow.from_source(source=str(Path(__file__).parent), entrypoint="prefect_etl.py:etl")
dep = flow.deploy(name="etl", work_pool_name=pool, build=False, push=False, print_next_steps=False)
setup_crash_retry("faultkit-demo", deployments=[dep], heartbeat_grace=grace)
print("DEPLOYMENT", dep)
