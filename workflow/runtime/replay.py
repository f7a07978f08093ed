"""Replay past visits from the central repo through the workflow, in batches.

A night is ~800 visits x 189 detectors: never one DAG of 150k targets.  Replay
writes the per-detector visit files of each past visit (as the stream shim would
have) and runs Snakemake on one batch of visits at a time, with ingest reading the
raws from the central repo.
"""

from __future__ import annotations

__all__ = ["visit_from_exposure", "write_visit_files", "replay"]

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from astropy.time import Time

from workflow.core.visit import CoordSys, Dome, NextVisit, RotSys
from workflow.stages.target import TargetPaths, write_json

_log = logging.getLogger(__name__)


def visit_from_exposure(record: Any, instrument: str) -> NextVisit:
    """Rebuild the next_visit message of a past exposure from its Butler record."""
    start = Time(record.timespan.begin, scale="tai") if record.timespan is not None else None
    stamp = float(start.unix_tai) if start is not None else 0.0
    n_snaps = int(record.seq_end) - int(record.seq_start) + 1
    return NextVisit(
        salIndex=1,
        scriptSalIndex=1,
        instrument=instrument,
        groupId=str(record.group),
        coordinateSystem=CoordSys.ICRS,
        position=[float(record.tracking_ra), float(record.tracking_dec)],
        startTime=stamp,
        rotationSystem=RotSys.SKY,
        cameraAngle=float(record.sky_angle),
        filters=str(record.physical_filter),
        dome=Dome.OPEN,
        duration=float(record.exposure_time) * n_snaps,
        nimages=n_snaps,
        survey=str(record.science_program or ""),
        totalCheckpoints=0,
        private_sndStamp=stamp,
    )


def write_visit_files(config: Mapping[str, Any], visit: NextVisit, detectors: Iterable[int]) -> list[TargetPaths]:
    """Fan a visit out to detectors and write their visit files; return the targets."""
    targets = []
    for detector_visit in visit.fan_out(sorted(set(detectors))):
        target = TargetPaths.from_visit(detector_visit, config)
        if not target.visit_file.exists():
            write_json(target.visit_file, detector_visit.to_dict())
        targets.append(target)
    return targets


def replay(
    config: Mapping[str, Any],
    *,
    instrument_file: str | Path,
    order: str = "exposure",
    limit: int | None = None,
    batch_visits: int = 1,
    seed: int = 0,
    extra_configfiles: Sequence[str | Path] = (),
    profile: str = "profiles/local",
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Replay past visits: write visit files and run Snakemake batch by batch.

    Parameters
    ----------
    config : `~collections.abc.Mapping`
        Merged configuration of the instrument.
    instrument_file : `str` or `pathlib.Path`
        The instrument config file (passed on to Snakemake).
    order : `str`
        ``"exposure"`` (time order, ``--ordered``) or ``"random"``.
    limit : `int`, optional
        At most this many visits.
    batch_visits : `int`
        Visits per Snakemake invocation.

    Returns
    -------
    batches : `list` [`dict`]
        Per batch: groups, targets, Snakemake return code and seconds.
    """
    from workflow.core.instrument import instrument_for_run
    from workflow.repo.central_repo import open_central_repo
    from workflow.repo.queries import past_exposures
    from workflow.runtime.snakemake_runner import run_snakemake

    name = config["instrument"]["name"]
    butler = open_central_repo(config["central_repo"])
    exposures = past_exposures(butler, name, order=order, seed=seed)
    active = {d.id for d in instrument_for_run(config).active_detectors()}
    visits: dict[str, list[TargetPaths]] = {}
    for exposure in exposures:
        group = str(exposure.record.group)
        if group in visits or (limit is not None and len(visits) >= limit):
            continue
        detectors = [ref.dataId["detector"] for ref in exposure.raws if ref.dataId["detector"] in active]
        visits[group] = write_visit_files(config, visit_from_exposure(exposure.record, name), detectors)
    override = Path(config["paths"]["work"]) / "replay-override.yaml"
    write_json(override, {"ingest": {"source": "central_repo", "poll_interval_s": 0.5}})
    groups = list(visits)
    batches = []
    from tqdm import tqdm

    for start in tqdm(range(0, len(groups), batch_visits), disable=not progress, unit="batch"):
        chunk = groups[start : start + batch_visits]
        targets = [str(t.done_file) for g in chunk for t in visits[g]]
        run = run_snakemake(
            targets,
            profile=profile,
            configfiles=[instrument_file, *extra_configfiles, override],
            log_file=Path("logs") / "replay" / f"batch-{start // batch_visits:05d}.log",
        )
        batches.append(
            {"groups": chunk, "targets": len(targets), "returncode": run.returncode, "seconds": round(run.seconds, 2)}
        )
        _log.info(
            "replay batch %d: %d targets, exit %d, %.1f s",
            start // batch_visits,
            len(targets),
            run.returncode,
            run.seconds,
        )
    return batches
