"""Alerter on real receivers (HTTP and SMTP), cross-process dedupe, secrets, metrics."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import pytest

import faultkit.metrics
from faultkit import (
    AlertConfigError,
    Alerter,
    CheckpointStore,
    Event,
    RetryPolicy,
    StaleAttemptError,
)
from faultkit.events import emit
from faultkit.testing import AlertReceiver, free_port, wait_until

SECRET = "S3cr3tT0kenZ9xQ"


def lost_event(key: str = "etl/run-1/load/0", worker: str = "tcp://10.0.0.7:40000") -> Event:
    return Event(
        "worker_lost",
        key,
        f"worker {worker} was lost while running {key}",
        {"worker": worker, "work_lost_seconds": 42.5},
        dedupe_key=worker,
    )


@pytest.fixture
def store(tmp_path):
    """A file store shared by every process of the test."""
    return CheckpointStore(f"file://{tmp_path / 'store'}")


def test_delivered_to_http_receiver_with_a_readable_message(alert_receiver):
    """An alert reaches a json:// webhook and says what failed, where, what was lost, what next."""
    alerter = Alerter(alert_receiver.url())
    assert alerter.send(lost_event()) is True
    (msg,) = alert_receiver.wait_for(1)
    assert msg["title"] == "faultkit: worker lost - etl/run-1/load/0"
    body = msg["message"]
    assert "worker tcp://10.0.0.7:40000 was lost" in body
    assert "Where: etl/run-1/load/0" in body
    assert "What was lost: work_lost_seconds: 42.5" in body
    assert "What happens next: The orchestrator retries the lost tasks" in body
    assert msg["type"] == "failure"


def test_delivered_by_email_to_a_real_smtp_server():
    """A mailto:// channel delivers through a real SMTP server on 127.0.0.1."""
    from aiosmtpd.controller import Controller

    received: list[bytes] = []

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            received.append(envelope.content)
            return "250 OK"

    port = free_port()
    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        url = (
            f"mailto://127.0.0.1:{port}?from=faultkit@example.com&to=ops@example.com&mode=insecure"
        )
        alerter = Alerter(url)
        event = Event(
            "resumed",
            "train/run-9/fit/0",
            "attempt 2 resumed train/run-9/fit/0",
            {"units_done": 7, "last_step": 400, "seconds_since_last_commit": 12.0},
        )
        assert alerter.send(event) is True
        wait_until(lambda: received, 30, "an e-mail at the SMTP server")
    finally:
        controller.stop()
    mail = received[0].decode("utf-8", "replace")
    assert "Subject: faultkit: resumed - train/run-9/fit/0" in mail
    assert "To: ops@example.com" in mail
    assert "snapshot of step 400" in mail


def test_deduplicated_in_process_without_a_store(alert_receiver):
    """Without a store the same event is sent once per window in this process."""
    alerter = Alerter(alert_receiver.url())
    assert alerter.send(lost_event()) is True
    assert alerter.send(lost_event()) is False
    assert alerter.send(lost_event(worker="tcp://10.0.0.8:40000")) is True  # another dedupe key
    alert_receiver.wait_for(2)
    time_limit = time.monotonic() + 0.3
    wait_until(lambda: time.monotonic() > time_limit, 5, "late duplicates to arrive")
    assert len(alert_receiver.messages()) == 2


SENDER = textwrap.dedent(
    """
    import os, sys, time
    from faultkit import Alerter, CheckpointStore, Event
    url, store_url, ready, gate = sys.argv[1:5]
    alerter = Alerter(url, store=CheckpointStore(store_url))
    events = [Event("worker_lost", f"etl/run-1/t{i}", "lost with its worker", {"i": i},
                    dedupe_key="tcp://10.0.0.7:40000") for i in range(5)]
    open(ready, "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            sys.exit("gate never opened")
        time.sleep(0.002)
    print(" ".join("SENT" if alerter.send(e) else "SUPPRESSED" for e in events), flush=True)
    """
)


