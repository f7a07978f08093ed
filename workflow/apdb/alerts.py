"""Build, serialize and send alert packets (lsst-alert-packet schemas, 11.0 by default).

One alert per DiaSource: ``diaSourceId`` (the alert id in schema 11), ``diaSource``,
``diaObject``, ``prvDiaSources`` (the object's preloaded history) and three FITS
cutouts (difference, science, template).  The schema is an `AlertSchema`: a version
shipped by the installed ``lsst.alert.packet`` (read from its package directory,
parsed once per process and version) and the registry id of the wire framing.  The
configuration chooses it (``alerts.schema_version``, ``alerts.schema_id``); the
default, `DEFAULT_SCHEMA`, is Rubin's production stream: 11.0, id 1100, on topic
``lsst-alerts-v11``.  Packets go to Kafka with the Confluent wire framing (magic
byte 0, 4-byte big-endian schema id, Avro body), or, when no broker is configured,
to one Avro object-container file per detector-visit.

Sending is at most once: callers check the sink (`KafkaAlertSink.check`) before the
APDB store and send only when the store actually wrote (see
`workflow.apdb.load.associate_store_alert`).
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_SCHEMA",
    "SCHEMA_ID",
    "SCHEMA_VERSION",
    "AlertSchema",
    "AlertBuildError",
    "AlertDeliveryError",
    "AlertSink",
    "AlertSummary",
    "AvroFileAlertSink",
    "CutoutMaker",
    "KafkaAlertSink",
    "PRODUCER_DEFAULTS",
    "alert_schema",
    "build_alerts",
    "deserialize_alert",
    "make_alert_sink",
    "serialize_alert",
    "serialize_alert_fastavro",
    "write_alert_file",
]

import dataclasses
import functools
import importlib.util
import io
import json
import logging
import math
import os
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast

import fastavro
import numpy as np
import pandas as pd

from workflow.apdb.avro_codec import EncodeMismatch, Writer, compile_writer, encode_long
from workflow.core.exceptions import NonRetriableError, RetriableError

_log = logging.getLogger(__name__)

SCHEMA_VERSION = (11, 0)
"""Default alert schema version (major, minor): Rubin's production stream (``lsst-alerts-v11``).

lsst-alert-packet 30.2026.2700 also ships 11.1 (its latest: four more DiaSource
fields), which brokers that accept only the production ids refuse.
"""
SCHEMA_ID = SCHEMA_VERSION[0] * 100 + SCHEMA_VERSION[1]
"""Default schema-registry id in the wire framing (1100), as ``Schema.get_schema_id`` derives it."""
_MAGIC = 0
_FITS_BLOCK = 2880
_RECORDS_PER_BLOCK = 64
"""Alerts per block of an Avro container file (~3 MB at 45 kB each)."""


@dataclasses.dataclass(frozen=True)
class AlertSchema:
    """The alert schema packets are written with: a lsst.alert.packet version and its registry id.

    Parameters
    ----------
    version : `tuple` [`int`, `int`]
        ``(major, minor)``, a version the installed lsst.alert.packet ships.
    schema_id : `int`, optional
        Registry id in the framing; default ``major * 100 + minor`` (``Schema.get_schema_id``).
    """

    version: tuple[int, int]
    schema_id: int = -1

    def __post_init__(self) -> None:
        major, minor = (int(v) for v in self.version)
        object.__setattr__(self, "version", (major, minor))
        if self.schema_id == -1:
            object.__setattr__(self, "schema_id", major * 100 + minor)
        if isinstance(self.schema_id, bool) or not 0 <= self.schema_id < 2**32:
            raise ValueError(f"alert schema id must be an int in [0, 2**32), got {self.schema_id!r}")

    @property
    def name(self) -> str:
        """``<major>.<minor>`` (`str`)."""
        return f"{self.version[0]}.{self.version[1]}"

    @property
    def header(self) -> bytes:
        """The 5-byte wire framing: magic byte 0 and the big-endian id (`bytes`)."""
        return struct.pack(">bI", _MAGIC, self.schema_id)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> AlertSchema:
        """Return the schema of ``alerts.schema_version`` / ``alerts.schema_id`` (default `DEFAULT_SCHEMA`).

        Raises
        ------
        ValueError
            If the version is not ``<major>.<minor>``.
        """
        section = config.get("alerts") or {}
        text = str(section.get("schema_version") or DEFAULT_SCHEMA.name)
        major, dot, minor = text.partition(".")
        if not (dot and major.isdigit() and minor.isdigit()):
            raise ValueError(f"alerts.schema_version {text!r}: expected <major>.<minor>, e.g. 11.0")
        schema_id = section.get("schema_id")
        return cls((int(major), int(minor)), -1 if schema_id is None else int(schema_id))


DEFAULT_SCHEMA = AlertSchema(SCHEMA_VERSION, SCHEMA_ID)
"""Rubin's production alert schema: 11.0, registry id 1100."""


