"""The typed records that carry a detector-visit through the DAG, written and read here only.

Three kinds of JSON file, each with a ``schema_version``:

- a **stage record** (``work_area/.../{stage}.json``): the stage's name, its own
  payload (``body``: the prep manifest, the raws found, the pipeline's products...),
  its timing and, when the stage server ran it, the forked stage's own resources;
- the target's **done record** (``results/.../done.json``): the outcome summary;
- the target's **failed record** (``results/.../failed.json``): the classified error.

A file written by another version of this module (or by hand) is refused with a
`RecordVersionError` that names the file, so a reader never guesses at a layout.
"""

from __future__ import annotations

__all__ = [
    "NO_OUTCOME",
    "RECORD_SCHEMA_VERSION",
    "DoneRecord",
    "FailedRecord",
    "Outcome",
    "RecordFormatError",
    "RecordVersionError",
    "StageRecord",
    "StageResources",
    "failed_from_dict",
    "read_done",
    "read_failed",
    "read_stage_record",
    "write_record",
]

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, TypeVar

from workflow.core.exceptions import NonRetriableError

RECORD_SCHEMA_VERSION = 1
"""Version of the three record layouts; bump it when a field changes meaning."""

NO_OUTCOME = "NoOutcome"
"""Error class of a target whose run ended with neither ``done.json`` nor ``failed.json``
(its job was killed or failed outside a stage); given by the shim's submitter and by replay."""


class RecordFormatError(NonRetriableError, ValueError):
    """A record file is missing, not JSON, or lacks the fields of its kind."""


class RecordVersionError(RecordFormatError):
    """A record file was written with a schema version this code does not read."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageResources:
    """What the forked stage itself used (from its own ``getrusage``), not the stage client."""

    cpu_user_s: float
    cpu_sys_s: float
    max_rss_mb: float
    wall_s: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageRecord:
    """One stage's output record: the next stages' input."""

    stage: str
    body: dict[str, Any]
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    resources: StageResources | None = None
    schema_version: int = RECORD_SCHEMA_VERSION


@dataclasses.dataclass(frozen=True, kw_only=True)
class DoneRecord:
    """A finished target's summary (``done.json``)."""

    instrument: str
    day_obs: str
    group: str
    detector: int
    outcome: str
    pipeline: str | None
    attempts: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    stage_seconds: dict[str, float | None] = dataclasses.field(default_factory=dict)
    stage_resources: dict[str, StageResources] = dataclasses.field(default_factory=dict)
    counts: dict[str, Any] = dataclasses.field(default_factory=dict)
    exported: list[str] = dataclasses.field(default_factory=list)
    apdb: dict[str, Any] = dataclasses.field(default_factory=dict)
    schema_version: int = RECORD_SCHEMA_VERSION


@dataclasses.dataclass(frozen=True, kw_only=True)
class FailedRecord:
    """Why a target failed (``failed.json``): the error class, and whether a retry may help."""

    error: str
    retriable: bool | None
    message: str
    stage: str
    instrument: str
    day_obs: str
    group: str
    detector: int
    seconds: float | None = None
    schema_version: int = RECORD_SCHEMA_VERSION

    # The fields a done record has, so outcome readers treat both kinds alike.
    outcome = "failed"
    pipeline = None

    @property
    def stage_seconds(self) -> dict[str, float | None]:
        """No stage finished the chain: empty."""
        return {}

    @property
    def apdb(self) -> dict[str, Any]:
        """Nothing reached the APDB through this record: empty."""
        return {}

    @property
    def stage_resources(self) -> dict[str, StageResources]:
        """The failed target's stage records are not gathered: empty."""
        return {}


_Record = TypeVar("_Record", StageRecord, DoneRecord, FailedRecord)


def write_record(path: str | Path, record: StageRecord | DoneRecord | FailedRecord) -> Path:
    """Write a record atomically (temp file + rename): readers never see half a file.

    Parameters
    ----------
    path : `str` or `pathlib.Path`
        Destination; its directory is created.
    record : `StageRecord`, `DoneRecord` or `FailedRecord`
        The record.

    Returns
    -------
    path : `pathlib.Path`
        The file written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dataclasses.asdict(record)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, prefix=".tmp-", suffix=".json") as tmp:
        json.dump(data, tmp, indent=1, sort_keys=True, default=str)
    os.replace(tmp.name, path)
    return path


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise RecordFormatError(f"record {path}: cannot read: {exc}") from exc
    except ValueError as exc:
        raise RecordFormatError(f"record {path}: not JSON: {exc}") from exc
    return _checked(path, data)


def _checked(path: Path | str, data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise RecordFormatError(f"record {path}: expected a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    if version != RECORD_SCHEMA_VERSION:
        raise RecordVersionError(
            f"record {path}: schema_version {version!r}, this code reads version {RECORD_SCHEMA_VERSION} "
            "(rerun the target with this version, or read it with the version that wrote it)"
        )
    return data


def _resources(data: Any) -> StageResources | None:
    return None if data is None else StageResources(**data)


def _build(kind: type[_Record], path: Path | str, data: dict[str, Any]) -> _Record:
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise RecordFormatError(f"record {path}: unknown field(s) {unknown} for a {kind.__name__}")
    try:
        return kind(**data)
    except TypeError as exc:
        raise RecordFormatError(f"record {path}: not a {kind.__name__}: {exc}") from exc


def read_stage_record(path: str | Path, stage: str | None = None) -> StageRecord:
    """Read a stage record.

    Parameters
    ----------
    path : `str` or `pathlib.Path`
        The record file.
    stage : `str`, optional
        The stage that must have written it.

    Returns
    -------
    record : `StageRecord`

    Raises
    ------
    RecordFormatError
        Unreadable, not a stage record, or written by another stage than ``stage``.
    RecordVersionError
        Another schema version.
    """
    path = Path(path)
    data = _load(path)
    data["resources"] = _resources(data.get("resources"))
    record = _build(StageRecord, path, data)
    if stage is not None and record.stage != stage:
        raise RecordFormatError(f"record {path}: written by stage {record.stage!r}, expected {stage!r}")
    return record


def read_done(path: str | Path) -> DoneRecord:
    """Read a ``done.json``; raise `RecordFormatError` / `RecordVersionError` naming it."""
    path = Path(path)
    data = _load(path)
    data["stage_resources"] = {k: StageResources(**v) for k, v in (data.get("stage_resources") or {}).items()}
    return _build(DoneRecord, path, data)


def read_failed(path: str | Path) -> FailedRecord:
    """Read a ``failed.json``; raise `RecordFormatError` / `RecordVersionError` naming it."""
    path = Path(path)
    return _build(FailedRecord, path, _load(path))


def failed_from_dict(data: Any, where: str) -> FailedRecord:
    """Return the failed record held by ``data`` (JSON read elsewhere, e.g. from S3); ``where`` names it."""
    return _build(FailedRecord, where, _checked(where, data))


Outcome = DoneRecord | FailedRecord
"""A target's outcome record: ``done.json`` or ``failed.json``."""
