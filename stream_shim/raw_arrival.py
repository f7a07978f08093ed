"""Raw arrivals: S3 event notifications in, entries of the arrival index out.

Notifications have the Rubin/Ceph S3-event form
``{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": ...},
"object": {"key": ..., "size": ...}}}]}`` (the embedded default makes them with
`stream_shim.bridge`).  Each key is parsed with the instrument's raw key layout;
raws of this instrument in the raw bucket whose object still exists are recorded
in the `workflow.core.arrivals.ArrivalIndex`, where ingest finds them.  Everything else
is counted by reason (category ``raw_notification``) and skipped: sidecars
(``.json``), other buckets, keys of another layout or instrument, unknown
detectors, inactive detectors (``inactive_detector``: e.g. LSSTCam's corner sensors,
which a config override can make active), objects gone by the time we look, malformed
messages.

`RawArrivals.check_early` is the early-arrival check made when a visit is
accepted during the first minutes of a shim run: it lists the bucket for raws
that landed while the shim was not listening and records them too.  Later the
notifications have recorded every raw already (early or not), and ingest itself
lists the bucket on its first poll, so the check is skipped: at the end of a
night a day's listing holds every raw of the night.
"""

from __future__ import annotations

__all__ = ["ObjectEvent", "parse_s3_event", "RawArrivals", "day_prefix"]

import dataclasses
import datetime
import json
import logging
import string
import time
from collections.abc import Mapping
from typing import Any

from stream_shim.status import ShimStatus
from workflow.core.arrivals import Arrival, ArrivalIndex, normalize_day_obs
from workflow.core.buckets import Bucket
from workflow.core.instrument import Instrument
from workflow.core.raw_keys import RawKeyLayout
from workflow.core.visit import BaseVisit

_log = logging.getLogger(__name__)

CATEGORY = "raw_notification"


@dataclasses.dataclass(frozen=True)
class ObjectEvent:
    """One record of an S3 event notification."""

    event_name: str
    bucket: str
    key: str
    size: int | None = None


def parse_s3_event(value: bytes | str | None) -> list[ObjectEvent]:
    """Parse an S3 event notification (Rubin/Ceph/AWS form) into its records.

    Raises
    ------
    ValueError
        If the message is not JSON, has no ``Records`` list, or a record lacks
        ``eventName``, ``s3.bucket.name`` or ``s3.object.key``; the message says which.
    """
    if value is None:
        raise ValueError("empty message")
    try:
        data = json.loads(value)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    records = data.get("Records") if isinstance(data, dict) else None
    if not isinstance(records, list):
        raise ValueError("no 'Records' list")
    events = []
    for number, record in enumerate(records):
        try:
            s3 = record["s3"]
            key = s3["object"]["key"]
            bucket = s3["bucket"]["name"]
            name = record["eventName"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"record {number}: missing {exc}") from None
        if not all(isinstance(v, str) for v in (key, bucket, name)):
            raise ValueError(f"record {number}: eventName, bucket name and key must be strings")
        size = s3["object"].get("size")
        events.append(ObjectEvent(name, bucket, _unquote(key), int(size) if isinstance(size, (int, float)) else None))
    return events


def _unquote(key: str) -> str:
    # S3 notifications URL-encode keys (spaces as '+'); raw keys never hold '%' or '+' themselves.
    from urllib.parse import unquote_plus

    return unquote_plus(key) if ("%" in key or "+" in key) else key


def day_prefix(layout: RawKeyLayout, day_obs: str) -> str:
    """Return the key prefix fixed by instrument and day (``LSSTCam/20261128/``), for listings."""
    known = {"instrument": layout.instrument, "day_obs": day_obs.replace("-", "")}
    prefix = ""
    for literal, field, _, _ in string.Formatter().parse(layout.template):
        prefix += literal
        if field is None:
            continue
        if field not in known:
            break
        prefix += known[field]
    return prefix


