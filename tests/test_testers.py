"""Tests for `workflow.sim.testers`, `workflow.sim.testers_replay` and their CLIs, scripts/upload.py and
scripts/upload_from_repo.py.

The testers run against the real Kafka broker and S3 server of conftest.py; the
replay tester reads a small central repo built here (LSSTComCamSim, 2 exposures,
1/8-scale detectors).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from astropy.io import fits
from astropy.time import Time, TimeDelta
from confluent_kafka import Consumer, Message

import workflow.repo.butler_ingest as ri
import workflow.repo.central_repo as cr
from stream_shim.filer_events import CREATED, decode_filer_event
from stream_shim.testbed.local_services import DEFAULT_FILER_TOPIC, free_port
from workflow.core.buckets import LocalBucket, open_bucket
from workflow.core.config import PROJECT_ROOT, known_instruments, load_config
from workflow.core.exceptions import ConfigError, NonRetriableError, RetriableError
from workflow.core.instrument import Instrument
from workflow.core.raw_keys import RawKeyLayout, sidecar_key
from workflow.core.schema_registry import LocalSchemas
from workflow.core.visit import decode_next_visit, parse_next_visit
from workflow.sim.exposures import make_exposures
from workflow.sim.simulate import simulate_raw
from workflow.sim.testers import (
    BrokerUnavailableError,
    NoMatchingRawsError,
    UploadOptions,
    exit_status,
    next_seq_num,
    upload_simulated,
)
from workflow.sim.testers_replay import load_repo_query, upload_from_repo
from workflow.stages.ingest import RawFinder

INSTRUMENT = "LSSTComCamSim"
WAIT = 20.0  # seconds to wait for Kafka messages
FAST = dict(slew_s=0.0, exposure_s=0.0, workers=2)
REPO_FILTERS = ("r_03", "i_06")
REPO_DETECTORS = (0, 1, 4)


# -- servers, configs, consumers ---------------------------------------------------------------


@pytest.fixture(scope="module")
def services(kafka_broker, s3_server):
    """The real broker and S3 server, with S3 credentials in the environment for the module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
        patch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
        patch.setenv("AWS_DEFAULT_REGION", s3_server.region)
        yield kafka_broker, s3_server


def _extra_config(directory: Path, *, bootstrap: str, endpoint: str) -> tuple[Path, str, str]:
    """Write an extra config file pointing at a fresh bucket and topic; return (file, bucket, topic)."""
    token = uuid.uuid4().hex[:10]
    bucket, topic = f"raw-{token}", f"next-visit-{token}"
    path = directory / f"extra-{token}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "kafka": {"bootstrap": bootstrap, "consumer_group": f"group-{token}"},
                "storage": {"endpoint_url": endpoint, "local_root": "unused"},
                "kafka_topics": {
                    "next_visit": topic,
                    "raw_notification": DEFAULT_FILER_TOPIC,
                    "alerts": f"alerts-{token}",
                },
                "buckets": {"raw": bucket},
            }
        )
    )
    return path, bucket, topic


def _config(services, tmp_path) -> tuple[dict[str, Any], Path]:
    broker, s3 = services
    path, _, _ = _extra_config(tmp_path, bootstrap=broker.bootstrap, endpoint=s3.endpoint_url)
    return load_config(instrument=INSTRUMENT, extra_files=[path]), path


def _consumer(bootstrap: str, topic: str) -> Consumer:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 2000,
            "heartbeat.interval.ms": 500,
        }
    )
    consumer.subscribe([topic])
    return consumer


def _next_visits(bootstrap: str, topic: str, count: int) -> list[Message]:
    consumer, got = _consumer(bootstrap, topic), []
    try:
        deadline = time.monotonic() + WAIT
        while len(got) < count and time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is not None and message.error() is None:
                got.append(message)
    finally:
        consumer.close()
    return sorted(got, key=lambda m: (m.partition(), m.offset()))


