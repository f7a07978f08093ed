"""Tests for `workflow.core.visit`."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import re
import struct
import unittest
from typing import Any

import fastavro
from astropy.time import Time

from workflow.core.exceptions import IgnorableVisit, InvalidIdentifier, InvalidVisit, StaleVisit, UnknownInstrumentError
from workflow.core.identifiers import GROUP_PATTERN, target_key
from workflow.core.schema_registry import NEXT_VISIT_SCHEMA_ID
from workflow.core.visit import (
    CoordSys,
    DetectorVisit,
    Dome,
    NextVisit,
    RotSys,
    check_usable,
    decode_next_visit,
    next_visit_schema,
    parse_next_visit,
)

# 2025-06-01T03:00:00 TAI as TAI unix seconds.
SND_STAMP = 1748746800.0
KNOWN = frozenset({"LSSTCam", "LATISS"})


def make_fields(**changes: Any) -> dict[str, Any]:
    """Return the fields of a good LSSTCam next_visit, with ``changes``.

    Parameters
    ----------
    **changes
        Fields to replace or add.

    Returns
    -------
    fields : `dict` [`str`, `~typing.Any`]
        JSON-friendly field values.
    """
    fields: dict[str, Any] = {
        "salIndex": 1,
        "scriptSalIndex": 100017,
        "instrument": "LSSTCam",
        "groupId": "2025-06-01T03:00:20.000",
        "coordinateSystem": 2,
        "position": [150.25, -30.5],
        "startTime": SND_STAMP + 20.0,
        "rotationSystem": 2,
        "cameraAngle": 12.5,
        "filters": "r_57,i_39",
        "dome": 2,
        "duration": 36.0,
        "nimages": 1,
        "survey": "BLOCK-365",
        "totalCheckpoints": 3,
        "private_sndStamp": SND_STAMP,
    }
    fields.update(changes)
    return fields


def make_summit_record(**changes: Any) -> dict[str, Any]:
    """Return a full summit Avro record, every private stamp filled in.

    Parameters
    ----------
    **changes
        Fields to replace.

    Returns
    -------
    record : `dict` [`str`, `~typing.Any`]
        A record matching the summit schema.
    """
    record = make_fields(
        private_efdStamp=SND_STAMP - 37.0 + 0.5,
        private_kafkaStamp=SND_STAMP + 0.2,
        private_revCode="c9aab3df",
        private_rcvStamp=SND_STAMP + 0.1,
        private_seqNum=42,
        private_identity="ScriptQueue:1",
        private_origin=1234,
    )
    record.update(changes)
    return record


def write_avro(record: dict[str, Any], schema_id: int | None = None, schema: Any = None) -> bytes:
    """Encode ``record`` with fastavro directly, as the summit would.

    Parameters
    ----------
    record : `dict` [`str`, `~typing.Any`]
        Record; missing fields take the schema's defaults.
    schema_id : `int`, optional
        If given, prepend Confluent framing with this id.
    schema : `dict`, optional
        Writer schema; defaults to the shipped summit schema.

    Returns
    -------
    data : `bytes`
        Encoded message.
    """
    buffer = io.BytesIO()
    if schema_id is not None:
        buffer.write(b"\x00" + struct.pack(">I", schema_id))
    fastavro.schemaless_writer(buffer, schema or next_visit_schema(), record)
    return buffer.getvalue()


class SchemaTestCase(unittest.TestCase):
    """Tests for `workflow.core.visit.next_visit_schema`."""

    def test_summit_form(self) -> None:
        schema = next_visit_schema()
        self.assertIs(schema, next_visit_schema())
        self.assertEqual(schema["name"], "lsst.sal.ScriptQueue.logevent_nextVisit")
        types = {f["name"]: f["type"] for f in schema["fields"]}
        for name in ("private_efdStamp", "private_kafkaStamp", "private_sndStamp", "private_rcvStamp"):
            self.assertEqual(types[name], "double")
        for name in ("salIndex", "scriptSalIndex", "private_seqNum", "private_origin"):
            self.assertEqual(types[name], "long")
        for name in ("coordinateSystem", "rotationSystem", "dome", "nimages", "totalCheckpoints"):
            self.assertEqual(types[name], "long")
        for name in ("private_revCode", "private_identity", "groupId", "filters", "instrument", "survey"):
            self.assertEqual(types[name], "string")
        for name in ("startTime", "cameraAngle", "duration"):
            self.assertEqual(types[name], "double")
        self.assertEqual(types["position"], {"type": "array", "items": "double"})
        self.assertTrue(all("default" in f for f in schema["fields"]))
        self.assertEqual(len(types), 23)


class NextVisitJsonTestCase(unittest.TestCase):
    """Tests for `workflow.core.visit.NextVisit` JSON (de)serialization."""

    def test_round_trip(self) -> None:
        text = json.dumps(make_fields())
        visit = NextVisit.from_json(text)
        self.assertEqual(json.loads(visit.to_json()), make_fields())
        self.assertEqual(NextVisit.from_json(visit.to_json()), visit)
        self.assertEqual(NextVisit.from_json(text.encode()), visit)
        self.assertEqual(NextVisit.from_dict(make_fields()), visit)

    def test_types_normalized(self) -> None:
        visit = NextVisit.from_dict(make_fields(salIndex=3.0, duration=30, position=(10, 20)))
        self.assertIs(visit.coordinateSystem, CoordSys.ICRS)
        self.assertIs(visit.rotationSystem, RotSys.SKY)
        self.assertIs(visit.dome, Dome.OPEN)
        self.assertEqual((visit.salIndex, type(visit.salIndex)), (3, int))
        self.assertEqual((visit.duration, type(visit.duration)), (30.0, float))
        self.assertEqual(visit.position, [10.0, 20.0])
        self.assertIsInstance(visit.position, list)

    def test_extra_fields_ignored(self) -> None:
        visit = NextVisit.from_json(json.dumps(make_summit_record(somethingNew="x")))
        self.assertEqual(visit, NextVisit.from_dict(make_fields()))
        self.assertNotIn("private_efdStamp", visit.to_dict())

    def test_enum_names_accepted(self) -> None:
        visit = NextVisit.from_dict(make_fields(coordinateSystem="ICRS", rotationSystem="sky", dome="EITHER"))
        self.assertEqual(
            (visit.coordinateSystem, visit.rotationSystem, visit.dome),
            (CoordSys.ICRS, RotSys.SKY, Dome.EITHER),
        )
        self.assertEqual(json.loads(visit.to_json())["dome"], 3)

    def test_properties(self) -> None:
        visit = NextVisit.from_dict(make_fields())
        self.assertEqual((visit.ra, visit.dec), (150.25, -30.5))
        self.assertEqual(visit.filter_list, ("r_57", "i_39"))
        self.assertEqual(NextVisit.from_dict(make_fields(filters="")).filter_list, ())
        self.assertEqual(NextVisit.from_dict(make_fields(filters=" g_6 , ")).filter_list, ("g_6",))

    def test_day_obs(self) -> None:
        noon = Time("2025-06-01T12:00:00", scale="tai").unix_tai
        for stamp, day in [
            (SND_STAMP, "2025-05-31"),
            (noon - 1.0, "2025-05-31"),
            (noon, "2025-06-01"),
            (noon + 86399.0, "2025-06-01"),
        ]:
            with self.subTest(stamp=stamp):
                self.assertEqual(NextVisit.from_dict(make_fields(private_sndStamp=stamp)).day_obs, day)

    def test_frozen_and_hashable(self) -> None:
        visit = NextVisit.from_dict(make_fields())
        with self.assertRaises(dataclasses.FrozenInstanceError):
            visit.groupId = "other"  # type: ignore[misc]
        self.assertEqual(hash(visit), hash(NextVisit.from_dict(make_fields())))
        self.assertEqual(len({visit, NextVisit.from_dict(make_fields())}), 1)


class NextVisitAvroTestCase(unittest.TestCase):
    """Tests for `workflow.core.visit.NextVisit` Avro (de)serialization."""

    def test_framed_round_trip(self) -> None:
        data = write_avro(make_fields(), schema_id=NEXT_VISIT_SCHEMA_ID)
        visit = NextVisit.from_avro(data)
        self.assertEqual(visit, NextVisit.from_dict(make_fields()))
        self.assertEqual(visit.to_avro(NEXT_VISIT_SCHEMA_ID), data)

    def test_bare_round_trip(self) -> None:
        # private_efdStamp is 0.0 here, so the bare body starts with a 0
        # byte, the same as the magic byte of a framed message.
        data = write_avro(make_fields())
        self.assertEqual(data[0], 0)
        visit = NextVisit.from_avro(data)
        self.assertEqual(visit, NextVisit.from_dict(make_fields()))
        self.assertEqual(visit.to_avro(), data)

    def test_full_summit_record(self) -> None:
        expected = NextVisit.from_dict(make_fields())
        for schema_id in (None, NEXT_VISIT_SCHEMA_ID):
            with self.subTest(schema_id=schema_id):
                visit = NextVisit.from_avro(write_avro(make_summit_record(), schema_id))
                self.assertEqual(visit, expected)
                self.assertEqual(NextVisit.from_avro(visit.to_avro(schema_id)), expected)

    def test_framing(self) -> None:
        visit = NextVisit.from_dict(make_fields())
        framed = visit.to_avro(schema_id=0x01020304)
        self.assertEqual(framed[:5], b"\x00\x01\x02\x03\x04")
        self.assertEqual(framed[5:], visit.to_avro())
        with self.assertRaisesRegex(ValueError, "schema_id"):
            visit.to_avro(schema_id=-1)

    def test_summit_defaults(self) -> None:
        # Only a few fields set, the way a script may publish it; fastavro
        # fills the rest from the summit schema's defaults.
        data = write_avro(
            {
                "instrument": "LATISS",
                "groupId": "2025-06-01T03:00:20.000",
                "coordinateSystem": 2,
                "rotationSystem": 2,
                "dome": 1,
                "position": [10.0, -20.0],
                "private_sndStamp": SND_STAMP,
            },
            schema_id=NEXT_VISIT_SCHEMA_ID,
        )
        visit = parse_next_visit(data, known_instruments=KNOWN, now=SND_STAMP + 1.0)
        self.assertEqual(visit.instrument, "LATISS")
        self.assertEqual((visit.salIndex, visit.nimages, visit.duration, visit.filters), (0, 0, 0.0, ""))
        self.assertEqual(visit.filter_list, ())

    def test_all_defaults_rejected(self) -> None:
        # Enum fields default to 0, which is no member of their enum.
        with self.assertRaisesRegex(InvalidVisit, "'coordinateSystem'.*CoordSys") as cm:
            NextVisit.from_avro(write_avro({}))
        self.assertIs(type(cm.exception), InvalidVisit)

    def test_older_writer_schema(self) -> None:
        # A writer schema without instrument/startTime: resolution fills in
        # the shipped schema's defaults.
        older = copy.deepcopy(json.loads(json.dumps(next_visit_schema())))
        older.pop("__fastavro_parsed", None)
        older.pop("__named_schemas", None)
        older["fields"] = [f for f in older["fields"] if f["name"] not in ("instrument", "startTime")]
        record = {k: v for k, v in make_fields().items() if k not in ("instrument", "startTime")}
        # The default instrument, "", cannot become a path: rejected when decoded.
        with self.assertRaisesRegex(InvalidIdentifier, "'instrument': '' is not an allowed instrument") as cm:
            NextVisit.from_avro(write_avro(record, 3, schema=older), writer_schema=older)
        self.assertEqual(cm.exception.reason, "invalid_instrument")
        no_start = copy.deepcopy(json.loads(json.dumps(next_visit_schema())))
        no_start.pop("__fastavro_parsed", None)
        no_start.pop("__named_schemas", None)
        no_start["fields"] = [f for f in no_start["fields"] if f["name"] != "startTime"]
        record = {k: v for k, v in make_fields().items() if k != "startTime"}
        visit = NextVisit.from_avro(write_avro(record, 3, schema=no_start), writer_schema=no_start)
        self.assertEqual((visit.instrument, visit.startTime, visit.groupId), ("LSSTCam", 0.0, record["groupId"]))

    def test_garbage_rejected(self) -> None:
        for data in (b"", b"\x00\x00\x00\x00\x01", b"\xff" * 3, write_avro(make_fields()) + b"junk"):
            with self.subTest(data=data):
                with self.assertRaisesRegex(InvalidVisit, "does not decode"):
                    NextVisit.from_avro(data)


class DetectorVisitTestCase(unittest.TestCase):
    """Tests for `workflow.core.visit.DetectorVisit` and `NextVisit.fan_out`."""

    def test_fan_out_round_trip(self) -> None:
        visit = NextVisit.from_dict(make_fields())
        visits = visit.fan_out(iter([94, 0, 188]))
        self.assertEqual([v.detector for v in visits], [94, 0, 188])
        for per_detector in visits:
            self.assertIsInstance(per_detector, DetectorVisit)
            self.assertNotIsInstance(per_detector, NextVisit)
            data = per_detector.to_dict()
            self.assertEqual({k: v for k, v in data.items() if k != "detector"}, visit.to_dict())
            self.assertEqual(data["private_sndStamp"], SND_STAMP)
            self.assertEqual(DetectorVisit.from_json(per_detector.to_json()), per_detector)
            self.assertEqual(DetectorVisit.from_json(per_detector.to_json().encode()), per_detector)
            self.assertEqual(per_detector.day_obs, visit.day_obs)
        self.assertEqual(len(set(visits)), 3)
        self.assertEqual(visit.fan_out([]), [])

    def test_fan_out_rejects(self) -> None:
        visit = NextVisit.from_dict(make_fields())
        with self.assertRaisesRegex(ValueError, "detector 5 listed twice"):
            visit.fan_out([5, 6, 5])
        with self.assertRaisesRegex(InvalidVisit, "'detector'.*non-negative int"):
            visit.fan_out([-1])
        with self.assertRaisesRegex(InvalidVisit, "'detector'.*expected int"):
            visit.fan_out(["R22_S11"])  # type: ignore[list-item]

    def test_missing_detector(self) -> None:
        with self.assertRaisesRegex(InvalidVisit, "missing field.*'detector'"):
            DetectorVisit.from_json(json.dumps(make_fields()))

    def test_check_usable(self) -> None:
        per_detector = NextVisit.from_dict(make_fields(rotationSystem=3)).fan_out([1])[0]
        with self.assertRaisesRegex(IgnorableVisit, "'rotationSystem' is HORIZON"):
            check_usable(per_detector, known_instruments=KNOWN, now=SND_STAMP)


class ParseRejectionTestCase(unittest.TestCase):
    """Tests for the `InvalidVisit` rejections of `workflow.core.visit` parsing."""

    def assertInvalid(self, data: Any, *patterns: str) -> InvalidVisit:
        """Assert that ``data`` is rejected as a plain `InvalidVisit`.

        Parameters
        ----------
        data : `~typing.Any`
            Message to decode.
        *patterns : `str`
            Regular expressions the message must match.

        Returns
        -------
        error : `InvalidVisit`
            The exception raised.
        """
        with self.assertRaises(InvalidVisit) as cm:
            decode_next_visit(data)
        self.assertIs(type(cm.exception), InvalidVisit)
        for pattern in patterns:
            self.assertRegex(str(cm.exception), pattern)
        return cm.exception

    def test_missing_field(self) -> None:
        for name in make_fields():
            fields = make_fields()
            del fields[name]
            with self.subTest(field=name):
                self.assertInvalid(json.dumps(fields), f"missing field.*'{name}'")
        fields = make_fields()
        del fields["groupId"], fields["dome"]
        self.assertInvalid(fields, "'groupId', 'dome'")

    def test_wrong_type(self) -> None:
        cases = [
            ("position", "1.0,2.0", "list of 2 numbers"),
            ("position", [1.0], "list of 2 numbers"),
            ("position", [1.0, 2.0, 3.0], "list of 2 numbers"),
            ("position", ["a", 2.0], "list of 2 numbers"),
            ("position", [True, 2.0], "list of 2 numbers"),
            ("position", [math.nan, 2.0], "finite"),
            ("groupId", 20250601, "expected str"),
            ("instrument", None, "expected str"),
            ("salIndex", 1.5, "expected int.*fractional"),
            ("salIndex", "1", "expected int"),
            ("nimages", True, "expected int"),
            ("totalCheckpoints", None, "expected int"),
            ("startTime", "soon", "expected float"),
            ("duration", False, "expected float"),
            ("cameraAngle", math.inf, "finite float"),
            ("coordinateSystem", "GALACTIC", "expected CoordSys"),
            ("coordinateSystem", 0, "expected CoordSys"),
            ("rotationSystem", 2.5, "expected RotSys"),
            ("dome", True, "expected Dome"),
        ]
        for name, value, pattern in cases:
            with self.subTest(field=name, value=value):
                self.assertInvalid(make_fields(**{name: value}), f"field '{name}'", pattern)

    def test_dec_out_of_range(self) -> None:
        for dec in (90.5, -91.0):
            with self.subTest(dec=dec):
                self.assertInvalid(make_fields(position=[10.0, dec]), "field 'position'", r"dec .* \[-90, 90\]")
        NextVisit.from_dict(make_fields(position=[359.9, -90.0]))

    def test_not_a_message(self) -> None:
        self.assertInvalid("{not json", "not valid JSON")
        self.assertInvalid(b"[1, 2]", "JSON object")
        self.assertInvalid(b"{not json", "not valid JSON")
        self.assertInvalid(b"\xff\xfe", "does not decode")

    def test_direct_construction_validates(self) -> None:
        with self.assertRaisesRegex(InvalidVisit, "field 'groupId'"):
            NextVisit(**make_fields(groupId=7))


class CheckUsableTestCase(unittest.TestCase):
    """Tests for `workflow.core.visit.check_usable` and `parse_next_visit`."""

    def test_usable(self) -> None:
        text = json.dumps(make_fields())
        visit = parse_next_visit(text, known_instruments=KNOWN, now=SND_STAMP + 3600.0)
        self.assertEqual(visit, NextVisit.from_dict(make_fields()))
        for kind, data in [
            ("json bytes", text.encode()),
            ("dict", make_fields()),
            ("bare avro", visit.to_avro()),
            ("framed avro", visit.to_avro(NEXT_VISIT_SCHEMA_ID)),
        ]:
            with self.subTest(kind=kind):
                self.assertEqual(parse_next_visit(data, known_instruments=KNOWN, now=SND_STAMP), visit)

    def test_unknown_instrument(self) -> None:
        for known in (KNOWN, ()):
            with self.subTest(known=known):
                with self.assertRaisesRegex(UnknownInstrumentError, "field 'instrument': 'HSC'"):
                    parse_next_visit(json.dumps(make_fields(instrument="HSC")), known_instruments=known, now=SND_STAMP)

    def test_not_icrs(self) -> None:
        for system in ("OBSERVED", 1, 4):
            with self.subTest(system=system):
                with self.assertRaisesRegex(IgnorableVisit, "field 'coordinateSystem' is .*only ICRS"):
                    parse_next_visit(make_fields(coordinateSystem=system), known_instruments=KNOWN, now=SND_STAMP)

    def test_not_sky(self) -> None:
        for system in ("NONE", 3, 4):
            with self.subTest(system=system):
                with self.assertRaisesRegex(IgnorableVisit, "field 'rotationSystem' is .*only SKY"):
                    parse_next_visit(make_fields(rotationSystem=system), known_instruments=KNOWN, now=SND_STAMP)

    def test_stale(self) -> None:
        data = make_fields()
        with self.assertRaisesRegex(IgnorableVisit, re.escape("'private_sndStamp' is 3600.5 s old")):
            parse_next_visit(data, known_instruments=KNOWN, now=SND_STAMP + 3600.5)
        with self.assertRaisesRegex(IgnorableVisit, "'private_sndStamp' is 61.0 s old, over the 60 s limit"):
            parse_next_visit(data, known_instruments=KNOWN, max_age_s=60.0, now=SND_STAMP + 61.0)
        parse_next_visit(data, known_instruments=KNOWN, max_age_s=60.0, now=SND_STAMP + 60.0)

    def test_default_clock(self) -> None:
        now = Time.now().unix_tai
        check_usable(NextVisit.from_dict(make_fields(private_sndStamp=now)), known_instruments=KNOWN)
        with self.assertRaisesRegex(IgnorableVisit, "'private_sndStamp'"):
            stale = NextVisit.from_dict(make_fields(private_sndStamp=now - 7200.0))
            check_usable(stale, known_instruments=KNOWN)

    def test_invalid_before_usable(self) -> None:
        # Structure is checked before meaning: a malformed message with an
        # unknown instrument is InvalidVisit, not UnknownInstrumentError.
        with self.assertRaises(InvalidVisit) as cm:
            bad = make_fields(instrument="HSC", salIndex=0.5)
            parse_next_visit(bad, known_instruments=KNOWN, now=SND_STAMP)
        self.assertIs(type(cm.exception), InvalidVisit)
        self.assertIn("'salIndex'", str(cm.exception))


POISON_GROUPS = ["../../../etc", "a/b", "", "..", ".", "g\n1", "g\x001", "/abs", "g 1", "x" * 81]


class IdentifierTestCase(unittest.TestCase):
    """Values that become paths are checked against `workflow.core.identifiers` when decoded."""

    def test_poison_groups_rejected_by_every_decoder(self) -> None:
        for group in POISON_GROUPS:
            with self.subTest(group=group):
                fields = make_fields(groupId=group)
                for data in (fields, json.dumps(fields), json.dumps(fields).encode()):
                    with self.assertRaises(InvalidIdentifier) as cm:
                        decode_next_visit(data)
                    self.assertEqual(cm.exception.reason, "invalid_group")
                    self.assertIn("'groupId'", str(cm.exception))
                with self.assertRaises(InvalidIdentifier):
                    decode_next_visit(write_avro(make_summit_record(groupId=group)))
                with self.assertRaises(InvalidIdentifier):
                    DetectorVisit.from_dict({**fields, "detector": 1})

    def test_real_groups_accepted(self) -> None:
        for group in ("2025-01-10T03:00:40.000", "2024-11-28T07:12:13.123456", "2025011000042", "g1", "g"):
            with self.subTest(group=group):
                self.assertEqual(decode_next_visit(make_fields(groupId=group)).groupId, group)
        self.assertEqual(GROUP_PATTERN, r"[A-Za-z0-9][A-Za-z0-9_.:+-]{0,79}")

    def test_instrument_detector_and_day_obs(self) -> None:
        for instrument in ("../LSSTCam", "LSST/Cam", "", "1Cam", "LSSTCam\n"):
            with self.subTest(instrument=instrument), self.assertRaises(InvalidIdentifier) as cm:
                decode_next_visit(make_fields(instrument=instrument))
            self.assertEqual(cm.exception.reason, "invalid_instrument")
        with self.assertRaises(InvalidIdentifier) as cm:
            DetectorVisit.from_dict({**make_fields(), "detector": 10**30})
        self.assertEqual(cm.exception.reason, "invalid_detector")
        for stamp in (1e300, -1.0):
            with self.subTest(stamp=stamp), self.assertRaises(InvalidIdentifier) as cm:
                decode_next_visit(make_fields(private_sndStamp=stamp))
            self.assertEqual(cm.exception.reason, "invalid_day_obs")

    def test_target_key(self) -> None:
        self.assertEqual(target_key("results/X/2026-11-27/g1/4/done.json"), ("X", "2026-11-27", "g1", 4))
        for bad in ("results/X/2026-11-27/a/b/4/done.json", "results/X/2026-11-27/../4/done.json", "g1/4/done.json"):
            with self.subTest(bad=bad):
                self.assertIsNone(target_key(bad))


class HostileInputTestCase(unittest.TestCase):
    """Deep nesting and huge fields are malformed messages, reported in bounded text."""

    def test_deeply_nested_json_is_malformed(self) -> None:
        deep = "[" * 200_000 + "]" * 200_000
        nested_field = json.dumps(make_fields())[:-1] + ', "x": ' + deep + "}"
        for data in (deep, deep.encode(), nested_field, nested_field.encode()):
            with self.assertRaisesRegex(InvalidVisit, "nested too deeply"):
                decode_next_visit(data)

    def test_huge_field_gives_a_short_message(self) -> None:
        huge = "x" * 5_000_000
        for changes in ({"groupId": huge}, {"survey": 5}, {"filters": ["y" * 5_000_000]}, {"instrument": huge}):
            with self.subTest(field=next(iter(changes))), self.assertRaises(InvalidVisit) as cm:
                decode_next_visit(json.dumps(make_fields(**changes)).encode())
            self.assertLess(len(str(cm.exception)), 1000)
        with self.assertRaises(InvalidVisit) as cm:
            decode_next_visit(make_fields(groupId=huge))
        self.assertIn("(5000000 chars)", str(cm.exception))


class StartTimeStalenessTestCase(unittest.TestCase):
    """``startTime`` too old is stale too, when ``max_start_age_s`` is given."""

    def test_stale_start_time(self) -> None:
        visit = NextVisit.from_dict(make_fields(startTime=SND_STAMP - 7200.0))
        check_usable(visit, known_instruments=KNOWN, now=SND_STAMP)  # not checked by default
        with self.assertRaisesRegex(StaleVisit, "'startTime' is 7260.0 s old, over the 3600 s limit") as cm:
            check_usable(visit, known_instruments=KNOWN, max_start_age_s=3600.0, now=SND_STAMP + 60.0)
        self.assertEqual(cm.exception.field, "startTime")
        fresh = NextVisit.from_dict(make_fields())
        check_usable(fresh, known_instruments=KNOWN, max_start_age_s=3600.0, now=SND_STAMP + 60.0)
        with self.assertRaises(StaleVisit) as cm:
            check_usable(fresh, known_instruments=KNOWN, max_age_s=10.0, max_start_age_s=3600.0, now=SND_STAMP + 60.0)
        self.assertEqual(cm.exception.field, "private_sndStamp")


if __name__ == "__main__":
    unittest.main()
