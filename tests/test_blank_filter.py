"""A next_visit with ``filters=""`` (any filter) through prep, ingest and the pipeline inputs,
and which failure ``failed.json`` keeps when two stages of one attempt fail."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest
import yaml
from raw_uploads import make_visit, upload_raw

from workflow.core.buckets import open_bucket
from workflow.core.config import load_config
from workflow.core.exceptions import NonRetriableError, RetriableError
from workflow.core.instrument import instrument_for_run
from workflow.runtime.replay import write_visit_files
from workflow.sim.demo_repo import build_demo_repo
from workflow.stages import ingest, pipeline, prep
from workflow.stages.ingest import RawMismatchError, raw_filter
from workflow.stages.records import read_stage_record
from workflow.stages.target import TargetPaths, stage

SCALE = 0.125
INSTRUMENT = "LSSTComCamSim"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory: tiny central repo (detector 4 only), local raw bucket, SQLite APDB."""
    run_dir = tmp_path_factory.mktemp("blank-filter")
    site = {
        "central_repo": str(run_dir / "repo"),
        "simulation": {"scale": SCALE, "seed": 0},
        "storage": {"endpoint_url": None, "local_root": str(run_dir / "buckets")},
        "paths": {
            "results": str(run_dir / "results"),
            "work": str(run_dir / "work_area"),
            "visits": str(run_dir / "visits"),
            "cache": str(run_dir / "cache"),
        },
        "raw": {"image_timeout_s": 2.0},
        "ingest": {"source": "bucket", "poll_interval_s": 0.2},
        "apdb": {"db_url": f"sqlite:///{run_dir}/apdb.sqlite3"},
    }
    (run_dir / "site.yaml").write_text(yaml.safe_dump(site))
    config = load_config(instrument=INSTRUMENT, extra_files=[run_dir / "site.yaml"])
    build_demo_repo(config["central_repo"], [INSTRUMENT], n_visits=1, scale=SCALE, n_detectors=1, progress=False)
    return config


def test_blank_filters_take_the_raw_header_filter(run):
    config = run
    physical_filter = config["filters"][2]["physical_filter"]  # r_03: the raw's filter
    taken = make_visit(
        INSTRUMENT, "2026-11-28T03:00:00.000", physical_filter, snd_stamp=time.time() + 5.0, duration=0.0
    )
    upload_raw(open_bucket(config, config["buckets"]["raw"]), config, instrument_for_run(config), taken, 4)
    blank = dataclasses.replace(taken, filters="")  # the summit's "any filter"
    (target,) = write_visit_files(config, blank, [4])
    visit_file = str(target.visit_file)
    work = Path(config["paths"]["work"])
    prep_file, ingest_file = work / "prep.json", work / "ingest.json"

    # Prep stages what does not depend on the filter (it raised DimensionNameError before).
    manifest = prep.run(visit=visit_file, manifest=str(prep_file), config=config).body
    assert (manifest["physical_filter"], manifest["band"], manifest["templates"]) == (None, None, [])
    assert "flat" not in manifest["calibs"] and "bias" in manifest["calibs"] and manifest["refcats"]

    # Ingest reads the raw's FILTER and stages the flat and templates for it.
    record = ingest.run(visit=visit_file, record=str(ingest_file), config=config).body
    by_filter = record["filter_inputs"]
    assert (by_filter["physical_filter"], by_filter["band"]) == (physical_filter, "r")
    assert Path(by_filter["calibs"]["flat"]["path"]).is_file() and by_filter["templates"]
    assert by_filter["calibs"]["flat"]["data_id"]["physical_filter"] == physical_filter

    # The pipeline stage's inputs combine both records.
    inputs = pipeline.load_processing_inputs(
        blank.fan_out([4])[0],
        read_stage_record(prep_file, "prep").body,
        read_stage_record(ingest_file, "ingest").body,
        config,
    )
    assert inputs.band == "r"
    assert inputs.flat is not None
    assert not target.failed_file.exists()


def test_raw_filter_reads_rubin_header_keys():
    config = load_config(instrument=INSTRUMENT)
    assert raw_filter({"FILTER": "r_03", "FILTBAND": "r"}, config, where="k") == "r_03"
    assert raw_filter({"FILTER01": "r_03"}, config, where="k") == "r_03"
    with pytest.raises(RawMismatchError, match=r"k: header FILTBAND='g' but FILTER='r_03' is band 'r'"):
        raw_filter({"FILTER": "r_03", "FILTBAND": "g"}, config, where="k")
    with pytest.raises(RawMismatchError, match=r"k: header FILTER='nope' is not a filter of LSSTComCamSim"):
        raw_filter({"FILTER": "nope"}, config, where="k")


class _PrepBroke(NonRetriableError):
    pass


class _RawLate(RetriableError):
    pass


def _target(tmp_path: Path) -> TargetPaths:
    paths = {"results": "results", "work": "work", "visits": "visits"}
    return TargetPaths(INSTRUMENT, "2026-11-28", "g1", 4, tmp_path, paths)


def test_failed_json_keeps_the_first_failure_of_an_attempt(tmp_path):
    target = _target(tmp_path)
    # Ingest starts beside prep; prep fails first; ingest times out later.
    ingest_stage = stage(target, "ingest")
    ingest_stage.__enter__()
    with pytest.raises(_PrepBroke), stage(target, "prep"):
        raise _PrepBroke("no flat: DimensionNameError")
    with pytest.raises(_RawLate):
        try:
            raise _RawLate("0 of 1 raw(s) arrived")
        except _RawLate as exc:
            ingest_stage.__exit__(type(exc), exc, exc.__traceback__)
            raise
    failed = json.loads(target.failed_file.read_text())
    assert (failed["stage"], failed["error"], failed["retriable"]) == ("prep", "_PrepBroke", False)


def test_failed_json_of_an_earlier_attempt_is_replaced(tmp_path):
    target = _target(tmp_path)
    with pytest.raises(_PrepBroke), stage(target, "prep"):
        raise _PrepBroke("attempt 1")
    old = time.time() - 60.0
    os.utime(target.failed_file, (old, old))  # attempt 1 ended a minute ago
    with pytest.raises(_RawLate), stage(target, "ingest"):
        raise _RawLate("attempt 2")
    failed = json.loads(target.failed_file.read_text())
    assert (failed["stage"], failed["message"]) == ("ingest", "attempt 2")
