"""Real local components for tests and demos: an alert receiver, S3 and PostgreSQL servers."""

from __future__ import annotations

from ._receiver import AlertReceiver
from ._seaweed import SeaweedS3Server
from ._services import MotoS3Server, PostgresServer, free_port, wait_until

__all__ = [
    "AlertReceiver",
    "MotoS3Server",
    "PostgresServer",
    "SeaweedS3Server",
    "free_port",
    "wait_until",
]
