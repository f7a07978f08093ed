"""The night simulator's report: per detector-visit latencies, CPU per visit, backlog, saturation.

Inputs are what the run left: the camera's `stream_shim.testbed.night.VisitRecord`
list (when each next_visit was sent and each raw landed), the stand-in jobs' records
(``work_area/.../<stage>.json`` with ``start``/``end``, ``runs.log``), the outcome
files, the shim's arrival index, and the `stream_shim.testbed.night_sampler.ProcessSampler`.

Orchestration-added latency of a detector-visit is the time its stand-in *apdb*
("alert sent") finished minus when it could have finished had every job started the
moment it could: ``max(next_visit sent + prep, raw landed + ingest) + pipeline + apdb``
(modelled seconds of the cost model).  It holds the notification path (filer event,
bridge, shim, arrival index), ingest's polling, Snakemake's scheduling and job
start-up, and any wait for a core.
"""

from __future__ import annotations

__all__ = [
    "TargetTimes",
    "backlog_series",
    "collect_targets",
    "cpu_summary",
    "extrapolate",
    "latency_summary",
    "saturation",
    "target_counts",
]

import dataclasses
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stream_shim.status import percentile
from stream_shim.testbed.night import VisitRecord
from stream_shim.testbed.night_standin import STAGE_NAMES, CostModel

LSSTCAM_DETECTORS = 189
LSSTCAM_CADENCE_S = 32.0


@dataclasses.dataclass
class TargetTimes:
    """What one detector-visit did (unix seconds; `None` where it did not happen)."""

    visit: int
    detector: int
    announced: float
    raw_landed: float | None
    raw_indexed: float | None
    visit_file: float | None
    stages: dict[str, dict[str, float]]
    runs: dict[str, int]
    done: bool
    failed: bool


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def collect_targets(
    visits: Sequence[VisitRecord], *, workdir: Path, instrument: str, paths: Mapping[str, str], arrivals_root: Path
) -> list[TargetTimes]:
    """Read every announced detector-visit's records from the run directory."""
    targets = []
    for visit in visits:
        if visit.publish_error is not None:
            continue
        for detector, raw in sorted(visit.raws.items()):
            tail = f"{instrument}/{visit.day_obs}/{visit.group}/{detector}"
            work, result = workdir / paths["work"] / tail, workdir / paths["results"] / tail
            stages = {}
            for stage in STAGE_NAMES[:-1]:
                record = _read_json(work / f"{stage}.json")
                if isinstance(record, dict):
                    stages[stage] = {k: float(v) for k, v in record.items()}
            finish = _read_json(result / "done.json")
            if isinstance(finish, dict):
                stages["finish"] = {k: float(v) for k, v in finish.items()}
            runs: dict[str, int] = {}
            try:
                for line in (work / "runs.log").read_text().splitlines():
                    if line.strip():
                        runs[line.split()[0]] = runs.get(line.split()[0], 0) + 1
            except OSError:
                pass
            entry = _read_json(arrivals_root / raw.entry)
            targets.append(
                TargetTimes(
                    visit=visit.index,
                    detector=detector,
                    announced=visit.announced,
                    raw_landed=raw.put_done,
                    raw_indexed=float(entry["received"]) if isinstance(entry, dict) else None,
                    visit_file=_mtime(workdir / paths["visits"] / f"{tail}.json"),
                    stages=stages,
                    runs=runs,
                    done=(result / "done.json").exists(),
                    failed=(result / "failed.json").exists(),
                )
            )
    return targets


def _stats(values: Sequence[float]) -> dict[str, Any]:
    def r(value: float | None) -> float | None:
        return None if value is None else round(value, 3)

    return {
        "n": len(values),
        "p50_s": r(percentile(list(values), 50)),
        "p95_s": r(percentile(list(values), 95)),
        "max_s": r(max(values) if values else None),
    }


