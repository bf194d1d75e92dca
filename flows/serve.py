"""Serve the ETL and training flows, with crashed runs re-run (``python flows/serve.py``).

Needs ``PREFECT_API_URL`` and the ``faultkit-demo`` blocks (``faultkit demo --engine prefect``
creates them), or run :func:`save_blocks` first. Equivalent with a process worker::

    prefect work-pool create demo --type process
    prefect deploy flows/etl.py:etl_flow -n etl -p demo && prefect worker start -p demo
    # the worker's environment needs PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prefect import serve

from flows.etl import etl_flow
from flows.train import train_flow
from prefect_blocks import setup_crash_retry

HEARTBEAT_SECONDS = 30


def main() -> None:
    """Create the crash-retry automations and serve both flows until interrupted.

    ``FAULTKIT_HEARTBEAT_GRACE`` sets the zombie automation's grace (seconds);
    ``FAULTKIT_ZOMBIES=0`` leaves that automation out (crashes the runner sees still re-run).
    """
    grace = float(os.environ.get("FAULTKIT_HEARTBEAT_GRACE", "90"))
    zombies = os.environ.get("FAULTKIT_ZOMBIES", "1") != "0"
    setup_crash_retry("faultkit-demo", heartbeat_grace=grace, zombies=zombies)
    serve(
        etl_flow.to_deployment(name="etl"),
        train_flow.to_deployment(name="train"),
        heartbeat_seconds=HEARTBEAT_SECONDS,
        print_starting_message=False,
        limit=int(os.environ.get("FAULTKIT_SERVE_LIMIT", "4")),
    )


if __name__ == "__main__":
    main()
