"""Intake that heals: broker restarts, quick crashes, the consumer watchdog (real Tansu broker).

The consume loops are the real `stream_shim.consumer.ConsumeLoop` with a stub
handler that records what it got.  Every wait is bounded.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from stream_shim.consumer import ConsumeLoop, KafkaLog, consumer_settings
from stream_shim.status import ShimStatus
from stream_shim.testbed.local_services import KafkaBroker
from stream_shim.watchdog import ConsumerWatchdog, WatchdogLimits

_log = logging.getLogger(__name__)

WAIT = 30.0
"""Bound of every wait for the broker or a consumer."""


def _wait_for(condition: Callable[[], bool], timeout: float = WAIT, what: str = "condition") -> float:
    """Wait until ``condition()`` holds; return the seconds it took (fail after ``timeout``)."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            pytest.fail(f"{what} not reached within {timeout:g} s")
        time.sleep(0.1)
    return time.monotonic() - started


def _topic(broker: KafkaBroker) -> str:
    """Create a fresh single-partition topic."""
    name = f"intake-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": broker.bootstrap, "log_level": 0})
    admin.create_topics([NewTopic(name, 1)])[name].result(WAIT)
    return name


def _produce(broker: KafkaBroker, topic: str, values: list[str]) -> None:
    producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 0, "logger": KafkaLog()})
    for value in values:
        producer.produce(topic, value.encode())
        assert producer.flush(WAIT) == 0, f"{value} not delivered"


class _Recorder:
    """Stub handler: records each message's value."""

    def __init__(self) -> None:
        self.values: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, message: Any) -> None:
        with self.lock:
            self.values.append(message.value().decode())

    def seen(self, *values: str) -> bool:
        with self.lock:
            return all(v in self.values for v in values)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[KafkaBroker]:
    """A broker of this test only (it gets restarted), with the default (persistent) storage."""
    with KafkaBroker(tmp_path / "kafka") as server:
        yield server


@pytest.fixture
def loop_factory() -> Iterator[Callable[..., ConsumeLoop]]:
    """Start `ConsumeLoop` threads; stop and join them at the end."""
    stops: list[tuple[threading.Event, ConsumeLoop]] = []

    def start(
        name: str, settings: dict[str, Any], topic: str, handler: Any, status: ShimStatus, **kw: Any
    ) -> ConsumeLoop:
        stop = threading.Event()
        loop = ConsumeLoop(name, settings, topic, handler, stop, status, **kw)
        loop.start()
        stops.append((stop, loop))
        return loop

    yield start
    for stop, _ in stops:
        stop.set()
    for _, loop in stops:
        loop.join(timeout=WAIT)


def test_broker_restart_keeps_topics_offsets_and_messages(broker: KafkaBroker) -> None:
    topic, group = _topic(broker), f"g-{uuid.uuid4().hex[:8]}"
    _produce(broker, topic, ["m0", "m1", "m2"])
    settings = consumer_settings(broker.bootstrap, group, member="persistence")
    consumer = Consumer(settings)
    consumer.subscribe([topic])
    got: list[str] = []
    deadline = time.monotonic() + WAIT
    while len(got) < 2 and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is not None and message.error() is None:
            got.append(bytes(message.value() or b"").decode())
            consumer.commit(message=message, asynchronous=False)
    consumer.close()
    assert got == ["m0", "m1"]

    broker.stop()
    broker.start()
    admin = AdminClient({"bootstrap.servers": broker.bootstrap, "log_level": 0})
    assert topic in admin.list_topics(timeout=WAIT).topics
    consumer = Consumer(settings)
    try:
        committed = consumer.committed([TopicPartition(topic, 0)], timeout=WAIT)
        assert committed[0].offset == 2
        consumer.assign([TopicPartition(topic, 0)])  # starts at the committed offset
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and "m2" not in got:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                got.append(bytes(message.value() or b"").decode())
    finally:
        consumer.close()
    assert got == ["m0", "m1", "m2"]  # m2 kept, m0 and m1 not again


def test_intake_recovers_after_broker_restart(broker: KafkaBroker, loop_factory: Callable[..., ConsumeLoop]) -> None:
    topic, group = _topic(broker), f"g-{uuid.uuid4().hex[:8]}"
    status, recorder = ShimStatus("LSSTCam", "streaming"), _Recorder()
    loop = loop_factory(
        "next_visit", consumer_settings(broker.bootstrap, group, member="restart"), topic, recorder, status
    )
    _produce(broker, topic, ["a0", "a1", "a2"])
    _wait_for(lambda: recorder.seen("a0", "a1", "a2"), what="messages before the restart")

    broker.stop()
    broker.start()
    restarted = time.monotonic()
    _produce(broker, topic, ["b0", "b1", "b2"])
    _wait_for(lambda: recorder.seen("b0", "b1", "b2"), timeout=WAIT, what="intake after the broker restart")
    recovery = time.monotonic() - restarted
    _log.info("intake recovered %.1f s after the broker restart", recovery)
    assert loop.is_alive() and loop.failed is None
    assert recorder.values == ["a0", "a1", "a2", "b0", "b1", "b2"]  # nothing lost, nothing twice
    consumer = Consumer(consumer_settings(broker.bootstrap, group, member="offsets"))
    try:
        _wait_for(
            lambda: consumer.committed([TopicPartition(topic, 0)], timeout=WAIT)[0].offset == 6,
            what="committed offset 6",
        )
    finally:
        consumer.close()