def _waits(target: TargetTimes) -> dict[str, float]:
    """Seconds each job waited after it could have started (and the shim's fan-out and notification path)."""
    s, out = target.stages, {}

    def end(*names: str) -> float | None:
        ends = [s[n]["end"] for n in names if n in s]
        return max(ends) if len(ends) == len(names) else None

    if target.visit_file is not None:
        out["next_visit_to_visit_file"] = target.visit_file - target.announced
        for stage in ("prep", "ingest"):
            if stage in s:
                out[f"{stage}_start"] = s[stage]["start"] - target.visit_file
    if target.raw_landed is not None and target.raw_indexed is not None:
        out["raw_landed_to_indexed"] = target.raw_indexed - target.raw_landed
        if "ingest" in s and "seen" in s["ingest"]:
            out["indexed_to_ingest_saw_it"] = s["ingest"]["seen"] - max(target.raw_indexed, s["ingest"]["start"])
    for stage, needs in (
        ("pipeline", ("prep", "ingest")),
        ("apdb", ("prep", "pipeline")),
        ("export", ("ingest", "pipeline")),
        ("finish", ("prep", "ingest", "pipeline", "export", "apdb")),
    ):
        ready = end(*needs)
        if stage in s and ready is not None:
            out[f"{stage}_start"] = s[stage]["start"] - ready
    return out


def latency_summary(targets: Sequence[TargetTimes], cost: CostModel) -> dict[str, Any]:
    """Return the latency statistics: orchestration-added, raw -> alert, raw -> done, waits per step."""
    added, to_alert, to_done, worst = [], [], [], []
    waits: dict[str, list[float]] = {}
    for target in targets:
        for name, value in _waits(target).items():
            waits.setdefault(name, []).append(value)
        apdb = target.stages.get("apdb")
        if apdb is None or target.raw_landed is None:
            continue
        ideal = (
            max(target.announced + cost.of("prep"), target.raw_landed + cost.of("ingest"))
            + cost.of("pipeline")
            + cost.of("apdb")
        )
        added.append(apdb["end"] - ideal)
        to_alert.append(apdb["end"] - target.raw_landed)
        worst.append((apdb["end"] - ideal, target.visit, target.detector))
        if "finish" in target.stages:
            to_done.append(target.stages["finish"]["end"] - target.raw_landed)
    return {
        "orchestration_added": _stats(added),
        "raw_landed_to_alert": _stats(to_alert),
        "raw_landed_to_done": _stats(to_done),
        "modelled_raw_to_alert_s": cost.after_raw_s(),
        "waits": {name: _stats(values) for name, values in sorted(waits.items())},
        "worst": [{"visit": v, "detector": d, "added_s": round(a, 3)} for a, v, d in sorted(worst, reverse=True)[:5]],
    }


def target_counts(targets: Sequence[TargetTimes], *, planned: int, shim: Mapping[str, Any]) -> dict[str, Any]:
    """Return expected/done/failed counts, and the targets that ran a stage more than once."""
    duplicates = [
        {"visit": t.visit, "detector": t.detector, "runs": t.runs}
        for t in targets
        if any(count > 1 for count in t.runs.values())
    ]
    return {
        "planned": planned,
        "expected": len(targets),
        "done": sum(t.done for t in targets),
        "failed": sum(t.failed and not t.done for t in targets),
        "missing": sum(not t.done and not t.failed for t in targets),
        "done_and_failed": sum(t.done and t.failed for t in targets),
        "ran_a_stage_twice": len(duplicates),
        "duplicates": duplicates[:10],
        "shim": dict(shim),
    }


def _backlog_at(ticks: Sequence[Mapping[str, Any]], when: float) -> int | None:
    before = [tick for tick in ticks if tick["t"] <= when and "backlog" in tick]
    return int(before[-1]["backlog"]) if before else None


def saturation(
    ticks: Sequence[Mapping[str, Any]],
    visits: Sequence[VisitRecord],
    *,
    sampler_started: float,
    detectors: int,
    cadence_s: float,
    warmup_visits: int,
    all_ended: bool,
) -> dict[str, Any]:
    """Decide whether the run kept up: backlog at each next_visit after the warm-up must not keep growing.

    Saturated when not every target ended in time, or when the backlog sampled at the
    next_visits after ``warmup_visits`` grows at every visit (at least three of them)
    by a total of at least half a visit.
    """
    points = [_backlog_at(ticks, v.announced - sampler_started) for v in visits]
    steady = [p for p in points[warmup_visits:] if p is not None]
    growing = (
        len(steady) >= 3
        and all(b >= a for a, b in itertools.pairwise(steady))
        and steady[-1] - steady[0] >= detectors / 2
    )
    if not all_ended:
        reason = "not every target ended before the duration limit"
    elif growing:
        reason = "the backlog grew at every next_visit after the warm-up"
    elif len(steady) < 3:
        reason = f"too few visits after the {warmup_visits}-visit warm-up to judge the trend (kept up with this run)"
    else:
        reason = "the backlog at the next_visits stayed level after the warm-up"
    return {
        "saturated": (not all_ended) or growing,
        "offered_targets_per_s": round(detectors / cadence_s, 3),
        "reason": reason,
        "warmup_visits": warmup_visits,
        "backlog_at_next_visit": points,
    }


