"""One detector-visit target: its paths, its visit, and its stage records.

Paths (relative to the run directory, from the ``paths`` config section)::

    visits/{instrument}/{day_obs}/{group}/{detector}.json      the target's input
    work_area/{instrument}/{day_obs}/{group}/{detector}/        scratch + stage records
    results/{instrument}/{day_obs}/{group}/{detector}/done.json the target
    results/{instrument}/{day_obs}/{group}/{detector}/failed.json  why it failed, if it did

Every stage runs inside `stage`, which times it and, when it fails, writes
``failed.json`` with the error class and whether a retry may help, so a summary can
count outcomes without parsing logs.  Prep and ingest run side by side, so two stages
of one attempt can fail: the first failure is the cause (prep's failure, not the
timeout ingest reaches later), and a failure stands when ``failed.json`` was written
after the failing stage started.  An older ``failed.json`` (an earlier attempt's) is
replaced.
"""

from __future__ import annotations

__all__ = [
    "TargetPaths",
    "existing_visit_files",
    "load_visit_file",
    "load_target_visit",
    "write_json",
    "log_to",
    "stage",
    "classify_error",
    "run_stage",
]

import dataclasses
import json
import logging
import os
import resource
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from workflow.core.exceptions import InvalidVisit, NonRetriableError, RetriableError
from workflow.core.identifiers import is_valid
from workflow.core.log_setup import configure_logging
from workflow.core.redact import redact_text
from workflow.core.timing import StageTime, timed
from workflow.core.visit import DetectorVisit
from workflow.stages.records import FailedRecord, StageRecord, StageResources, write_record

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TargetPaths:
    """Where one detector-visit's files live."""

    instrument: str
    day_obs: str
    group: str
    detector: int
    root: Path = Path(".")
    paths: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: {"results": "results", "work": "work_area", "visits": "visits"}
    )

    @property
    def _tail(self) -> Path:
        return Path(self.instrument, self.day_obs, self.group)

    @property
    def visit_file(self) -> Path:
        return self.root / self.paths["visits"] / self._tail / f"{self.detector}.json"

    @property
    def work_dir(self) -> Path:
        return self.root / self.paths["work"] / self._tail / str(self.detector)

    @property
    def result_dir(self) -> Path:
        return self.root / self.paths["results"] / self._tail / str(self.detector)

    @property
    def done_file(self) -> Path:
        return self.result_dir / "done.json"

    @property
    def failed_file(self) -> Path:
        return self.result_dir / "failed.json"

    def usage_file(self, stage: str) -> Path:
        """The stage's own usage TSV, beside Snakemake's ``benchmarks/<stage>/.../<detector>.tsv``."""
        return self.root / "benchmarks" / stage / self._tail / f"{self.detector}.stage.tsv"

    @classmethod
    def from_visit(cls, visit: DetectorVisit, config: Mapping[str, Any], root: Path = Path(".")) -> TargetPaths:
        """Paths of the target of a detector-visit."""
        return cls(visit.instrument, visit.day_obs, visit.groupId, visit.detector, root, config["paths"])

    @classmethod
    def from_visit_file(cls, path: str | Path, config: Mapping[str, Any]) -> TargetPaths:
        """Paths of a target given its visit file ``.../{inst}/{day_obs}/{group}/{det}.json``.

        Raises
        ------
        InvalidVisit
            If the path does not have that shape; the message names it.
        """
        path = Path(path)
        try:
            instrument, day_obs, group = path.parts[-4:-1]
            return cls(instrument, day_obs, group, int(path.stem), Path("."), config["paths"])
        except ValueError as exc:
            raise InvalidVisit(
                f"visit file {path}: expected .../{{instrument}}/{{day_obs}}/{{group}}/{{detector}}.json"
            ) from exc


def existing_visit_files(visits_root: str | Path, instrument: str) -> list[tuple[str, str, int]]:
    """Return ``(day_obs, group, detector)`` of every visit file of an instrument.

    Files whose day or group is not an allowed identifier (`workflow.core.identifiers`:
    no rule could build their target) are skipped with a warning.
    """
    root = Path(visits_root) / instrument
    found = []
    for path in sorted(root.glob("*/*/*.json")):
        if path.stem.isdigit():
            day_obs, group = path.parent.parent.name, path.parent.name
            if not (is_valid("day_obs", day_obs) and is_valid("group", group) and is_valid("detector", path.stem)):
                _log.warning("visit file %s skipped: its day, group or detector is not an allowed identifier", path)
                continue
            found.append((day_obs, group, int(path.stem)))
    return found


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically (temp file + rename): readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, prefix=".tmp-", suffix=".json") as tmp:
        json.dump(data, tmp, indent=1, sort_keys=True, default=str)
    os.replace(tmp.name, path)
    return path


def log_to(config: Mapping[str, Any], log: str | Path | None) -> None:
    """Send this stage's log records to ``log`` (its parent made), at the config's ``log_levels``; nothing if `None`."""
    if log:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        configure_logging(config["log_levels"], filename=str(log))


def load_visit_file(path: str | Path, *, expected_instrument: str | None = None) -> DetectorVisit:
    """Read a per-detector visit file.

    Raises
    ------
    InvalidVisit
        If the file is missing, not JSON, malformed, for another instrument than the
        run's, or its name disagrees with its content; the message names the file.
    """
    path = Path(path)
    try:
        visit = DetectorVisit.from_json(path.read_text())
    except OSError as exc:
        raise InvalidVisit(f"visit file {path}: cannot read: {exc}") from exc
    except InvalidVisit as exc:
        raise InvalidVisit(f"visit file {path}: {exc}") from exc
    if expected_instrument is not None and visit.instrument != expected_instrument:
        raise InvalidVisit(
            f"visit file {path}: instrument {visit.instrument!r} but this run is configured for {expected_instrument!r}"
        )
    if path.stem != str(visit.detector) or path.parent.name != visit.groupId:
        raise InvalidVisit(
            f"visit file {path}: holds group {visit.groupId} detector {visit.detector}, which does not match its path"
        )
    return visit


