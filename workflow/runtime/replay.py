"""Replay past visits from the central repo through the workflow, in batches.

A night is ~800 visits x 189 detectors: never one DAG of 150k targets.  Replay
writes the per-detector visit files of each past visit (as the stream shim would
have) and runs Snakemake on one batch of visits at a time, with ingest reading the
raws from the central repo.
"""

from __future__ import annotations

__all__ = ["fail_targets_without_outcome", "visit_from_exposure", "write_visit_files", "replay"]

import contextlib
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
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
    run: bool = True,
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
    run : `bool`, optional
        `False`: only write the visit files (for a dry run: ``snakemake -n``), one
        batch record per batch with return code 0 and no Snakemake log.

    Returns
    -------
    batches : `list` [`dict`]
        Per batch: groups, targets (their count) and ``done_files`` (their outcome files),
        Snakemake return code, seconds and ``log_file`` (Snakemake's log).
    """
    from workflow.core.instrument import instrument_for_run
    from workflow.repo.central_repo import open_central_repo
    from workflow.repo.queries import past_exposures
    from workflow.runtime.snakemake_runner import has_remote_outputs, run_snakemake
    from workflow.runtime.versions import check_startup

    # refuse an unsupported APDB, dimension universe or alert schema before writing anything
    check_startup(config, create_apdb=True)  # a missing SQLite APDB is created, as the first target would
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
    remote_outputs = has_remote_outputs(profile)
    override = Path(config["paths"]["work"]) / "replay-override.yaml"
    write_json(override, {"ingest": {"source": "central_repo", "poll_interval_s": 0.5}})
    groups = list(visits)
    batches = []
    n_batches = -(-len(groups) // batch_visits)
    finished_before = 0
    from tqdm import tqdm

    # One bar over the targets, advanced as their outcome files appear (a batch of a
    # few visits runs for minutes: a bar per batch would sit at 0 meanwhile).
    bar = tqdm(total=sum(len(t) for t in visits.values()), disable=not (progress and run), unit="target")
    for number, start in enumerate(range(0, len(groups), batch_visits)):
        chunk = groups[start : start + batch_visits]
        paths = [t for g in chunk for t in visits[g]]
        targets = [str(t.done_file) for t in paths]
        log_file = Path("logs") / "replay" / f"batch-{number:05d}.log"
        if not run:
            batches.append({"groups": chunk, "targets": len(targets), "done_files": targets, "returncode": 0})
            continue
        if progress:
            bar.write(f"replay batch {number + 1}/{n_batches}: {len(targets)} targets; Snakemake's log: {log_file}")
        with _OutcomeWatcher(paths, bar, finished_before) if progress else contextlib.nullcontext():
            result = run_snakemake(
                targets,
                profile=profile,
                configfiles=[instrument_file, *extra_configfiles, override],
                log_file=log_file,
            )
        finished_before += len(paths)
        # Outcome files on a remote default storage are the shim's store's business, not looked at here.
        missing = (
            []
            if remote_outputs
            else fail_targets_without_outcome(paths, returncode=result.returncode, log_file=log_file)
        )
        if missing:
            _log.error(
                "replay batch %d: %d target(s) ended without an outcome (their jobs failed outside a stage: "
                "killed by the scheduler, a time limit, a lost node?); failed.json written as NoOutcome; see %s",
                number,
                len(missing),
                log_file,
            )
        bar.n = finished_before
        bar.refresh()
        batches.append(
            {
                "groups": chunk,
                "targets": len(targets),
                "done_files": targets,
                "returncode": result.returncode,
                "seconds": round(result.seconds, 2),
                "log_file": str(log_file),
            }
        )
        _log.info(
            "replay batch %d: %d targets, exit %d, %.1f s",
            number,
            len(targets),
            result.returncode,
            result.seconds,
        )
    bar.close()
    return batches


def fail_targets_without_outcome(
    paths: Sequence[TargetPaths], *, returncode: int, log_file: str | Path
) -> list[TargetPaths]:
    """Write ``failed.json`` (``NoOutcome``, retriable) for the targets a finished run left without an outcome.

    A job that dies outside a stage (a batch scheduler's ``scancel`` or time limit, a
    drained node, an OOM kill of the job step) writes no outcome file, so without this
    the target would be neither done nor failed: not counted, not explained.  A rerun
    runs it again (Snakemake's target is ``done.json``), and the finish stage then
    removes this record.

    Parameters
    ----------
    paths : sequence of `workflow.stages.target.TargetPaths`
        The run's targets.
    returncode : `int`
        Snakemake's exit status (in the message).
    log_file : `str` or `pathlib.Path`
        Snakemake's log (in the message).

    Returns
    -------
    failed : `list` [`workflow.stages.target.TargetPaths`]
        The targets given a ``NoOutcome`` record.
    """
    from workflow.stages.records import NO_OUTCOME, FailedRecord, write_record

    failed = []
    for target in paths:
        if target.done_file.exists() or target.failed_file.exists():
            continue
        record = FailedRecord(
            error=NO_OUTCOME,
            retriable=True,
            message=(
                f"{target.instrument} group {target.group} detector {target.detector}: Snakemake exited "
                f"{returncode} with no outcome for this target: its job ended outside a stage (killed by "
                f"the scheduler, a time limit, a lost node, an out-of-memory kill?); see {log_file}"
            ),
            stage="snakemake",
            instrument=target.instrument,
            day_obs=target.day_obs,
            group=target.group,
            detector=target.detector,
        )
        write_record(target.failed_file, record)
        failed.append(target)
    return failed


class _OutcomeWatcher:
    """Advance a progress bar as a batch's targets get an outcome file (done or failed), once a second."""

    def __init__(self, paths: Sequence[TargetPaths], bar: Any, offset: int) -> None:
        self._paths, self._bar, self._offset = list(paths), bar, offset
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replay-progress", daemon=True)

    def _run(self) -> None:
        ticks = 0
        while not self._stop.wait(1.0):
            ticks += 1
            ended = sum(1 for t in self._paths if t.done_file.exists() or t.failed_file.exists())
            if self._offset + ended != self._bar.n or ticks % 10 == 0:  # the elapsed time moves on too
                self._bar.n = self._offset + ended
                self._bar.refresh()

    def __enter__(self) -> _OutcomeWatcher:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
