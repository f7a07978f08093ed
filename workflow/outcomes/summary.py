"""Summaries of a run: outcome counts, pipelines used, per-stage seconds, alerts.

Reads the targets' ``done.json`` and ``failed.json`` files, so it works on any run
directory after the fact (live nights, replays, the demo).
"""

from __future__ import annotations

__all__ = ["collect_outcomes", "summarize", "format_summary"]

import collections
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from workflow.stages.records import FailedRecord, Outcome, read_done, read_failed


def collect_outcomes(results_root: str | Path, instrument: str | None = None) -> list[Outcome]:
    """Return one record per target: its done record, or its failed record if it has no done one."""
    root = Path(results_root)
    if instrument:
        root = root / instrument
    records: list[Outcome] = [read_done(done) for done in sorted(root.glob("**/done.json"))]
    for failed in sorted(root.glob("**/failed.json")):
        if not (failed.parent / "done.json").exists():
            records.append(read_failed(failed))
    return records


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def summarize(records: Sequence[Outcome]) -> dict[str, Any]:
    """Aggregate target records into the run summary."""
    outcomes = collections.Counter(r.outcome for r in records)
    failures = collections.Counter(f"{r.stage}:{r.error}" for r in records if isinstance(r, FailedRecord))
    pipelines = collections.Counter(r.pipeline for r in records if not isinstance(r, FailedRecord))
    stages: dict[str, list[float]] = collections.defaultdict(list)
    per_visit: dict[str, dict[str, int]] = collections.defaultdict(lambda: collections.Counter())
    for record in records:
        for name, seconds in record.stage_seconds.items():
            if seconds is not None:
                stages[name].append(seconds)
        apdb = record.apdb
        visit = per_visit[record.group]
        visit["targets"] += 1
        visit["dia_sources"] += int(apdb.get("n_dia_sources") or 0)
        visit["new_dia_objects"] += int(apdb.get("n_new_objects") or 0)
        visit["alerts"] += int(apdb.get("n_alerts") or 0)
    return {
        "targets": len(records),
        "outcomes": dict(outcomes),
        "failures": dict(failures),
        "pipelines": {str(k): v for k, v in pipelines.items()},
        "median_stage_seconds": {name: _median(values) for name, values in sorted(stages.items())},
        "per_visit": {group: dict(counts) for group, counts in sorted(per_visit.items())},
    }


def format_summary(summary: dict[str, Any]) -> str:
    """Render the summary as a few human-readable lines."""
    outcomes = summary["outcomes"]
    lines = [
        f"targets: {summary['targets']}  ok: {outcomes.get('ok', 0)}  fallback: {outcomes.get('fallback', 0)}  "
        f"ignored: {outcomes.get('ignored', 0)}  failed: {outcomes.get('failed', 0)}",
        "pipelines used: " + (", ".join(f"{k} x{v}" for k, v in summary["pipelines"].items()) or "none"),
        "median seconds per stage: "
        + ", ".join(f"{k} {v}" for k, v in summary["median_stage_seconds"].items() if v is not None),
    ]
    if summary["failures"]:
        lines.append("failures: " + ", ".join(f"{k} x{v}" for k, v in summary["failures"].items()))
    for group, counts in summary["per_visit"].items():
        lines.append(
            f"visit {group}: {counts.get('targets', 0)} detectors, {counts.get('dia_sources', 0)} DIA sources, "
            f"{counts.get('new_dia_objects', 0)} new DiaObjects, {counts.get('alerts', 0)} alerts"
        )
    return "\n".join(lines)