class AlertDeliveryError(RetriableError, ConnectionError):
    """Alerts could not be delivered to the broker (message names the broker and topic)."""


class AlertBuildError(NonRetriableError, ValueError):
    """A catalog lacks a field that the alert schema requires."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class AlertSummary:
    """Counts for the target summary."""

    n_alerts: int
    n_bytes: int
    destination: str
    schema_version: str
    seconds: float


def _schema_dir(version: tuple[int, int]) -> Path:
    """Directory of a schema version inside the installed lsst.alert.packet (no import)."""
    spec = importlib.util.find_spec("lsst.alert.packet")
    if spec is None or not spec.submodule_search_locations:
        raise AlertBuildError("lsst.alert.packet is not installed")
    major, minor = version
    path = Path(list(spec.submodule_search_locations)[0]) / "schema" / str(major) / str(minor)
    if not path.is_dir():
        raise AlertBuildError(f"alert schema {major}.{minor} is not in the installed lsst.alert.packet ({path})")
    return path


def alert_schema(version: tuple[int, int] = SCHEMA_VERSION) -> dict[str, Any]:
    """Return the parsed fastavro schema of an alert version (default `SCHEMA_VERSION`; cached)."""
    return _load_alert_schema((int(version[0]), int(version[1])))  # one cache key per version


@functools.cache
def _load_alert_schema(version: tuple[int, int]) -> dict[str, Any]:
    major, minor = version
    schema = fastavro.schema.load_schema(str(_schema_dir(version) / f"lsst.v{major}_{minor}.alert.avsc"))
    return cast(dict[str, Any], schema)  # a record schema parses to a dict


@functools.cache
def _record_fields(name: str, version: tuple[int, int]) -> tuple[tuple[str, str, bool], ...]:
    """(field, avro type, nullable) of one record schema (``diaSource``, ``diaObject``)."""
    major, minor = version
    with open(_schema_dir(version) / f"lsst.v{major}_{minor}.{name}.avsc") as stream:
        fields = json.load(stream)["fields"]
    out = []
    for field in fields:
        kind = field["type"]
        nullable = isinstance(kind, list) and "null" in kind
        base = [t for t in kind if t != "null"][0] if isinstance(kind, list) else kind
        out.append((field["name"], base, nullable))
    return tuple(out)


_CONVERT = {"long": int, "int": int, "float": float, "double": float, "boolean": bool, "string": str}


def _is_null(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _records(
    frame: pd.DataFrame, name: str, version: tuple[int, int], fill: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Turn a catalog into Avro records of schema ``name``; NaN/NA become null."""
    fill = fill or {}
    columns: dict[str, list[Any]] = {}
    for field, kind, nullable in _record_fields(name, version):
        convert = _CONVERT.get(kind, lambda v: v)
        if field in frame.columns:
            values = [None if _is_null(v) else convert(v) for v in frame[field].tolist()]
        else:
            values = [None] * len(frame)
        if not nullable and any(v is None for v in values):
            if field not in fill:
                raise AlertBuildError(f"{name} field {field!r} is required by alert schema {version}")
            values = [convert(fill[field]) if v is None else v for v in values]
        columns[field] = values
    names = list(columns)
    return [dict(zip(names, row, strict=False)) for row in zip(*columns.values(), strict=False)]