def _filer_created(bootstrap: str, bucket: str, expected: set[str]) -> set[str]:
    """Read the filer topic until every expected key of ``bucket`` was announced as created."""
    consumer, seen = _consumer(bootstrap, DEFAULT_FILER_TOPIC), set()
    try:
        deadline = time.monotonic() + WAIT
        while not expected <= seen and time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is None or message.error() is not None:
                continue
            event = decode_filer_event(message.key(), message.value())
            if event is not None and event.bucket == bucket and event.kind == CREATED:
                seen.add(event.key)
    finally:
        consumer.close()
    return seen


def _objects(s3, bucket: str) -> dict[str, Any]:
    """Return ``key -> LastModified`` of every object in the bucket."""
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {item["Key"]: item["LastModified"] for page in pages for item in page.get("Contents", [])}


def _check_bucket(config: dict[str, Any], s3, reports) -> dict[str, Any]:
    """Check every report's objects: keys parse, headers and sidecars carry the group."""
    bucket, layout = config["buckets"]["raw"], RawKeyLayout.from_config(config)
    objects, client = _objects(s3, bucket), s3.client()
    assert set(objects) == {key for report in reports for key in report.keys}
    instrument = Instrument.from_config(config)
    for report in reports:
        for raw in report.raws:
            fields = layout.parse(raw.key)
            assert fields is not None and fields.instrument == INSTRUMENT
            assert fields.detector_name == instrument.detector(raw.detector).name
            assert fields.day_obs == report.visit.day_obs.replace("-", "")
            data = client.get_object(Bucket=bucket, Key=raw.key)["Body"].read()
            header = fits.getheader(io.BytesIO(data), 0)
            assert (header["GROUPID"], header["DETECTOR"], header["OBSID"]) == (
                report.visit.groupId,
                raw.detector,
                fields.obs_id,
            )
            assert header["FILTER"] == report.visit.filters
            sidecar = json.loads(client.get_object(Bucket=bucket, Key=sidecar_key(raw.key))["Body"].read())
            assert sidecar["GROUPID"] == report.visit.groupId and raw.sidecar == sidecar_key(raw.key)
            assert objects[raw.sidecar] >= objects[raw.key]  # sidecar written after its image
    return objects


def _run(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "scripts" / script), *args],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# -- the central repo for replays -------------------------------------------------------------


@pytest.fixture(scope="module")
def central_repo(tmp_path_factory):
    """A central repo holding raws of 2 exposures (r_03, then i_06) of 3 detectors."""
    tmp = tmp_path_factory.mktemp("testers-repo")
    instrument = Instrument.from_config(load_config(instrument=INSTRUMENT), scale=0.125)
    butler = cr.create_central_repo(tmp / "repo")
    cr.register_instrument(butler, instrument)
    start = Time("2025-01-10T03:00:00", scale="tai")
    paths, exposures = [], []
    for i, physical_filter in enumerate(REPO_FILTERS):
        exposure = make_exposures(
            instrument,
            start=start + TimeDelta(40.0 * i, format="sec"),
            seq_num=i + 1,
            ra=150.1 + 0.01 * i,
            dec=2.2,
            rotation_deg=10.0 * i,
            physical_filter=physical_filter,
        )[0]
        exposures.append(exposure)
        for det in REPO_DETECTORS:
            paths.append(simulate_raw(instrument, det, exposure).write(tmp / f"{exposure.exposure_id}-{det}.fits"))
    ri.ingest_raws(butler, instrument, paths)
    return tmp / "repo", exposures


def _query_file(directory: Path, repo: Path, extra: Path, **keys: Any) -> Path:
    path = directory / f"query-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(
        yaml.safe_dump({"instrument": INSTRUMENT, "central_repo": str(repo), "config_files": [str(extra)], **keys})
    )
    return path


# -- upload.py ---------------------------------------------------------------------------------


