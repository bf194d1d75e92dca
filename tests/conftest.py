"""Shared fixtures: real local components (alert receiver, moto S3, PostgreSQL)."""

from __future__ import annotations

import os
import uuid

import pytest

from faultkit.testing import AlertReceiver, MotoS3Server, PostgresServer

# Child processes started by tests must import the checkout, whatever their cwd.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))


@pytest.fixture
def alert_receiver():
    """A real HTTP receiver on 127.0.0.1; ``alert_receiver.url()`` is an Apprise json:// URL."""
    with AlertReceiver() as r:
        yield r


@pytest.fixture(scope="session")
def moto_s3():
    """moto's S3 server, started once per session on a loopback port."""
    with MotoS3Server() as server:
        yield server


@pytest.fixture
def s3_store_url(moto_s3):
    """(url, storage_options) of a fresh bucket on the moto server."""
    bucket = f"fk-{uuid.uuid4().hex[:12]}"
    moto_s3.make_bucket(bucket)
    return f"s3://{bucket}/ck", moto_s3.storage_options()


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server the tests start themselves (initdb in a temp dir)."""
    reason = PostgresServer.available()
    if reason:
        pytest.skip(f"PostgreSQL tests skipped: {reason} (make test installs Debian's postgresql)")
    with PostgresServer() as pg:
        yield pg


@pytest.fixture
def postgres_url(postgres_server):
    """A SQLAlchemy URL of a fresh database on the test PostgreSQL server."""
    import sqlalchemy as sa

    name = f"fk_{uuid.uuid4().hex[:10]}"
    eng = sa.create_engine(postgres_server.url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(sa.text(f"CREATE DATABASE {name}"))
    eng.dispose()
    return postgres_server.url.rsplit("/", 1)[0] + f"/{name}"
