"""s3:// stores on a real S3-compatible server (SeaweedFS on loopback), no mock in between."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import uuid

import pytest

from faultkit import CheckpointStore, StoreConfigError, key
from faultkit._storage import open_storage
from faultkit._storage_s3 import FsspecStorage, ObstoreS3Storage, _code
from faultkit.testing import wait_until


def _storage(url: str, opts: dict, client: str = "s3fs") -> FsspecStorage:
    """A storage with its own clients (its own connections), as another process has."""
    s = open_storage(url, client=client, **opts)
    assert isinstance(s, FsspecStorage)
    assert isinstance(s, ObstoreS3Storage) == (client == "obstore")
    return s


@pytest.fixture(params=["obstore", "s3fs"])
def client(request):
    """Each S3 client a store may send the log's requests through."""
    return request.param


def _race(storages: list[FsspecStorage], path: str) -> dict[int, BaseException | None]:
    """Every storage creates ``path`` at once; {writer: None if it won, else its error}."""
    barrier = threading.Barrier(len(storages))
    out: dict[int, BaseException | None] = {}

    def write(i: int) -> None:
        barrier.wait()
        try:
            storages[i].create(path, f"writer {i}".encode())
            out[i] = None
        except BaseException as exc:
            out[i] = exc

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(storages))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_lost_create_is_file_exists(s3_store_url, client):
    """A create of a taken name raises FileExistsError (from SeaweedFS's 412) and keeps the
    first object's bytes."""
    url, opts = s3_store_url
    s = _storage(url, opts, client)
    s.create("log/000000000001", b"first")
    with pytest.raises(FileExistsError) as info:
        s.create("log/000000000001", b"second")
    assert _code(info.value) in ("PreconditionFailed", "412")
    with pytest.raises(FileExistsError), s.open_new("log/000000000001") as f:
        f.write(b"third")
    assert s.read("log/000000000001") == b"first"


def test_create_race_has_exactly_one_winner(s3_store_url):
    """Two writers racing to create the same name, 20 times over: each time exactly one wins,
    the other gets FileExistsError, and the stored bytes are the winner's (an obstore writer
    against an s3fs one: either may win)."""
    url, opts = s3_store_url
    storages = [_storage(url, opts, "obstore"), _storage(url, opts, "s3fs")]
    for n in range(20):
        path = f"race/{n:012d}"
        out = _race(storages, path)
        winners = [i for i, exc in out.items() if exc is None]
        losers = [exc for exc in out.values() if exc is not None]
        assert len(winners) == 1, out
        assert len(losers) == 1 and isinstance(losers[0], FileExistsError), out
        assert storages[0].read(path) == f"writer {winners[0]}".encode()


_CLAIM = textwrap.dedent(
    """
    import json, os, sys, time
    from faultkit import CheckpointStore
    url, k, ready, go = sys.argv[1:5]
    store = CheckpointStore(url, **json.loads(os.environ["FK_S3_OPTS"]))
    stage = store.stage(k)
    open(os.path.join(ready, str(os.getpid())), "w").close()
    while not os.path.exists(go):  # start together: the claims race each other
        time.sleep(0.005)
    stage.claim()
    print(stage.epoch)
    """
)


def test_eight_processes_claim_distinct_epochs(s3_store_url, tmp_path):
    """Eight processes claiming one stage at once get eight distinct epochs, 1 to 8."""
    url, opts = s3_store_url
    k = key("etl", "dag", f"run-{uuid.uuid4().hex[:8]}", "load")
    ready, go = tmp_path / "ready", tmp_path / "go"
    ready.mkdir()
    env = {**os.environ, "FK_S3_OPTS": json.dumps(opts)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CLAIM, url, k, str(ready), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        for _ in range(8)
    ]
    # Every process imports faultkit and opens its store before the race starts.
    wait_until(
        lambda: len(os.listdir(ready)) == 8 or any(p.poll() is not None for p in procs),
        60,
        "8 claimers to open their stores",
    )
    go.touch()
    epochs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        epochs.append(int(out.strip()))
    assert sorted(epochs) == list(range(1, 9))
    assert CheckpointStore(url, **opts).stage(k).claim().epoch == 9


