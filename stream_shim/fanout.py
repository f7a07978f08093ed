"""The pool's fan-out role: next_visit in, one work item per active detector out.

    python -m stream_shim --role fanout --instrument LSSTCam --workdir /shared/run --status-port 8080

`FanOutHandler` checks each next_visit exactly as the all-in-one shim does
(`stream_shim.consumer.VisitGate`: decode, usability, identifiers, paths inside the
run directory), then produces one `stream_shim.work_items.WorkItem` per active
detector to the work topic, keyed by detector, on partition ``detector %
pool.partitions`` (`stream_shim.work_items.partition_for`).  It returns only once
the producer reported every item delivered; the `stream_shim.consumer.ConsumeLoop`
then commits the next_visit's offset.  A fan-out killed mid-visit has not
committed, so the next one fans the visit out again (at least once; the workers
skip targets that already have ``done.json`` or ``failed.json``).

`FanOutService` is the process: state-directory lock, Kafka health check, the work
topic created with ``pool.partitions`` partitions if missing (`ensure_work_topic`),
status file and server, the next_visit consumer (and, in the testbed, the filer
bridge: one for the pool), drain on ``stop``.
"""

from __future__ import annotations

__all__ = ["FanOutHandler", "FanOutInterrupted", "FanOutService", "ensure_work_topic"]

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from stream_shim.bridge import bridge_for_config
from stream_shim.consumer import ConsumeLoop, VisitGate, consumer_settings
from stream_shim.health import check_kafka
from stream_shim.state_lock import take_state_lock
from stream_shim.status import ShimStatus, StatusServer, StatusWriter
from stream_shim.work_items import WorkItem, partition_for, work_topic
from workflow.core.exceptions import RetriableError
from workflow.core.instrument import instrument_for_run
from workflow.core.visit import NextVisit

_log = logging.getLogger(__name__)

_DELIVERY_TIMEOUT_S = 10.0  # per attempt: flush bound, and the producer's message.timeout.ms
CATEGORY = "work_items"
"""Status category of the fan-out's counts (``produced``, ``delivery_failed``, ...)."""


class FanOutInterrupted(RetriableError, RuntimeError):
    """The fan-out stopped before every item of a visit was delivered (the visit is not committed)."""