class CutoutMaker:
    """Cut small FITS stamps, with a WCS header, out of one image.

    Parameters
    ----------
    image : `numpy.ndarray`
        2-d image (``[y, x]``).
    wcs : `astropy.wcs.WCS`
        Its WCS; a stamp's header is this WCS with ``CRPIX`` shifted (exact).
    size : `int`, optional
        Stamp side in pixels; pixels off the image are NaN.
    """

    def __init__(self, image: np.ndarray, wcs: Any, size: int = 30) -> None:
        self.image, self.size = image, size
        cards = [c.image for c in wcs.to_header(relax=True).cards]
        self._crpix = (float(wcs.wcs.crpix[0]), float(wcs.wcs.crpix[1]))
        first = [c for c in cards if c.startswith("WCSAXES ")]  # must precede other WCS keys
        rest = [c for c in cards if c[:8].strip() not in ("CRPIX1", "CRPIX2", "WCSAXES")]
        head = [
            _card("SIMPLE", "T"),
            _card("BITPIX", -32),
            _card("NAXIS", 2),
            _card("NAXIS1", size),
            _card("NAXIS2", size),
        ]
        self._head = "".join(head + first)
        self._tail = "".join(rest) + "END".ljust(80)
        length = len(self._head) + 160 + len(self._tail)
        self._pad = " " * (-length % _FITS_BLOCK)

    def cutout(self, x: float, y: float) -> bytes:
        """Return FITS bytes of the stamp centred on pixel ``(x, y)`` (0-based)."""
        size = self.size
        x0, y0 = int(round(x)) - size // 2, int(round(y)) - size // 2
        ny, nx = self.image.shape
        stamp = np.full((size, size), np.nan, dtype=">f4")
        ys, ye, xs, xe = max(y0, 0), min(y0 + size, ny), max(x0, 0), min(x0 + size, nx)
        if ys < ye and xs < xe:
            stamp[ys - y0 : ye - y0, xs - x0 : xe - x0] = self.image[ys:ye, xs:xe]
        header = (
            self._head
            + _card("CRPIX1", self._crpix[0] - x0)
            + _card("CRPIX2", self._crpix[1] - y0)
            + self._tail
            + self._pad
        )
        data = stamp.tobytes()
        return header.encode("ascii") + data + b"\0" * (-len(data) % _FITS_BLOCK)


def _card(key: str, value: Any) -> str:
    if isinstance(value, str):
        text = f"{key:<8}= {value:>20}"
    elif isinstance(value, int):
        text = f"{key:<8}= {value:>20d}"
    else:
        number = f"{value:.13G}"
        text = f"{key:<8}= {number if any(c in number for c in '.EN') else number + '.0':>20}"
    return text.ljust(80)


def build_alerts(
    sources: pd.DataFrame,
    objects: pd.DataFrame,
    history: pd.DataFrame | None = None,
    *,
    cutouts: Mapping[str, CutoutMaker] | None = None,
    visit_mjd_tai: float | None = None,
    schema: AlertSchema | None = None,
) -> list[dict[str, Any]]:
    """Build one alert record per DiaSource.

    Parameters
    ----------
    sources : `pandas.DataFrame`
        This detector-visit's DiaSources, with ``diaObjectId``.
    objects : `pandas.DataFrame`
        The DiaObjects just stored (new versions), with ``diaObjectId``.
    history : `pandas.DataFrame`, optional
        Preloaded DiaSources; those of an alert's object (other visits) become
        its ``prvDiaSources``, oldest first (null when there are none).
    cutouts : `~collections.abc.Mapping` [`str`, `CutoutMaker`], optional
        Keys ``difference``, ``science``, ``template``; a missing key gives a null cutout.
    visit_mjd_tai : `float`, optional
        Fills ``diaObject.validityStartMjdTai`` where unset.
    schema : `AlertSchema`, optional
        Schema whose fields the records get (default `DEFAULT_SCHEMA`).

    Returns
    -------
    alerts : `list` [`dict`]
        Records of the alert schema.

    Raises
    ------
    AlertBuildError
        If a field the schema requires is missing.
    """
    version = (schema or DEFAULT_SCHEMA).version
    src_records = _records(sources, "diaSource", version)
    obj_fill = {"validityStartMjdTai": visit_mjd_tai} if visit_mjd_tai is not None else {}
    obj_records = dict(
        zip(objects["diaObjectId"].tolist(), _records(objects, "diaObject", version, obj_fill), strict=False)
    )
    prv: dict[int, list[dict[str, Any]]] = {}
    if history is not None and len(history):
        ids = set(sources["diaObjectId"].tolist())
        visits = set(sources["visit"].tolist())
        past = history[history["diaObjectId"].isin(ids) & ~history["visit"].isin(visits)]
        past = past.sort_values("midpointMjdTai", kind="stable")
        for record in _records(past, "diaSource", version):
            prv.setdefault(record["diaObjectId"], []).append(record)
    makers = cutouts or {}
    xs, ys = sources["x"].to_numpy(float), sources["y"].to_numpy(float)
    alerts = []
    for i, src in enumerate(src_records):
        alert: dict[str, Any] = {
            "diaSourceId": src["diaSourceId"],
            "diaSource": src,
            "prvDiaSources": prv.get(src["diaObjectId"]),
            "diaObject": obj_records.get(src["diaObjectId"]),
        }
        for key in ("difference", "science", "template"):
            maker = makers.get(key)
            alert[f"cutout{key.capitalize()}"] = maker.cutout(xs[i], ys[i]) if maker is not None else None
        alerts.append(alert)
    return alerts


