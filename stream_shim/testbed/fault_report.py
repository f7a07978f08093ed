"""The fault suite's judgement of one scenario: counts, duplicates, alerts, recovery, goals; and the table.

`account` reads what a scenario left in the run directory: for every detector-visit
the camera announced, its outcome file (``done.json``, ``failed.json``, or neither:
*lost*, i.e. not ended within the scenario's timeout), its stand-in ``runs.log`` (one
line per job run: a stage listed twice ran twice), the stand-in *apdb* lines (the
"alert sent" marker: more than one is a duplicate alert, none for a done target a
missing one), and the visit files' times (when the shim consumed each next_visit).
Recovery is measured from the end of the fault window: the first next_visit
consumed after it, the first target done after it, the last outcome.  When the
stand-in *apdb* stores rows in PostgreSQL (`stream_shim.testbed.fault_standin.ApdbRows`),
they are counted too: one per done target (``expected``), none missing, none twice
(``total == distinct == expected``).  `format_table` prints one row per scenario.
"""

from __future__ import annotations

__all__ = ["Observed", "account", "format_table"]

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stream_shim.testbed.faults import FaultWindow, Scenario
from stream_shim.testbed.night import VisitRecord

_LIST_MAX = 10
_NOT_DROPS = frozenset({"accepted", "duplicate", "kafka_error", "consumer_restarted", "handler_error"})
"""Counts of the ``next_visit`` category that are not drops (the consume loop shares the category)."""
_SHIM_CATEGORIES = ("next_visit", "raw_notification", "bridge", "retries", "backend", "failures", "targets")


@dataclasses.dataclass
class Observed:
    """What the driver saw of one scenario (unix seconds)."""

    scenario: Scenario
    visits: list[VisitRecord]
    planned_visits: int
    detectors: list[int]
    window: FaultWindow | None
    fault_error: str | None
    unbuildable: tuple[str, int] | None
    """``(group, detector)`` of the crafted target no rule builds, once its visit was announced."""
    counts_before: dict[str, dict[str, int]]
    counts_after: dict[str, dict[str, int]]
    all_ended: bool
    wall_s: float
    upload_retries: int
    shim_alive: bool
    apdb_rows: list[tuple[str, int]] | None = None
    """``(group, detector)`` of each stand-in APDB row of the scenario's visits (`None`: no rows stored)."""
    apdb_error: str | None = None
    """Why the rows could not be counted."""


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _runs(path: Path) -> dict[str, int]:
    runs: dict[str, int] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return runs
    for line in lines:
        words = line.split()
        if words:
            runs[words[0]] = runs.get(words[0], 0) + 1
    return runs


def _delta(
    before: Mapping[str, Mapping[str, int]], after: Mapping[str, Mapping[str, int]]
) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for category in _SHIM_CATEGORIES:
        old, new = before.get(category, {}), after.get(category, {})
        changed = {k: int(v) - int(old.get(k, 0)) for k, v in new.items() if int(v) != int(old.get(k, 0))}
        if changed:
            out[category] = dict(sorted(changed.items()))
    return out


def _after(times: Sequence[float], since: float) -> float | None:
    later = [t - since for t in times if t >= since]
    return round(min(later), 2) if later else None


def _apdb_rows(observed: Observed, done_keys: set[tuple[str, int]]) -> dict[str, Any] | None:
    """Count the stand-in APDB rows against the done targets (`None` if the scenario stores none)."""
    if observed.apdb_rows is None and observed.apdb_error is None:
        return None
    per = Counter(observed.apdb_rows or [])
    return {
        "expected": len(done_keys),
        "total": sum(per.values()),
        "distinct": len(per),
        "duplicate": sum(count - 1 for count in per.values()),
        "missing": len(done_keys - set(per)),
        "not_done": len(set(per) - done_keys),
        "error": observed.apdb_error,
    }


