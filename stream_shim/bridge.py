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
``ObjectCreated:Copy``, a deletion ``ObjectRemoved:Delete``.  The message is
produced and flushed before the filer event's offset is committed (at least
once; a duplicate notification is harmless downstream).
"""

from __future__ import annotations

__all__ = ["EVENT_NAMES", "s3_event", "FilerBridge"]

import datetime
import json
import logging
import time
from collections.abc import Collection
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


class BridgeDeliveryError(ConnectionError):
    """A notification was not acknowledged by the broker in time."""


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
        Bound on each delivery.
    """

    def __init__(
        self, bootstrap: str, topic: str, buckets: Collection[str], status: ShimStatus, *, timeout_s: float = 10.0
    ) -> None:
        from confluent_kafka import Producer

        self.topic, self.buckets, self.status, self.timeout_s = topic, set(buckets), status, timeout_s
        from stream_shim.consumer import KafkaLog

        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "linger.ms": 0,
                "logger": KafkaLog(),
                "message.timeout.ms": int(timeout_s * 1000),
            }
        )

    def __call__(self, message: Any) -> None:
        """Handle one filer event message."""
        self.forward(message.key(), message.value())

    def forward(self, key: bytes | str | None, value: bytes | None) -> str:
        """Forward one filer event if it concerns a watched bucket; return what was done.

        Raises
        ------
        BridgeDeliveryError
            If the notification was not acknowledged in time (the message is retried).
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
        errors: list[Any] = []
        self._producer.produce(
            self.topic,
            json.dumps(body).encode(),
            key=event.key.encode(),
            on_delivery=lambda err, _msg: errors.append(err),
        )
        self._producer.flush(self.timeout_s)
        if not errors or errors[0] is not None:
            raise BridgeDeliveryError(
                f"notification for {event.bucket}/{event.key} not delivered to "
                f"{self.topic}: {errors[0] if errors else 'timeout'}"
            )
        self.status.count(CATEGORY, "forwarded")
        _log.debug(
            "filer event %s %s/%s forwarded as %s (mtime %s)",
            event.kind,
            event.bucket,
            event.key,
            EVENT_NAMES[event.kind],
            mtime,
        )
        return "forwarded"
