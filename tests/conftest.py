"""Shared pytest fixtures: real servers on 127.0.0.1, started only when a test asks.

Each server runs once per session in its own ``tmp_path_factory`` directory
and is stopped at session end.  A server that cannot start raises
`ServiceStartError` (with the tail of its log), so the tests that use it
ERROR rather than hang or skip.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from stream_shim.testbed.local_services import KafkaBroker, PostgresServer, S3Server

FILER_TOPIC = "seaweedfs-filer-events"
"""Kafka topic the `s3_server` fixture's filer publishes object events to."""


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A PostgreSQL server with an empty database; use ``.url`` or ``.dsn``."""
    with PostgresServer(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """A Tansu Kafka broker (persistent storage in a private SeaweedFS); use ``.bootstrap``."""
    with KafkaBroker(tmp_path_factory.mktemp("kafka")) as broker:
        yield broker


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory, kafka_broker: KafkaBroker) -> Iterator[S3Server]:
    """A SeaweedFS S3 server whose filer publishes to `kafka_broker` on `FILER_TOPIC`."""
    with S3Server(tmp_path_factory.mktemp("s3"), kafka_broker.bootstrap, FILER_TOPIC) as server:
        yield server