def account(observed: Observed, *, workdir: Path, instrument: str, paths: Mapping[str, str]) -> dict[str, Any]:
    """Return the scenario's report (JSON-able): targets, duplicates, alerts, recovery, shim counts, goals.

    Parameters
    ----------
    observed : `Observed`
        What the driver saw.
    workdir : `pathlib.Path`
        The stack's run directory.
    instrument : `str`
        Instrument of the targets.
    paths : `~collections.abc.Mapping`
        The config's ``paths`` (``visits``, ``work``, ``results``).
    """
    scenario = observed.scenario
    done, failed, lost, duplicated, outcomes_at, done_at = [], [], [], [], [], []
    accepted_at: list[tuple[float, float]] = []  # (consumed, announced) per visit
    alerts = {"sent": 0, "duplicate": 0, "missing": 0}
    stage_reruns = 0
    done_keys: set[tuple[str, int]] = set()
    for visit in observed.visits:
        consumed = []
        for detector in observed.detectors:
            tail = f"{instrument}/{visit.day_obs}/{visit.group}/{detector}"
            name = f"visit {visit.index} ({visit.group}) detector {detector}"
            result, work = workdir / paths["results"] / tail, workdir / paths["work"] / tail
            visit_file = _mtime(workdir / paths["visits"] / f"{tail}.json")
            if visit_file is not None:
                consumed.append(visit_file)
            done_time, failed_time = _mtime(result / "done.json"), _mtime(result / "failed.json")
            runs = _runs(work / "runs.log")
            if done_time is not None:
                done.append(name)
                done_keys.add((visit.group, detector))
                done_at.append(done_time)
                outcomes_at.append(done_time)
            elif failed_time is not None:
                failed.append(name)
                outcomes_at.append(failed_time)
            else:
                lost.append(name)
            extra = sum(count - 1 for count in runs.values() if count > 1)
            if extra:
                stage_reruns += extra
                duplicated.append(f"{name}: {runs}")
            apdb = runs.get("apdb", 0)
            alerts["sent"] += int(apdb > 0)
            alerts["duplicate"] += max(apdb - 1, 0)
            alerts["missing"] += int(done_time is not None and apdb == 0)
        if consumed:
            accepted_at.append((min(consumed), visit.announced))
    recovery: dict[str, float | None] = {}
    window = observed.window
    if window is not None:
        end = window.ended
        later = sorted((c, a) for c, a in accepted_at if c >= end)
        recovery = {
            "intake_s": round(later[0][0] - end, 2) if later else None,
            "intake_lag_s": round(later[0][0] - max(later[0][1], end), 2) if later else None,
            "first_done_s": _after(done_at, end),
            "last_outcome_s": round(max(outcomes_at) - end, 2) if outcomes_at and max(outcomes_at) >= end else None,
        }
    expected = len(observed.visits) * len(observed.detectors)
    shim = _delta(observed.counts_before, observed.counts_after)
    drops = {k: v for k, v in shim.get("next_visit", {}).items() if k not in _NOT_DROPS}
    unbuildable = None
    if observed.unbuildable is not None:
        group, detector = observed.unbuildable
        unbuildable = next((n for n in failed if f"({group}) detector {detector}" in n), None)
    rows = _apdb_rows(observed, done_keys)
    violations = _violations(
        observed,
        rows=rows,
        expected=expected,
        failed=failed,
        lost=lost,
        stage_reruns=stage_reruns,
        alerts=alerts,
        drops=drops,
        recovery=recovery,
        unbuildable_failed=unbuildable,
    )
    publish_errors = [v.index for v in observed.visits if v.publish_error is not None]
    upload_errors = sum(raw.error is not None for v in observed.visits for raw in v.raws.values())
    return {
        "scenario": scenario.name,
        "description": scenario.description,
        "fault": window.to_dict() if window is not None else None,
        "fault_error": observed.fault_error,
        "targets": {
            "planned": observed.planned_visits * len(observed.detectors),
            "expected": expected,
            "done": len(done),
            "failed": len(failed),
            "lost": len(lost),
            "failed_targets": failed[:_LIST_MAX],
            "lost_targets": lost[:_LIST_MAX],
        },
        "duplicate_stage_runs": stage_reruns,
        "duplicated_targets": duplicated[:_LIST_MAX],
        "alerts": alerts,
        "apdb_rows": rows,
        "recovery": recovery,
        "next_visit_drops": drops,
        "shim_counts": shim,
        "camera": {
            "visits_announced": len(observed.visits),
            "publish_errors": publish_errors,
            "upload_retries": observed.upload_retries,
            "upload_errors_left": upload_errors,
        },
        "all_ended": observed.all_ended,
        "shim_alive": observed.shim_alive,
        "wall_s": round(observed.wall_s, 1),
        "goals": {"met": not violations, "violations": violations},
    }