def load_target_visit(visit_file: str | Path, config: Mapping[str, Any]) -> DetectorVisit:
    """Read a target's visit file, which must be for the run's instrument (see `load_visit_file`)."""
    return load_visit_file(visit_file, expected_instrument=config["instrument"]["name"])


def classify_error(error: BaseException) -> dict[str, Any]:
    """Describe an error for the outcome records: class, retriable, message."""
    if isinstance(error, RetriableError):
        retriable: bool | None = True
    elif isinstance(error, NonRetriableError):
        retriable = False
    else:
        retriable = None  # unexpected: a bug until proven otherwise
    return {"error": type(error).__name__, "retriable": retriable, "message": redact_text(str(error))}


@contextmanager
def stage(target: TargetPaths, name: str) -> Iterator[StageTime]:
    """Run one stage of a target: time it, and record a failure if it raises.

    The exception is re-raised so that Snakemake fails the job (and only that
    target's chain).
    """
    context = {"instrument": target.instrument, "group": target.group, "detector": target.detector}
    started = time.time()
    try:
        with timed(name, **context) as record:
            yield record
    except BaseException as exc:
        failure = FailedRecord(
            **classify_error(exc),
            stage=name,
            instrument=target.instrument,
            day_obs=target.day_obs,
            group=target.group,
            detector=target.detector,
            seconds=round(record.wall_s, 3),
        )
        _record_first_failure(target.failed_file, failure, started)
        _log.error(
            "%s failed for %s group %s detector %s: %s: %s",
            name,
            target.instrument,
            target.group,
            target.detector,
            type(exc).__name__,
            exc,
        )
        raise


def _record_first_failure(path: Path, failure: FailedRecord, started: float) -> None:
    """Write ``failed.json`` unless a stage of the same attempt failed first.

    A ``failed.json`` modified after ``started`` was written by a stage running
    beside this one (prep beside ingest): its error came first and is the cause.
    The check and the write hold a lock on the result directory, so two stages
    failing at once keep exactly one record.
    """
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            earlier = path.stat().st_mtime >= started
        except FileNotFoundError:
            earlier = False
        if earlier:
            _log.info(
                "%s: %s failed after an earlier failure of this attempt; %s keeps that cause",
                path.parent,
                failure.stage,
                path.name,
            )
            return
        write_record(path, failure)
    finally:
        os.close(fd)  # releases the lock


def _usage_since(start: resource.struct_rusage, wall_s: float) -> StageResources:
    now = resource.getrusage(resource.RUSAGE_SELF)
    return StageResources(
        cpu_user_s=round(now.ru_utime - start.ru_utime, 3),
        cpu_sys_s=round(now.ru_stime - start.ru_stime, 3),
        max_rss_mb=round(now.ru_maxrss / 1024.0, 1),
        wall_s=round(wall_s, 3),
    )


def run_stage(
    name: str,
    *,
    visit: str,
    record: str,
    config: Mapping[str, Any],
    log: str | None,
    body: Callable[[TargetPaths], dict[str, Any]],
) -> StageRecord:
    """Run ``body(target)`` as stage ``name`` of the target of ``visit``; write and return its record.

    The body runs inside `stage` (timing; a failure writes ``failed.json`` and
    re-raises).  The record carries the body's payload, the stage's seconds and the
    resources this process used meanwhile (its own ``getrusage``: in a child forked
    by the stage server that is the stage itself; the peak RSS counts the pages the
    child shares with the server).

    Parameters
    ----------
    name : `str`
        Stage name (the rule's name, see `workflow.stages.STAGES`).
    visit : `str`
        The target's visit file.
    record : `str`
        Where the stage record goes.
    config : `~collections.abc.Mapping`
        Merged configuration.
    log : `str`, optional
        Log file of the rule (logging is configured to it).
    body : callable
        The stage's work; returns its payload.

    Returns
    -------
    stage_record : `workflow.stages.records.StageRecord`
    """
    log_to(config, log)
    target = TargetPaths.from_visit_file(visit, config)
    start = resource.getrusage(resource.RUSAGE_SELF)
    with stage(target, name) as timing:
        payload = body(target)
    result = StageRecord(
        stage=name, body=payload, seconds=timing.as_dict(), resources=_usage_since(start, timing.wall_s)
    )
    write_record(record, result)
    write_usage_tsv(target.usage_file(name), result.resources)
    return result


USAGE_COLUMNS = ("s", "cpu_user_s", "cpu_sys_s", "max_rss_mb")
"""Columns of a stage's own usage TSV (``s`` is wall seconds, as in Snakemake's benchmarks)."""


def write_usage_tsv(path: Path, usage: StageResources | None) -> None:
    """Write the stage's own resources as a one-row TSV beside Snakemake's benchmark of the job.

    Snakemake's benchmark measures the stage client (a stdlib process that waits on
    the stage server), not the forked stage; this file holds what the stage used.
    """
    if usage is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    row = (usage.wall_s, usage.cpu_user_s, usage.cpu_sys_s, usage.max_rss_mb)
    path.write_text("\t".join(USAGE_COLUMNS) + "\n" + "\t".join(f"{v:g}" for v in row) + "\n")
