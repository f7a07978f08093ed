"""The next_visit message: parsing, validation and serialization.

The summit's ScriptQueue publishes a ``nextVisit`` event before each visit.
It reaches us as JSON or as Avro (the summit's ``logevent_nextVisit``
record, usually with Confluent schema-registry framing).  The schema id in the
framing selects the writer schema (`workflow.core.schema_registry`: a registry,
or shipped files keyed by id); the body is resolved from it to our reader
schema, `next_visit_schema`, so a field the summit adds, drops or moves is read
right, and an id nobody knows raises `UnknownSchemaError`.  `NextVisit` is the
whole-focal-plane message; `NextVisit.fan_out` turns it into one
`DetectorVisit` per detector, the form the workflow's visit files hold.

Reading a message has two stages, so that callers can count the reasons
separately:

- *parse* (`decode_next_visit`, `NextVisit.from_json`, `NextVisit.from_avro`,
  ...) checks structure and types and raises `InvalidVisit`;
- `check_usable` checks meaning and raises `UnknownInstrumentError` or
  `IgnorableVisit`.

`parse_next_visit` does both in one call.

Times: ``private_sndStamp`` and ``startTime`` are TAI expressed as unix
seconds (the SAL convention: the TAI calendar date and time, counted like
unix time), which is astropy's ``unix_tai`` format.  ``now`` arguments use
the same scale.
"""

from __future__ import annotations

__all__ = [
    "CoordSys",
    "RotSys",
    "Dome",
    "BaseVisit",
    "NextVisit",
    "DetectorVisit",
    "next_visit_schema",
    "UnknownSchemaError",
    "decode_next_visit",
    "check_usable",
    "parse_next_visit",
]

import dataclasses
import enum
import io
import json
import logging
import math
import numbers
import struct
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, Self

import fastavro
from astropy.time import Time, TimeDelta

from workflow.core.exceptions import (
    IgnorableVisit,
    InvalidIdentifier,
    InvalidVisit,
    StaleVisit,
    UnknownInstrumentError,
)
from workflow.core.identifiers import MAX_DETECTOR, check_identifier
from workflow.core.log_fields import shorten
from workflow.core.schema_registry import NEXT_VISIT_SCHEMA_ID, SchemaSource, UnknownSchemaError, shipped_schemas

_log = logging.getLogger(__name__)

_MAGIC_BYTE = 0
_FRAME_HEADER = struct.Struct(">bI")
_DAY_OBS_OFFSET = TimeDelta(12 * 3600.0, format="sec")
# private_sndStamp gives day_obs (a path component): keep it in years 1970-9999.
_STAMP_RANGE = (0.0, 253_402_214_400.0)
_NESTED = "next_visit is nested too deeply to be a next_visit"


class CoordSys(enum.IntEnum):
    """Coordinate system of `NextVisit.position` (SAL MetadataCoordSys)."""

    NONE = 1
    ICRS = 2
    OBSERVED = 3
    MOUNT = 4


class RotSys(enum.IntEnum):
    """Rotation system of `NextVisit.cameraAngle` (SAL MetadataRotSys)."""

    NONE = 1
    SKY = 2
    HORIZON = 3
    MOUNT = 4


class Dome(enum.IntEnum):
    """Dome state required by the visit (SAL MetadataDome)."""

    CLOSED = 1
    OPEN = 2
    EITHER = 3


# ---------------------------------------------------------------------------
# Field converters: each takes (field name, raw value) and returns the
# normalized value or raises InvalidVisit naming the field.


