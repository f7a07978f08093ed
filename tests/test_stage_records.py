"""Tests for `workflow.stages.records` and the resources `workflow.stages.target.run_stage` records."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from workflow.core.config import load_config
from workflow.stages.records import (
    RECORD_SCHEMA_VERSION,
    DoneRecord,
    FailedRecord,
    RecordFormatError,
    RecordVersionError,
    StageRecord,
    StageResources,
    failed_from_dict,
    read_done,
    read_failed,
    read_stage_record,
    write_record,
)
from workflow.stages.target import run_stage

USAGE = StageResources(cpu_user_s=1.5, cpu_sys_s=0.25, max_rss_mb=812.0, wall_s=2.0)


def test_records_round_trip(tmp_path):
    stage = StageRecord(
        stage="pipeline",
        body={"pipeline": "ApPipe", "products": {"a": "b"}},
        seconds={"wall_s": 2.0, "cpu_s": 1.7},
        resources=USAGE,
    )
    assert read_stage_record(write_record(tmp_path / "pipeline.json", stage), "pipeline") == stage
    done = DoneRecord(
        instrument="LSSTCam",
        day_obs="2026-12-01",
        group="g",
        detector=94,
        outcome="ok",
        pipeline="ApPipe",
        stage_resources={"pipeline": USAGE},
        exported=["calexp"],
    )
    assert read_done(write_record(tmp_path / "done.json", done)) == done
    failed = FailedRecord(
        error="RawTimeoutError",
        retriable=True,
        message="no raw",
        stage="ingest",
        instrument="LSSTCam",
        day_obs="2026-12-01",
        group="g",
        detector=94,
        seconds=30.0,
    )
    path = write_record(tmp_path / "x" / "failed.json", failed)
    assert read_failed(path) == failed and read_failed(path).outcome == "failed"
    assert json.loads(path.read_text())["schema_version"] == RECORD_SCHEMA_VERSION
    assert failed_from_dict(json.loads(path.read_text()), "s3://b/failed.json") == failed


def test_other_versions_and_shapes_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "done.json"
    path.write_text(json.dumps({"outcome": "ok", "instrument": "X"}))
    with pytest.raises(RecordVersionError, match=f"record {path}: schema_version None, this code reads version 1"):
        read_done(path)
    path.write_text(json.dumps({"schema_version": 1, "stage": "prep", "body": {}, "colour": "blue"}))
    with pytest.raises(RecordFormatError, match=r"unknown field\(s\) \['colour'\] for a StageRecord"):
        read_stage_record(path)
    path.write_text(json.dumps({"schema_version": 1, "stage": "prep", "body": {}}))
    with pytest.raises(RecordFormatError, match="written by stage 'prep', expected 'ingest'"):
        read_stage_record(path, "ingest")
    path.write_text("{half")
    with pytest.raises(RecordFormatError, match="not JSON"):
        read_done(path)
    with pytest.raises(RecordFormatError, match="cannot read"):
        read_failed(tmp_path / "missing.json")


def _forked_stage(tmp_path, name: str, body) -> StageResources:
    """Run ``body`` as a stage in a forked child, as the stage server does; return its recorded usage."""
    config = load_config()
    visit = "visits/LSSTComCamSim/2026-12-01/G1/4.json"
    record_file = tmp_path / "work_area" / f"{name}.json"
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(tmp_path)
            run_stage(name, visit=visit, record=str(record_file), config=config, log=None, body=body)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    usage = read_stage_record(record_file, name).resources
    assert usage is not None
    return usage


def test_a_forked_stage_records_its_own_cpu_and_peak_memory(tmp_path):
    """A stage that allocates 200 MB records >= 200 MB, and ~200 MB more than one that does not."""

    def allocate_and_spin(target):
        block = np.ones(200 * 2**20 // 8)  # 200 MB, touched
        deadline = time.process_time() + 0.3
        while time.process_time() < deadline:
            block[:1000] += 1.0
        return {"sum": float(block[:10].sum())}

    big = _forked_stage(tmp_path, "pipeline", allocate_and_spin)
    small = _forked_stage(tmp_path, "export", lambda target: {})
    assert big.max_rss_mb >= 200 and big.max_rss_mb - small.max_rss_mb >= 180, (big, small)
    assert big.cpu_user_s + big.cpu_sys_s >= 0.29 and big.cpu_user_s > small.cpu_user_s
    tsv = (tmp_path / "benchmarks/pipeline/LSSTComCamSim/2026-12-01/G1/4.stage.tsv").read_text().splitlines()
    assert tsv[0].split("\t") == ["s", "cpu_user_s", "cpu_sys_s", "max_rss_mb"]
    assert float(tsv[1].split("\t")[3]) == big.max_rss_mb


def test_sizing_takes_the_p95_of_what_the_stages_used():
    from workflow.outcomes.sizing import set_resources_lines, size_resources

    records = [
        DoneRecord(
            instrument="LSSTCam",
            day_obs="2026-12-01",
            group="g",
            detector=d,
            outcome="ok",
            pipeline="ApPipe",
            stage_resources={
                "pipeline": StageResources(
                    cpu_user_s=10.0 + d, cpu_sys_s=2.0, max_rss_mb=1000.0 + 10 * d, wall_s=14.0 + d
                ),
                "prep": StageResources(cpu_user_s=0.1, cpu_sys_s=0.05, max_rss_mb=150.0, wall_s=1.0),
            },
        )
        for d in range(20)
    ]
    records.append(
        FailedRecord(
            error="RawTimeoutError",
            retriable=True,
            message="m",
            stage="ingest",
            instrument="LSSTCam",
            day_obs="2026-12-01",
            group="g",
            detector=99,
        )
    )
    sizes = {s.rule: s for s in size_resources(records, headroom=1.25)}
    assert list(sizes) == ["prep", "pipeline"]  # chain order, only measured rules
    assert sizes["pipeline"].samples == 20
    assert sizes["pipeline"].p95_max_rss_mb == pytest.approx(1180.5)
    assert sizes["pipeline"].mem_mb == 1500  # 1180.5 x 1.25 = 1475.6, rounded up to 100 MB
    assert sizes["prep"].mem_mb == 200  # the floor
    assert 0.5 < sizes["pipeline"].cpu_fraction <= 1.0
    assert set_resources_lines(sizes.values()) == ["prep:mem_mb=200", "pipeline:mem_mb=1500"]