def test_missing_bucket_names_it(seaweed_s3, client):
    """A store in a bucket that does not exist fails with a StoreConfigError that names the
    bucket and says to create it, on first use and when it must already exist."""
    bucket = f"fk-missing-{uuid.uuid4().hex[:8]}"
    opts = {**seaweed_s3.storage_options(), "client": client}
    store = CheckpointStore(f"s3://{bucket}/ck", **opts)
    with pytest.raises(StoreConfigError) as info:
        store.stage(key("etl", "dag", "run", "load")).claim()
    assert bucket in str(info.value) and "create it" in str(info.value)
    assert "Free space" not in str(info.value) and "permissions" not in str(info.value)
    with pytest.raises(StoreConfigError, match=bucket):
        CheckpointStore(f"s3://{bucket}/ck", must_exist=True, **opts)


def test_wrong_credentials_are_a_config_error(s3_store_url, client):
    """A secret the server refuses fails the first write with a StoreConfigError that says
    to fix the credentials, and never shows the secret."""
    url, opts = s3_store_url
    store = CheckpointStore(url, **{**opts, "secret": "not-the-secret", "client": client})
    with pytest.raises(StoreConfigError, match="credentials") as info:
        store.stage(key("etl", "dag", "run", "load")).claim()
    assert "not-the-secret" not in str(info.value)


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        pytest.param("key", 123, "a string", id="key-int"),
        pytest.param("secret", 1.5, "a string", id="secret-float"),
        pytest.param("token", ["t"], "a string", id="token-list"),
        pytest.param("anon", "yes", "True or False", id="anon-str"),
        pytest.param("requester_pays", 1, "True or False", id="requester-pays-int"),
        pytest.param("endpoint_url", 5, "a string", id="endpoint-int"),
        pytest.param("endpoint_url", "127.0.0.1:8333", "http://", id="endpoint-no-scheme"),
        pytest.param("client_kwargs", "x", "a dict", id="client-kwargs-str"),
        pytest.param("client_kwargs", {"endpoint_url": 5}, "a string", id="nested-endpoint"),
        pytest.param("client_kwargs", {"region_name": 1}, "a string", id="nested-region"),
        pytest.param("config_kwargs", [], "a dict", id="config-kwargs-list"),
        pytest.param("config_kwargs", {"no_such": 1}, "Config", id="config-kwargs-unknown"),
        pytest.param("s3_additional_kwargs", "x", "a dict", id="additional-str"),
        pytest.param("default_block_size", True, "a positive int", id="block-size-bool"),
        pytest.param("default_block_size", -1, "a positive int", id="block-size-negative"),
    ],
)
def test_wrong_typed_options_fail_at_construction(seaweed_s3, option, value, expected):
    """A wrong-typed S3 option fails when the store is made, naming the option and the type
    it needs, without showing a secret's value."""
    opts = {**seaweed_s3.storage_options(), option: value}
    with pytest.raises(StoreConfigError) as info:
        CheckpointStore("s3://fk-options/ck", **opts)
    msg = str(info.value)
    assert option in msg and expected in msg
    if option in ("key", "secret", "token"):
        assert repr(value) not in msg


def test_unknown_option_fails_at_construction(seaweed_s3):
    """An option s3fs does not take fails when the store is made, with the likely name."""
    opts = {**seaweed_s3.storage_options(), "secret_key": "s"}
    with pytest.raises(StoreConfigError, match="did you mean 'secret'"):
        CheckpointStore("s3://fk-options/ck", **opts)


def test_file_store_options_are_ignored(s3_store_url):
    """A file:// option (fsync) given to an s3:// store is ignored, not fatal."""
    url, opts = s3_store_url
    store = CheckpointStore(url, fsync=False, **opts)
    assert store.stage(key("etl", "dag", "run", "load")).claim().epoch == 1


def test_options_s3fs_refuses_are_a_config_error(seaweed_s3):
    """Options s3fs itself refuses (key and username together) fail as StoreConfigError."""
    opts = {**seaweed_s3.storage_options(), "username": "someone"}
    with pytest.raises(StoreConfigError, match="key or username"):
        CheckpointStore("s3://fk-options/ck", **opts)


@pytest.fixture
def log_folder(s3_store_url, client):
    """A storage whose folder ``log`` holds records 1, 2, 3, 5, 8, 20, a sub-folder ``4``,
    ``@gone`` and two names sorting between 1 and 2."""
    url, opts = s3_store_url
    s = _storage(url, opts, client)
    for n in (1, 2, 3, 5, 8, 20):
        s.create(f"log/{n:012d}", b"r")
    s.create("log/000000000004/child", b"c")
    s.create("log/000000000001.a", b"x")
    s.create("log/000000000001.b", b"x")
    s.create("log/@gone", b"")
    return s


