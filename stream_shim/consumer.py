"""Kafka consumption: a poll loop with per-message commits, and the next_visit handler.

`ConsumeLoop` polls one topic and hands each message to a handler; the offset is
committed (synchronously) only when the handler has returned, so a message whose
handling did not finish is delivered again after a restart (at least once).  A
`stream_shim.watchdog.ConsumerWatchdog` recreates the consumer when it gets no
assignment, stalls behind new messages or sees repeated broker errors; the
loop's members are static (``group.instance.id``, `consumer_settings`), so a
consumer that stops before its assignment does not wedge the group.

`VisitGate` is the door: decode (JSON or Avro, `workflow.core.visit.decode_next_visit`; the
writer schema of framed Avro by its id, `workflow.core.schema_registry.schema_source`),
check (`workflow.core.visit.check_usable`), fan out to the active detectors with every
visit file's path inside the run directory; anything unusable is logged, counted by
reason and skipped.  What happens to a usable visit is its subclass's `accept`:
`NextVisitHandler` (the all-in-one shim) writes the per-detector visit files,
journals the visit and submits its targets; the pool's fan-out
(`stream_shim.fanout.FanOutHandler`) produces one work item per detector instead.
"""

from __future__ import annotations

__all__ = [
    "KafkaLog",
    "instance_id",
    "consumer_settings",
    "ConsumeLoop",
    "VisitGate",
    "NextVisitHandler",
    "drop_reason",
]

import hashlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from stream_shim.journal import AcceptedVisit, VisitJournal
from stream_shim.status import ShimStatus
from stream_shim.submission import Submitter
from stream_shim.target_store import LocalStore, PathOutsideRunDirError, TargetStore, contained_path
from stream_shim.watchdog import ConsumerWatchdog, WatchdogLimits
from workflow.core.config import known_instruments
from workflow.core.exceptions import (
    IgnorableVisit,
    InvalidIdentifier,
    InvalidVisit,
    StaleVisit,
    UnknownInstrumentError,
)
from workflow.core.log_fields import shorten
from workflow.core.schema_registry import UnknownSchemaError, schema_source
from workflow.core.visit import CoordSys, DetectorVisit, NextVisit, RotSys, check_usable, decode_next_visit
from workflow.stages.target import TargetPaths

_log = logging.getLogger(__name__)

_HANDLER_RETRIES = 3
_COMMIT_TRIES = 3
_DROP_MESSAGE_LIMIT = 600  # characters of a drop's message kept in the log line


class KafkaLog:
    """librdkafka's log lines, at DEBUG (they are noisy while a broker restarts)."""

    def log(self, level: int, msg: str, *args: Any) -> None:
        _log.debug("librdkafka: " + msg, *args)


def instance_id(group: str, member: str | None = None) -> str:
    """Return the static member id (``group.instance.id``) of this host's consumer in ``group``.

    Stable across restarts: a fresh consumer with the same id takes over the
    partitions of its predecessor at once, even if that one died or left
    before its assignment (which wedges a Tansu group of dynamic members).

    Parameters
    ----------
    group : `str`
        Consumer group.
    member : `str`, optional
        Tells apart consumers of one group on one host (e.g. the shim's state
        directory); two live consumers with the same id fence each other.
    """
    suffix = f".{hashlib.sha1(member.encode()).hexdigest()[:10]}" if member else ""
    return f"{group}.{socket.gethostname()}{suffix}"


def consumer_settings(
    bootstrap: str, group: str, *, member: str | None = None, static: bool = True, **extra: Any
) -> dict[str, Any]:
    """Return consumer settings: manual commits, earliest for a new group, quick group joins.

    A new group starts at the earliest offset: stale next_visits are dropped by
    age, so nothing old is processed, and nothing sent before the first start
    is lost (Tansu's high watermark is not reliable enough for ``latest``).
    Members are static (`instance_id`, with ``member``): a restarted consumer
    gets its partitions back within seconds, a dead one holds them for at most
    ``session.timeout.ms``.  ``static=False``: a dynamic member (no
    ``group.instance.id``), for groups whose dead members' partitions must move on.
    """
    return {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        **({"group.instance.id": instance_id(group, member)} if static else {}),
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "session.timeout.ms": 3000,
        "heartbeat.interval.ms": 750,
        # A fetch returns within 50 ms when nothing new came: Tansu answers an empty fetch
        # only at this deadline (librdkafka's 500 ms default; measured ~150 ms per hop),
        # and a raw crosses two consumers (filer bridge, arrival index) before ingest sees it.
        "fetch.wait.max.ms": 50,
        "logger": KafkaLog(),
        **extra,
    }


