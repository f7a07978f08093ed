"""Tests for `workflow.core.config`: every shipped file validates; bad files fail clearly."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from workflow.core.config import (
    DEFAULT_CONFIG_PATH,
    PIPELINES_CONFIG_PATH,
    PROJECT_ROOT,
    instrument_config_path,
    known_instruments,
    load_config,
    load_yaml,
    validate_file,
    validate_merged,
)
from workflow.core.exceptions import ConfigError

INSTRUMENTS = ["HSC", "LATISS", "LSSTComCam", "LSSTComCamSim", "LSSTCam-imSim", "LSSTCam"]


def test_every_instrument_has_a_file():
    assert known_instruments() == sorted(INSTRUMENTS)


@pytest.mark.parametrize(
    "path",
    [DEFAULT_CONFIG_PATH, PIPELINES_CONFIG_PATH] + sorted((PROJECT_ROOT / "config" / "instruments").glob("*.yaml")),
    ids=lambda p: p.name,
)
def test_shipped_file_validates(path: Path):
    validate_file(path, load_yaml(path))


@pytest.mark.parametrize("instrument", INSTRUMENTS)
def test_merged_config_names_its_instrument(instrument: str):
    config = load_config(instrument=instrument)
    assert config["instrument"]["name"] == instrument
    # Defaults survive the merge, instrument sections arrive.
    assert config["visit"]["max_age_s"] == 3600.0
    assert set(config["pipeline_definitions"]) >= {"ApPipe", "SingleFrame", "Isr"}
    for node in config["pipelines"]:
        assert set(node["pipelines"]) <= set(config["pipeline_definitions"])


def test_default_instrument_is_comcamsim():
    assert load_config()["instrument"]["name"] == "LSSTComCamSim"


def _write(tmp_path: Path, data: dict, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _hsc() -> dict:
    return copy.deepcopy(load_yaml(instrument_config_path("HSC")))


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["detector"].update(gian=1.0), "key 'detector.gian' is not allowed; expected one of: amplifiers"),
        (
            lambda d: d["detector"].update(gain_e_per_adu="abc"),
            "key 'detector.gain_e_per_adu': expected number, got 'abc'",
        ),
        (lambda d: d["raw"].update(snaps_per_visit=3), "key 'raw.snaps_per_visit': expected maximum 2, got 3"),
        (
            lambda d: d["focal_plane"].update(layout="hex"),
            "key 'focal_plane.layout': expected one of 'grid', 'rafts', got 'hex'",
        ),
        (lambda d: d["focal_plane"].update(columns="x"), "key 'focal_plane.columns': expected integer, got 'x'"),
        (lambda d: d.update(detectr={}), "key 'detectr' is not allowed"),
        (lambda d: d["filters"][0].update(band="q"), "key 'filters.0.band': expected one of"),
        (lambda d: d["buckets"].update(raw="Bad_Bucket"), "key 'buckets.raw': expected a string matching"),
    ],
    ids=[
        "misspelled",
        "wrong-type",
        "too-large",
        "bad-layout",
        "layout-field-type",
        "top-level-typo",
        "bad-band",
        "bad-bucket",
    ],
)
def test_bad_instrument_file_names_file_key_and_expectation(tmp_path, mutate, expected):
    data = _hsc()
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_missing_nested_key_is_reported_on_the_merge_naming_the_files(tmp_path):
    data = _hsc()
    data["detector"].pop("nx")
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith("merged configuration from [") and str(path) in message
    assert "key 'detector.nx' is missing" in message


def test_override_file_may_set_one_nested_key(tmp_path):
    override = _write(tmp_path, {"raw": {"image_timeout_s": 5.0}}, "site.yaml")
    config = load_config(instrument="HSC", extra_files=[override])
    assert config["raw"]["image_timeout_s"] == 5.0
    assert config["raw"]["key_template"].startswith("{instrument}/{detector}")


def test_undefined_pipeline_is_rejected(tmp_path):
    data = _hsc()
    data["pipelines"] = [{"pipelines": ["ApPipe", "NoSuchPipe"]}]
    with pytest.raises(ConfigError, match=r"undefined pipeline\(s\) \['NoSuchPipe'\]"):
        load_config(_write(tmp_path, data))


def test_incomplete_instrument_file_is_rejected(tmp_path):
    data = _hsc()
    del data["skymap"]
    with pytest.raises(ConfigError, match="key\\(s\\) skymap missing"):
        load_config(_write(tmp_path, data))


def test_yaml_syntax_error_names_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("detector: [unclosed\n")
    with pytest.raises(ConfigError, match=f"{path}: not valid YAML"):
        load_config(path)


def test_unknown_instrument_lists_known_ones():
    with pytest.raises(ConfigError, match="unknown instrument 'DECam'.*LSSTCam"):
        load_config(instrument="DECam")


def test_extra_file_overrides_and_is_validated(tmp_path):
    override = _write(tmp_path, {"visit": {"max_age_s": 60.0}}, "site.yaml")
    assert load_config(instrument="LATISS", extra_files=[override])["visit"]["max_age_s"] == 60.0
    bad = _write(tmp_path, {"visit": {"max_age_s": -1}}, "site-bad.yaml")
    with pytest.raises(ConfigError, match="site-bad.yaml: key 'visit.max_age_s'"):
        load_config(instrument="LATISS", extra_files=[bad])


def test_site_file_switches_apdb_to_a_config_file(tmp_path):
    """The instrument file's db_url stays in the merge; config_file, which open_apdb prefers, may join it."""
    from workflow.apdb.store import create_apdb, open_apdb

    create_apdb(f"sqlite:///{tmp_path}/site-apdb.sqlite3", config_path=tmp_path / "apdb.yaml")
    site = _write(tmp_path, {"apdb": {"config_file": str(tmp_path / "apdb.yaml")}}, "site.yaml")
    config = load_config(instrument="LSSTComCamSim", extra_files=[site])
    assert config["apdb"]["db_url"].startswith("sqlite:///demo/")  # the instrument's default, still merged
    assert f"{tmp_path}/site-apdb.sqlite3" in open_apdb(config["apdb"]).getConfig().db_url


def test_apdb_needs_a_url_or_a_config_file():
    config = load_config(instrument="LSSTComCamSim")
    del config["apdb"]["db_url"]
    with pytest.raises(ConfigError, match="apdb"):
        validate_merged(config, ["LSSTComCamSim.yaml"])