@pytest.mark.parametrize(
    ("names", "present"),
    [
        pytest.param([2, 4], [2], id="neighbours-folder-is-absent"),
        pytest.param([5, 7], [5], id="neighbours"),
        pytest.param([6, 7], [], id="neighbours-absent"),
        pytest.param([1, 2], [1, 2], id="past-truncated-listing"),
        pytest.param([0, 1], [1], id="from-zero"),
        pytest.param([3], [3], id="one"),
        pytest.param([9], [], id="one-absent"),
        pytest.param([1, 20, 1000], [1, 20], id="far-apart"),
        pytest.param(["@gone"], ["@gone"], id="marker"),
        pytest.param(["@gone", 5], ["@gone", 5], id="mixed"),
    ],
)
def test_present_tells_which_names_exist(log_folder, names, present):
    """present() answers exactly which names are objects directly under the folder."""

    def name(n):
        return n if isinstance(n, str) else f"{n:012d}"

    assert log_folder.present("log", [name(n) for n in names]) == {name(n) for n in present}
    assert log_folder.present("nowhere", [name(n) for n in names]) == set()


def _count_requests(s: FsspecStorage) -> list[str]:
    """The S3 operations ``s`` sends from now on, as they are sent."""
    sent: list[str] = []
    s._run(s.fs.set_session)
    s.fs.s3.meta.events.register(
        "before-send.s3", lambda request, **kw: sent.append(request.method)
    )
    return sent


def test_present_of_log_neighbours_is_one_request(s3_store_url):
    """Checking a log record's two neighbours costs one request, whether or not they exist."""
    url, opts = s3_store_url
    s = _storage(url, opts)
    for n in range(1, 6):
        s.create(f"log/{n:012d}", b"r")
    sent = _count_requests(s)
    assert s.present("log", ["000000000003", "000000000005"]) == {"000000000003", "000000000005"}
    assert s.present("log", ["000000000005", "000000000007"]) == {"000000000005"}
    assert sent == ["GET", "GET"]


def test_read_and_present_is_one_round_trip(s3_store_url):
    """A commit's checks after its PUT (read the predecessor, ask for the successor) go out
    together: both requests are sent before either answer is handled."""
    url, opts = s3_store_url
    s = _storage(url, opts)
    for n in range(1, 4):
        s.create(f"log/{n:012d}", f"r{n}".encode())
    s._run(s.fs.set_session)
    seen: list[str] = []
    events = s.fs.s3.meta.events
    events.register("before-send.s3", lambda request, **kw: seen.append(f"send {request.method}"))
    events.register("after-call.s3", lambda **kw: seen.append("answer"))
    got = s.read_and_present("log/000000000002", "log", ["000000000003"])
    assert got == (b"r2", {"000000000003"})
    assert sorted(seen[:2]) == ["send GET", "send HEAD"] and seen[2:] == ["answer", "answer"], seen
    seen.clear()
    assert s.read("log/000000000001") == b"r1"  # one request: no HEAD for the size first
    assert s.read_many(["log/000000000001", "log/000000000003"]) == {
        "log/000000000001": b"r1",
        "log/000000000003": b"r3",
    }
    assert [x for x in seen if x.startswith("send")] == ["send GET"] * 3, seen
    seen.clear()
    assert s.read_and_present("log/000000000009", "log", ["000000000010"]) == (None, set())
    assert len(seen) == 4 and seen[2:] == ["answer", "answer"]


def test_info_and_subdirs(s3_store_url):
    """info() gives size and an identity that changes when the object is replaced, and a
    folder is not an object; subdirs() lists folders, not objects."""
    url, opts = s3_store_url
    s = _storage(url, opts)
    s.create("k/@blobs/b1", b"12345")
    s.create("k/@log/000000000001", b"r")
    s.create("k/top", b"t")
    first = s.info("k/@blobs/b1")
    assert first.size == 5 and first.mtime > 0
    s.fs.pipe_file(f"{s.root}/k/@blobs/b1", b"54321")
    assert s.info("k/@blobs/b1").ident != first.ident
    with pytest.raises(FileNotFoundError):
        s.info("k/@blobs")
    with pytest.raises(FileNotFoundError):
        s.info("k/none")
    assert s.subdirs("k") == ["@blobs", "@log"]
    assert s.subdirs("") == ["k"]