def backlog_series(ticks: Sequence[Mapping[str, Any]], max_points: int = 120) -> list[list[float]]:
    """Return ``[t, backlog, done]`` over time, thinned to ``max_points``."""
    rows = [[tick["t"], tick["backlog"], tick.get("done", 0)] for tick in ticks if "backlog" in tick]
    step = max(1, math.ceil(len(rows) / max_points))
    return rows[::step] + ([rows[-1]] if rows and (len(rows) - 1) % step else [])


def cpu_summary(cpu: Mapping[str, Mapping[str, float]], *, visits: int, targets: int) -> dict[str, Any]:
    """Return CPU seconds per visit and per target of each role (user and sys apart).

    ``jobs`` is what the Snakemake processes' reaped children used (the stand-in
    jobs) plus the job processes still alive at the last sample; the submitters' own
    CPU is ``submitter``.  ``reaped_children_*`` of each role are kept as a cross-check
    (the shim's, in the subprocess design, hold its finished Snakemake runs whole, jobs
    included, where the samples may miss up to one interval per run).
    """
    roles = {role: dict(values) for role, values in cpu.items()}
    jobs = roles.setdefault("jobs", {"processes": 0})
    submitter = roles.get("submitter", {})
    # A job seen alive and later reaped would count twice: its own samples count only if still unreaped.
    jobs["user_s"] = jobs.get("alive_user_s", 0.0) + submitter.get("reaped_user_s", 0.0)
    jobs["sys_s"] = jobs.get("alive_sys_s", 0.0) + submitter.get("reaped_sys_s", 0.0)
    out = {}
    for role, values in sorted(roles.items()):
        user, sys_ = values.get("user_s", 0.0), values.get("sys_s", 0.0)
        out[role] = {
            "user_s": round(user, 2),
            "sys_s": round(sys_, 2),
            "user_s_per_visit": round(user / max(visits, 1), 3),
            "sys_s_per_visit": round(sys_ / max(visits, 1), 3),
            "cpu_s_per_target": round((user + sys_) / max(targets, 1), 4),
            "reaped_children_user_s": round(values.get("reaped_user_s", 0.0), 2),
            "reaped_children_sys_s": round(values.get("reaped_sys_s", 0.0), 2),
            "processes_seen": int(values.get("processes", 0)),
        }
    return out


def extrapolate(cpu: Mapping[str, Mapping[str, Any]], *, cores: int) -> dict[str, Any]:
    """Return the cores LSSTCam's rate would take, from this run's CPU per target, with the assumptions."""
    rate = LSSTCAM_DETECTORS / LSSTCAM_CADENCE_S
    need = {role: round(values["cpu_s_per_target"] * rate, 3) for role, values in cpu.items()}
    orchestration = round(sum(need.get(r, 0.0) for r in ("shim", "submitter")), 3)
    return {
        "targets_per_s": round(rate, 3),
        "cores_needed_by_role": need,
        "orchestration_cores_needed": orchestration,
        "cores_here": cores,
        "orchestration_fits_here": orchestration < cores,
        "formula": "cpu_s_per_target x 189 / 32 s",
        "assumptions": [
            "CPU per target stays what this run measured: linear in the target rate; the streaming "
            "Snakemake's per-target CPU grew with the targets it had seen in the soak (scale.md), "
            "so for a whole night this is a lower bound",
            "orchestration = shim + submitter Snakemake; jobs are the stand-in bash jobs (their CPU "
            "is not a real stage's); broker, S3 and the camera driver are left out",
            "a process that exited between two samples lost at most one sample interval of CPU",
        ],
    }