class ConsumeLoop(threading.Thread):
    """Poll ``topic`` until ``stop`` is set; handle each message, then commit its offset.

    Parameters
    ----------
    name : `str`
        Name of the loop (thread name, status category).
    settings : `~collections.abc.Mapping`
        Consumer settings (`consumer_settings`).
    topic : `str`
        Topic to consume.
    handler : callable
        Called with each message.  An exception is retried a few times, then
        the message is counted as ``handler_error`` and skipped.
    stop : `threading.Event`
        Ends the loop.
    status : `stream_shim.status.ShimStatus`
        Counts go here, category ``name`` (``kafka_error``, ``consumer_restarted``, ...).
    limits : `stream_shim.watchdog.WatchdogLimits`, optional
        Bounds of the watchdog that recreates a stuck consumer.

    Attributes
    ----------
    assigned : `threading.Event`
        Set once a consumer of the loop got its partitions.
    watchdog : `stream_shim.watchdog.ConsumerWatchdog`
    failed : `BaseException` or `None`
        Why the loop ended by itself (the service then stops).
    """

    def __init__(
        self,
        name: str,
        settings: Mapping[str, Any],
        topic: str,
        handler: Callable[[Any], None],
        stop: threading.Event,
        status: ShimStatus,
        *,
        limits: WatchdogLimits | None = None,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.settings, self.topic, self.handler, self.stop, self.status = dict(settings), topic, handler, stop, status
        self.failed: BaseException | None = None
        self.assigned = threading.Event()
        self.watchdog = ConsumerWatchdog(name, status, limits)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                consumer = self._new_consumer()
            except Exception as exc:  # noqa: BLE001 - reported by the service
                self.failed = exc
                return
            try:
                reason = self._consume(consumer)
            except Exception as exc:  # noqa: BLE001 - reported by the service, which stops
                self.failed = exc
                _log.exception("%s consumer stopped", self.topic)
                return
            finally:
                self._close(consumer)
            if reason is None:
                return
            self.watchdog.restarting(reason)

    def _new_consumer(self) -> Any:
        from confluent_kafka import Consumer

        consumer = Consumer({**self.settings, "error_cb": self._on_error})
        self.watchdog.created()
        consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke)
        _log.info("consuming %s as group %s", self.topic, self.settings["group.id"])
        return consumer

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        self.watchdog.assigned()
        self.assigned.set()

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        self.watchdog.revoked()

    def _on_error(self, error: Any) -> None:
        streak = self.watchdog.error(error)
        # the first of a burst (a broker away reports each reconnection) at WARNING, the rest at DEBUG
        _log.log(logging.WARNING if streak == 1 else logging.DEBUG, "%s: Kafka error: %s", self.topic, error)

    def _consume(self, consumer: Any) -> str | None:
        """Poll, handle and commit until stopped (`None`) or the watchdog wants a new consumer (why)."""
        while not self.stop.is_set():
            message = consumer.poll(0.5)
            if message is not None and message.error() is not None:
                _log.warning("%s: Kafka error: %s", self.topic, message.error())
                self.watchdog.error(message.error())
            elif message is not None:
                if not self._handle(message):
                    return None  # stopping in the middle: not committed, delivered again next time
                if not self._commit(consumer, message):
                    return None if self.stop.is_set() else "commit failed (the message is delivered again)"
                self.watchdog.progressed()
            reason = self.watchdog.check(consumer)
            if reason is not None:
                return reason
        return None

    def _commit(self, consumer: Any, message: Any) -> bool:
        """Commit the offset after ``message``, retrying; return whether it was committed."""
        from confluent_kafka import KafkaException

        for attempt in range(1, _COMMIT_TRIES + 1):
            try:
                consumer.commit(message=message, asynchronous=False)
                return True
            except KafkaException as exc:
                _log.warning(
                    "%s: commit of offset %d (partition %d) failed (attempt %d of %d): %s",
                    self.topic,
                    message.offset(),
                    message.partition(),
                    attempt,
                    _COMMIT_TRIES,
                    exc,
                )
                self.watchdog.error(exc)
            if attempt < _COMMIT_TRIES and self.stop.wait(0.5):
                return False
        return False

    def _close(self, consumer: Any) -> None:
        try:
            consumer.close()
        except Exception as exc:  # noqa: BLE001 - a consumer that cannot close is dropped anyway
            _log.warning("%s: closing the consumer failed: %s", self.topic, exc)

    def _handle(self, message: Any) -> bool:
        """Handle a message, retrying; return `False` if stopped before it was handled or given up."""
        for attempt in range(1, _HANDLER_RETRIES + 1):
            try:
                self.handler(message)
                return True
            except Exception:  # noqa: BLE001 - a message must not stop the shim
                _log.exception(
                    "%s: handling offset %d of partition %d failed (attempt %d of %d)",
                    self.topic,
                    message.offset(),
                    message.partition(),
                    attempt,
                    _HANDLER_RETRIES,
                )
            if attempt < _HANDLER_RETRIES and self.stop.wait(1.0):
                return False
        self.status.count(self.name, "handler_error")
        return True