def test_emptied_folder_lists_nothing(s3_store_url):
    """A folder whose objects were all deleted lists no names and walks no files (SeaweedFS
    keeps it as an object named "<folder>/")."""
    url, opts = s3_store_url
    s = _storage(url, opts)
    s.create("staging/f/a/x", b"1")
    s.create("staging/f/b", b"1")
    s.delete("staging/f/a/x")
    assert s.list("staging/f/a") == []
    assert s.subdirs("staging/f/a") == []
    assert list(s.walk_files("staging/f/a")) == []
    assert list(s.walk_files("staging")) == ["staging/f/b"]
    s.delete_tree("staging")
    assert list(s.walk_files("staging")) == []


@pytest.mark.parametrize("retries", [0, -1, "2", True])
def test_retries_option_is_checked(seaweed_s3, retries):
    """retries= (s3fs's own retries of a failed request) must be an int of at least 1."""
    with pytest.raises(StoreConfigError, match="retries"):
        CheckpointStore("s3://fk-options/ck", retries=retries, **seaweed_s3.storage_options())


def test_unreachable_store_is_a_retryable_error(seaweed_s3, client):
    """A store whose endpoint does not answer fails a claim with StoreUnavailableError (a
    ConnectionError that retry policies count as infrastructure), naming the store and
    what to do, within the configured timeouts; nothing is mistaken for a config error."""
    from faultkit import RetryPolicy, StoreUnavailableError, classify
    from faultkit.testing import free_port

    opts = seaweed_s3.storage_options()
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = CheckpointStore(
        "s3://fk-unreachable/ck",
        **{**opts, "client_kwargs": {**opts["client_kwargs"], "endpoint_url": endpoint}},
        config_kwargs={"connect_timeout": 1, "read_timeout": 1, "retries": {"max_attempts": 1}},
        retries=1,
        client=client,
    )
    calls = []

    @RetryPolicy(on=StoreUnavailableError, attempts=2, wait_initial=0, wait_jitter=0)
    def claim():
        calls.append(1)
        return store.stage(key("etl", "dag", "run", "load")).claim()

    with pytest.raises(StoreUnavailableError) as info:
        claim()
    assert len(calls) == 2  # retried, as the policy said
    assert isinstance(info.value, ConnectionError)
    assert classify(info.value) == "infrastructure"
    msg = str(info.value)
    assert "s3://fk-unreachable/ck" in msg and "did not answer" in msg
    assert "retrying it is safe" in msg and opts["secret"] not in msg


def test_puts_do_not_wait_for_100_continue(s3_store_url):
    """No request carries Expect: 100-continue: aiohttp waits for the server's "100
    Continue" with no timeout, so a partition mid-commit would hang the writer for ever
    (tests/cluster/test_store_host.py shows the bounded failure instead)."""
    url, opts = s3_store_url
    store = CheckpointStore(url, client="s3fs", **opts)
    sent = []
    fs = store._storage.fs
    fs.s3.meta.events.register(
        "before-send.s3", lambda request, **_: sent.append((request.method, request.headers))
    )
    stage = store.stage(key("etl", "dag", "run", "load")).claim()
    stage.done(1)
    stage.save(b"x" * 1000, step=1)
    puts = [h for m, h in sent if m == "PUT"]
    assert len(puts) >= 3  # claim, done, snapshot data and record
    assert all("Expect" not in h for h in puts), puts


# -- which client carries the log's requests --------------------------------------------


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        pytest.param(
            {"s3_additional_kwargs": {"ServerSideEncryption": "AES256"}}, "s3_add", id="sse-headers"
        ),
        pytest.param({"requester_pays": True}, "requester_pays", id="requester-pays"),
        pytest.param(
            {"config_kwargs": {"signature_version": "s3v4"}},
            "signature_version",
            id="botocore-config",
        ),
        pytest.param({"client_kwargs": {"verify": "/etc/ssl/ca.pem"}}, "CA bundle", id="ca-bundle"),
    ],
)
def test_fsspec_options_keep_the_store_on_s3fs(seaweed_s3, extra, why):
    """Options only s3fs understands keep every request on s3fs; asking for obstore then is
    a StoreConfigError that names the option."""
    opts = seaweed_s3.storage_options()
    if "client_kwargs" in extra:
        extra = {"client_kwargs": {**opts["client_kwargs"], **extra["client_kwargs"]}}
    opts = {**opts, **extra}
    s = open_storage("s3://fk-options/ck", **opts)
    assert type(s) is FsspecStorage
    with pytest.raises(StoreConfigError, match=why) as info:
        open_storage("s3://fk-options/ck", client="obstore", **opts)
    assert "client='auto'" in str(info.value)