def test_upload_simulated_json_skip_and_late(services, tmp_path):
    broker, s3 = services
    config, _ = _config(services, tmp_path)
    options = UploadOptions(**FAST, skip_detectors=("R22_S00",), late_detectors=(8,), late_delay_s=1.5)
    reports = upload_simulated(config, 2, options=options, scale=0.125, physical_filter="g_01")

    assert len({r.visit.groupId for r in reports}) == 2
    for report in reports:
        assert sorted(r.detector for r in report.raws) == list(range(1, 9))  # all active but the skipped one
        assert [r.detector for r in report.raws if r.late] == [8]
        on_time = max(r.finished for r in report.raws if not r.late)
        assert next(r.finished for r in report.raws if r.late) >= on_time + 1.4
        assert report.visit.nimages == 1 and report.visit.filters == "g_01"
    messages = _next_visits(broker.bootstrap, config["kafka_topics"]["next_visit"], 2)
    assert all(m.value().startswith(b"{") for m in messages)
    visits = [parse_next_visit(m.value(), known_instruments=known_instruments()) for m in messages]
    assert visits == [r.visit for r in reports]

    objects = _check_bucket(config, s3, reports)
    for report in reports:
        late_key = next(r.key for r in report.raws if r.late)
        assert objects[late_key] > max(objects[r.key] for r in report.raws if not r.late)
    seqs = [int(r.raws[0].key.rsplit("/", 2)[1][-6:]) for r in reports]
    assert seqs[1] == seqs[0] + 1
    assert _filer_created(broker.bootstrap, config["buckets"]["raw"], set(objects)) >= set(objects)

    # What ingest will look for: the detector-visit's raw is found, complete with its sidecar.
    bucket, visit = open_bucket(config, config["buckets"]["raw"]), reports[1].visit
    finder = RawFinder(bucket, RawKeyLayout.from_config(config), visit.fan_out([3])[0], "R22_S10", has_sidecar=True)
    assert finder.find() == [next(r.key for r in reports[1].raws if r.detector == 3)]


def test_upload_cli_avro(services, tmp_path):
    broker, s3 = services
    extra, bucket, topic = _extra_config(tmp_path, bootstrap=broker.bootstrap, endpoint=s3.endpoint_url)
    process = _run(
        "upload.py",
        INSTRUMENT,
        "1",
        "--config-file",
        str(extra),
        "--avro",
        "--schema-id",
        "7",
        "--slew-s",
        "0",
        "--exposure-s",
        "0",
        "--scale",
        "0.125",
        "--detectors",
        "4",
        "R22_S12",
        "--filter",
        "i_06",
        "--ra",
        "30.5",
        "--dec",
        "-10.25",
        "--rotation",
        "12",
    )
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    group, summary = out.strip().split(": ", 1)
    assert summary.startswith("2 raws, 4 objects in ") and summary.endswith(" s")

    [message] = _next_visits(broker.bootstrap, topic, 1)
    assert message.value()[0] == 0 and int.from_bytes(message.value()[1:5], "big") == 7
    site_schemas = tmp_path / "schemas"  # id 7: the shipped schema under a site's id
    site_schemas.mkdir()
    (site_schemas / "7.avsc").write_text((PROJECT_ROOT / "workflow" / "data" / "next_visit.1.avsc").read_text())
    visit = decode_next_visit(message.value(), schemas=LocalSchemas(site_schemas))
    assert visit.groupId == group
    assert (visit.position, visit.filters, visit.cameraAngle) == ([30.5, -10.25], "i_06", 12.0)
    keys = set(_objects(s3, bucket))
    layout = RawKeyLayout.from_config(load_config(instrument=INSTRUMENT))
    images = [k for k in keys if layout.parse(k) is not None]
    assert sorted(layout.parse(k).detector_name for k in images) == ["R22_S11", "R22_S12"]
    assert keys == {*images, *map(sidecar_key, images)}
    assert _filer_created(broker.bootstrap, bucket, keys) >= keys


# -- upload_from_repo.py ----------------------------------------------------------------------


