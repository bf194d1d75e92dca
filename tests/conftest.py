"""Shared fixtures: real local components (alert receiver, SeaweedFS and moto S3, PostgreSQL)."""

from __future__ import annotations

import os
import uuid

import pytest

from faultkit import CheckpointStore, subscribe
from faultkit.testing import AlertReceiver, MotoS3Server, PostgresServer, SeaweedS3Server

# Child processes started by tests must import the checkout, whatever their cwd.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))


def pytest_collection_modifyitems(config, items):
    """Under ``pytest -n`` (pytest-xdist, ``--dist loadgroup``; ``make test`` runs two
    workers) a module stays on one worker, so its module-scoped servers start once, and the
    multi-host tests share one worker, so two simulated clusters never run at once."""
    for item in items:
        path = item.nodeid.split("::")[0]
        group = "cluster" if path.startswith("tests/cluster/") else path
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture
def alert_receiver():
    """A real HTTP receiver on 127.0.0.1; ``alert_receiver.url()`` is an Apprise json:// URL."""
    with AlertReceiver() as r:
        yield r


@pytest.fixture
def events():
    """Every faultkit event emitted during the test."""
    got = []
    unsubscribe = subscribe(got.append)
    yield got
    unsubscribe()


COMPACT = 16  # compact_every of the compacting backends


@pytest.fixture(
    params=[
        pytest.param("memory", id="memory"),
        pytest.param("file", id="file"),
        pytest.param("file-nofsync", id="file-nofsync-compact"),
        pytest.param("s3", id="s3-compact"),
    ]
)
def backend(request, tmp_path):
    """(url, storage_options) for a fresh, empty store on each backend (S3: SeaweedFS).

    Two of them compact their logs every 16 records, so every store test also runs across
    compactions (the default, 500, is rarely reached in a test)."""
    if request.param == "memory":
        return f"memory://{uuid.uuid4().hex}", {}
    if request.param == "file":
        return f"file://{tmp_path}/store", {}
    if request.param == "file-nofsync":
        return f"file://{tmp_path}/store", {"fsync": False, "compact_every": COMPACT}
    url, opts = request.getfixturevalue("s3_store_url")
    return url, {**opts, "compact_every": COMPACT}


@pytest.fixture
def store(backend):
    """A CheckpointStore on each backend."""
    url, opts = backend
    return CheckpointStore(url, **opts)


@pytest.fixture(scope="session")
def moto_s3():
    """moto's S3 server, started once per session on a loopback port (where a mock is enough)."""
    with MotoS3Server() as server:
        yield server


@pytest.fixture(scope="session")
def seaweed_s3():
    """A real S3-compatible server (SeaweedFS), started once per session on loopback ports."""
    reason = SeaweedS3Server.available()
    if reason:
        pytest.skip(f"S3 tests skipped: {reason}")
    with SeaweedS3Server() as server:
        yield server


@pytest.fixture
def s3_store_url(seaweed_s3):
    """(url, storage_options) of a fresh bucket on the SeaweedFS server."""
    bucket = f"fk-{uuid.uuid4().hex[:12]}"
    seaweed_s3.make_bucket(bucket)
    return f"s3://{bucket}/ck", seaweed_s3.storage_options()


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server the tests start themselves (initdb in a temp dir)."""
    reason = PostgresServer.available()
    if reason:
        pytest.skip(f"PostgreSQL tests skipped: {reason} (make test installs Debian's postgresql)")
    with PostgresServer() as pg:
        yield pg


MACHINE_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(scope="session")
def postgres_admin_url(request):
    """An admin URL of a PostgreSQL server: the machine's own at 127.0.0.1:5432 (user
    postgres, trust auth) when it answers, else one the tests start from the installed
    binaries (``postgres_server``), else the test is skipped saying why."""
    import sqlalchemy as sa

    eng = sa.create_engine(MACHINE_POSTGRES, connect_args={"connect_timeout": 2})
    try:
        with eng.connect() as c:
            c.execute(sa.text("SELECT 1"))
        return MACHINE_POSTGRES
    except Exception:
        return request.getfixturevalue("postgres_server").url
    finally:
        eng.dispose()


@pytest.fixture
def postgres_url(postgres_admin_url):
    """A SQLAlchemy URL of a fresh database (dropped afterwards) on a PostgreSQL server."""
    import sqlalchemy as sa

    name = f"fk_{uuid.uuid4().hex[:10]}"
    eng = sa.create_engine(postgres_admin_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(sa.text(f"CREATE DATABASE {name}"))
    yield postgres_admin_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        with eng.connect() as c:
            c.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    finally:
        eng.dispose()