def _bad(name: str, expected: str, value: Any) -> InvalidVisit:
    return InvalidVisit(f"next_visit field {name!r}: expected {expected}, got {type(value).__name__} {shorten(value)}")


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _bad(name, "int", value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if not math.isfinite(value) or not float(value).is_integer():
        raise _bad(name, "int (a number with no fractional part)", value)
    return int(math.trunc(value))  # numbers.Real promises __trunc__, not __int__


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _bad(name, "float", value)
    if not math.isfinite(value):
        raise _bad(name, "finite float", value)
    return float(value)


def _as_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _bad(name, "str", value)
    return value


def _as_detector(name: str, value: Any) -> int:
    number = _as_int(name, value)
    if number < 0:
        raise _bad(name, "non-negative int", value)
    return number


# ---------------------------------------------------------------------------
# Identifier checks: run after every field has its type, on the values that
# become paths and targets (workflow.core.identifiers).


def _check_detector(name: str, value: int) -> None:
    if value > MAX_DETECTOR:
        raise InvalidIdentifier(
            f"next_visit field {name!r}: {shorten(value)} is not an allowed detector (at most {MAX_DETECTOR})",
            reason="invalid_detector",
        )


def _check_send_stamp(name: str, value: float) -> None:
    low, high = _STAMP_RANGE
    if not low <= value <= high:
        raise InvalidIdentifier(
            f"next_visit field {name!r}: {value!r} TAI unix seconds is outside [{low:g}, {high:g}], "
            "so its day_obs is not a YYYY-MM-DD path component",
            reason="invalid_day_obs",
        )


_IDENTIFIER_CHECKS: dict[str, Callable[[str, Any], None]] = {
    "instrument": lambda name, value: check_identifier("instrument", value, field=name),
    "groupId": lambda name, value: check_identifier("group", value, field=name),
    "private_sndStamp": _check_send_stamp,
    "detector": _check_detector,
}


def _as_position(name: str, value: Any) -> list[float]:
    expected = "list of 2 numbers [ra, dec] in degrees"
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _bad(name, expected, value)
    if any(isinstance(x, bool) or not isinstance(x, numbers.Real) for x in value):
        raise _bad(name, expected, value)
    if not all(math.isfinite(x) for x in value):
        raise _bad(name, "finite " + expected, value)
    ra, dec = (float(x) for x in value)
    if not -90.0 <= dec <= 90.0:
        raise InvalidVisit(f"next_visit field {name!r}: dec {dec!r} is outside [-90, 90] degrees")
    return [ra, dec]


def _enum_converter(enum_cls: type[enum.IntEnum]) -> Callable[[str, Any], enum.IntEnum]:
    names = ", ".join(f"{m.value}={m.name}" for m in enum_cls)
    expected = f"{enum_cls.__name__} ({names}) as int or name"

    def convert(name: str, value: Any) -> enum.IntEnum:
        if isinstance(value, str):
            try:
                return enum_cls[value.strip().upper()]
            except KeyError:
                raise _bad(name, expected, value) from None
        try:
            return enum_cls(_as_int(name, value))
        except (InvalidVisit, ValueError):
            raise _bad(name, expected, value) from None

    return convert


_CONVERTERS: dict[str, Callable[[str, Any], Any]] = {
    "salIndex": _as_int,
    "scriptSalIndex": _as_int,
    "instrument": _as_str,
    "groupId": _as_str,
    "coordinateSystem": _enum_converter(CoordSys),
    "position": _as_position,
    "startTime": _as_float,
    "rotationSystem": _enum_converter(RotSys),
    "cameraAngle": _as_float,
    "filters": _as_str,
    "dome": _enum_converter(Dome),
    "duration": _as_float,
    "nimages": _as_int,
    "survey": _as_str,
    "totalCheckpoints": _as_int,
    "private_sndStamp": _as_float,
    "detector": _as_detector,
}


# ---------------------------------------------------------------------------
# Message classes


@dataclasses.dataclass(frozen=True, kw_only=True)
class BaseVisit:
    """Fields shared by `NextVisit` and `DetectorVisit`.

    Construction validates and normalizes every field (integral floats become
    `int`, enum names or values become enum members, ``position`` becomes a
    new list of two `float`).  Do not modify ``position`` in place.

    Raises
    ------
    InvalidVisit
        Raised if a field has the wrong type or ``position`` holds a dec
        outside [-90, 90].  The message names the field.
    InvalidIdentifier
        Raised (an `InvalidVisit`), once every field has its type, if a value
        that becomes a path does not match `workflow.core.identifiers`
        (``instrument``, ``groupId``, ``detector``, the day of ``private_sndStamp``).
    """

    salIndex: int
    """SAL index of the ScriptQueue that published the message."""
    scriptSalIndex: int
    """SAL index of the script that takes the visit."""
    instrument: str
    """Short instrument name, e.g. ``LSSTCam``."""
    groupId: str
    """Group id shared by the visit's exposures (ISO timestamp for LSST)."""
    coordinateSystem: CoordSys
    """Coordinate system of ``position``."""
    position: list[float]
    """Pointing ``[ra, dec]`` in degrees."""
    startTime: float
    """Expected start of the visit, TAI unix seconds."""
    rotationSystem: RotSys
    """Rotation system of ``cameraAngle``."""
    cameraAngle: float
    """Camera angle in degrees."""
    filters: str
    """Comma-separated acceptable physical filters; empty for any."""
    dome: Dome
    """Dome state the visit needs."""
    duration: float
    """Estimated duration of the script, in seconds."""
    nimages: int
    """Number of images expected; 0 if unknown."""
    survey: str
    """Survey or observing block name."""
    totalCheckpoints: int
    """Number of checkpoints the script passes."""
    private_sndStamp: float
    """Time the summit sent the message, TAI unix seconds."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = _CONVERTERS[f.name](f.name, getattr(self, f.name))
            object.__setattr__(self, f.name, value)
        for name, check in _IDENTIFIER_CHECKS.items():
            if hasattr(self, name):
                check(name, getattr(self, name))

    def __hash__(self) -> int:
        return hash(tuple(tuple(v) if isinstance(v, list) else v for v in self._values()))

    def _values(self) -> list[Any]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    @property
    def ra(self) -> float:
        """Right ascension of the pointing, in degrees (`float`)."""
        return self.position[0]

    @property
    def dec(self) -> float:
        """Declination of the pointing, in degrees (`float`)."""
        return self.position[1]

    @property
    def filter_list(self) -> tuple[str, ...]:
        """Acceptable physical filters; empty if any will do (`tuple` [`str`])."""
        return tuple(name.strip() for name in self.filters.split(",") if name.strip())

    @property
    def day_obs(self) -> str:
        """Observing day of the message, ``YYYY-MM-DD`` (`str`).

        The day is the TAI date of ``private_sndStamp`` minus 12 hours.  The
        stamp is read with astropy's ``unix_tai`` format, which matches the
        SAL convention, so no leap-second offset needs to be applied by hand.
        """
        when = Time(self.private_sndStamp, format="unix_tai", scale="tai") - _DAY_OBS_OFFSET
        return when.tai.strftime("%Y-%m-%d")

    def to_dict(self) -> dict[str, Any]:
        """Return the message as a JSON-friendly `dict`.

        Returns
        -------
        data : `dict` [`str`, `~typing.Any`]
            One key per field; enums as their `int` values.
        """
        data: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.IntEnum):
                value = int(value)
            elif isinstance(value, list):
                value = list(value)
            data[f.name] = value
        return data

    def to_json(self) -> str:
        """Return the message as a JSON object.

        Returns
        -------
        text : `str`
            JSON text that `from_json` reads back to an equal object.
        """
        return json.dumps(self.to_dict(), allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Build a message from a mapping of field names to values.

        Parameters
        ----------
        data : `~collections.abc.Mapping` [`str`, `~typing.Any`]
            Field values.  Keys that are not fields (Rubin's other
            ``private_*`` stamps, for instance) are ignored.

        Returns
        -------
        visit : `NextVisit` or `DetectorVisit`
            An instance of the class it is called on.

        Raises
        ------
        InvalidVisit
            Raised if ``data`` is not a mapping, or a field is missing or has
            the wrong type.  The message names the field.
        """
        if not isinstance(data, Mapping):
            raise InvalidVisit(f"next_visit must be a JSON object/mapping, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [name for name in names if name not in data]
        if missing:
            raise InvalidVisit(f"next_visit is missing field(s): {', '.join(map(repr, missing))}")
        return cls(**{name: data[name] for name in names})

    @classmethod
    def from_json(cls, data: str | bytes | bytearray | Mapping[str, Any]) -> Self:
        """Build a message from JSON text or an already-decoded JSON object.

        Parameters
        ----------
        data : `str`, `bytes`, `bytearray` or `~collections.abc.Mapping`
            A JSON object (UTF-8 if bytes), or its decoded form.

        Returns
        -------
        visit : `NextVisit` or `DetectorVisit`
            An instance of the class it is called on.

        Raises
        ------
        InvalidVisit
            Raised if the text is not JSON (or nested too deeply to parse), or as
            for `from_dict`.
        """
        if isinstance(data, Mapping):
            return cls.from_dict(data)
        try:
            decoded = json.loads(data)
        except (ValueError, TypeError) as e:
            raise InvalidVisit(f"next_visit is not valid JSON: {shorten(str(e))}") from e
        except RecursionError:
            raise InvalidVisit(_NESTED) from None
        return cls.from_dict(decoded)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NextVisit(BaseVisit):
    """A next_visit message for the whole focal plane.

    See `BaseVisit` for the fields and the validation done on construction.
    """

    __hash__ = BaseVisit.__hash__

    def __str__(self) -> str:
        return f"NextVisit({self.instrument}, group={self.groupId}, survey={shorten(self.survey)})"

    @classmethod
    def from_avro(
        cls,
        data: bytes,
        *,
        writer_schema: Mapping[str, Any] | None = None,
        schemas: SchemaSource | None = None,
    ) -> NextVisit:
        """Build a message from the summit's Avro form.

        Parameters
        ----------
        data : `bytes`
            An Avro body, bare or with Confluent schema-registry framing
            (magic byte 0, 4-byte big-endian schema id, body).  Framing is
            detected: if both readings decode, the framed one wins.  A framed
            body is read with the writer schema of its id, resolved to
            `next_visit_schema`; a bare one with `next_visit_schema` itself.
        writer_schema : `~collections.abc.Mapping`, optional
            Schema the body was written with, whatever the id says.  Fields it
            lacks take the reader schema's defaults.
        schemas : `workflow.core.schema_registry.SchemaSource`, optional
            Where the writer schema of a frame's id comes from (default: the
            shipped schemas, `workflow.core.schema_registry.shipped_schemas`).

        Returns
        -------
        visit : `NextVisit`
            The decoded message.

        Raises
        ------
        UnknownSchemaError
            Raised (an `InvalidVisit`) if the bytes are framed with an id that
            ``schemas`` does not know and do not read as a bare body either.
        workflow.core.schema_registry.SchemaRegistryUnavailableError
            Raised (a `RetriableError`) if the registry cannot be asked.
        InvalidVisit
            Raised if the bytes do not decode, or as for `from_dict`.
        """
        record = _decode_avro(bytes(data), writer_schema, schemas or shipped_schemas())
        return cls.from_dict(record)

    def to_avro(self, schema_id: int | None = None) -> bytes:
        """Encode the message with the summit's Avro schema (`next_visit_schema`).

        Parameters
        ----------
        schema_id : `int`, optional
            Schema-registry id.  If given, the body is framed (magic byte 0,
            4-byte big-endian id); otherwise the bare body is returned.  The
            shipped schemas know it as `NEXT_VISIT_SCHEMA_ID`
            (`workflow.core.schema_registry`); a registry, under its own id.
            Summit fields that `NextVisit` does not hold get their defaults.

        Returns
        -------
        data : `bytes`
            The encoded message.

        Raises
        ------
        ValueError
            Raised if ``schema_id`` does not fit in 4 unsigned bytes.
        """
        record = self.to_dict()
        buffer = io.BytesIO()
        if schema_id is not None:
            if isinstance(schema_id, bool) or not 0 <= schema_id < 2**32:
                raise ValueError(f"schema_id must be an int in [0, 2**32), got {schema_id!r}")
            buffer.write(_FRAME_HEADER.pack(_MAGIC_BYTE, schema_id))
        fastavro.schemaless_writer(buffer, next_visit_schema(), record)
        return buffer.getvalue()

    def fan_out(self, detectors: Iterable[int]) -> list[DetectorVisit]:
        """Make one per-detector message for each detector.

        Parameters
        ----------
        detectors : `~collections.abc.Iterable` [`int`]
            Detector ids, in the order wanted.

        Returns
        -------
        visits : `list` [`DetectorVisit`]
            One message per detector, carrying all of this message's fields.

        Raises
        ------
        ValueError
            Raised if a detector appears twice.
        InvalidVisit
            Raised if a detector is not a non-negative int.
        """
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        visits: list[DetectorVisit] = []
        seen: set[int] = set()
        for detector in detectors:
            visit = DetectorVisit(**fields, detector=detector)
            if visit.detector in seen:
                raise ValueError(f"detector {visit.detector} listed twice in fan_out of {self}")
            seen.add(visit.detector)
            visits.append(visit)
        return visits


@dataclasses.dataclass(frozen=True, kw_only=True)
class DetectorVisit(BaseVisit):
    """A next_visit message for one detector: the workflow's visit file.

    All `NextVisit` fields (see `BaseVisit`) plus ``detector``.
    """

    detector: int
    """Detector id."""

    __hash__ = BaseVisit.__hash__

    def __str__(self) -> str:
        return (
            f"DetectorVisit({self.instrument}, group={self.groupId}, detector={self.detector}, "
            f"survey={shorten(self.survey)})"
        )


# ---------------------------------------------------------------------------
# Avro


def next_visit_schema() -> dict[str, Any]:
    """Return the summit's ``logevent_nextVisit`` Avro schema, parsed: our reader schema.

    It is the shipped schema of id `NEXT_VISIT_SCHEMA_ID`
    (``workflow/data/next_visit.1.avsc``).

    Returns
    -------
    schema : `dict` [`str`, `~typing.Any`]
        The schema as parsed by `fastavro.parse_schema`; shared and cached,
        so do not modify it.
    """
    schema = shipped_schemas().writer_schema(NEXT_VISIT_SCHEMA_ID)
    if schema is None:
        raise RuntimeError(f"the shipped next_visit schema (id {NEXT_VISIT_SCHEMA_ID}) is missing from workflow/data")
    return schema


def _read_body(body: bytes, writer_schema: Mapping[str, Any] | None) -> dict[str, Any]:
    buffer = io.BytesIO(body)
    reader = next_visit_schema()
    if writer_schema is None or writer_schema is reader:
        record = fastavro.schemaless_reader(buffer, reader)
    else:
        record = fastavro.schemaless_reader(buffer, dict(writer_schema), reader)
    if buffer.tell() != len(body):
        raise ValueError(f"{len(body) - buffer.tell()} bytes left over after the record")
    if not isinstance(record, dict):
        raise ValueError(f"decoded a {type(record).__name__}, not a record")
    return record


def _decode_avro(data: bytes, writer_schema: Mapping[str, Any] | None, schemas: SchemaSource) -> dict[str, Any]:
    """Read framed (writer schema by id) or bare (the reader schema) Avro; framed first.

    A bare body may start with a zero byte too (``private_efdStamp`` 0.0 does), so a
    frame whose id is unknown is read as bare before it is called unknown; id 0,
    which a registry never assigns (its ids start at 1), is no frame at all.
    """
    attempts: list[tuple[str, bytes, Mapping[str, Any] | None]] = []
    unknown_id: int | None = None
    framed = len(data) > _FRAME_HEADER.size and data[0] == _MAGIC_BYTE
    schema_id = _FRAME_HEADER.unpack_from(data)[1] if framed else 0
    if framed and (schema_id != 0 or writer_schema is not None):
        framed_writer = writer_schema if writer_schema is not None else schemas.writer_schema(schema_id)
        if framed_writer is None:
            unknown_id = schema_id
        else:
            attempts.append((f"framed Avro (schema id {schema_id})", data[_FRAME_HEADER.size :], framed_writer))
    attempts.append(("bare Avro", data, writer_schema))
    errors = []
    for kind, body, writer in attempts:
        try:
            record = _read_body(body, writer)
        except Exception as e:  # noqa: BLE001 - fastavro raises many types on bad bytes
            errors.append(f"as {kind}: {type(e).__name__}: {shorten(str(e))}")
            continue
        _log.debug("Decoded next_visit as %s.", kind)
        return record
    if unknown_id is not None:
        raise UnknownSchemaError(
            f"next_visit framed with Avro schema id {unknown_id}, which the {schemas.describe()} does not know "
            f"(and it does not read as bare Avro: {'; '.join(errors)})",
            schema_id=unknown_id,
        )
    raise InvalidVisit(f"next_visit does not decode ({'; '.join(errors)})")


# ---------------------------------------------------------------------------
# Parse, check, both


def decode_next_visit(
    data: str | bytes | bytearray | Mapping[str, Any], *, schemas: SchemaSource | None = None
) -> NextVisit:
    """Parse a next_visit from JSON or Avro, detecting which.

    Parameters
    ----------
    data : `str`, `bytes`, `bytearray` or `~collections.abc.Mapping`
        A decoded JSON object, JSON text, or bytes holding JSON or Avro
        (framed or bare).  Bytes are read as JSON if they parse as JSON,
        otherwise as Avro; if they look like JSON (start with ``{`` or
        ``[``) and fail both ways, the JSON error is reported.
    schemas : `workflow.core.schema_registry.SchemaSource`, optional
        Writer schemas of framed Avro by id (default: the shipped ones); see
        `NextVisit.from_avro`.

    Returns
    -------
    visit : `NextVisit`
        The parsed message; not yet checked with `check_usable`.

    Raises
    ------
    UnknownSchemaError
        Raised (an `InvalidVisit`) if framed Avro names a schema id ``schemas``
        does not know.
    workflow.core.schema_registry.SchemaRegistryUnavailableError
        Raised (a `RetriableError`) if the schema registry cannot be asked.
    InvalidVisit
        Raised if the message is malformed (nested too deeply to parse,
        included); the message names the field.
    InvalidIdentifier
        Raised (an `InvalidVisit`) if a value that becomes a path or a target
        (``groupId``, ``instrument``, the day_obs of ``private_sndStamp``) does not
        match its pattern in `workflow.core.identifiers`; ``reason`` says which.
    """
    if isinstance(data, (str, Mapping)):
        return NextVisit.from_json(data)
    data = bytes(data)
    try:
        decoded = json.loads(data)
    except RecursionError:
        raise InvalidVisit(_NESTED) from None
    except ValueError as e:
        if data.lstrip()[:1] not in (b"{", b"["):
            return NextVisit.from_avro(data, schemas=schemas)
        try:
            return NextVisit.from_avro(data, schemas=schemas)
        except InvalidVisit:
            raise InvalidVisit(f"next_visit is not valid JSON: {shorten(str(e))}") from e
    return NextVisit.from_dict(decoded)


def check_usable(
    visit: BaseVisit,
    *,
    known_instruments: Collection[str],
    max_age_s: float = 3600.0,
    max_start_age_s: float | None = None,
    now: float | None = None,
) -> None:
    """Check that a well-formed message is one we should process.

    Checks run in this order: instrument, coordinate system, rotation
    system, age of the send stamp, age of the start time.

    Parameters
    ----------
    visit : `BaseVisit`
        A parsed `NextVisit` or `DetectorVisit`.
    known_instruments : `~collections.abc.Collection` [`str`]
        Instruments we have configuration for.
    max_age_s : `float`, optional
        Largest acceptable age of the message (``now - private_sndStamp``), in seconds.
    max_start_age_s : `float`, optional
        Largest acceptable age of the visit's start (``now - startTime``), in
        seconds; `None` (the default): not checked.
    now : `float`, optional
        Current time, TAI unix seconds; defaults to the clock.

    Raises
    ------
    UnknownInstrumentError
        Raised if ``visit.instrument`` is not in ``known_instruments``.
    StaleVisit
        Raised (an `IgnorableVisit`) if ``now - private_sndStamp`` exceeds
        ``max_age_s`` or ``now - startTime`` exceeds ``max_start_age_s``;
        ``field`` names which.
    IgnorableVisit
        Raised if the position is not ICRS or the rotation is not SKY.
    """
    if visit.instrument not in known_instruments:
        known = ", ".join(sorted(known_instruments)) or "(none)"
        raise UnknownInstrumentError(
            f"next_visit field 'instrument': {visit.instrument!r} is not a known instrument ({known})"
        )
    if visit.coordinateSystem != CoordSys.ICRS:
        raise IgnorableVisit(
            f"next_visit field 'coordinateSystem' is {visit.coordinateSystem.name}, only ICRS is processed"
        )
    if visit.rotationSystem != RotSys.SKY:
        raise IgnorableVisit(f"next_visit field 'rotationSystem' is {visit.rotationSystem.name}, only SKY is processed")
    if now is None:
        now = Time.now().unix_tai
    age = now - visit.private_sndStamp
    if age > max_age_s:
        raise StaleVisit(
            f"next_visit field 'private_sndStamp' is {age:.1f} s old, over the {max_age_s:g} s limit",
            field="private_sndStamp",
        )
    start_age = now - visit.startTime
    if max_start_age_s is not None and start_age > max_start_age_s:
        raise StaleVisit(
            f"next_visit field 'startTime' is {start_age:.1f} s old, over the {max_start_age_s:g} s limit "
            "(visit.max_start_age_s)",
            field="startTime",
        )


def parse_next_visit(
    data: str | bytes | bytearray | Mapping[str, Any],
    *,
    known_instruments: Collection[str],
    max_age_s: float = 3600.0,
    max_start_age_s: float | None = None,
    now: float | None = None,
) -> NextVisit:
    """Parse a next_visit (JSON or Avro) and check that it is usable.

    Parameters
    ----------
    data : `str`, `bytes`, `bytearray` or `~collections.abc.Mapping`
        The message; see `decode_next_visit`.
    known_instruments : `~collections.abc.Collection` [`str`]
        Instruments we have configuration for.
    max_age_s : `float`, optional
        Largest acceptable age of the message, in seconds.
    max_start_age_s : `float`, optional
        Largest acceptable age of the visit's ``startTime``, in seconds (`None`: not checked).
    now : `float`, optional
        Current time, TAI unix seconds; defaults to the clock.

    Returns
    -------
    visit : `NextVisit`
        The parsed, usable message.

    Raises
    ------
    InvalidVisit
        Raised if the message is malformed.
    UnknownInstrumentError
        Raised if the instrument is unknown.
    IgnorableVisit
        Raised if the message is well-formed but not to be processed.
    """
    visit = decode_next_visit(data)
    check_usable(
        visit, known_instruments=known_instruments, max_age_s=max_age_s, max_start_age_s=max_start_age_s, now=now
    )
    return visit