def drop_reason(visit: NextVisit, error: IgnorableVisit) -> str:
    """Return the counted reason of an ignorable next_visit.

    Parameters
    ----------
    visit : `workflow.core.visit.NextVisit`
        The dropped message.
    error : `workflow.core.exceptions.IgnorableVisit`
        Why `workflow.core.visit.check_usable` refused it.

    Returns
    -------
    reason : `str`
        ``not_icrs``, ``not_sky_rotation``, ``stale_start`` (``startTime`` too old)
        or ``stale`` (``private_sndStamp`` too old).
    """
    if visit.coordinateSystem != CoordSys.ICRS:
        return "not_icrs"
    if visit.rotationSystem != RotSys.SKY:
        return "not_sky_rotation"
    if isinstance(error, StaleVisit) and error.field == "startTime":
        return "stale_start"
    return "stale"


class VisitGate:
    """Decode and check next_visit messages of one instrument; hand each usable one to `accept`.

    The checks of the door, shared by the all-in-one shim (`NextVisitHandler`) and
    the pool's fan-out (`stream_shim.fanout.FanOutHandler`), which differ only in
    what `accept` does with a visit.

    Parameters
    ----------
    config : `~collections.abc.Mapping`
        Merged configuration (``paths``, ``visit.max_age_s``, ``visit.max_start_age_s``,
        ``kafka.schema_registry_url`` or ``kafka.schema_dir``: writer schemas of framed Avro).
    detectors : sequence of `int`
        The instrument's active detectors.
    status : `stream_shim.status.ShimStatus`
        Counts go to category ``next_visit``.
    workdir : `pathlib.Path`
        Run directory (the config's relative paths are relative to it).
    """

    def __init__(
        self, config: Mapping[str, Any], *, detectors: Sequence[int], status: ShimStatus, workdir: Path
    ) -> None:
        self.config, self.detectors, self.status, self.workdir = config, list(detectors), status, Path(workdir)
        self.instrument = config["instrument"]["name"]
        self.max_age_s = float(config["visit"]["max_age_s"])
        self.max_start_age_s = float(config["visit"]["max_start_age_s"])
        self.known = known_instruments()
        self.schemas = schema_source(config, base_dir=self.workdir)

    def __call__(self, message: Any) -> None:
        """Handle one Kafka message."""
        where = {"topic": message.topic(), "partition": message.partition(), "offset": message.offset()}
        self.handle(message.value(), kafka=where)

    def handle(
        self, value: bytes | str | None, *, kafka: dict[str, Any] | None = None, now: float | None = None
    ) -> str:
        """Handle one message value; return what happened (`accept`'s outcome or the drop reason).

        A schema registry that cannot be reached raises
        `workflow.core.schema_registry.SchemaRegistryUnavailableError` (retried by the loop).

        Drop reasons: ``malformed`` (not JSON/Avro, a field missing or mistyped,
        nested too deeply), ``unknown_schema`` (framed Avro whose schema id neither
        the registry nor the schema files know), ``invalid_group``, ``invalid_instrument``,
        ``invalid_detector``, ``invalid_day_obs`` (a value that becomes a path does
        not match `workflow.core.identifiers`), ``unknown_instrument``,
        ``not_icrs``, ``not_sky_rotation``, ``stale``, ``stale_start``,
        ``other_instrument``, ``outside_run_dir``.
        """
        where = f"next_visit at {kafka}" if kafka else "next_visit"
        if value is None:
            return self._drop("malformed", f"{where}: empty message")
        try:
            visit = decode_next_visit(value, schemas=self.schemas)
        except InvalidIdentifier as exc:
            return self._drop(exc.reason, f"{where}: {exc}")
        except UnknownSchemaError as exc:
            return self._drop("unknown_schema", f"{where}: {exc}", {"schema_id": exc.schema_id})
        except InvalidVisit as exc:
            return self._drop("malformed", f"{where}: {exc}")
        context = {"instrument": visit.instrument, "group": visit.groupId}
        try:
            check_usable(
                visit,
                known_instruments=self.known,
                max_age_s=self.max_age_s,
                max_start_age_s=self.max_start_age_s,
                now=now,
            )
        except UnknownInstrumentError as exc:
            return self._drop("unknown_instrument", f"{where}: {exc}", context)
        except IgnorableVisit as exc:
            return self._drop(drop_reason(visit, exc), f"{where}: {exc}", context)
        if visit.instrument != self.instrument:
            return self._drop(
                "other_instrument",
                f"{where}: instrument {visit.instrument!r}, this shim serves {self.instrument!r}",
                context,
            )
        return self.accept(visit, kafka=kafka)

    def _drop(self, reason: str, message: str, context: Mapping[str, Any] | None = None) -> str:
        self.status.count("next_visit", reason)
        if len(message) > _DROP_MESSAGE_LIMIT:
            message = f"{message[:_DROP_MESSAGE_LIMIT]}... (message cut, {len(message)} chars)"
        _log.warning("dropped (%s): %s", reason, message, extra={"reason": reason, **(context or {})})
        return reason

    def fan_out(
        self, visit: NextVisit, *, kafka: dict[str, Any] | None = None
    ) -> list[tuple[DetectorVisit, TargetPaths]] | str:
        """Return the visit's detector-visits and their target paths, or the drop reason (logged, counted).

        Every visit file's path is checked to stay inside the run directory; if
        one does not, the visit is dropped as ``outside_run_dir`` (or ``invalid_detector``).
        """
        context = {"instrument": visit.instrument, "group": visit.groupId}
        where = f"next_visit at {kafka}" if kafka else "next_visit"
        try:
            fanned = [(dv, TargetPaths.from_visit(dv, self.config)) for dv in visit.fan_out(self.detectors)]
            for _, paths in fanned:
                contained_path(self.workdir, paths.visit_file)
        except InvalidIdentifier as exc:
            return self._drop(exc.reason, f"{where}: {exc}", context)
        except PathOutsideRunDirError as exc:
            return self._drop("outside_run_dir", f"{where} group {shorten(visit.groupId)}: {exc}", context)
        return fanned

    def accept(self, visit: NextVisit, *, kafka: dict[str, Any] | None = None) -> str:
        """Do the role's work with a usable visit; return the outcome counted (subclasses)."""
        raise NotImplementedError