@functools.cache
def _alert_writer(version: tuple[int, int]) -> Writer | None:
    """The compiled encoder of an alert schema, or `None` if the schema has a type it does not compile."""
    try:
        return compile_writer(alert_schema(version))
    except EncodeMismatch as exc:
        _log.warning("alert schema %s: compiled encoder unavailable (%s); using fastavro", version, exc)
        return None


def _encode_into(out: bytearray, alert: Mapping[str, Any], version: tuple[int, int]) -> None:
    """Append the Avro body of one alert: compiled if it takes the values, else fastavro."""
    writer = _alert_writer(version)
    if writer is not None:
        mark = len(out)
        try:
            writer(out, alert)
            return
        except EncodeMismatch:
            del out[mark:]  # a value outside the compiled checks: fastavro writes it, or says what is wrong
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, alert_schema(version), dict(alert))
    out += buffer.getvalue()


def serialize_alert(alert: Mapping[str, Any], schema: AlertSchema | None = None) -> bytes:
    """Return the framed bytes of one alert: magic 0, schema id (big-endian), Avro body.

    The body is what ``fastavro.schemaless_writer`` writes with ``schema`` (default
    `DEFAULT_SCHEMA`); the compiled encoder (`workflow.apdb.avro_codec`, compiled from
    that schema) writes it at 1/2 to 1/4 of the CPU, and hands any alert with a value
    it does not take to fastavro, which then writes it or raises.
    """
    schema = schema or DEFAULT_SCHEMA
    out = bytearray(schema.header)
    _encode_into(out, alert, schema.version)
    return bytes(out)


def write_alert_file(stream: BinaryIO, alerts: Sequence[Mapping[str, Any]], schema: AlertSchema | None = None) -> None:
    """Write alerts as an Avro object-container file (what ``fastavro.writer`` writes, ~1/3 of the CPU).

    The header comes from fastavro (``schema``, default `DEFAULT_SCHEMA`; null codec;
    sync marker); the blocks of records are encoded as in `serialize_alert`.
    ``fastavro.reader`` reads it back.
    """
    version = (schema or DEFAULT_SCHEMA).version
    marker = os.urandom(16)
    fastavro.writer(stream, alert_schema(version), [], sync_marker=marker)  # header only
    for start in range(0, len(alerts), _RECORDS_PER_BLOCK):
        block = alerts[start : start + _RECORDS_PER_BLOCK]
        body = bytearray()
        for alert in block:
            _encode_into(body, alert, version)
        stream.write(encode_long(len(block)) + encode_long(len(body)))
        stream.write(body)
        stream.write(marker)


def serialize_alert_fastavro(alert: Mapping[str, Any], schema: AlertSchema | None = None) -> bytes:
    """`serialize_alert` by ``fastavro.schemaless_writer`` alone (the reference encoder)."""
    schema = schema or DEFAULT_SCHEMA
    buffer = io.BytesIO()
    buffer.write(schema.header)
    fastavro.schemaless_writer(buffer, alert_schema(schema.version), dict(alert))
    return buffer.getvalue()


