"""Tests for `workflow.core.raw_keys`: format and parse raw keys for every instrument layout."""

from __future__ import annotations

import json

import pytest

from workflow.core.config import known_instruments, load_config
from workflow.core.exceptions import ConfigError
from workflow.core.instrument import Instrument
from workflow.core.raw_keys import RawKeyLayout, lsst_exposure_id, lsst_obs_id, sidecar_key

# Rubin's own raw keys: the keys of lsst-dm/prompt_processing tests/test_raw.py
# (``get_raw_path`` cases, GPL-3.0) and the extension and corner-sensor forms its
# ``LSST_REGEXP`` (shared/raw.py: ``R\d\d_S.\d``, ``\.f.*``) accepts, with the
# detector numbers of obs_lsst.  (key, instrument, detector id, detector name)
RUBIN_KEYS = [
    ("LATISS/20220321/AT_O_20220321_000002/AT_O_20220321_000002_R00_S00.fits", "LATISS", 0, "R00_S00"),
    ("LSSTComCam/20220321/CC_O_20220321_000003/CC_O_20220321_000003_R22_S11.fits", "LSSTComCam", 4, "R22_S11"),
    ("LSSTComCam/20220321/CC_O_20220321_000003/CC_O_20220321_000003_R22_S00.fits", "LSSTComCam", 0, "R22_S00"),
    ("LSSTComCam/20220321/CC_O_20220321_000003/CC_O_20220321_000003_R22_S22.fits", "LSSTComCam", 8, "R22_S22"),
    ("LSSTCam/20220321/MC_O_20220321_000004/MC_O_20220321_000004_R11_S20.fits", "LSSTCam", 42, "R11_S20"),
    ("LSSTCam/20220321/MC_O_20220321_000004/MC_O_20220321_000004_R11_S20.fits.fz", "LSSTCam", 42, "R11_S20"),
    ("LSSTCam/20220321/MC_O_20220321_000004/MC_O_20220321_000004_R00_SG0.fits", "LSSTCam", 189, "R00_SG0"),
    ("LSSTCam/20220321/MC_O_20220321_000004/MC_O_20220321_000004_R00_SG1.fits", "LSSTCam", 190, "R00_SG1"),
    ("LSSTCam/20220321/MC_O_20220321_000004/MC_O_20220321_000004_R00_SW0.fits", "LSSTCam", 191, "R00_SW0"),
    ("LSSTCam/20220321/MC_O_20220321_000004/MC_O_20220321_000004_R00_SW1.fits.fz", "LSSTCam", 192, "R00_SW1"),
    ("LSSTCam/20220321/MC_O_20220321_000004/MC_O_20220321_000004_R04_SW0.fits", "LSSTCam", 195, "R04_SW0"),
    ("LSSTCam/20220321/MC_O_20220321_000004/MC_O_20220321_000004_R40_SG0.fits", "LSSTCam", 197, "R40_SG0"),
    ("LSSTCam/20220321/MC_O_20220321_000004/MC_O_20220321_000004_R44_SW1.fits", "LSSTCam", 204, "R44_SW1"),
    ("LSSTComCamSim/20240618/CC_S_20240618_000012/CC_S_20240618_000012_R22_S11.fits", "LSSTComCamSim", 4, "R22_S11"),
    ("HSC/42/2022032100001/0/404/HSC-R/HSC-2022032100001-0-404-HSC-R-42.fz", "HSC", 42, None),
    (
        "LSSTCam-imSim/20220321/2022032100004/2022032100004_r_94_R22_S11.fits",
        "LSSTCam-imSim",
        94,
        "R22_S11",
    ),
]


def test_every_instrument_has_a_rubin_key():
    assert {row[1] for row in RUBIN_KEYS} == set(known_instruments())


@pytest.mark.parametrize(("key", "instrument", "detector", "name"), RUBIN_KEYS)
def test_rubin_keys_parse_to_their_detector(key, instrument, detector, name):
    config = load_config(instrument=instrument)
    fields = RawKeyLayout.from_config(config).parse(key)
    assert fields is not None, key
    assert fields.instrument == instrument
    det = Instrument.from_config(config).detector(
        fields.detector if fields.detector is not None else fields.detector_name
    )
    assert (det.id, det.name if name else None) == (detector, name)


VALUES = dict(
    day_obs="2026-11-28",
    obs_id=lsst_obs_id("CC", "S", "2026-11-28", 42),
    detector=4,
    detector_name="R22_S11",
    group="2026-11-28T07:12:13.123",
    snap=1,
    exposure=lsst_exposure_id("2026-11-28", 42),
    physical_filter="r_03",
)


def test_lsst_ids_follow_rubin_conventions():
    assert VALUES["obs_id"] == "CC_S_20261128_000042"
    assert VALUES["exposure"] == 2026112800042
    assert sidecar_key("a/b/CC_S_20261128_000042_R22_S11.fits") == "a/b/CC_S_20261128_000042_R22_S11.json"
    assert sidecar_key("a/b/CC_S_20261128_000042_R22_S11.fits.fz") == "a/b/CC_S_20261128_000042_R22_S11.json"