class NextVisitHandler(VisitGate):
    """Handle next_visit messages of one instrument: the all-in-one shim's intake.

    Parameters
    ----------
    config : `~collections.abc.Mapping`
        Merged configuration (``paths``, ``visit.max_age_s``, ``visit.max_start_age_s``).
    detectors : sequence of `int`
        The instrument's active detectors.
    submitter : `stream_shim.submission.Submitter`
        Where targets go.
    journal : `stream_shim.journal.VisitJournal`
        Where accepted visits are recorded.
    status : `stream_shim.status.ShimStatus`
        Counts go to category ``next_visit``.
    workdir : `pathlib.Path`
        Run directory (the config's relative paths are relative to it).
    on_accepted : callable, optional
        Called with each accepted visit after submission (early-arrival check);
        what it returns is ignored.
    store : `stream_shim.target_store.TargetStore`, optional
        Where visit files are written (default: under ``workdir``).
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        detectors: Sequence[int],
        submitter: Submitter,
        journal: VisitJournal,
        status: ShimStatus,
        workdir: Path,
        on_accepted: Callable[[NextVisit], object] | None = None,
        store: TargetStore | None = None,
    ) -> None:
        super().__init__(config, detectors=detectors, status=status, workdir=workdir)
        self.submitter, self.journal, self.on_accepted = submitter, journal, on_accepted
        self.store: TargetStore = store if store is not None else LocalStore(self.workdir)

    def accept(self, visit: NextVisit, *, kafka: dict[str, Any] | None = None) -> str:
        """Fan out, write visit files, journal, submit; return ``accepted``, ``duplicate`` or a drop reason.

        Every visit file's path is checked to stay inside the run directory
        before any is written; if one does not, nothing is written and the visit
        is dropped as ``outside_run_dir`` (or ``invalid_detector``).
        """
        started = time.monotonic()
        fanned = self.fan_out(visit, kafka=kafka)
        if isinstance(fanned, str):
            return fanned
        targets = []
        for detector_visit, paths in fanned:
            self.store.write_json(paths.visit_file, detector_visit.to_dict())
            targets.append(paths)
        self.journal.append(
            AcceptedVisit(
                instrument=visit.instrument,
                day_obs=visit.day_obs,
                group=visit.groupId,
                detectors=tuple(self.detectors),
                accepted=time.time(),
                kafka=kafka,
            )
        )
        result = self.submitter.submit(targets, batch_id=visit.groupId)
        outcome = "accepted" if result.submitted else "duplicate"
        self.status.count("next_visit", outcome)
        self.status.observe("accept_to_submit", time.monotonic() - started)
        _log.info(
            "%s group %s: %d target(s) submitted, %d already done, %d already failed, %d in flight",
            visit.instrument,
            visit.groupId,
            len(result.submitted),
            len(result.already_done),
            len(result.already_failed),
            len(result.in_flight),
            extra={"instrument": visit.instrument, "group": visit.groupId, "outcome": outcome},
        )
        if self.on_accepted is not None:
            try:
                self.on_accepted(visit)
            except Exception:  # noqa: BLE001 - an early-arrival check is best effort
                _log.exception("early-arrival check for group %s failed", visit.groupId)
        return outcome
