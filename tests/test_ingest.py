"""Tests for `workflow.stages.ingest`: find, wait for and check a detector-visit's raws."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from astropy.io import fits
from raw_uploads import make_visit, upload_raw

from workflow.core.buckets import LocalBucket
from workflow.core.config import load_config
from workflow.core.instrument import Instrument
from workflow.core.raw_keys import RawKeyLayout
from workflow.stages.ingest import (
    CorruptRawError,
    RawFinder,
    RawMismatchError,
    RawMissingError,
    RawTimeoutError,
    fetch_and_check,
    poll_interval,
    wait_window_s,
)
from workflow.stages.target import TargetPaths, classify_error

SND = 1_795_000_000.0 + 37.0  # 2026-11-19 TAI


def _visit(instrument: str, group: str, filters: str, angle: float = 30.0):
    return make_visit(instrument, group, filters, snd_stamp=SND, angle=angle, ra=150.0, dec=2.0)


def _upload(bucket, config, instrument, visit, detector, *, corrupt=False, angle=None, seq=7):
    return upload_raw(
        bucket, config, instrument, visit, detector, corrupt=corrupt, rotation_deg=angle, seq_num=seq, seed=1
    )


@pytest.fixture(scope="module", params=["LSSTComCamSim", "HSC"])
def setup(request, tmp_path_factory):
    config = load_config(instrument=request.param)
    instrument = Instrument.from_config(config, scale=0.0625)
    bucket = LocalBucket(tmp_path_factory.mktemp("buckets"), config["buckets"]["raw"])
    return config, instrument, bucket


def _finder(setup, visit, detector):
    config, instrument, bucket = setup
    dv = visit.fan_out([detector])[0]
    return dv, RawFinder(
        bucket,
        RawKeyLayout.from_config(config),
        dv,
        instrument.detector(detector).name,
        has_sidecar=config["raw"]["sidecar"],
    )


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


# -- transient S3 errors, vanished, garbage and all-NaN raws ----------------------------------


def _connection_error():
    import botocore.exceptions

    return botocore.exceptions.EndpointConnectionError(endpoint_url="http://s3.invalid:8333/raw")


class FlakyBucket:
    """A bucket whose first ``failures`` calls of each listed method raise an S3 connection error."""

    def __init__(self, bucket, failures: int = 1, methods=("list", "get")) -> None:
        self.bucket, self.name = bucket, bucket.name
        self.left = {method: failures for method in methods}
        self.raised = 0

    def _maybe_fail(self, method: str) -> None:
        if self.left.get(method, 0) > 0:
            self.left[method] -= 1
            self.raised += 1
            raise _connection_error()

    def list(self, prefix: str = "") -> list[str]:
        self._maybe_fail("list")
        return self.bucket.list(prefix)

    def get(self, key: str) -> bytes:
        self._maybe_fail("get")
        return self.bucket.get(key)

    def read_head(self, key: str, nbytes: int) -> bytes:
        self._maybe_fail("read_head")
        return self.bucket.read_head(key, nbytes)


def _flaky_finder(setup, visit, detector, bucket):
    config, instrument, _ = setup
    dv = visit.fan_out([detector])[0]
    finder = RawFinder(
        bucket,
        RawKeyLayout.from_config(config),
        dv,
        instrument.detector(detector).name,
        has_sidecar=config["raw"]["sidecar"],
    )
    return dv, finder


def test_ingest_rides_through_transient_s3_errors(setup, tmp_path, caplog):
    config, instrument, bucket = setup
    visit = _visit(instrument.name, "2026-11-19T06:00:00.000", config["filters"][0]["physical_filter"])
    det = instrument.active_detectors()[0].id
    key = _upload(bucket, config, instrument, visit, det, seq=12)
    flaky = FlakyBucket(bucket, failures=2)
    dv, finder = _flaky_finder(setup, visit, det, flaky)
    with caplog.at_level("WARNING", logger="workflow.stages.transient_errors"):
        assert finder.wait(expected=1, window_s=20.0, poll_s=0.05) == [key]
        (path,) = fetch_and_check(flaky, [key], dv, tmp_path, geometry=instrument.geometry, errors=finder.errors)
    assert path.read_bytes() == bucket.get(key)
    assert finder.errors.count == 4 == flaky.raised
    assert sum("transient object-store error" in r.getMessage() for r in caplog.records) == 4


def test_ingest_gives_up_when_the_window_closes_naming_the_last_s3_error(setup):
    config, instrument, bucket = setup
    visit = _visit(instrument.name, "2026-11-19T07:00:00.000", config["filters"][0]["physical_filter"])
    det = instrument.active_detectors()[0].id
    _upload(bucket, config, instrument, visit, det, seq=13)
    _, finder = _flaky_finder(setup, visit, det, FlakyBucket(bucket, failures=10**6))
    started = time.monotonic()
    with pytest.raises(
        RawTimeoutError, match=r"0 of 1 raw.* transient S3 error\(s\), the last: EndpointConnectionError"
    ):
        finder.wait(expected=1, window_s=0.5, poll_s=0.05)
    assert time.monotonic() - started >= 0.5 and finder.errors.count >= 2


def test_fetch_rides_through_until_the_window_closes(setup, tmp_path):
    config, instrument, bucket = setup
    visit = _visit(instrument.name, "2026-11-19T07:30:00.000", config["filters"][0]["physical_filter"])
    det = instrument.active_detectors()[0].id
    key = _upload(bucket, config, instrument, visit, det, seq=14)
    dv, finder = _finder(setup, visit, det)
    finder.wait(expected=1, window_s=0.4, poll_s=0.05)
    with pytest.raises(RawTimeoutError, match=f"{key} found but not readable .* the last: EndpointConnectionError"):
        fetch_and_check(FlakyBucket(bucket, failures=10**6), [key], dv, tmp_path, errors=finder.errors)


def test_real_s3_errors_are_transient():
    import boto3
    import botocore.config

    from workflow.core.buckets import S3Bucket
    from workflow.stages.transient_errors import is_transient

    client = boto3.client(
        "s3",
        endpoint_url="http://127.0.0.1:9",  # discard port: nothing listens
        aws_access_key_id="x",
        aws_secret_access_key="x",
        region_name="us-east-1",
        config=botocore.config.Config(connect_timeout=1, read_timeout=1, retries={"max_attempts": 1}),
    )
    with pytest.raises(Exception) as raised:
        S3Bucket(client, "raw").list("LSSTCam/")
    assert is_transient(raised.value)
    assert not is_transient(FileNotFoundError("bucket raw: no object 'k'")) and not is_transient(ValueError("x"))


def test_raw_vanished_after_it_was_found_is_a_retriable_error(setup, tmp_path):
    config, instrument, bucket = setup
    visit = _visit(instrument.name, "2026-11-19T08:00:00.000", config["filters"][0]["physical_filter"])
    det = instrument.active_detectors()[0].id
    key = _upload(bucket, config, instrument, visit, det, seq=15)
    dv, finder = _finder(setup, visit, det)
    assert finder.wait(expected=1, window_s=1.0) == [key]
    (bucket.root / key).unlink()  # deleted after its notification
    with pytest.raises(RawMissingError, match=f"{key}: raw of .* group {visit.groupId} detector {det} vanished"):
        fetch_and_check(bucket, [key], dv, tmp_path)
    assert classify_error(RawMissingError("x"))["retriable"] is True


def _rewrite_segments(bucket, key, change) -> None:
    """Replace the raw's amplifier pixels by ``change(data)`` (written uncompressed)."""
    with fits.open(io.BytesIO(bucket.get(key))) as hdul:
        hdus = [fits.PrimaryHDU(header=hdul[0].header)]
        hdus += [fits.ImageHDU(change(np.asarray(h.data)), header=h.header, name=h.name) for h in hdul[1:]]
    stream = io.BytesIO()
    fits.HDUList(hdus).writeto(stream)
    bucket.put(key, stream.getvalue())


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda data: np.full(data.shape, np.nan, np.float32), r"amplifier \S+ has no finite pixel \(all NaN"),
        (lambda data: data[:10, :10], r"amplifier \S+ has shape \(10, 10\), expected"),
    ],
    ids=["all-nan", "wrong-shape"],
)
def test_garbage_raw_is_a_corrupt_raw_naming_file_group_detector(setup, tmp_path, change, problem):
    config, instrument, bucket = setup
    group = "2026-11-19T09:00:00.000" if "NaN" in problem else "2026-11-19T09:30:00.000"
    visit = _visit(instrument.name, group, config["filters"][0]["physical_filter"])
    det = instrument.active_detectors()[0].id
    key = _upload(bucket, config, instrument, visit, det, seq=16 if "NaN" in problem else 17)
    _rewrite_segments(bucket, key, change)
    dv, finder = _finder(setup, visit, det)
    assert finder.wait(expected=1, window_s=1.0) == [key]
    with pytest.raises(CorruptRawError, match=f"{key}: corrupt raw for group {group} detector {det}: {problem}"):
        fetch_and_check(bucket, [key], dv, tmp_path, geometry=instrument.geometry)
    assert classify_error(CorruptRawError("x"))["retriable"] is False