def test_upload_from_repo(services, central_repo, tmp_path):
    broker, s3 = services
    repo, past = central_repo
    config, extra = _config(services, tmp_path)
    query = load_repo_query(_query_file(tmp_path, repo, extra, seed=3))
    options = UploadOptions(**FAST, skip_detectors=(1,))
    reports = upload_from_repo(query, 3, options=options)  # more groups than the repo has: cycled

    by_filter = {e.physical_filter: e for e in past}
    assert sorted(r.visit.filters for r in reports[:2]) == sorted(REPO_FILTERS)
    for report in reports:
        source = by_filter[report.visit.filters]
        assert report.visit.groupId not in {e.group_id for e in past}
        assert report.visit.position == pytest.approx([source.ra, source.dec])
        assert report.visit.cameraAngle == pytest.approx(source.rotation_deg)
        assert sorted(r.detector for r in report.raws) == [0, 4]
    _check_bucket(config, s3, reports)

    # Headers rewritten (new ids and times), pixels untouched.
    raw = reports[0].raws[0]
    data = s3.client().get_object(Bucket=config["buckets"]["raw"], Key=raw.key)["Body"].read()
    source = by_filter[reports[0].visit.filters]
    butler = cr.open_central_repo(repo)
    [ref] = butler.query_datasets(
        "raw",
        collections=cr.raw_collection(INSTRUMENT),
        instrument=INSTRUMENT,
        exposure=source.exposure_id,
        detector=raw.detector,
    )
    with fits.open(io.BytesIO(data)) as new, fits.open(butler.getURI(ref).ospath) as old:
        assert new[0].header["EXPID"] != old[0].header["EXPID"] and new[0].header["OBSID"] != old[0].header["OBSID"]
        assert new[0].header["DATE-OBS"] > old[0].header["DATE-OBS"]
        assert new[0].header.comments["GROUPID"] == old[0].header.comments["GROUPID"]
        np.testing.assert_array_equal(new[1].data, old[1].data)

    only_i = load_repo_query(_query_file(tmp_path, repo, extra, where="exposure.physical_filter = 'i_06'"))
    assert [r.visit.filters for r in upload_from_repo(only_i, 2, options=UploadOptions(**FAST))] == ["i_06"] * 2


def test_upload_from_repo_cli_ordered(services, central_repo, tmp_path):
    broker, _ = services
    repo, _ = central_repo
    extra, _, topic = _extra_config(tmp_path, bootstrap=broker.bootstrap, endpoint=services[1].endpoint_url)
    process = _run(
        "upload_from_repo.py",
        str(_query_file(tmp_path, repo, extra)),
        "2",
        "--ordered",
        "--slew-s",
        "0",
        "--exposure-s",
        "0",
    )
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert len(out.strip().splitlines()) == 2 and all("3 raws, 6 objects" in line for line in out.splitlines())
    visits = [decode_next_visit(m.value()) for m in _next_visits(broker.bootstrap, topic, 2)]
    assert [v.filters for v in visits] == list(REPO_FILTERS)


# -- bad input ---------------------------------------------------------------------------------


def test_cli_errors_are_one_line(services, central_repo, tmp_path):
    broker, s3 = services
    repo, _ = central_repo
    good, _, _ = _extra_config(tmp_path, bootstrap=broker.bootstrap, endpoint=s3.endpoint_url)
    no_broker, _, _ = _extra_config(tmp_path, bootstrap=f"127.0.0.1:{free_port()}", endpoint=s3.endpoint_url)
    no_s3, _, _ = _extra_config(tmp_path, bootstrap=broker.bootstrap, endpoint=f"http://127.0.0.1:{free_port()}")
    fast = ["--slew-s", "0", "--exposure-s", "0", "--scale", "0.125", "--kafka-timeout-s", "2"]
    cases = {
        "unknown instrument 'NoSuchCam'": (78, _run("upload.py", "NoSuchCam", "1", *fast)),
        "Kafka broker 127.0.0.1": (75, _run("upload.py", INSTRUMENT, "1", "--config-file", str(no_broker), *fast)),
        "is not available": (75, _run("upload.py", INSTRUMENT, "1", "--config-file", str(no_s3), *fast)),
        "unknown physical filter 'x_99'": (78, _run("upload.py", INSTRUMENT, "1", "--filter", "x_99", *fast)),
        "no LSSTComCamSim raws": (
            66,
            _run(
                "upload_from_repo.py",
                str(_query_file(tmp_path, repo, good, where="exposure.seq_num = 999")),
                "1",
                *fast[:4],
            ),
        ),
        "query for raws": (
            78,
            _run(
                "upload_from_repo.py",
                str(_query_file(tmp_path, repo, good, where="exposure.seq_num ===")),
                "1",
                *fast[:4],
            ),
        ),
        "key 'wher' is not allowed": (
            78,
            _run("upload_from_repo.py", str(_query_file(tmp_path, repo, good, wher="x")), "1"),
        ),
    }
    for text, (status, process) in cases.items():
        out, err = process.communicate(timeout=60)
        assert (process.returncode, len(err.strip().splitlines())) == (status, 1), (text, err)
        assert text in err and "Traceback" not in err and err.startswith(("upload: error:", "upload_from_repo:"))


