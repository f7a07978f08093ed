"""Tests for `stream_shim.testbed.local_services` and `stream_shim.filer_events`.

The round trips talk to real servers (fixtures in conftest.py).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy
from confluent_kafka import Consumer, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from stream_shim.filer_events import CREATED, DELETED, RENAMED, UPDATED, FilerEvent, decode_filer_event
from stream_shim.testbed.local_services import (
    KafkaBroker,
    LocalServer,
    PostgresServer,
    S3Server,
    free_port,
    process_alive,
)
from workflow.core.exceptions import ServiceStartError

WAIT = 15.0  # Seconds to wait for a Kafka message before failing.


def _consumer(bootstrap: str, group: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            # Tansu makes a join wait session.timeout.ms / 2.
            "session.timeout.ms": 2000,
            "heartbeat.interval.ms": 500,
        }
    )


def _poll(consumer: Consumer, count: int) -> list[Message]:
    """Poll until ``count`` messages arrived or `WAIT` seconds passed."""
    got: list[Message] = []
    deadline = time.monotonic() + WAIT
    while len(got) < count and time.monotonic() < deadline:
        message = consumer.poll(0.2)
        if message is None:
            continue
        assert message.error() is None, message.error()
        got.append(message)
    return got


# Round trips against real servers.


def test_postgres_round_trip(postgres_server: PostgresServer) -> None:
    assert postgres_server.url.startswith("postgresql+psycopg2://prompt_snake@127.0.0.1:")
    engine = sqlalchemy.create_engine(postgres_server.url)
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("CREATE TABLE visit (id integer PRIMARY KEY, band text)"))
            conn.execute(sqlalchemy.text("INSERT INTO visit VALUES (1, 'g'), (2, 'r')"))
        with engine.connect() as conn:
            rows = conn.execute(sqlalchemy.text("SELECT id, band FROM visit ORDER BY id")).all()
            extensions = conn.execute(sqlalchemy.text("SELECT extname FROM pg_extension")).scalars().all()
            user = conn.execute(sqlalchemy.text("SELECT current_user")).scalar()
    finally:
        engine.dispose()
    assert [tuple(row) for row in rows] == [(1, "g"), (2, "r")]
    assert "btree_gist" in extensions
    assert user == "prompt_snake"


def test_kafka_group_resumes_after_commit(kafka_broker: KafkaBroker) -> None:
    topic, group = f"test-{uuid.uuid4().hex}", f"group-{uuid.uuid4().hex}"
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap})
    for future in admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)]).values():
        future.result(timeout=WAIT)
    producer = Producer({"bootstrap.servers": kafka_broker.bootstrap})
    for i in range(10):
        producer.produce(topic, key=b"k", value=f"msg-{i}".encode())
    assert producer.flush(WAIT) == 0

    first = _consumer(kafka_broker.bootstrap, group)
    first.subscribe([topic])
    got = _poll(first, 4)
    first.commit(asynchronous=False)
    first.close()
    assert [m.value() for m in got] == [f"msg-{i}".encode() for i in range(4)]

    second = _consumer(kafka_broker.bootstrap, group)
    second.subscribe([topic])
    rest = _poll(second, 6)
    second.close()
    assert [m.offset() for m in rest] == list(range(4, 10))
    assert rest[0].value() == b"msg-4"


def test_s3_round_trip_publishes_filer_event(s3_server: S3Server, kafka_broker: KafkaBroker) -> None:
    bucket, key = f"raw-{uuid.uuid4().hex[:8]}", "LSSTCam/20260101/visit-1/r01.fits"
    client = s3_server.client()
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key=key, Body=b"SIMPLE  = T")
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"SIMPLE  = T"

    assert s3_server.notification_topic is not None
    consumer = _consumer(kafka_broker.bootstrap, f"group-{uuid.uuid4().hex}")
    consumer.subscribe([s3_server.notification_topic])
    events = []
    deadline = time.monotonic() + WAIT
    try:
        while FilerEvent(bucket, key, CREATED) not in events and time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is not None and message.error() is None:
                events.append(decode_filer_event(message.key(), message.value()))
    finally:
        consumer.close()
    assert FilerEvent(bucket, key, CREATED) in events
    # Directory entries (the bucket, LSSTCam/, ...) decode to None, not to objects.
    assert {e.key for e in events if e is not None and e.bucket == bucket} == {key}


# Filer-event decoder, on hand-built protobuf bytes.


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, value: int | bytes | str) -> bytes:
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _entry(name: str, is_dir: bool = False) -> bytes:
    # Attributes (field 4, length-delimited) and a fixed32 field 99 must be skipped.
    fixed32 = _varint(99 << 3 | 5) + b"\x01\x02\x03\x04"
    return _field(1, name) + (_field(2, 1) if is_dir else b"") + _field(4, b"\x08\x05") + fixed32


def _event(old: bytes | None = None, new: bytes | None = None, parent: str = "") -> bytes:
    out = b""
    if old is not None:
        out += _field(1, old) + _field(3, 1)
    if new is not None:
        out += _field(2, new)
    if parent:
        out += _field(4, parent)
    return out + _field(6, _varint(123456789))


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        (b"/buckets/raw/a/b.fits", _event(new=_entry("b.fits"), parent="/buckets/raw/a"), ("raw", "a/b.fits", CREATED)),
        ("/buckets/raw/b.fits", _event(new=_entry("b.fits"), parent="/buckets/raw"), ("raw", "b.fits", CREATED)),
        (b"/buckets/raw/b.fits", _event(new=_entry("b.fits")), ("raw", "b.fits", CREATED)),
        (b"/buckets/raw/b", _event(_entry("b"), _entry("b"), "/buckets/raw"), ("raw", "b", UPDATED)),
        (b"/buckets/raw/b", _event(_entry("b"), _entry("c"), "/buckets/raw/x"), ("raw", "x/c", RENAMED)),
        (b"/buckets/raw/b", _event(old=_entry("b")), ("raw", "b", DELETED)),
        (b"/buckets/raw/a", _event(new=_entry("a", is_dir=True), parent="/buckets/raw"), None),
        (b"/buckets/raw", _event(new=_entry("raw", is_dir=True), parent="/buckets"), None),
        (b"/buckets/.system/owners/x", _event(new=_entry("x"), parent="/buckets/.system/owners"), None),
        (
            b"/buckets/raw/.uploads/id/0001.part",
            _event(new=_entry("0001.part"), parent="/buckets/raw/.uploads/id"),
            None,
        ),
        (b"/etc/x", _event(new=_entry("x"), parent="/etc"), None),
        (b"/buckets/raw/b", _field(6, _varint(1)), None),
    ],
)
def test_decode_filer_event(key: bytes | str, value: bytes, expected: tuple[str, str, str] | None) -> None:
    assert decode_filer_event(key, value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (_field(2, _entry("b"))[:-3], "runs past the end"),
        (b"\x12\x80", "truncated varint"),
        (b"\x13", "unsupported wire type 3"),
        (_varint(7 << 3 | 5) + b"\x01", "fixed-width field runs past the end"),
    ],
)
def test_decode_filer_event_rejects_malformed(value: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_filer_event(b"/buckets/raw/b", value)


# Failures and cleanup.


def _fake_binary(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "fake-server"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def test_missing_binary_raises(tmp_path: Path) -> None:
    with pytest.raises(ServiceStartError, match=r"kafka server failed to start: cannot run .*/nonexistent"):
        KafkaBroker(tmp_path, binary=tmp_path / "nonexistent").start()


def test_missing_postgres_binaries_raise(tmp_path: Path) -> None:
    with pytest.raises(ServiceStartError, match="install the Debian package `postgresql`"):
        PostgresServer(tmp_path, bin_dir=tmp_path / "none").start()


@pytest.mark.parametrize("server_class", [KafkaBroker, S3Server])
def test_immediate_exit_raises_with_log(tmp_path: Path, server_class: type[LocalServer]) -> None:
    binary = _fake_binary(tmp_path, "echo 'line 1'\necho 'fatal: cannot bind the listener' >&2\nexit 3\n")
    with pytest.raises(ServiceStartError) as info:
        server_class(tmp_path, binary=binary).start()
    text = str(info.value)
    assert "exited with code 3 before it was ready" in text
    assert "line 1\nfatal: cannot bind the listener" in text
    assert str(tmp_path) in text  # The log path, for the full log.


def test_start_timeout_raises_and_kills(tmp_path: Path) -> None:
    binary = _fake_binary(tmp_path, 'echo "still booting as $$"\nexec sleep 60\n')
    server = KafkaBroker(tmp_path, binary=binary, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ServiceStartError, match=r"not ready after 0.5 s \(last probe error: .*\)[\s\S]*still booting"):
        server.start()
    assert time.monotonic() - started < 5
    assert server.pid is None
    pid = int(server.log_tail().split()[-1])
    assert not process_alive(pid)


def _identities(pids: set[int]) -> set[tuple[int, str]]:
    """(pid, start time) of live processes: a pid reused by a new process is not ours."""
    found = set()
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if process_alive(pid):
            found.add((pid, stat.rsplit(")", 1)[1].split()[19]))
    return found


def _still_running(before: set[tuple[int, str]]) -> list[int]:
    return sorted(pid for pid, start in before if (pid, start) in _identities({pid}))


@pytest.mark.parametrize("server_class", [PostgresServer, KafkaBroker, S3Server])
def test_stop_leaves_no_process(tmp_path: Path, server_class: type[LocalServer]) -> None:
    server = server_class(tmp_path)
    with server:
        pids = server.process_ids()
        assert server.pid in pids and process_alive(server.pid)
        # (PostgreSQL forks short-lived workers: some listed may be gone by now; only live ones count.)
        ours = _identities(pids)
        assert server.pid in {pid for pid, _ in ours}
    assert server.pid is None
    assert _still_running(ours) == []
    server.stop()  # A second stop does nothing.


class _StubbornServer(LocalServer):
    """Ignores SIGTERM, and has a child in a session of its own (like PostgreSQL backends)."""

    name = "stubborn"

    def _launch(self) -> None:
        script = "trap '' TERM; setsid sleep 30 & sleep 30 & echo up; wait"
        self._spawn(["sh", "-c", script], cwd=self.base_dir)

    def _is_ready(self) -> bool:
        return "up" in self.log_tail()


def test_stop_kills_what_ignores_sigterm(tmp_path: Path) -> None:
    server = _StubbornServer(tmp_path, timeout=0.5)
    server.start()
    pids = server.process_ids()
    assert len(pids) == 3
    ours = _identities(pids)
    server.stop()
    assert _still_running(ours) == []


def test_server_dies_with_its_parent(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os, signal
        from stream_shim.testbed.local_services import KafkaBroker
        broker = KafkaBroker({str(tmp_path)!r})
        broker.start()
        print(broker.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    pid = int(run.stdout.split()[0])
    deadline = time.monotonic() + 5
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(pid)


def test_free_port_with_offsets() -> None:
    port = free_port((0, 10000))
    assert 10000 <= port and port + 10000 < 65536
    assert free_port((0, 10000)) != port
