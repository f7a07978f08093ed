"""Targets the workflow cannot build: spot them in Snakemake's output, fail them alone.

One target that no rule produces must not stop the others.  The long-lived
Snakemake of the streaming design exits when a DAG update meets such a target
(``MissingInputException`` of the queue-fed rule, or ``MissingRuleException``);
`unbuildable_targets` reads which targets its output names, and `quarantine`
gives each its ``failed.json`` (a `workflow.stages.records.FailedRecord`,
``retriable=False``, stage ``snakemake``), so it is never fed again, nor resumed.
"""

from __future__ import annotations

__all__ = ["UNBUILDABLE", "INVALID_TARGET", "unbuildable_targets", "quarantine"]

import logging
import os
import re
from collections.abc import Collection, Iterable
from pathlib import Path, PurePosixPath

from stream_shim.target_store import PathOutsideRunDirError, contained_path
from workflow.core.identifiers import is_valid, target_key
from workflow.core.log_fields import shorten
from workflow.stages.records import FailedRecord, write_record

_log = logging.getLogger(__name__)

UNBUILDABLE = "UnbuildableTarget"
"""Error class of a target no rule can produce (``failed.json``'s ``error``)."""
INVALID_TARGET = "InvalidTarget"
"""Error class of a target whose path is not ``.../{instrument}/{day_obs}/{group}/{detector}/done.json``."""

_NO_RULE = re.compile(r"No rule to produce (\S+)")
_MISSING_INPUT = "MissingInputException in rule "
_AFFECTED = "affected files:"


def _affected_files(lines: Iterable[str]) -> list[str]:
    """Files Snakemake's error output says it cannot make."""
    found: list[str] = []
    in_exception = in_files = False
    for line in lines:
        stripped = line.strip()
        match = _NO_RULE.search(line)
        if match:
            found.append(match.group(1))
        if line.startswith(_MISSING_INPUT):
            in_exception, in_files = True, False
        elif in_exception and stripped == _AFFECTED:
            in_files = True
        elif in_files and line[:1].isspace() and stripped:
            found.append(stripped)
        elif in_files:
            in_exception = in_files = False
    return found


def _path_key(path: str) -> tuple[str, str, str, int] | None:
    """``(instrument, day_obs, group, detector)`` of any detector-visit path (visit file, work, results)."""
    parts = list(PurePosixPath(path).parts)
    if parts and parts[-1].endswith(".json") and parts[-1][:-5].isdigit():
        parts[-1] = parts[-1][:-5]  # visits/{inst}/{day}/{group}/{det}.json
    for i in range(len(parts) - 4, -1, -1):
        instrument, day_obs, group, detector = parts[i : i + 4]
        if (
            is_valid("instrument", instrument)
            and is_valid("day_obs", day_obs)
            and is_valid("group", group)
            and is_valid("detector", detector)
        ):
            return instrument, day_obs, group, int(detector)
    return None


def unbuildable_targets(lines: Iterable[str], candidates: Collection[str]) -> list[str]:
    """Return the candidates that Snakemake's output says it cannot build.

    Parameters
    ----------
    lines : iterable of `str`
        Snakemake's output (the end of it is enough).
    candidates : collection of `str`
        Targets fed to that Snakemake (``results/.../done.json``).

    Returns
    -------
    targets : `list` [`str`]
        Candidates named by a ``MissingInputException`` (the target itself, or an
        input of one of its jobs, such as its visit file) or a ``No rule to
        produce`` line, sorted; empty if the output names none.
    """
    by_path = {os.path.normpath(c): c for c in candidates}
    by_key = {}
    for candidate in candidates:
        key = target_key(candidate)
        if key is not None:
            by_key[key] = candidate
    found = set()
    for path in _affected_files(lines):
        target = by_path.get(os.path.normpath(path))
        if target is None:
            key = _path_key(path)
            target = by_key.get(key) if key is not None else None
        if target is not None:
            found.add(target)
    return sorted(found)


def quarantine(workdir: Path, target: str, *, error: str, message: str) -> FailedRecord | None:
    """Write ``failed.json`` beside a target that must not run again.

    Parameters
    ----------
    workdir : `pathlib.Path`
        The run directory (target paths are relative to it).
    target : `str`
        ``results/{instrument}/{day_obs}/{group}/{detector}/done.json``.
    error : `str`
        Error class recorded (`UNBUILDABLE`, `INVALID_TARGET`).
    message : `str`
        Why; recorded and logged.

    Returns
    -------
    record : `workflow.stages.records.FailedRecord` or `None`
        What was written, or `None` if the target's path is not a well-formed
        target inside the run directory (then nothing is written; logged).
    """
    key = target_key(target)
    if key is None:
        _log.error("target %s is not a well-formed target path; nothing written (%s)", shorten(target), message)
        return None
    try:
        failed = contained_path(workdir, Path(target).with_name("failed.json"))
    except PathOutsideRunDirError as exc:
        _log.error("target %s not quarantined: %s", shorten(target), exc)
        return None
    instrument, day_obs, group, detector = key
    record = FailedRecord(
        error=error,
        retriable=False,
        message=message,
        stage="snakemake",
        instrument=instrument,
        day_obs=day_obs,
        group=group,
        detector=detector,
    )
    write_record(failed, record)
    _log.error(
        "target %s quarantined (%s): %s; wrote %s",
        target,
        error,
        message,
        failed,
        extra={"instrument": instrument, "group": group, "detector": detector, "error": error},
    )
    return record