def _violations(
    observed: Observed,
    *,
    expected: int,
    failed: Sequence[str],
    lost: Sequence[str],
    stage_reruns: int,
    alerts: Mapping[str, int],
    drops: Mapping[str, int],
    recovery: Mapping[str, float | None],
    unbuildable_failed: str | None,
    rows: Mapping[str, Any] | None = None,
) -> list[str]:
    scenario, out = observed.scenario, []
    if observed.fault_error is not None:
        out.append(f"fault not injected: {observed.fault_error}")
    if len(observed.visits) < observed.planned_visits:
        out.append(f"{len(observed.visits)} of {observed.planned_visits} visits announced")
    if any(v.publish_error is not None for v in observed.visits):
        out.append("a next_visit was not delivered to the broker")
    if lost:
        out.append(f"{len(lost)} lost (no outcome within the timeout)")
    if stage_reruns:
        out.append(f"{stage_reruns} duplicate stage run(s)")
    if alerts["duplicate"]:
        out.append(f"{alerts['duplicate']} duplicate alert(s)")
    if alerts["missing"]:
        out.append(f"{alerts['missing']} done target(s) without an alert")
    if len(failed) != scenario.expected_failures:
        out.append(f"{len(failed)} failed, {scenario.expected_failures} expected")
    if scenario.unbuildable is not None and unbuildable_failed is None:
        out.append("the unbuildable target did not fail")
    for reason, count in scenario.expected_drops.items():
        if drops.get(reason, 0) != count:
            out.append(f"next_visit drops {reason}: {drops.get(reason, 0)}, {count} expected")
    if scenario.intake_bound_s is not None:
        intake = recovery.get("intake_s")
        if intake is None or intake > scenario.intake_bound_s:
            out.append(f"intake recovery {intake} s, bound {scenario.intake_bound_s:g} s")
    if scenario.apdb_rows and rows is None:
        out.append("the stand-in APDB rows were not stored")
    if rows is not None:
        if rows["error"] is not None:
            out.append(f"stand-in APDB rows not counted: {rows['error']}")
        if rows["missing"]:
            out.append(f"{rows['missing']} done target(s) without an APDB row")
        if rows["duplicate"]:
            out.append(f"{rows['duplicate']} duplicate APDB row(s)")
        if rows["not_done"]:
            out.append(f"{rows['not_done']} APDB row(s) of targets not done")
    if not observed.shim_alive:
        out.append("the shim exited")
    if expected == 0:
        out.append("no target expected")
    return out


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def format_table(reports: Sequence[Mapping[str, Any]]) -> str:
    """Return a plain-text table, one row per scenario report (`account`), and the violations below it."""
    header = (
        "scenario",
        "expected",
        "done",
        "failed",
        "lost",
        "dup runs",
        "dup alerts",
        "miss alerts",
        "rows t/d/e",
        "intake s",
        "1st done s",
        "last s",
        "wall s",
        "goals",
    )
    rows: list[tuple[str, ...]] = [header]
    for report in reports:
        targets, alerts, recovery = report["targets"], report["alerts"], report["recovery"]
        apdb = report.get("apdb_rows")
        row_cell = f"{apdb['total']}/{apdb['distinct']}/{apdb['expected']}" if apdb else None
        rows.append(
            tuple(
                _cell(v)
                for v in (
                    report["scenario"],
                    targets["expected"],
                    targets["done"],
                    targets["failed"],
                    targets["lost"],
                    report["duplicate_stage_runs"],
                    alerts["duplicate"],
                    alerts["missing"],
                    row_cell,
                    recovery.get("intake_s"),
                    recovery.get("first_done_s"),
                    recovery.get("last_outcome_s"),
                    report["wall_s"],
                    "met" if report["goals"]["met"] else "MISSED",
                )
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    for report in reports:
        for violation in report["goals"]["violations"]:
            lines.append(f"{report['scenario']}: {violation}")
    return "\n".join(lines)
