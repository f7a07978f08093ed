"""Tests for `stream_shim.bridge.FilerBridge`: no notification lost while the broker is away.

The live case runs the shim's own `stream_shim.consumer.ConsumeLoop` with the bridge
as its handler: filer events on the session's Tansu broker, notifications to a
private one (persistent storage: a stop and start keep its topics).  The private
broker is stopped for longer than several of the bridge's (shortened)
``message.timeout.ms`` while filer events are being handled, then started again on
the same port, and the notification topic is read: every filer event's
notification is there (duplicates allowed and counted).  The consumer's broker
stays up, so its commits succeed throughout, as they do in the shim when the
broker is back while the bridge's producer is still reconnecting: before the fix
the consume loop gave up on an event after three handler attempts and committed
it, losing its notification.

The catch-up case runs the whole embedded chain on a private broker: SeaweedFS
whose filer publishes to it, the bridge consuming those events and producing to
it.  Objects put while the broker is away (the filer drops their events) still
get their notification: the bridge lists the bucket once the broker is back.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from shared_helpers import filer_create_event

from stream_shim.bridge import BridgeDeliveryError, CatchUp, FilerBridge, s3_lister
from stream_shim.consumer import ConsumeLoop, consumer_settings
from stream_shim.status import ShimStatus
from stream_shim.testbed.local_services import KafkaBroker, S3Server

EVENTS = 4
DELIVERY_TIMEOUT_S = 1.0
DOWN_S = 10.0  # > 3 handler attempts of (timeout + 1 s pause): what the consume loop used to allow
WAIT = 45.0


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[KafkaBroker]:
    with KafkaBroker(tmp_path / "kafka") as server:
        yield server


def _create_topics(bootstrap: str, *names: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(n, num_partitions=1, replication_factor=1) for n in names]).values():
        future.result(timeout=WAIT)


def _notified_keys(bootstrap: str, topic: str, want: set[str], timeout_s: float) -> Counter[str]:
    """Read ``topic`` from the start until every key of ``want`` was seen (or the timeout); count the keys."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}", "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])  # no group to join: quicker on a restarted broker
    seen: Counter[str] = Counter()
    deadline = time.monotonic() + timeout_s
    try:
        while not want <= set(seen) and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error() is not None:
                continue
            record = json.loads(message.value())["Records"][0]
            seen[record["s3"]["object"]["key"]] += 1
        end = time.monotonic() + 2.0  # late duplicates, to count them
        while time.monotonic() < end:
            message = consumer.poll(0.2)
            if message is not None and message.error() is None:
                seen[json.loads(message.value())["Records"][0]["s3"]["object"]["key"]] += 1
    finally:
        consumer.close()
    return seen


def test_broker_outage_longer_than_the_delivery_timeout_loses_no_notification(
    kafka_broker: KafkaBroker, broker: KafkaBroker
) -> None:
    filer_topic, notes_topic = f"filer-{uuid.uuid4().hex[:8]}", f"notes-{uuid.uuid4().hex[:8]}"
    _create_topics(kafka_broker.bootstrap, filer_topic)
    _create_topics(broker.bootstrap, notes_topic)
    keys = [f"LSSTCam/20261202/MC_O_20261202_000001/r{i}.fits" for i in range(EVENTS)]
    producer = Producer({"bootstrap.servers": kafka_broker.bootstrap, "linger.ms": 0})
    for key in keys:
        name = key.rsplit("/", 1)[1]
        producer.produce(filer_topic, filer_create_event(name, f"/buckets/raw/{key.rsplit('/', 1)[0]}"), key=key)
    assert producer.flush(WAIT) == 0

    status, stop, gate, entered = ShimStatus("LSSTCam", "test"), threading.Event(), threading.Event(), threading.Event()
    bridge = FilerBridge(broker.bootstrap, notes_topic, ["raw"], status, timeout_s=DELIVERY_TIMEOUT_S, stop=stop)

    def handler(message: Any) -> None:
        entered.set()
        gate.wait(WAIT)  # the first event waits here until the broker is down
        bridge(message)

    loop = ConsumeLoop(
        "bridge",
        consumer_settings(kafka_broker.bootstrap, f"bridge-{uuid.uuid4().hex}"),
        filer_topic,
        handler,
        stop,
        status,
    )
    loop.start()
    try:
        assert entered.wait(WAIT), "the consume loop never handed over a filer event"
        broker.stop()
        gate.set()  # the bridge now produces while the broker is away
        time.sleep(DOWN_S)
        failed_while_down = status.counts("bridge").get("delivery_failed", 0)
        broker.start()
        seen = _notified_keys(broker.bootstrap, notes_topic, set(keys), WAIT)
    finally:
        stop.set()
        loop.join(timeout=15.0)
    counts = status.counts("bridge")
    assert set(seen) == set(keys), f"notifications missing: {sorted(set(keys) - set(seen))}; bridge counts {counts}"
    assert failed_while_down >= 3  # several timed-out attempts, each produced again
    assert counts.get("redelivered", 0) >= 1
    assert status.counts("bridge").get("handler_error", 0) == 0  # the consume loop never gave up on an event
    assert sum(seen.values()) >= EVENTS  # duplicates allowed (the shim dedupes)
    print(f"notifications: {sum(seen.values())} for {EVENTS} events; bridge counts {counts}")