def test_credentials_from_the_environment_use_obstore(seaweed_s3, monkeypatch):
    """A store given only its URL finds credentials, endpoint and region in the AWS_*
    variables, as botocore does, and commits through obstore; without credentials there
    (a profile or an instance role) it stays on s3fs."""
    for name, value in seaweed_s3.aws_env().items():
        monkeypatch.setenv(name, value)
    bucket = f"fk-env-{uuid.uuid4().hex[:8]}"
    seaweed_s3.make_bucket(bucket)
    store = CheckpointStore(f"s3://{bucket}/ck")
    assert isinstance(store._storage, ObstoreS3Storage)
    stage = store.stage(key("etl", "dag", "run", "load")).claim()
    stage.done(1, {"rows": 3})
    again = CheckpointStore(f"s3://{bucket}/ck", client="s3fs").stage(
        key("etl", "dag", "run", "load")
    )
    again.refresh()
    assert type(again._storage) is FsspecStorage and again.results() == {1: {"rows": 3}}
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    assert type(open_storage(f"s3://{bucket}/ck")) is FsspecStorage


@pytest.mark.parametrize("value", ["boto", "", 1, None])
def test_client_option_is_checked(seaweed_s3, value):
    """client= is 'auto', 'obstore' or 's3fs'; anything else says so when the store is made."""
    with pytest.raises(StoreConfigError, match=r"client=.*'auto'"):
        CheckpointStore("s3://fk-options/ck", client=value, **seaweed_s3.storage_options())


_FORKED = textwrap.dedent(
    """
    import json, os, sys
    from faultkit import CheckpointStore
    url, k = sys.argv[1:3]
    store = CheckpointStore(url, **json.loads(os.environ["FK_S3_OPTS"]))
    stage = store.stage(k).claim()
    stage.done(1, {"by": "parent"})  # obstore's runtime is running in this process now
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a forked worker (Airflow, Celery, multiprocessing 'fork')
        child = CheckpointStore(url, **json.loads(os.environ["FK_S3_OPTS"]))
        st = child.stage(k + "-child").claim()
        st.done(1, {"by": "child"})
        seen = store.stage(k)  # through the parent's store object, inherited
        seen.refresh()
        seen = seen.results()
        os.write(w, json.dumps([st.results(), sorted(seen)]).encode())
        os._exit(0)
    os.close(w)
    got = b""
    while chunk := os.read(r, 65536):
        got += chunk
    os.waitpid(pid, 0)
    stage.done(2, {"by": "parent"})
    print(got.decode())
    """
)


def test_a_forked_child_does_not_hang_on_the_parents_client(s3_store_url):
    """obstore's runtime does not survive fork(): a child forked after its parent made a
    request would hang at its first one. Such a child sends its requests through s3fs and
    finishes; the parent keeps committing."""
    url, opts = s3_store_url
    k = key("etl", "dag", f"run-{uuid.uuid4().hex[:8]}", "load")
    out = subprocess.run(
        [sys.executable, "-c", _FORKED, url, k],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "FK_S3_OPTS": json.dumps(opts)},
    )
    assert out.returncode == 0, out.stderr
    results, seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert results == {"1": {"by": "child"}} and seen == [1]
    st = CheckpointStore(url, client="s3fs", **opts).stage(k)
    st.refresh()
    assert st.results() == {1: {"by": "parent"}, 2: {"by": "parent"}}


def test_reads_inside_an_event_loop_use_s3fs(s3_store_url):
    """Called from async code (a running loop on this thread), the concurrent reads go
    through s3fs's own loop: a second loop cannot run on the thread."""
    import asyncio

    url, opts = s3_store_url
    s = _storage(url, opts, "obstore")
    for n in range(1, 4):
        s.create(f"log/{n:012d}", f"r{n}".encode())

    async def inside() -> tuple:
        return (
            s.read_many(["log/000000000001", "log/000000000009"]),
            s.read_and_present("log/000000000002", "log", ["000000000003"]),
            s.present("log", ["000000000003", "000000000004"]),
        )

    many, rp, present = asyncio.run(inside())
    assert many == {"log/000000000001": b"r1", "log/000000000009": None}
    assert rp == (b"r2", {"000000000003"})
    assert present == {"000000000003"}
    # and outside a loop, through obstore: the same answers
    assert s.read_many(["log/000000000001", "log/000000000009"]) == many
    assert s.read_and_present("log/000000000002", "log", ["000000000003"]) == rp