class RawArrivals:
    """Record the raws of one instrument as they arrive.

    Parameters
    ----------
    config : `~collections.abc.Mapping`
        Merged configuration (``raw.key_template``, ``buckets.raw``).
    instrument : `workflow.core.instrument.Instrument`
        The instrument (detector names to ids).
    bucket : `workflow.core.buckets.Bucket`
        The raw bucket (existence checks, early-arrival listings).
    index : `workflow.core.arrivals.ArrivalIndex`
        Where arrivals are recorded.
    status : `stream_shim.status.ShimStatus`
        Counts go here.
    warmup_s : `float`, optional
        `check_early` lists the bucket only this long after construction.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        instrument: Instrument,
        bucket: Bucket,
        index: ArrivalIndex,
        status: ShimStatus,
        warmup_s: float = 300.0,
    ) -> None:
        self.layout = RawKeyLayout.from_config(config)
        self.instrument, self.bucket, self.index, self.status = instrument, bucket, index, status
        self.bucket_name = config["buckets"]["raw"]
        self.warmup_ends = time.monotonic() + warmup_s

    def __call__(self, message: Any) -> None:
        """Handle one Kafka message of the raw-notification topic."""
        self.handle(message.value())

    def handle(self, value: bytes | str | None, *, received: float | None = None) -> list[str]:
        """Handle one notification; return the outcome of each record."""
        received = time.time() if received is None else received
        try:
            events = parse_s3_event(value)
        except ValueError as exc:
            self.status.count(CATEGORY, "malformed")
            _log.warning("raw notification skipped: malformed: %s", exc, extra={"reason": "malformed"})
            return ["malformed"]
        return [self.handle_event(event, received) for event in events]

    def _skip(self, reason: str, event: ObjectEvent, level: int = logging.DEBUG) -> str:
        self.status.count(CATEGORY, reason)
        _log.log(
            level, "raw notification for %s/%s skipped: %s", event.bucket, event.key, reason, extra={"reason": reason}
        )
        return reason

    def handle_event(self, event: ObjectEvent, received: float) -> str:
        """Record one event's raw, or count why not; return the outcome."""
        if not event.event_name.startswith("ObjectCreated"):
            return self._skip("not_a_creation", event)
        if event.bucket != self.bucket_name:
            return self._skip("other_bucket", event)
        if event.key.endswith(".json"):
            return self._skip("sidecar", event)
        return self._record(event.key, received, size=event.size, source="notification", check_exists=True)

    def _record(self, key: str, received: float, *, size: int | None, source: str, check_exists: bool) -> str:
        event = ObjectEvent("ObjectCreated", self.bucket_name, key, size)
        fields = self.layout.parse(key)
        if fields is None:
            return self._skip("no_layout_match", event, logging.INFO)
        detector_key = fields.detector if fields.detector is not None else fields.detector_name
        if detector_key is None:  # the key template names no detector
            return self._skip("unknown_detector", event, logging.WARNING)
        try:
            found = self.instrument.detector(detector_key)
        except (KeyError, ValueError, TypeError):
            return self._skip("unknown_detector", event, logging.WARNING)
        if not found.active:  # e.g. LSSTCam's corner guiders and wavefront sensors: no target waits for it
            return self._skip("inactive_detector", event)
        detector = found.id
        if check_exists:
            try:
                exists = self.bucket.exists(key)
            except Exception as exc:  # noqa: BLE001 - record anyway: ingest checks the object itself
                _log.warning("cannot check %s/%s: %s", self.bucket_name, key, exc)
                exists = True
            if not exists:
                return self._skip("vanished", event, logging.WARNING)
        day_obs = fields.day_obs or _day_of(received)
        new = self.index.record(
            self.instrument.name,
            normalize_day_obs(day_obs),
            Arrival(key=key, bucket=self.bucket_name, detector=detector, received=received, size=size, source=source),
        )
        if not new:
            if source == "notification":  # a listing meets every earlier raw of the day again: not counted
                self.status.count(CATEGORY, "duplicate")
            return "duplicate"
        outcome = "recorded" if source == "notification" else "early_arrival"
        self.status.count(CATEGORY, outcome)
        if new:
            _log.info(
                "raw %s arrived (%s)",
                key,
                source,
                extra={"instrument": self.instrument.name, "detector": detector, "key": key},
            )
        return outcome

    def check_early(self, visit: BaseVisit) -> int:
        """List the bucket for the visit's day and record raws not seen yet; return how many.

        After the warm-up nothing is listed (0 is returned): see the module docstring.
        """
        if time.monotonic() > self.warmup_ends:
            return 0
        keys = self.bucket.list(day_prefix(self.layout, visit.day_obs))
        found = 0
        now = time.time()
        for key in keys:
            if key.endswith(".json") or self.layout.parse(key) is None:
                continue
            if self._record(key, now, size=None, source="listing", check_exists=False) == "early_arrival":
                found += 1
        return found


def _day_of(unix_time: float) -> str:
    """Observing day (``YYYYMMDD``, time minus 12 h) of a unix time, for layouts without a day."""
    moment = datetime.datetime.fromtimestamp(unix_time, datetime.UTC) - datetime.timedelta(hours=12)
    return moment.strftime("%Y%m%d")