def test_a_stop_ends_a_pending_delivery_without_acknowledging_it() -> None:
    status, stop = ShimStatus("LSSTCam", "test"), threading.Event()
    bridge = FilerBridge("127.0.0.1:1", "notes", ["raw"], status, timeout_s=0.5, retry_s=0.2, stop=stop)
    raised: list[BaseException] = []

    def forward() -> None:
        try:
            bridge.forward(b"/buckets/raw/a/b.fits", filer_create_event("b.fits", "/buckets/raw/a"))
        except BaseException as exc:  # noqa: BLE001 - inspected below
            raised.append(exc)

    thread = threading.Thread(target=forward)
    thread.start()
    time.sleep(2.0)
    assert thread.is_alive() and not raised  # still trying: never gives up on its own
    stop.set()
    thread.join(timeout=10.0)
    assert not thread.is_alive()
    assert len(raised) == 1 and isinstance(raised[0], BridgeDeliveryError)
    assert "raw/a/b.fits" in str(raised[0]) and "not committed" in str(raised[0])
    assert status.counts("bridge").get("forwarded", 0) == 0
    assert status.counts("bridge")["delivery_failed"] >= 2


def test_objects_put_while_the_broker_is_away_are_notified_after_it(
    broker: KafkaBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    filer_topic, notes_topic = f"filer-{uuid.uuid4().hex[:8]}", f"notes-{uuid.uuid4().hex[:8]}"
    _create_topics(broker.bootstrap, filer_topic, notes_topic)
    with S3Server(tmp_path / "s3", broker.bootstrap, filer_topic) as s3:
        for name, value in (("AWS_ACCESS_KEY_ID", s3.access_key), ("AWS_SECRET_ACCESS_KEY", s3.secret_key)):
            monkeypatch.setenv(name, value)
        client = s3.client()
        client.create_bucket(Bucket="raw")
        status, stop = ShimStatus("LSSTCam", "test"), threading.Event()
        catch_up = CatchUp(s3_lister(s3.endpoint_url), probe_s=1.0, settle_s=3.0, margin_s=2.0)
        bridge = FilerBridge(
            broker.bootstrap, notes_topic, ["raw"], status, timeout_s=2.0, stop=stop, catch_up=catch_up
        )
        settings = consumer_settings(broker.bootstrap, f"bridge-{uuid.uuid4().hex}")
        loop = ConsumeLoop("bridge", settings, filer_topic, bridge, stop, status)
        loop.start()
        try:
            assert loop.assigned.wait(WAIT)
            before = "LSSTCam/20261202/MC_O_20261202_000002/before.fits"
            client.put_object(Bucket="raw", Key=before, Body=b"x")
            assert set(_notified_keys(broker.bootstrap, notes_topic, {before}, WAIT)) == {before}
            broker.stop()
            away = [f"LSSTCam/20261202/MC_O_20261202_000002/away{i}.fits" for i in range(3)]
            for key in away:
                client.put_object(Bucket="raw", Key=key, Body=b"x")
            broker.start()
            seen = _notified_keys(broker.bootstrap, notes_topic, {before, *away}, WAIT)
        finally:
            stop.set()
            loop.join(timeout=15.0)
    counts = status.counts("bridge")
    assert set(away) <= set(seen), f"not notified: {sorted(set(away) - set(seen))}; bridge counts {counts}"
    assert counts["broker_away"] >= 1  # the bridge saw the outage and listed the bucket after it
    # The filer drops events while the broker is away (then the listing notifies them, counted
    # caught_up), except when it was still retrying as the broker came back: either way, all arrive.
    assert counts.get("caught_up", 0) <= len(away)
    print(f"notifications {dict(seen)}; bridge counts {counts}")