def ensure_work_topic(bootstrap: str, topic: str, partitions: int, *, timeout_s: float = 10.0) -> int:
    """Create the work topic with ``partitions`` partitions unless it exists; return its partition count.

    A topic that exists with another count is left alone (logged): the
    producer's explicit partitions then use the count it has.

    Raises
    ------
    ConnectionError
        If the broker does not answer or refuses to create the topic.
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        existing = admin.list_topics(timeout=timeout_s).topics
    except KafkaException as exc:
        raise ConnectionError(f"broker {bootstrap} not reachable within {timeout_s:g} s: {exc}") from None
    if topic not in existing:
        future = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])[topic]
        try:
            future.result(timeout=timeout_s)
            _log.info("work topic %s created with %d partition(s)", topic, partitions)
        except Exception as exc:  # noqa: BLE001 - another role creating it at the same time is fine
            if "exist" not in str(exc).lower():
                raise ConnectionError(f"broker {bootstrap}: cannot create work topic {topic!r}: {exc}") from None
        existing = admin.list_topics(topic=topic, timeout=timeout_s).topics
    have = len(existing[topic].partitions) if topic in existing else partitions
    if have != partitions:
        _log.warning(
            "work topic %s has %d partition(s), pool.partitions is %d: using %d", topic, have, partitions, have
        )
    return have


class FanOutHandler(VisitGate):
    """Fan usable next_visits out to the work topic.

    Parameters
    ----------
    config : `~collections.abc.Mapping`
        Merged configuration.
    detectors : sequence of `int`
        The instrument's active detectors.
    status : `stream_shim.status.ShimStatus`
        Counts go to ``next_visit`` (as the shim's) and ``work_items``.
    workdir : `pathlib.Path`
        The shared run directory (visit files must stay inside it).
    producer : `confluent_kafka.Producer`
        Where work items go.
    topic : `str`
        The work topic.
    partitions : `int`
        Its partition count.
    stop : `threading.Event`
        Ends the delivery retries (the visit is then not committed).
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        detectors: Sequence[int],
        status: ShimStatus,
        workdir: Path,
        producer: Any,
        topic: str,
        partitions: int,
        stop: threading.Event,
    ) -> None:
        super().__init__(config, detectors=detectors, status=status, workdir=workdir)
        self.producer, self.topic, self.partitions, self.stop = producer, topic, partitions, stop

    def accept(self, visit: NextVisit, *, kafka: dict[str, Any] | None = None) -> str:
        """Produce the visit's work items and wait for their delivery; return ``fanned_out``.

        Items not delivered are produced again (every second) until they are
        or ``stop`` is set.

        Raises
        ------
        FanOutInterrupted
            If stopped before every item was delivered (the caller does not commit).
        """
        started = time.monotonic()
        fanned = self.fan_out(visit, kafka=kafka)
        if isinstance(fanned, str):
            return fanned
        pending = [WorkItem(detector_visit) for detector_visit, _ in fanned]
        attempt = 0
        while pending:
            attempt += 1
            failed = self._deliver(pending)
            if failed:
                self.status.count(CATEGORY, "delivery_failed", len(failed))
                _log.warning(
                    "%s group %s: %d of %d work item(s) not delivered (attempt %d): %s; producing them again",
                    visit.instrument,
                    visit.groupId,
                    len(failed),
                    len(pending),
                    attempt,
                    failed[0][1],
                    extra={"instrument": visit.instrument, "group": visit.groupId},
                )
                if self.stop.wait(1.0):
                    raise FanOutInterrupted(
                        f"group {visit.groupId}: stopped with {len(failed)} work item(s) undelivered"
                    )
            pending = [item for item, _ in failed]
        self.status.count(CATEGORY, "produced", len(fanned))
        self.status.count("next_visit", "fanned_out")
        self.status.observe("fan_out", time.monotonic() - started)
        _log.info(
            "%s group %s: %d work item(s) delivered to %s in %.2f s",
            visit.instrument,
            visit.groupId,
            len(fanned),
            self.topic,
            time.monotonic() - started,
            extra={"instrument": visit.instrument, "group": visit.groupId, "outcome": "fanned_out"},
        )
        return "fanned_out"

    def _deliver(self, items: Sequence[WorkItem]) -> list[tuple[WorkItem, str]]:
        """Produce ``items`` and flush; return those not delivered, with why."""
        reports: dict[int, str | None] = {}

        def report(index: int) -> Any:
            def on_delivery(error: Any, _message: Any) -> None:
                reports[index] = None if error is None else str(error)

            return on_delivery

        for index, item in enumerate(items):
            try:
                self.producer.produce(
                    self.topic,
                    item.encode(),
                    key=item.key(),
                    partition=partition_for(item.detector, self.partitions),
                    on_delivery=report(index),
                )
            except (BufferError, ValueError) as exc:  # queue full or a bad argument: this item waits
                reports[index] = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # noqa: BLE001 - a KafkaException: counted as not delivered
                reports[index] = f"{type(exc).__name__}: {exc}"
            self.producer.poll(0)
        self.producer.flush(_DELIVERY_TIMEOUT_S)
        return [
            (item, reports.get(i) or "no delivery report")
            for i, item in enumerate(items)
            if i not in reports or reports[i] is not None
        ]


def _producer(bootstrap: str) -> Any:
    from confluent_kafka import Producer

    from stream_shim.consumer import KafkaLog

    return Producer(
        {
            "bootstrap.servers": bootstrap,
            "client.id": "prompt-snake-fanout",
            "enable.idempotence": False,  # duplicates are harmless (workers dedupe); Tansu lacks idempotent producers
            "acks": "all",
            "linger.ms": 5,  # a visit's 189 items go in a few batches
            "message.timeout.ms": int(_DELIVERY_TIMEOUT_S * 1000),
            "logger": KafkaLog(),
        }
    )


