"""Finish: gather a detector-visit's stage records into its summary, ``done.json``.

Data path of the chain (records in ``work_area/.../``)::

    visit file -> prep.json (staged inputs) ┐
               -> ingest.json (raws)        ├-> pipeline.json (products) -> export.json, apdb.json -> done.json
"""

from __future__ import annotations

__all__ = ["run", "summarize"]

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from workflow.stages.records import DoneRecord, StageRecord, read_stage_record, write_record
from workflow.stages.target import TargetPaths, log_to

_log = logging.getLogger(__name__)


def summarize(target: TargetPaths, records: Mapping[str, StageRecord]) -> DoneRecord:
    """Return the done record of a target from its stage records (by stage name)."""
    pipeline = records["pipeline"].body if "pipeline" in records else {}
    chosen = pipeline.get("pipeline")
    candidates = pipeline.get("candidates", [])
    if chosen is None:
        outcome = "ignored"
    elif candidates and chosen != candidates[0]:
        outcome = "fallback"
    else:
        outcome = "ok"
    return DoneRecord(
        instrument=target.instrument,
        day_obs=target.day_obs,
        group=target.group,
        detector=target.detector,
        outcome=outcome,
        pipeline=chosen,
        attempts=pipeline.get("attempts", []),
        stage_seconds={name: rec.seconds.get("wall_s") for name, rec in records.items()},
        stage_resources={name: rec.resources for name, rec in records.items() if rec.resources is not None},
        counts=pipeline.get("counts", {}),
        exported=records["export"].body.get("exported", []) if "export" in records else [],
        apdb=dict(records["apdb"].body) if "apdb" in records else {},
    )


def run(
    *, visit: str, records: Sequence[str], done: str, config: Mapping[str, Any], log: str | None = None
) -> DoneRecord:
    """Gather the stage records into the target's ``done.json`` (rule ``finish``)."""
    log_to(config, log)
    target = TargetPaths.from_visit_file(visit, config)
    by_stage = {rec.stage: rec for rec in (read_stage_record(path) for path in records)}
    summary = summarize(target, by_stage)
    target.failed_file.unlink(missing_ok=True)  # an earlier failure is superseded
    write_record(done, summary)
    return summary