def test_deduplicated_across_two_processes_with_a_shared_store(alert_receiver, tmp_path):
    """Two processes sending the same events at the same moment deliver each exactly once."""
    script = tmp_path / "sender.py"
    script.write_text(SENDER)
    store_url = f"file://{tmp_path / 'shared-store'}"
    gate = tmp_path / "gate"
    procs = []
    for i in range(2):
        ready = tmp_path / f"ready-{i}"
        procs.append(
            (
                ready,
                subprocess.Popen(
                    [
                        sys.executable,
                        str(script),
                        alert_receiver.url(),
                        store_url,
                        str(ready),
                        str(gate),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=os.environ.copy(),
                ),
            )
        )
    wait_until(lambda: all(r.exists() for r, _ in procs), 60, "both senders ready")
    gate.touch()
    outputs = []
    for _, p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        outputs.append(out.split())
    got = alert_receiver.wait_for(5)
    for p_out in zip(*outputs, strict=True):  # per event: one process sent, one suppressed
        assert sorted(p_out) == ["SENT", "SUPPRESSED"], outputs
    time_limit = time.monotonic() + 0.5
    wait_until(lambda: time.monotonic() > time_limit, 5, "late duplicates to arrive")
    titles = sorted(m["title"] for m in alert_receiver.messages())
    assert len(got) == 5 and titles == [f"faultkit: worker lost - etl/run-1/t{i}" for i in range(5)]


def test_window_expiry_uses_numbered_markers(alert_receiver, store):
    """After the window the event is sent again, by whoever creates the next marker."""
    first = Alerter(alert_receiver.url(), store=store, dedupe_window=0.5)
    second = Alerter(alert_receiver.url(), store=store, dedupe_window=0.5)  # another "process"
    assert first.send(lost_event()) is True
    assert second.send(lost_event()) is False
    t_sent = time.monotonic()
    wait_until(lambda: time.monotonic() - t_sent > 0.6, 5, "the dedupe window to pass")
    assert second.send(lost_event()) is True
    assert first.send(lost_event()) is False
    alert_receiver.wait_for(2)
    (folder,) = store._storage.list("@alerts")
    assert sorted(store._storage.list(f"@alerts/{folder}")) == ["000000000001", "000000000002"]
    assert len(alert_receiver.messages()) == 2


def test_failing_channel_retried_then_delivered_once(alert_receiver):
    """A channel that fails twice then recovers gets the alert once, within the send call."""
    alert_receiver.fail_next(2)
    alerter = Alerter(alert_receiver.url(), delivery_attempts=3, delivery_wait=0.05)
    assert alerter.send(lost_event()) is True
    assert alert_receiver.failed == 2
    assert len(alert_receiver.wait_for(1)) == 1


def test_receiver_down_then_up_delivered_once_after_recovery(caplog):
    """A receiver that is down when the alert is sent gets it once when it comes back."""
    caplog.set_level(logging.WARNING)
    port = free_port()
    alerter = Alerter(f"json://127.0.0.1:{port}/hook", delivery_attempts=8, delivery_wait=0.1)
    result: list[bool] = []
    sender = threading.Thread(target=lambda: result.append(alerter.send(lost_event())))
    sender.start()
    try:
        wait_until(lambda: "Connection error" in caplog.text, 30, "a failed delivery")
        with AlertReceiver(port=port) as receiver:
            sender.join(60)
            assert result == [True]
            receiver.wait_for(1)
            assert len(receiver.messages()) == 1
    finally:
        sender.join(60)


def test_failure_is_logged_never_raised_and_secrets_never_leak(alert_receiver, caplog, capfd):
    """Every channel failing returns False and logs, with no secret in logs, errors or reprs."""
    caplog.set_level(logging.DEBUG)
    stderr_handler = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(stderr_handler)
    try:
        alert_receiver.fail_next(100)
        down = free_port()
        alerter = Alerter(
            [
                f"json://ops:{SECRET}@127.0.0.1:{alert_receiver.port}/hook",
                f"json://127.0.0.1:{down}/hook?token={SECRET}2",
            ],
            delivery_attempts=2,
            delivery_wait=0.01,
        )
        assert alerter.send(lost_event()) is False
        with pytest.raises(AlertConfigError) as info:
            Alerter(f"nosuchservice://admin:{SECRET}@example.com/{SECRET}3")
    finally:
        logging.getLogger().removeHandler(stderr_handler)
    assert alert_receiver.failed == 2
    assert "could not be delivered to json://ops:****@127.0.0.1" in caplog.text
    out, err = capfd.readouterr()
    texts = [caplog.text, out, err, repr(alerter), str(info.value), str(alerter.channels)]
    texts += [r.getMessage() for r in caplog.records]
    assert "Connection error" in caplog.text  # apprise's own failure logs were kept...
    for text in texts:
        assert SECRET not in text  # ...but with the secrets taken out
    assert "nosuchservice://***@example.com" in str(info.value)


def test_broken_store_still_delivers(alert_receiver, tmp_path, monkeypatch):
    """When the dedupe store fails, the alert is still delivered (deduped in-process)."""
    store = CheckpointStore(f"file://{tmp_path / 'store'}")
    alerter = Alerter(alert_receiver.url(), store=store)

    def refuse(path: str, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store._storage, "create", refuse)  # fault injection at the store seam
    assert alerter.send(lost_event()) is True
    assert alerter.send(lost_event()) is False
    assert len(alert_receiver.wait_for(1)) == 1


def test_group_of_lost_tasks_is_one_alert(alert_receiver, store):
    """50 tasks lost with one worker make one alert, sent once across alerters."""
    events = [lost_event(key=f"etl/run-1/t{i:02d}") for i in range(50)]
    first = Alerter(alert_receiver.url(), store=store)
    second = Alerter(alert_receiver.url(), store=store)
    assert first.send_group(events) is True
    assert second.send_group(events) is False
    assert second.send(events[7]) is False  # a member alone is already covered
    (msg,) = alert_receiver.wait_for(1)
    assert msg["title"] == "faultkit: worker lost - tcp://10.0.0.7:40000"
    assert "50 worker lost event(s)" in msg["message"]
    assert "etl/run-1/t00" in msg["message"] and "(+40 more)" in msg["message"]
    assert "work_lost_seconds: 2125" in msg["message"]


def test_attach_forwards_emitted_events_of_its_kinds(alert_receiver):
    """attach() sends emitted events of the chosen kinds until unsubscribed."""
    alerter = Alerter(alert_receiver.url())
    unsubscribe = alerter.attach()
    try:
        emit(Event("retry_scheduled", "noisy", "attempt 1 failed"))  # not a default kind
        emit(lost_event())
    finally:
        unsubscribe()
    emit(lost_event(worker="tcp://after-unsubscribe:1"))
    (msg,) = alert_receiver.wait_for(1)
    assert msg["title"] == "faultkit: worker lost - etl/run-1/load/0"
    assert len(alert_receiver.messages()) == 1


def test_attach_with_group_window_batches_a_burst(alert_receiver):
    """With a group window, a burst of worker_lost events for one worker is one alert."""
    alerter = Alerter(alert_receiver.url())
    unsubscribe = alerter.attach(group_window=0.3)
    try:
        for i in range(20):
            emit(lost_event(key=f"etl/run-2/t{i}"))
        (msg,) = alert_receiver.wait_for(1)
    finally:
        unsubscribe()
    assert "20 worker lost event(s)" in msg["message"]
    assert len(alert_receiver.messages()) == 1


def test_resume_of_a_stage_alerts_what_was_lost(alert_receiver, store):
    """A stage resumed by a new attempt alerts once, saying what was kept and lost."""
    alerter = Alerter(alert_receiver.url(), store=store)
    unsubscribe = alerter.attach()
    try:
        with store.stage("etl/run-3/load") as st:
            st.done("part-0")
            st.done("part-1")
        with store.stage("etl/run-3/load") as st2:
            assert st2.resumed
    finally:
        unsubscribe()
    (msg,) = alert_receiver.wait_for(1)
    assert msg["title"] == "faultkit: resumed - etl/run-3/load"
    assert "kept: 2 unit(s) done" in msg["message"]
    assert "What was lost: work after the last commit" in msg["message"]


def test_alert_failure_never_changes_the_task_outcome(alert_receiver):
    """A retried call whose alert channel is down still raises its own error, unchanged."""
    alert_receiver.fail_next(100)
    alerter = Alerter(alert_receiver.url(), delivery_attempts=1)
    unsubscribe = alerter.attach()
    err = ConnectionError("database unreachable")
    calls = []

    def always() -> None:
        calls.append(1)
        raise err

    try:
        with pytest.raises(ConnectionError) as info:
            RetryPolicy(on=ConnectionError, attempts=2, wait_initial=0, wait_jitter=0).call(always)
    finally:
        unsubscribe()
    assert info.value is err and len(calls) == 2
    assert alerter.flush(30)
    assert alert_receiver.failed == 1  # the gave_up alert was attempted


def test_unreachable_channel_never_delays_the_task(tmp_path):
    """An attached alerter whose channel hangs (a server that accepts and never answers)
    does not slow entering a stage: the resumed alert is sent from a background thread."""
    import socket
    import time

    from faultkit import CheckpointStore

    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(8)
    port = hang.getsockname()[1]
    try:
        store = CheckpointStore(f"file://{tmp_path}/store")
        with store.stage("slow/a") as st:
            st.done(0)
        alerter = Alerter(f"json://127.0.0.1:{port}/hook", delivery_attempts=3)
        unsubscribe = alerter.attach()
        try:
            t0 = time.monotonic()
            with store.stage("slow/a") as again:
                assert again.resumed  # a resumed event was emitted
            assert time.monotonic() - t0 < 1.0
        finally:
            unsubscribe()
        assert not alerter.flush(0.2)  # still trying in the background
    finally:
        hang.close()


def test_metrics_follow_events_saves_and_alerts(alert_receiver, store):
    """Prometheus metrics count resumes, fenced writes, saves, lost work and alerts."""
    reg = faultkit.metrics.enable()

    def value(name: str, **labels: str) -> float:
        return reg.get_sample_value(name, labels) or 0.0

    names = [
        ("faultkit_resumes_total", {}),
        ("faultkit_fenced_writes_total", {}),
        ("faultkit_work_lost_seconds_count", {}),
        ("faultkit_checkpoint_save_seconds_count", {}),
        ("faultkit_checkpoint_save_seconds_sum", {}),
        ("faultkit_checkpoint_save_bytes_sum", {}),
        ("faultkit_alerts_sent_total", {"kind": "worker_lost"}),
        ("faultkit_alerts_suppressed_total", {"kind": "worker_lost"}),
    ]
    before = {n: value(n, **lb) for n, lb in names}
    with store.stage("m/run/task") as old:
        old.done("u1")
        with store.stage("m/run/task"):  # a newer attempt resumes; the old one is now stale
            pass
        with pytest.raises(StaleAttemptError):
            old.done("u2")
    faultkit.metrics.observe_save(0.25, 4096)
    alerter = Alerter(alert_receiver.url())
    alerter.send(lost_event())
    alerter.send(lost_event())
    delta = {n: value(n, **lb) - before[n] for n, lb in names}
    assert delta == {
        "faultkit_resumes_total": 1,
        "faultkit_fenced_writes_total": 1,
        "faultkit_work_lost_seconds_count": 1,
        "faultkit_checkpoint_save_seconds_count": 1,
        "faultkit_checkpoint_save_seconds_sum": 0.25,
        "faultkit_checkpoint_save_bytes_sum": 4096,
        "faultkit_alerts_sent_total": 1,
        "faultkit_alerts_suppressed_total": 1,
    }
    assert 0 <= value("faultkit_checkpoint_age_seconds") < 60
    port = free_port()
    server = faultkit.metrics.start_http_server(port)
    try:
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    finally:
        if isinstance(server, tuple):
            server[0].shutdown()
    assert b"faultkit_resumes_total" in page and b"faultkit_alerts_sent_total" in page


def test_dedupe_on_an_s3_store(alert_receiver, s3_store_url):
    """Dedupe markers work on S3 (moto's server) through its create-if-absent writes."""
    url, options = s3_store_url
    first = Alerter(alert_receiver.url(), store=CheckpointStore(url, **options))
    second = Alerter(alert_receiver.url(), store=CheckpointStore(url, **options))
    assert first.send(lost_event()) is True
    assert second.send(lost_event()) is False
    assert first.send(lost_event(worker="tcp://10.0.0.9:1")) is True
    assert len(alert_receiver.wait_for(2)) == 2
