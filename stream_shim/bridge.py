"""Bridge: SeaweedFS filer events in, Rubin/Ceph-style S3 event notifications out.

SeaweedFS (the embedded default's S3) cannot send S3 bucket notifications; its
filer publishes protobuf metadata events to Kafka instead
(`stream_shim.filer_events`).  The bridge turns each object change in the
watched buckets into the JSON that the summit's Ceph sends, on the
raw-notification topic, so everything downstream is the production path::

    {"Records": [{"eventVersion": "2.2", "eventSource": "ceph:s3", "eventTime": ...,
                  "eventName": "ObjectCreated:Put",
                  "s3": {"bucket": {"name": ...}, "object": {"key": ..., "size": ...}}}]}

A creation or overwrite becomes ``ObjectCreated:Put``, a rename
``ObjectCreated:Copy``, a deletion ``ObjectRemoved:Delete``.

Never a notification lost: the handler returns (and the consume loop commits the
filer event's offset) only once the broker acknowledged the notification.  A
failed delivery (the producer's ``message.timeout.ms`` ran out while the broker
was away, or the broker refused it) is produced again after a back-off, for as
long as it takes; only a stop (``stop``) ends the wait, by raising, and the loop
then does not commit, so the event is consumed again by the next run.  A
notification acknowledged but reported as failed is sent twice: harmless, the
shim's arrival index and submitter dedupe.

The filer itself drops the events it cannot publish while the broker is away.
Given a ``lister`` (`s3_lister`), the bridge heals that: a watch thread probes the
broker every ``CatchUp.probe_s``; once it answers again after failing, and
``CatchUp.settle_s`` later (the filer reconnects), the watched buckets are listed
and every object modified from ``CatchUp.margin_s`` before the last good probe
until the listing gets a notification (``ObjectCreated:Put``, counted
``caught_up``), delivered like the others.  Objects whose event did get through
are notified twice: harmless, as above.  The listing reads whole buckets (S3 has
no time filter): right for the embedded default this bridge serves, not for a
bucket of many nights.
"""

from __future__ import annotations

__all__ = ["EVENT_NAMES", "CatchUp", "ObjectLister", "s3_event", "s3_lister", "FilerBridge", "bridge_for_config"]

import dataclasses
import datetime
import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from stream_shim.filer_events import CREATED, DELETED, RENAMED, UPDATED, decode_filer_event, new_entry_attributes
from stream_shim.status import ShimStatus

_log = logging.getLogger(__name__)

CATEGORY = "bridge"
EVENT_NAMES = {
    CREATED: "ObjectCreated:Put",
    UPDATED: "ObjectCreated:Put",
    RENAMED: "ObjectCreated:Copy",
    DELETED: "ObjectRemoved:Delete",
}
"""S3 event name of each filer event kind."""


_REPORT_SLACK_S = 5.0
"""Beyond ``message.timeout.ms``, how long to wait for a delivery report before producing again."""
_POLL_S = 0.25


ObjectLister = Callable[[str], Iterable[tuple[str, int | None, float]]]
"""``lister(bucket)`` yields ``(key, size, last modified as unix seconds)`` of each object of a bucket."""


@dataclasses.dataclass(frozen=True)
class CatchUp:
    """How the bridge finds the objects whose filer events were dropped while the broker was away.

    Attributes
    ----------
    lister : `ObjectLister`
        Lists a watched bucket (`s3_lister`).
    probe_s : `float`
        Interval between two probes of the broker (a metadata request).
    settle_s : `float`
        Wait after the broker answers again before listing (the filer reconnects meanwhile).
    margin_s : `float`
        The window listed starts this long before the last good probe.
    """

    lister: ObjectLister
    probe_s: float = 2.0
    settle_s: float = 10.0
    margin_s: float = 10.0

    def __post_init__(self) -> None:
        if self.probe_s <= 0 or self.settle_s < 0 or self.margin_s < 0:
            raise ValueError(f"bridge catch-up {self}: probe_s must be > 0, settle_s and margin_s >= 0")


def s3_lister(endpoint_url: str) -> ObjectLister:
    """Return an `ObjectLister` for the S3 server at ``endpoint_url`` (credentials: the ``AWS_*`` environment)."""
    import boto3
    import botocore.config

    client = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        config=botocore.config.Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 3}),
    )

    def lister(bucket: str) -> Iterable[tuple[str, int | None, float]]:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                yield item["Key"], item.get("Size"), item["LastModified"].timestamp()

    return lister


class BridgeDeliveryError(ConnectionError):
    """The bridge was stopped before a notification was acknowledged (its filer event is not committed)."""


