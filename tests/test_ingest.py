"""Tests for `workflow.ingest`: find, wait for and check a detector-visit's raws."""

from __future__ import annotations

import threading
import time

import pytest
from raw_uploads import make_visit, upload_raw

from workflow.buckets import LocalBucket
from workflow.config import load_config
from workflow.ingest import (
    CorruptRawError,
    RawFinder,
    RawMismatchError,
    RawTimeoutError,
    fetch_and_check,
    wait_window_s,
)
from workflow.instrument import Instrument
from workflow.raw_keys import RawKeyLayout

SND = 1_795_000_000.0 + 37.0  # 2026-11-19 TAI


def _visit(instrument: str, group: str, filters: str, angle: float = 30.0):
    return make_visit(instrument, group, filters, snd_stamp=SND, angle=angle, ra=150.0, dec=2.0)


def _upload(bucket, config, instrument, visit, detector, *, corrupt=False, angle=None, seq=7):
    return upload_raw(bucket, config, instrument, visit, detector, corrupt=corrupt, rotation_deg=angle,
                      seq_num=seq, seed=1)


@pytest.fixture(scope="module", params=["LSSTComCamSim", "HSC"])
def setup(request, tmp_path_factory):
    config = load_config(instrument=request.param)
    instrument = Instrument.from_config(config, scale=0.0625)
    bucket = LocalBucket(tmp_path_factory.mktemp("buckets"), config["buckets"]["raw"])
    return config, instrument, bucket


def _finder(setup, visit, detector):
    config, instrument, bucket = setup
    dv = visit.fan_out([detector])[0]
    return dv, RawFinder(bucket, RawKeyLayout.from_config(config), dv, instrument.detector(detector).name,
                         has_sidecar=config["raw"]["sidecar"])


def test_finds_and_checks_only_its_own_raw(setup, tmp_path):
    config, instrument, bucket = setup
    filt = config["filters"][1]["physical_filter"]
    visit = _visit(instrument.name, "2026-11-19T01:00:00.000", filt)
    other = _visit(instrument.name, "2026-11-19T01:01:00.000", filt)
    det_a, det_b = [d.id for d in instrument.active_detectors()[:2]]
    key = _upload(bucket, config, instrument, visit, det_a)
    _upload(bucket, config, instrument, visit, det_b)
    _upload(bucket, config, instrument, other, det_a, seq=8)
    dv, finder = _finder(setup, visit, det_a)
    assert finder.wait(expected=1, window_s=1.0) == [key]
    (path,) = fetch_and_check(bucket, [key], dv, tmp_path)
    assert path.stat().st_size == len(bucket.get(key))


def test_late_raw_is_waited_for(setup):
    config, instrument, bucket = setup
    visit = _visit(instrument.name, "2026-11-19T02:00:00.000", config["filters"][0]["physical_filter"])
    det = instrument.active_detectors()[0].id
    _, finder = _finder(setup, visit, det)
    uploader = threading.Timer(0.6, _upload, args=(bucket, config, instrument, visit, det), kwargs={"seq": 9})
    uploader.start()
    started = time.monotonic()
    keys = finder.wait(expected=1, window_s=20.0, poll_s=0.1)
    uploader.join()
    assert len(keys) == 1 and time.monotonic() - started >= 0.5


def test_missing_raw_times_out_with_classified_error(setup):
    config, instrument, _ = setup
    visit = _visit(instrument.name, "2026-11-19T03:00:00.000", config["filters"][0]["physical_filter"])
    det = instrument.active_detectors()[0].id
    _, finder = _finder(setup, visit, det)
    with pytest.raises(RawTimeoutError, match=f"group 2026-11-19T03:00:00.000 detector {det}: 0 of 1 raw"):
        finder.wait(expected=1, window_s=0.3, poll_s=0.1)
    assert RawTimeoutError.__mro__[1].__name__ == "RetriableError"
    assert wait_window_s(visit.fan_out([det])[0], 120.0) == 180.0


def test_corrupt_raw_is_a_specific_error(setup, tmp_path):
    config, instrument, bucket = setup
    visit = _visit(instrument.name, "2026-11-19T04:00:00.000", config["filters"][0]["physical_filter"])
    det = instrument.active_detectors()[0].id
    key = _upload(bucket, config, instrument, visit, det, corrupt=True, seq=10)
    dv, finder = _finder(setup, visit, det)
    assert finder.wait(expected=1, window_s=1.0) == [key]
    with pytest.raises(CorruptRawError, match=f"{key}: corrupt raw for group .* detector {det}"):
        fetch_and_check(bucket, [key], dv, tmp_path)


def test_wrong_rotation_is_dropped_and_wrong_filter_rejected(setup, tmp_path):
    config, instrument, bucket = setup
    filt = config["filters"][0]["physical_filter"]
    visit = _visit(instrument.name, "2026-11-19T05:00:00.000", filt, angle=30.0)
    det = instrument.active_detectors()[0].id
    key = _upload(bucket, config, instrument, visit, det, angle=35.0, seq=11)
    dv, _ = _finder(setup, visit, det)
    with pytest.raises(RawMismatchError, match="every raw was dropped"):
        fetch_and_check(bucket, [key], dv, tmp_path)
    other_filter = _visit(instrument.name, visit.groupId, config["filters"][2]["physical_filter"], angle=30.0)
    with pytest.raises(RawMismatchError, match="header FILTER="):
        fetch_and_check(bucket, [key], other_filter.fan_out([det])[0], tmp_path)