_CHILD = textwrap.dedent(
    """
    import signal, sys, threading, time
    from stream_shim.consumer import ConsumeLoop, consumer_settings
    from stream_shim.status import ShimStatus

    bootstrap, group, topic = sys.argv[1:4]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    settings = consumer_settings(bootstrap, group)
    loop = ConsumeLoop("next_visit", settings, topic, lambda m: None, stop, ShimStatus("X", "y"))
    loop.start()
    print("subscribed", flush=True)
    while not stop.wait(0.05):
        pass
    loop.join(timeout=20)
    print("assigned" if loop.assigned.is_set() else "closed before assignment", flush=True)
    time.sleep(60)  # killed here
    """
)


def test_quick_crash_does_not_wedge_the_group(
    kafka_broker: KafkaBroker, loop_factory: Callable[..., ConsumeLoop]
) -> None:
    topic, group = _topic(kafka_broker), f"g-{uuid.uuid4().hex[:8]}"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, kafka_broker.bootstrap, group, topic],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "subscribed"
        time.sleep(0.5)
        child.send_signal(signal.SIGTERM)  # a shim stopped right after its start: leaves before assignment
        assert child.stdout.readline().strip() == "closed before assignment"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=WAIT)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=WAIT)

    recorder = _Recorder()
    loop = loop_factory(
        "next_visit", consumer_settings(kafka_broker.bootstrap, group), topic, recorder, ShimStatus("X", "y")
    )
    assigned = _wait_for(loop.assigned.is_set, timeout=20.0, what="assignment of the fresh consumer")
    _produce(kafka_broker, topic, ["after-crash"])
    _wait_for(lambda: recorder.seen("after-crash"), timeout=10.0, what="a new message after the quick crash")
    _log.info("fresh consumer assigned %.1f s after a quick crash", assigned)


def test_watchdog_recreates_consumer_counts_and_reports_degraded(
    broker: KafkaBroker, loop_factory: Callable[..., ConsumeLoop]
) -> None:
    topic, group = _topic(broker), f"g-{uuid.uuid4().hex[:8]}"
    status, recorder = ShimStatus("LSSTCam", "streaming"), _Recorder()
    status.state = "running"
    limits = WatchdogLimits(errors=2, error_s=3.0, min_restart_s=1.0)
    loop = loop_factory(
        "raw_notification",
        consumer_settings(broker.bootstrap, group, member="watchdog"),
        topic,
        recorder,
        status,
        limits=limits,
    )
    _produce(broker, topic, ["before"])
    _wait_for(lambda: recorder.seen("before"), what="a message before the outage")
    assert "consumer:raw_notification" not in status.conditions()

    broker.stop()  # the broker is away: repeated errors
    try:
        _wait_for(
            lambda: status.counts("raw_notification").get("consumer_restarted", 0) >= 1,
            what="a consumer recreation",
        )
        assert status.counts("raw_notification")["kafka_error"] >= 2
        condition = status.conditions()["consumer:raw_notification"]
        assert condition["level"] == "degraded" and "broker errors" in condition["detail"]
        healthy, text = status.health()
        assert healthy and text.startswith("running (degraded)")
    finally:
        broker.start()
    _produce(broker, topic, ["after"])
    _wait_for(lambda: recorder.seen("after"), what="a message after the outage")
    _wait_for(lambda: "consumer:raw_notification" not in status.conditions(), what="the condition cleared")
    assert loop.is_alive() and recorder.values == ["before", "after"]
    assert status.health() == (True, "running\n")


class _FakeConsumer:
    """Assignment, position and watermarks of one partition, as a `confluent_kafka.Consumer` reports them."""

    def __init__(self, position: int, high: int) -> None:
        self.position_, self.high = position, high

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition("t", 0)]

    def position(self, parts: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition("t", 0, self.position_)]

    def committed(self, parts: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        return [TopicPartition("t", 0, 3)]

    def get_watermark_offsets(self, part: TopicPartition, timeout: float, cached: bool) -> tuple[int, int]:
        return 0, self.high


def test_watchdog_rules_with_a_fake_clock() -> None:
    now = [0.0]
    status = ShimStatus("LSSTCam", "streaming")
    limits = WatchdogLimits(assign_s=10.0, stall_s=5.0, check_s=1.0, min_restart_s=0.0)
    watchdog = ConsumerWatchdog("next_visit", status, limits, clock=lambda: now[0])
    consumer = _FakeConsumer(position=5, high=8)
    watchdog.created()
    now[0] = 11.0
    reason = watchdog.check(consumer)
    assert reason is not None and "no partition assignment" in reason
    watchdog.restarting(reason)
    assert status.conditions()["consumer:next_visit"]["level"] == "degraded"
    assert status.counts("next_visit") == {"consumer_restarted": 1}

    watchdog.created()
    watchdog.assigned()
    now[0] = 13.0
    assert watchdog.check(consumer) is None  # behind, not for long
    now[0] = 17.0
    reason = watchdog.check(consumer)
    assert reason is not None and "no progress" in reason and "partition 0 at 5 of 8" in reason
    watchdog.restarting(reason)
    watchdog.created()
    watchdog.assigned()
    consumer.position_ = -1001  # nothing consumed by the new consumer: the committed offset counts
    now[0] = 18.0
    assert watchdog.check(consumer) is None and "consumer:next_visit" in status.conditions()
    consumer.high = 3  # caught up with the committed offset
    now[0] = 19.5
    assert watchdog.check(consumer) is None
    assert status.conditions() == {} and status.counts("next_visit")["consumer_restarted"] == 2