def deserialize_alert(payload: bytes, schema: AlertSchema | None = None) -> dict[str, Any]:
    """Decode bytes written by `serialize_alert` with ``schema`` (default `DEFAULT_SCHEMA`), checking the framing.

    Raises
    ------
    AlertBuildError
        If the magic byte or the schema id is not the schema's.
    """
    schema = schema or DEFAULT_SCHEMA
    magic, schema_id = struct.unpack(">bI", payload[:5])
    if magic != _MAGIC or schema_id != schema.schema_id:
        raise AlertBuildError(
            f"alert framing: magic {magic}, schema id {schema_id}; expected 0 and {schema.schema_id} "
            f"(alert schema {schema.name})"
        )
    record = fastavro.schemaless_reader(io.BytesIO(payload[5:]), alert_schema(schema.version), None)
    return cast(dict[str, Any], record)  # the alert schema is a record: read as a dict


class AlertSink(Protocol):
    """Where alerts go (`KafkaAlertSink`, `AvroFileAlertSink`): ``check`` before the store, then ``send``."""

    schema: AlertSchema

    def check(self) -> None: ...  # noqa: D102
    def send(self, alerts: Sequence[Mapping[str, Any]], *, visit: int, detector: int) -> AlertSummary: ...  # noqa: D102


PRODUCER_DEFAULTS: dict[str, Any] = {"linger.ms": 10, "compression.type": "lz4"}
"""librdkafka settings of `KafkaAlertSink` (``producer_config`` overrides them).

lz4 because a packet is largely FITS header and block padding (a 30x30 stamp is
3.6 kB of pixels in 8.6 kB): 0.70 of the bytes on the wire and a third less broker
CPU, for ~9 us more producer CPU per alert (46 -> 55 us; zstd: 119 us).  Not
``enable.idempotence``: 146 us per alert against Tansu, and delivery is at least once
anyway (`workflow.apdb.outbox`: consumers dedupe on the alert id).  Measured by
scripts/bench_alerts.py (see README).
"""


