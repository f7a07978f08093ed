"""Tests for `stream_shim.raw_arrival`, `stream_shim.bridge` (offline parts), `workflow.core.arrivals`
and the filer attribute decoding of `stream_shim.filer_events`."""

from __future__ import annotations

import json

import pytest
from shared_helpers import filer_create_event

from stream_shim.bridge import FilerBridge, s3_event
from stream_shim.filer_events import new_entry_attributes
from stream_shim.raw_arrival import CATEGORY, RawArrivals, day_prefix, parse_s3_event
from stream_shim.status import ShimStatus
from workflow.core.arrivals import Arrival, ArrivalIndex, normalize_day_obs
from workflow.core.buckets import LocalBucket
from workflow.core.config import load_config
from workflow.core.instrument import Instrument
from workflow.core.raw_keys import RawKeyLayout
from workflow.core.visit import CoordSys, Dome, NextVisit, RotSys

KEY = "LSSTComCamSim/20261128/CC_S_20261128_000007/CC_S_20261128_000007_R22_S11.fits"


class TestParseS3Event:
    """Tests for `stream_shim.raw_arrival.parse_s3_event` and `stream_shim.bridge.s3_event`."""

    def test_round_trip_of_bridge_form(self) -> None:
        (event,) = parse_s3_event(json.dumps(s3_event("raw", KEY, size=123)).encode())
        assert (event.event_name, event.bucket, event.key, event.size) == ("ObjectCreated:Put", "raw", KEY, 123)

    def test_rubin_form_with_encoded_key_and_two_records(self) -> None:
        records = [
            {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"}, "object": {"key": k}}}
            for k in ("a%2Fb+c.fits", "plain.fits")
        ]
        events = parse_s3_event(json.dumps({"Records": records}))
        assert [e.key for e in events] == ["a/b c.fits", "plain.fits"] and events[0].size is None

    @pytest.mark.parametrize(
        ("value", "message"),
        [
            (b"{not json", "not JSON"),
            (b"[1, 2]", "no 'Records' list"),
            (b'{"Records": 3}', "no 'Records' list"),
            (b'{"Records": [{"eventName": "x", "s3": {"bucket": {"name": "b"}}}]}', "record 0: missing 'object'"),
            (None, "empty message"),
        ],
    )
    def test_malformed_is_named(self, value: bytes | None, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            parse_s3_event(value)


class TestArrivalIndex:
    """Tests for `workflow.core.arrivals.ArrivalIndex`."""

    def test_record_once_and_read_back(self, tmp_path) -> None:
        index = ArrivalIndex(tmp_path)
        arrival = Arrival(key=KEY, bucket="raw", detector=4, received=10.0, size=5)
        assert index.record("LSSTComCamSim", "20261128", arrival)
        assert not index.record("LSSTComCamSim", "2026-11-28", arrival)
        assert index.keys("LSSTComCamSim", "2026-11-28", 4) == [KEY]
        assert index.arrivals("LSSTComCamSim", "20261128", 4) == [arrival]
        assert index.keys("LSSTComCamSim", "2026-11-28", 5) == []

    def test_prune_and_day_forms(self, tmp_path) -> None:
        index = ArrivalIndex(tmp_path)
        index.record("X", "20261128", Arrival(key="k", bucket="b", detector=1, received=0.0))
        assert index.prune(3600.0, now=1e12) == 1 and index.keys("X", "20261128", 1) == []
        assert normalize_day_obs(20261128) == "2026-11-28"
        with pytest.raises(ValueError, match="expected YYYYMMDD or YYYY-MM-DD"):
            normalize_day_obs("28/11/2026")

    def test_from_environment(self, monkeypatch, tmp_path) -> None:
        monkeypatch.delenv("PROMPT_SNAKE_ARRIVALS_DIR", raising=False)
        assert ArrivalIndex.from_environment() is None
        monkeypatch.setenv("PROMPT_SNAKE_ARRIVALS_DIR", str(tmp_path))
        assert ArrivalIndex.from_environment().root == tmp_path


@pytest.fixture
def arrivals(tmp_path):
    config = load_config(instrument="LSSTComCamSim")
    bucket = LocalBucket(tmp_path / "buckets", config["buckets"]["raw"])
    status = ShimStatus("LSSTComCamSim", "test")
    index = ArrivalIndex(tmp_path / "arrivals")
    handler = RawArrivals(
        config, instrument=Instrument.from_config(config, scale=0.05), bucket=bucket, index=index, status=status
    )
    return handler, bucket, index, status


class TestRawArrivals:
    """Tests for `stream_shim.raw_arrival.RawArrivals`."""

    def test_counts_every_reason_and_records_raws(self, arrivals) -> None:
        handler, bucket, index, status = arrivals
        bucket.put(KEY, b"SIMPLE")
        name = bucket.name

        def note(key: str, bucket_name: str = name, event: str = "ObjectCreated:Put") -> bytes:
            return json.dumps(s3_event(bucket_name, key, event_name=event)).encode()

        assert handler.handle(note(KEY), received=5.0) == ["recorded"]
        assert handler.handle(note(KEY)) == ["duplicate"]
        assert handler.handle(note(KEY.replace(".fits", ".json"))) == ["sidecar"]
        assert handler.handle(note(KEY, "other-bucket")) == ["other_bucket"]
        assert handler.handle(note("HSC/1/x/0/1/HSC-R/HSC-x-0-1-HSC-R-1.fz")) == ["no_layout_match"]
        assert handler.handle(note(KEY.replace("R22_S11", "R99_S99"))) == ["unknown_detector"]
        assert handler.handle(note(KEY.replace("000007", "000008"))) == ["vanished"]
        assert handler.handle(note(KEY, event="ObjectRemoved:Delete")) == ["not_a_creation"]
        assert handler.handle(b"garbage") == ["malformed"]
        assert status.counts(CATEGORY) == {
            "recorded": 1,
            "duplicate": 1,
            "sidecar": 1,
            "other_bucket": 1,
            "no_layout_match": 1,
            "unknown_detector": 1,
            "vanished": 1,
            "not_a_creation": 1,
            "malformed": 1,
        }
        (arrival,) = index.arrivals("LSSTComCamSim", "2026-11-28", 4)  # R22_S11 is detector 4
        assert arrival.key == KEY and arrival.received == 5.0 and arrival.source == "notification"

    def test_early_arrival_check_lists_the_day(self, arrivals) -> None:
        handler, bucket, index, status = arrivals
        bucket.put(KEY, b"SIMPLE")
        bucket.put(KEY.replace(".fits", ".json"), b"{}")
        visit = NextVisit(
            salIndex=1,
            scriptSalIndex=1,
            instrument="LSSTComCamSim",
            groupId="g",
            coordinateSystem=CoordSys.ICRS,
            position=[150.0, 2.0],
            startTime=0.0,
            rotationSystem=RotSys.SKY,
            cameraAngle=0.0,
            filters="",
            dome=Dome.OPEN,
            duration=1.0,
            nimages=1,
            survey="",
            totalCheckpoints=0,
            private_sndStamp=1_795_870_000.0,
        )
        assert visit.day_obs == "2026-11-28"
        assert handler.check_early(visit) == 1 and handler.check_early(visit) == 0
        assert index.arrivals("LSSTComCamSim", "2026-11-28", 4)[0].source == "listing"
        assert status.counts(CATEGORY) == {"early_arrival": 1}
        bucket.put(KEY.replace("000007", "000009"), b"SIMPLE")
        handler.warmup_ends = 0.0  # later in the night: the notifications have it, no listing
        assert handler.check_early(visit) == 0

    def test_day_prefix_per_layout(self) -> None:
        lsst = RawKeyLayout("{instrument}/{day_obs}/{obs_id}/{obs_id}_{detector_name}.fits", "LSSTCam")
        hsc = RawKeyLayout("{instrument}/{detector}/{group}/{snap}/{exposure}/{physical_filter}/x.fz", "HSC")
        assert day_prefix(lsst, "2026-11-28") == "LSSTCam/20261128/"
        assert day_prefix(hsc, "2026-11-28") == "HSC/"


class TestFilerBridge:
    """Tests for what `stream_shim.bridge.FilerBridge` drops, and `new_entry_attributes`."""

    def test_attributes_of_a_creation(self) -> None:
        value = filer_create_event("x.fits", "/buckets/raw/dir", 4321, 1_795_870_000)
        assert new_entry_attributes(value) == (4321, 1_795_870_000)
        assert new_entry_attributes(b"") == (None, None)

    def test_drops_without_producing(self) -> None:
        status = ShimStatus("LSSTComCamSim", "test")
        bridge = FilerBridge("127.0.0.1:1", "topic", ["raw"], status, timeout_s=1.0)  # never contacted
        assert (
            bridge.forward(b"/buckets/other/x.fits", filer_create_event("x.fits", "/buckets/other", 1, 1))
            == "other_bucket"
        )
        assert bridge.forward(b"/topics/x", filer_create_event("x", "/topics", 1, 1)) == "not_an_object"
        assert bridge.forward(b"/buckets/raw/x", b"\x0a\xff") == "malformed"
        assert status.counts("bridge") == {"other_bucket": 1, "not_an_object": 1, "malformed": 1}