def s3_event(
    bucket: str,
    key: str,
    *,
    event_name: str = "ObjectCreated:Put",
    size: int | None = None,
    event_time: float | None = None,
) -> dict[str, Any]:
    """Return one S3 event notification (a single record) as a `dict`.

    Parameters
    ----------
    bucket, key : `str`
        The object.
    event_name : `str`, optional
        S3 event name.
    size : `int`, optional
        Object size in bytes.
    event_time : `float`, optional
        Unix time of the change (default: now).
    """
    when = datetime.datetime.fromtimestamp(time.time() if event_time is None else event_time, datetime.UTC)
    obj: dict[str, Any] = {"key": key}
    if size is not None:
        obj["size"] = size
    return {
        "Records": [
            {
                "eventVersion": "2.2",
                "eventSource": "ceph:s3",
                "eventName": event_name,
                "eventTime": when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z",
                "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket}, "object": obj},
            }
        ]
    }


class FilerBridge:
    """Turn filer events (handler of a `stream_shim.consumer.ConsumeLoop`) into S3 notifications.

    Parameters
    ----------
    bootstrap : `str`
        Broker of the notification topic.
    topic : `str`
        The raw-notification topic.
    buckets : collection of `str`
        Buckets whose events are forwarded (others are counted and dropped).
    status : `stream_shim.status.ShimStatus`
        Counts go to category ``bridge``.
    timeout_s : `float`, optional
        The producer's ``message.timeout.ms``: how long one delivery attempt may take.
    retry_s, retry_max_s : `float`, optional
        Back-off before the first re-delivery, doubled each time up to ``retry_max_s``.
    stop : `threading.Event`, optional
        Set when the shim stops: a delivery still pending then raises
        `BridgeDeliveryError` (the event is not committed).  Without it, a
        delivery waits for the broker as long as it takes.
    catch_up : `CatchUp`, optional
        Heal the filer's dropped events (module docstring): a daemon watch
        thread starts here and ends when ``stop`` is set.

    Notes
    -----
    Counts (category ``bridge``): ``forwarded`` per notification acknowledged,
    ``delivery_failed`` per failed attempt, ``redelivered`` per notification that
    needed more than one attempt; with ``catch_up``, ``broker_away`` per outage
    seen, ``listed`` per object listed after one and ``caught_up`` per object
    modified in its window, notified.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        buckets: Collection[str],
        status: ShimStatus,
        *,
        timeout_s: float = 10.0,
        retry_s: float = 1.0,
        retry_max_s: float = 10.0,
        stop: threading.Event | None = None,
        catch_up: CatchUp | None = None,
    ) -> None:
        from confluent_kafka import Producer

        from stream_shim.consumer import KafkaLog

        if timeout_s <= 0 or retry_s <= 0 or retry_max_s < retry_s:
            raise ValueError(f"bridge: timeout_s {timeout_s} and retry_s must be > 0, retry_max_s >= retry_s")
        self.topic, self.buckets, self.status, self.timeout_s = topic, set(buckets), status, timeout_s
        self.retry_s, self.retry_max_s = retry_s, retry_max_s
        self.stop = stop if stop is not None else threading.Event()
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "linger.ms": 0,
                "logger": KafkaLog(),
                "message.timeout.ms": int(timeout_s * 1000),
            }
        )
        self.catch_up = catch_up
        self.watch: threading.Thread | None = None
        if catch_up is not None:
            self.watch = threading.Thread(target=self._watch, args=(catch_up,), name="bridge-watch", daemon=True)
            self.watch.start()

    def __call__(self, message: Any) -> None:
        """Handle one filer event message."""
        self.forward(message.key(), message.value())

    def forward(self, key: bytes | str | None, value: bytes | None) -> str:
        """Forward one filer event if it concerns a watched bucket; return what was done.

        Raises
        ------
        BridgeDeliveryError
            If ``stop`` was set before the notification was acknowledged.
        """
        try:
            event = decode_filer_event(key, value or b"")
            size, mtime = new_entry_attributes(value or b"")
        except (ValueError, UnicodeDecodeError) as exc:
            self.status.count(CATEGORY, "malformed")
            _log.warning("filer event skipped: malformed: %s", exc)
            return "malformed"
        if event is None:
            self.status.count(CATEGORY, "not_an_object")
            return "not_an_object"
        if event.bucket not in self.buckets:
            self.status.count(CATEGORY, "other_bucket")
            return "other_bucket"
        body = s3_event(event.bucket, event.key, event_name=EVENT_NAMES[event.kind], size=size)
        attempts = self._deliver(event.key.encode(), json.dumps(body).encode(), f"{event.bucket}/{event.key}")
        self.status.count(CATEGORY, "forwarded")
        if attempts > 1:
            self.status.count(CATEGORY, "redelivered")
            _log.warning("notification for %s/%s delivered at attempt %d", event.bucket, event.key, attempts)
        _log.debug(
            "filer event %s %s/%s forwarded as %s (mtime %s)",
            event.kind,
            event.bucket,
            event.key,
            EVENT_NAMES[event.kind],
            mtime,
        )
        return "forwarded"

    def _deliver(self, key: bytes, payload: bytes, what: str) -> int:
        """Produce until the broker acknowledges; return the attempts it took.

        Raises
        ------
        BridgeDeliveryError
            If ``stop`` is set first.
        """
        backoff, attempt = self.retry_s, 0
        while True:
            attempt += 1
            error = self._attempt(key, payload)
            if error is None:
                return attempt
            self.status.count(CATEGORY, "delivery_failed")
            # the first failure of a notification at WARNING, the rest (one per timeout while the broker is away) DEBUG
            _log.log(
                logging.WARNING if attempt == 1 else logging.DEBUG,
                "notification for %s not delivered to %s (attempt %d): %s; producing it again in %.1f s",
                what,
                self.topic,
                attempt,
                error,
                backoff,
            )
            if self.stop.wait(backoff):
                raise BridgeDeliveryError(
                    f"notification for {what} not delivered to {self.topic} after {attempt} attempt(s) "
                    f"({error}); stopping: its filer event is not committed"
                )
            backoff = min(backoff * 2, self.retry_max_s)

    def _attempt(self, key: bytes, payload: bytes) -> str | None:
        """Produce once and wait for the delivery report; return `None` if acknowledged, else why not."""
        reports: list[Any] = []
        try:
            self._producer.produce(self.topic, payload, key=key, on_delivery=lambda err, _msg: reports.append(err))
        except BufferError as exc:  # the local queue is full of earlier attempts still timing out
            self._producer.poll(_POLL_S)
            return f"producer queue full: {exc}"
        give_up = time.monotonic() + self.timeout_s + _REPORT_SLACK_S
        while not reports:
            left = give_up - time.monotonic()
            if left <= 0:
                return f"no delivery report within {self.timeout_s + _REPORT_SLACK_S:g} s"
            if self.stop.is_set():
                return "stopping"
            self._producer.poll(min(_POLL_S, left))
        return None if reports[0] is None else str(reports[0])

    # -- the filer's dropped events -----------------------------------------------------

    def _broker_answers(self, timeout_s: float) -> bool:
        from confluent_kafka import KafkaException

        try:
            self._producer.list_topics(self.topic, timeout=timeout_s)
        except KafkaException:
            return False
        return True

    def _watch(self, catch_up: CatchUp) -> None:
        """Probe the broker until ``stop``; after each outage, notify what changed meanwhile (`_catch_up`)."""
        last_ok = time.time()
        while not self.stop.wait(catch_up.probe_s):
            if self._broker_answers(catch_up.probe_s):
                last_ok = time.time()
                continue
            self.status.count(CATEGORY, "broker_away")
            _log.warning(
                "broker away (last answer %.1f s ago): objects changed meanwhile are listed after it",
                time.time() - last_ok,
            )
            while not self.stop.wait(catch_up.probe_s):
                if self._broker_answers(catch_up.probe_s):
                    break
            if self.stop.wait(catch_up.settle_s):
                return
            try:
                self._catch_up(catch_up, last_ok - catch_up.margin_s)
            except BridgeDeliveryError:
                return  # stopping
            last_ok = time.time()

    def _catch_up(self, catch_up: CatchUp, since: float) -> int:
        """Notify every object of the watched buckets modified since ``since`` (unix); return how many.

        A listing that fails (S3 away too) is tried again every ``probe_s`` until ``stop``.
        """
        notified = 0
        for bucket in sorted(self.buckets):
            while True:
                try:
                    listed = list(catch_up.lister(bucket))
                    break
                except Exception as exc:  # noqa: BLE001 - S3 may be away too: list again
                    _log.warning("bucket %s: listing after the broker outage failed: %s; again", bucket, exc)
                    if self.stop.wait(catch_up.probe_s):
                        return notified
            self.status.count(CATEGORY, "listed", len(listed))
            for key, size, mtime in (item for item in listed if item[2] >= since):
                body = s3_event(bucket, key, size=size, event_time=mtime)
                self._deliver(key.encode(), json.dumps(body).encode(), f"{bucket}/{key}")
                self.status.count(CATEGORY, "caught_up")
                notified += 1
        _log.warning(
            "after the broker outage: %d object(s) modified in the last %.0f s notified again",
            notified,
            time.time() - since,
        )
        return notified


def bridge_for_config(config: Mapping[str, Any], status: ShimStatus, *, stop: threading.Event) -> FilerBridge:
    """Return the bridge of a run: raw bucket events to its raw-notification topic.

    ``stop`` ends the wait of a pending delivery (its filer event is then not
    committed, so it is delivered again); with an S3 endpoint, the bridge lists the
    raw bucket after a broker outage for the events the filer dropped meanwhile.
    """
    endpoint = config["storage"]["endpoint_url"]
    return FilerBridge(
        config["kafka"]["bootstrap"],
        config["kafka_topics"]["raw_notification"],
        [config["buckets"]["raw"]],
        status,
        stop=stop,
        catch_up=CatchUp(s3_lister(endpoint)) if endpoint else None,
    )