class KafkaAlertSink:
    """Produce framed alerts to a Kafka topic, confirming every delivery.

    Parameters
    ----------
    bootstrap : `str`
        ``bootstrap.servers``.
    topic : `str`
        Alert topic (``kafka_topics.alerts``).
    timeout_s : `float`, optional
        Bound on the broker check and on waiting for deliveries.
    producer_config : `~collections.abc.Mapping`, optional
        Extra librdkafka settings (e.g. SASL), over `PRODUCER_DEFAULTS`.
    serializer : callable, optional
        Alert record -> message bytes; default `serialize_alert` with ``schema``.
    schema : `AlertSchema`, optional
        Schema of the packets (default `DEFAULT_SCHEMA`).
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        timeout_s: float = 30.0,
        producer_config: Mapping[str, Any] | None = None,
        serializer: Callable[[Mapping[str, Any]], bytes] | None = None,
        schema: AlertSchema | None = None,
    ) -> None:
        from confluent_kafka import Producer

        self.bootstrap, self.topic, self.timeout_s = bootstrap, topic, timeout_s
        self.schema = schema or DEFAULT_SCHEMA
        self._serialize = serializer or functools.partial(serialize_alert, schema=self.schema)
        config = {
            "bootstrap.servers": bootstrap,
            "message.timeout.ms": int(timeout_s * 1000),
            **PRODUCER_DEFAULTS,
            "logger": _log,
            **(producer_config or {}),
        }
        self._producer = Producer(config)

    def check(self) -> None:
        """Make sure the broker answers and the topic exists (call before storing).

        Raises
        ------
        AlertDeliveryError
            If the broker does not answer in time or the topic is unknown.
        """
        from confluent_kafka import KafkaException

        try:
            meta = self._producer.list_topics(self.topic, timeout=min(self.timeout_s, 10.0))
        except KafkaException as exc:
            raise AlertDeliveryError(f"Kafka broker {self.bootstrap} unreachable: {exc}") from exc
        topic = meta.topics.get(self.topic)
        if topic is None or topic.error is not None:
            error = topic.error if topic is not None else "missing"
            raise AlertDeliveryError(f"Kafka broker {self.bootstrap}: alert topic {self.topic!r} unusable: {error}")

    def send(self, alerts: Sequence[Mapping[str, Any]], *, visit: int, detector: int) -> AlertSummary:
        """Produce the alerts and wait (bounded) until each is acknowledged.

        Raises
        ------
        AlertDeliveryError
            If any alert is not acknowledged within ``timeout_s``.
        """
        start, sent, failures = time.monotonic(), [0], []

        def on_delivery(err: Any, msg: Any) -> None:
            if err is None:
                sent[0] += 1
            else:
                failures.append(err)

        n_bytes = 0
        for alert in alerts:
            payload = self._serialize(alert)
            n_bytes += len(payload)
            self._produce(payload, str(alert["diaSourceId"]).encode(), on_delivery)
        remaining = self._producer.flush(self.timeout_s)
        if remaining or failures or sent[0] != len(alerts):
            first = failures[0] if failures else "timeout"
            raise AlertDeliveryError(
                f"visit {visit} detector {detector}: {sent[0]} of {len(alerts)} alerts acknowledged by "
                f"{self.bootstrap} topic {self.topic!r} ({remaining} pending; first error: {first})"
            )
        return AlertSummary(
            n_alerts=len(alerts),
            n_bytes=n_bytes,
            destination=f"kafka://{self.bootstrap}/{self.topic}",
            schema_version=self.schema.name,
            seconds=time.monotonic() - start,
        )

    def _produce(self, payload: bytes, key: bytes, callback: Any) -> None:
        from confluent_kafka import KafkaException

        while True:
            try:
                self._producer.produce(self.topic, value=payload, key=key, on_delivery=callback)
                break
            except BufferError:
                self._producer.poll(0.1)  # local queue full: serve callbacks, then retry
            except KafkaException as exc:  # e.g. a fatal idempotence error: this producer is done
                raise AlertDeliveryError(f"Kafka broker {self.bootstrap} topic {self.topic!r}: {exc}") from exc
        self._producer.poll(0)


class AvroFileAlertSink:
    """Write a detector-visit's alerts to one Avro object-container file (no broker), with ``schema``."""

    def __init__(self, path: str | os.PathLike[str], schema: AlertSchema | None = None) -> None:
        self.path = Path(path)
        self.schema = schema or DEFAULT_SCHEMA

    def check(self) -> None:
        """Make sure the output directory exists."""
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def send(self, alerts: Sequence[Mapping[str, Any]], *, visit: int, detector: int) -> AlertSummary:
        """Write the alerts (atomically: temporary file, then rename)."""
        start = time.monotonic()
        self.check()
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as stream:
            write_alert_file(stream, alerts, self.schema)
        os.replace(tmp, self.path)
        _log.info("visit %d detector %d: wrote %d alerts to %s", visit, detector, len(alerts), self.path)
        return AlertSummary(
            n_alerts=len(alerts),
            n_bytes=self.path.stat().st_size,
            destination=str(self.path),
            schema_version=self.schema.name,
            seconds=time.monotonic() - start,
        )


def make_alert_sink(config: Mapping[str, Any], avro_path: str | os.PathLike[str], **kwargs: Any) -> AlertSink:
    """Return the sink the config asks for: Kafka if ``kafka.bootstrap`` is set, else an Avro file.

    Parameters
    ----------
    config : `~collections.abc.Mapping`
        Merged configuration (``kafka.bootstrap``, ``kafka_topics.alerts``, ``alerts``:
        the schema, `AlertSchema.from_config`).
    avro_path : `str` or `os.PathLike`
        File for the no-broker case.
    **kwargs
        Passed to `KafkaAlertSink`.
    """
    schema = AlertSchema.from_config(config)
    bootstrap = (config.get("kafka") or {}).get("bootstrap")
    if bootstrap:
        return KafkaAlertSink(bootstrap, config["kafka_topics"]["alerts"], schema=schema, **kwargs)
    return AvroFileAlertSink(avro_path, schema)
