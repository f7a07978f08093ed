"""The stages of one detector-visit target, as the rule scripts call them.

Each function: reads the visit file, runs its stage inside `workflow.target.stage`
(timing; a failure writes ``failed.json`` and re-raises so Snakemake fails only this
target), and writes its JSON record, the next stage's input.  Data path::

    visit file -> prep.json (staged inputs) ┐
               -> ingest.json (raws)        ├-> pipeline.json (products) -> export.json -> done.json
"""

from __future__ import annotations

__all__ = ["run_prep", "run_ingest", "run_pipeline", "run_export", "run_apdb", "run_finish"]

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .log_setup import configure_logging
from .target import TargetPaths, load_visit_file, read_json, stage, write_json

_log = logging.getLogger(__name__)


def _begin(visit_file: str, config: Mapping[str, Any], log_file: str | None) -> TargetPaths:
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        configure_logging(config["log_levels"], filename=log_file)
    return TargetPaths.from_visit_file(visit_file, config)


def _visit(visit_file: str, config: Mapping[str, Any]):
    return load_visit_file(visit_file, expected_instrument=config["instrument"]["name"])


def _run_stage(name: str, visit_file: str, record_file: str, config: Mapping[str, Any], log_file: str | None,
               body: Callable[[TargetPaths], dict]) -> dict:
    """Run ``body(target)`` as stage ``name``, add its seconds to the record it returns, write the record."""
    target = _begin(visit_file, config, log_file)
    with stage(target, name) as timing:
        record = body(target)
    record["seconds"] = timing.as_dict()
    write_json(record_file, record)
    return record


def run_prep(visit_file: str, manifest_file: str, config: Mapping[str, Any], log_file: str | None = None) -> dict:
    """Stage calibs, refcat shards and templates; write the prep manifest."""
    from .prep import stage_inputs

    return _run_stage("prep", visit_file, manifest_file, config, log_file,
                      lambda target: stage_inputs(_visit(visit_file, config), config, target.work_dir))


def run_ingest(visit_file: str, record_file: str, config: Mapping[str, Any], log_file: str | None = None) -> dict:
    """Find (waiting if needed), download and check the raws; write the ingest record."""
    from .buckets import open_bucket
    from .ingest import RawFinder, fetch_and_check, raws_from_central_repo, read_primary_header, wait_window_s
    from .prep import instrument_for_run
    from .raw_keys import RawKeyLayout

    def ingest(target: TargetPaths) -> dict:
        visit = _visit(visit_file, config)
        dest = target.work_dir / "raws"
        source = config["ingest"]["source"]
        if source == "central_repo":
            paths = raws_from_central_repo(config, visit, dest)
        else:
            bucket = open_bucket(config, config["buckets"]["raw"])
            finder = RawFinder(bucket, RawKeyLayout.from_config(config), visit,
                               instrument_for_run(config).detector(visit.detector).name,
                               has_sidecar=bool(config["raw"]["sidecar"]))
            expected = visit.nimages or int(config["raw"]["snaps_per_visit"])
            keys = finder.wait(expected, wait_window_s(visit, float(config["raw"]["image_timeout_s"])),
                               poll_s=float(config["ingest"]["poll_interval_s"]))
            paths = fetch_and_check(bucket, keys, visit, dest)
        with open(paths[0], "rb") as stream:
            header = read_primary_header(stream.read(2880 * 12), where=str(paths[0]))
        return {"source": source, "raws": [str(p) for p in paths],
                "header": {k: header[k] for k in header if k not in ("COMMENT", "HISTORY", "")}}

    return _run_stage("ingest", visit_file, record_file, config, log_file, ingest)


def run_pipeline(visit_file: str, prep_file: str, ingest_file: str, record_file: str,
                 config: Mapping[str, Any], log_file: str | None = None) -> dict:
    """Run the configured pipelines with fallback; write products and the record."""
    from .science_run import process_detector_visit

    return _run_stage("pipeline", visit_file, record_file, config, log_file, lambda target: process_detector_visit(
        _visit(visit_file, config), read_json(prep_file), read_json(ingest_file), config, target.work_dir / "products"))


def run_export(visit_file: str, ingest_file: str, pipeline_file: str, record_file: str,
               config: Mapping[str, Any], log_file: str | None = None) -> dict:
    """Export the selected products to the central repo; write the export record."""
    from .export import export_outputs

    def export(target: TargetPaths) -> dict:
        pipeline = read_json(pipeline_file)
        if pipeline.get("pipeline") is None:
            return {"exported": [], "skipped": [], "reason": "no pipeline ran (visit ignored)"}
        return export_outputs(
            config, day_obs=target.day_obs, pipeline=pipeline["pipeline"], outputs=pipeline["products"],
            raw_header=read_json(ingest_file)["header"],
            where=f"{target.instrument} group {target.group} detector {target.detector}",
        )

    return _run_stage("export", visit_file, record_file, config, log_file, export)


def run_apdb(visit_file: str, prep_file: str, pipeline_file: str, record_file: str,
             config: Mapping[str, Any], log_file: str | None = None) -> dict:
    """Associate, store once and send alerts; write the APDB record."""
    from .apdb_load import load_detector_visit

    return _run_stage("apdb", visit_file, record_file, config, log_file, lambda target: load_detector_visit(
        _visit(visit_file, config), read_json(prep_file), read_json(pipeline_file), config,
        target.work_dir / "alerts.avro", outbox_file=target.work_dir / "alert_outbox.avro"))


def run_finish(visit_file: str, record_files: Sequence[str], done_file: str,
               config: Mapping[str, Any], log_file: str | None = None) -> dict:
    """Gather the stage records into the target's summary ``done.json``."""
    target = _begin(visit_file, config, log_file)
    records = {Path(f).stem: read_json(f) for f in record_files}
    pipeline = records.get("pipeline", {})
    chosen = pipeline.get("pipeline")
    candidates = pipeline.get("candidates", [])
    if chosen is None:
        outcome = "ignored"
    elif candidates and chosen != candidates[0]:
        outcome = "fallback"
    else:
        outcome = "ok"
    summary = {
        "instrument": target.instrument, "day_obs": target.day_obs, "group": target.group,
        "detector": target.detector, "outcome": outcome, "pipeline": chosen,
        "attempts": pipeline.get("attempts", []),
        "stage_seconds": {name: rec.get("seconds", {}).get("wall_s") for name, rec in records.items()},
        "counts": pipeline.get("counts", {}),
        "exported": records.get("export", {}).get("exported", []),
    }
    for name, rec in records.items():
        if name == "apdb":
            summary["apdb"] = {k: v for k, v in rec.items() if k != "seconds"}
    target.failed_file.unlink(missing_ok=True)  # an earlier failure is superseded
    write_json(done_file, summary)
    return summary