class FanOutService:
    """One fan-out process.

    Parameters
    ----------
    config : `~collections.abc.Mapping`
        Merged configuration.
    workdir : `pathlib.Path`
        The shared run directory.
    state_dir : `pathlib.Path` or `None`
        Lock, status file (default ``<workdir>/fanout``).
    status_port : `int` or `None`
        Serve status over HTTP on this port.
    status_host : `str`, optional
        Address the status server binds.
    health_check : `bool`
        Check the broker (and create the topics) at start-up.
    filer_topic : `str` or `None`
        If set, also run the filer bridge from this SeaweedFS filer topic (the
        testbed's raw notifications: one bridge for the whole pool).
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        workdir: Path,
        state_dir: Path | None = None,
        status_port: int | None = None,
        status_host: str = "127.0.0.1",
        health_check: bool = True,
        filer_topic: str | None = None,
    ) -> None:
        self.config, self.workdir, self.filer_topic = config, Path(workdir).resolve(), filer_topic
        self.state_dir = Path(state_dir or self.workdir / "fanout").resolve()
        self.status_port, self.status_host, self.health_check = status_port, status_host, health_check
        self.status = ShimStatus(config["instrument"]["name"], "fanout")
        self._lock_file: IO[str] | None = None

    def _take_lock(self) -> None:
        self._lock_file = take_state_lock(self.state_dir, "fan-out")

    def run(self, stop: threading.Event) -> int:
        """Run until ``stop`` is set (or the consumer fails); return the exit status (0 or 1).

        Raises
        ------
        stream_shim.state_lock.ShimAlreadyRunningError
            If another fan-out uses the same state directory.
        stream_shim.health.HealthCheckError
            If the broker is unavailable at start-up.
        """
        from stream_shim.health import HealthCheckError

        self._take_lock()
        config = self.config
        bootstrap, topic = config["kafka"]["bootstrap"], work_topic(config)
        try:
            if self.health_check:
                topics = [config["kafka_topics"]["next_visit"], config["kafka_topics"]["raw_notification"]]
                check_kafka(bootstrap, topics + ([self.filer_topic] if self.filer_topic else []))
            partitions = ensure_work_topic(bootstrap, topic, int(config["pool"]["partitions"]))
        except (ConnectionError, ValueError) as exc:
            raise HealthCheckError(f"start-up health check failed: kafka: {exc}") from None
        writer_stop = threading.Event()
        writer = StatusWriter(self.status, self.state_dir / "status.json", writer_stop)
        writer.start()
        server = None
        if self.status_port is not None:
            server = StatusServer(self.status, self.status_port, self.status_host)
        if server is not None:
            server.start()
        producer = _producer(bootstrap)
        loop_stop = threading.Event()
        detectors = [d.id for d in instrument_for_run(config).active_detectors()]
        handler = FanOutHandler(
            config,
            detectors=detectors,
            status=self.status,
            workdir=self.workdir,
            producer=producer,
            topic=topic,
            partitions=partitions,
            stop=loop_stop,
        )
        self.status.gauge("fanout", lambda: {"partitions": partitions, "detectors": len(detectors)})
        loop = ConsumeLoop(
            "next_visit",
            consumer_settings(bootstrap, config["kafka"]["consumer_group"], member=str(self.state_dir)),
            config["kafka_topics"]["next_visit"],
            handler,
            loop_stop,
            self.status,
        )
        loops = [loop]
        if self.filer_topic:
            group = f"{config['kafka']['consumer_group']}-filer-bridge"
            bridge = bridge_for_config(config, self.status, stop=loop_stop)
            loops.append(
                ConsumeLoop(
                    "bridge",
                    consumer_settings(bootstrap, group, member=str(self.state_dir)),
                    self.filer_topic,
                    bridge,
                    loop_stop,
                    self.status,
                )
            )
        for each in loops:
            each.start()
        self.status.state = "running"
        _log.info(
            "fan-out running for %s: %d detector(s) to %s (%d partitions); state in %s",
            config["instrument"]["name"],
            len(detectors),
            topic,
            partitions,
            self.state_dir,
        )
        code = 0
        while not stop.wait(0.5):
            dead = [each for each in loops if not each.is_alive()]
            if dead:
                _log.error("consumer %s stopped (%s): shutting down", dead[0].name, dead[0].failed)
                code = 1
                break
        self.status.state = "draining"
        loop_stop.set()
        for each in loops:
            each.join(timeout=20.0)
        left = producer.flush(_DELIVERY_TIMEOUT_S)
        if left:
            _log.warning("fan-out stopped with %d work item(s) undelivered; their visit was not committed", left)
        self.status.state = "stopped"
        if server is not None:
            server.stop()
        writer_stop.set()
        writer.join(timeout=5.0)
        return code