def test_library_errors(services, central_repo, tmp_path):
    broker, s3 = services
    extra, _, _ = _extra_config(tmp_path, bootstrap=f"127.0.0.1:{free_port()}", endpoint=s3.endpoint_url)
    config = load_config(instrument=INSTRUMENT, extra_files=[extra])
    with pytest.raises(BrokerUnavailableError, match="not reachable within 1 s"):
        upload_simulated(config, 1, options=UploadOptions(**FAST, kafka_timeout_s=1.0), scale=0.125)
    with pytest.raises(ConfigError, match="kafka.bootstrap is null"):
        upload_simulated({**config, "kafka": {"bootstrap": None}}, 1, scale=0.125)
    with pytest.raises(ConfigError, match="late detectors: LSSTComCamSim: no detector 'R99_S99'"):
        upload_simulated(config, 1, options=UploadOptions(late_detectors=("R99_S99",)), scale=0.125)
    with pytest.raises(NoMatchingRawsError, match="match where"):
        upload_from_repo(
            load_repo_query(_query_file(tmp_path, central_repo[0], extra, where="exposure.seq_num = 999")), 1
        )


# -- pieces without servers --------------------------------------------------------------------


def test_exit_status():
    assert exit_status(ConfigError("x")) == 78
    assert exit_status(NoMatchingRawsError("x")) == 66
    assert exit_status(NonRetriableError("x")) == 65
    assert exit_status(BrokerUnavailableError("x")) == exit_status(RetriableError("x")) == 75
    assert exit_status(RuntimeError("x")) == 1


def test_next_seq_num(tmp_path):
    bucket = LocalBucket(tmp_path, "raws")
    for name in ("HSC", INSTRUMENT):
        layout = RawKeyLayout.from_config(load_config(instrument=name))
        assert next_seq_num(bucket, layout, 20250110) == 1
    lsst = RawKeyLayout.from_config(load_config(instrument=INSTRUMENT))
    bucket.put(f"{INSTRUMENT}/20250110/CC_S_20250110_000041/CC_S_20250110_000041_R22_S00.fits", b"x")
    bucket.put(f"{INSTRUMENT}/20250109/CC_S_20250109_000077/CC_S_20250109_000077_R22_S00.fits", b"x")
    assert next_seq_num(bucket, lsst, 20250110) == 42
    hsc = RawKeyLayout.from_config(load_config(instrument="HSC"))
    bucket.put("HSC/5/g1/0/2025011000007/HSC-G/HSC-g1-0-2025011000007-HSC-G-5.fz", b"x")
    assert next_seq_num(bucket, hsc, 20250110) == 8


def test_load_repo_query(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text("instrument: HSC\ncollections: HSC/raw/all\nconfig_files: [config/extra.yaml]\n")
    query = load_repo_query(path)
    assert query["collections"] == ["HSC/raw/all"] and query["seed"] == 0 and query["where"] == ""
    assert query["config_files"] == [str(PROJECT_ROOT / "config/extra.yaml")]
    example = load_repo_query(PROJECT_ROOT / "config" / "testers" / "upload_from_repo.example.yaml")
    assert example["instrument"] == INSTRUMENT and example["bind"]["filters"]
    path.write_text("collections: [a]\n")
    with pytest.raises(ConfigError, match="key 'instrument' is missing"):
        load_repo_query(path)
    path.write_text("instrument: HSC\nseed: many\n")
    with pytest.raises(ConfigError, match="key 'seed': expected int, got 'many'"):
        load_repo_query(path)
