"""Tests for `workflow.core.raw_keys`: format and parse raw keys for every instrument layout."""

from __future__ import annotations

import pytest

from workflow.core.config import known_instruments, load_config
from workflow.core.exceptions import ConfigError
from workflow.core.raw_keys import RawKeyLayout, lsst_exposure_id, lsst_obs_id, sidecar_key

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
        "LATISS/20261128/AT_O_20261128_000001/AT_O_20261128_000001_RXX_S00.fits",  # other instrument
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