def test_pipeline_stage_names_file_group_and_detector_of_an_unreadable_raw(setup, tmp_path):
    from workflow.stages.pipeline import _read_raws

    config, instrument, bucket = setup
    visit = _visit(instrument.name, "2026-11-19T10:00:00.000", config["filters"][0]["physical_filter"])
    det = instrument.active_detectors()[0].id
    key = _upload(bucket, config, instrument, visit, det, seq=18)
    _rewrite_segments(bucket, key, lambda data: data[:10, :10])
    path = tmp_path / "raw.fits"
    path.write_bytes(bucket.get(key))
    with pytest.raises(CorruptRawError, match=f"{path}: corrupt raw for .* group {visit.groupId} detector {det}:"):
        _read_raws([str(path)], instrument.geometry, visit.fan_out([det])[0])


def test_all_nan_raw_fails_the_ingest_stage_not_a_fallback(setup, tmp_path, monkeypatch):
    from workflow.stages.ingest import run
    from workflow.stages.records import read_failed

    config, instrument, bucket = setup
    config = {**config, "simulation": {**config["simulation"], "scale": 0.0625}}
    config["storage"] = {**config["storage"], "endpoint_url": None, "local_root": str(bucket.root.parent)}
    visit = _visit(instrument.name, "2026-11-19T11:00:00.000", config["filters"][0]["physical_filter"])
    det = instrument.active_detectors()[0].id
    key = _upload(bucket, config, instrument, visit, det, seq=19)
    _rewrite_segments(bucket, key, lambda data: np.full(data.shape, np.nan, np.float32))
    dv = visit.fan_out([det])[0]
    monkeypatch.chdir(tmp_path)  # target paths are relative to the run directory
    target = TargetPaths.from_visit(dv, config)
    target.visit_file.parent.mkdir(parents=True)
    target.visit_file.write_text(dv.to_json())
    with pytest.raises(CorruptRawError):
        run(visit=str(target.visit_file), record=str(target.work_dir / "ingest.json"), config=config)
    failure = read_failed(target.failed_file)
    assert (failure.stage, failure.error, failure.retriable) == ("ingest", "CorruptRawError", False)
    assert f"{key}: corrupt raw for group {visit.groupId} detector {det}: amplifier" in failure.message


def test_ingest_polls_the_arrival_index_often_and_the_bucket_listing_less():
    settings = {"poll_interval_s": 0.5, "index_poll_interval_s": 0.1}
    assert poll_interval(settings, indexed=True) == 0.1
    assert poll_interval(settings, indexed=False) == 0.5
    assert poll_interval({"poll_interval_s": 0.5}, indexed=True) == 0.5