@pytest.mark.parametrize("instrument", known_instruments())
def test_round_trip_every_instrument(instrument):
    layout = RawKeyLayout.from_config(load_config(instrument=instrument))
    key = layout.format(instrument=instrument, **VALUES)
    fields = layout.parse(key)
    assert fields is not None, key
    assert fields.instrument == instrument
    for name in layout.fields:
        expected = VALUES.get(name, instrument)
        if name == "day_obs":
            expected = "20261128"
        assert getattr(fields, name) == expected, (key, name)


def test_hsc_key_with_hyphenated_group_parses():
    layout = RawKeyLayout.from_config(load_config(instrument="HSC"))
    key = "HSC/50/2026-11-28T07:12:13.123/0/904010/HSC-R2/HSC-2026-11-28T07:12:13.123-0-904010-HSC-R2-50.fz"
    fields = layout.parse(key)
    assert (fields.detector, fields.group, fields.exposure, fields.physical_filter) == (
        50,
        "2026-11-28T07:12:13.123",
        904010,
        "HSC-R2",
    )


@pytest.mark.parametrize(
    "key",
    [
        "LSSTComCamSim/20261128/CC_S_20261128_000042/CC_S_20261128_000042_R22_S11.json",  # sidecar
        "LATISS/20261128/AT_O_20261128_000001/AT_O_20261128_000001_R00_S00.fits",  # other instrument
        "LSSTComCamSim/20261128/CC_S_20261128_000042/CC_S_20261128_000042_R22_S11.fits.bak",  # not a raw
        "LSSTComCamSim/20261128/garbage.fits",
        "",
    ],
)
def test_non_raw_keys_parse_to_none(key):
    layout = RawKeyLayout.from_config(load_config(instrument="LSSTComCamSim"))
    assert layout.parse(key) is None


def test_hsc_repeated_field_must_agree():
    layout = RawKeyLayout.from_config(load_config(instrument="HSC"))
    key = "HSC/50/G1/0/904010/HSC-R2/HSC-G2-0-904010-HSC-R2-50.fz"
    assert layout.parse(key) is None


def test_unknown_template_field_is_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['seqnum'\]"):
        RawKeyLayout("{instrument}/{seqnum}/{detector}.fits", "X")


def test_format_names_missing_field():
    layout = RawKeyLayout.from_config(load_config(instrument="LSSTComCamSim"))
    with pytest.raises(KeyError, match="obs_id"):
        layout.format(instrument="LSSTComCamSim", day_obs="20261128", detector_name="R22_S00")


@pytest.mark.parametrize(
    ("instrument", "key", "outcome", "detector"),
    [
        # The summit's LATISS raw: detector 0 is R00_S00 (was counted unknown_detector).
        ("LATISS", RUBIN_KEYS[0][0], "recorded", 0),
        ("LSSTComCam", RUBIN_KEYS[1][0], "recorded", 4),
        ("LSSTCam", RUBIN_KEYS[5][0], "recorded", 42),  # .fits.fz
        ("LSSTCam", RUBIN_KEYS[9][0], "inactive_detector", None),  # corner sensor, off by config
    ],
)
def test_shim_counts_rubin_raw_notifications(tmp_path, instrument, key, outcome, detector):
    from stream_shim.bridge import s3_event
    from stream_shim.raw_arrival import CATEGORY, RawArrivals
    from stream_shim.status import ShimStatus
    from workflow.core.arrivals import ArrivalIndex
    from workflow.core.buckets import LocalBucket

    config = load_config(instrument=instrument)
    bucket = LocalBucket(tmp_path / "buckets", config["buckets"]["raw"])
    bucket.put(key, b"SIMPLE")
    status, index = ShimStatus(instrument, "test"), ArrivalIndex(tmp_path / "arrivals")
    handler = RawArrivals(config, instrument=Instrument.from_config(config), bucket=bucket, index=index, status=status)
    assert handler.handle(json.dumps(s3_event(bucket.name, key)).encode()) == [outcome]
    assert status.counts(CATEGORY) == {outcome: 1}
    if detector is not None:
        assert index.keys(instrument, "2022-03-21", detector) == [key]


def test_corner_sensor_processed_when_configured(tmp_path):
    from stream_shim.bridge import s3_event
    from stream_shim.raw_arrival import CATEGORY, RawArrivals
    from stream_shim.status import ShimStatus
    from workflow.core.arrivals import ArrivalIndex
    from workflow.core.buckets import LocalBucket
    from workflow.core.config import merge_configs

    config = merge_configs(load_config(instrument="LSSTCam"), {"active_detectors": {"overrides": {"192": True}}})
    instrument = Instrument.from_config(config)
    assert instrument.detector("R00_SW1").active and instrument.detector("R00_SW1").purpose == "WAVEFRONT"
    assert not instrument.detector("R00_SW0").active
    key = RUBIN_KEYS[9][0]  # R00_SW1
    bucket = LocalBucket(tmp_path / "buckets", config["buckets"]["raw"])
    bucket.put(key, b"SIMPLE")
    status, index = ShimStatus("LSSTCam", "test"), ArrivalIndex(tmp_path / "arrivals")
    handler = RawArrivals(config, instrument=instrument, bucket=bucket, index=index, status=status)
    assert handler.handle(json.dumps(s3_event(bucket.name, key)).encode()) == ["recorded"]
    assert status.counts(CATEGORY) == {"recorded": 1}
    assert index.keys("LSSTCam", "2022-03-21", 192) == [key]
