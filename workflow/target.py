"""One detector-visit target: its paths, its visit, and its stage records.

Paths (relative to the run directory, from the ``paths`` config section)::

    visits/{instrument}/{day_obs}/{group}/{detector}.json      the target's input
    work_area/{instrument}/{day_obs}/{group}/{detector}/        scratch + stage records
    results/{instrument}/{day_obs}/{group}/{detector}/done.json the target
    results/{instrument}/{day_obs}/{group}/{detector}/failed.json  why it failed, if it did

Every stage runs inside `stage`, which times it and, when it fails, writes
``failed.json`` with the error class and whether a retry may help, so a summary can
count outcomes without parsing logs.
"""

from __future__ import annotations

__all__ = [
    "TargetPaths",
    "existing_visit_files",
    "load_visit_file",
    "write_json",
    "read_json",
    "stage",
    "classify_error",
]

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .exceptions import InvalidVisit, NonRetriableError, RetriableError
from .timing import StageTime, timed
from .visit import DetectorVisit

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
    """Return ``(day_obs, group, detector)`` of every visit file of an instrument."""
    root = Path(visits_root) / instrument
    found = []
    for path in sorted(root.glob("*/*/*.json")):
        if path.stem.isdigit():
            found.append((path.parent.parent.name, path.parent.name, int(path.stem)))
    return found


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically (temp file + rename): readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, prefix=".tmp-", suffix=".json") as tmp:
        json.dump(data, tmp, indent=1, sort_keys=True, default=str)
    os.replace(tmp.name, path)
    return path


def read_json(path: str | Path) -> Any:
    """Read a JSON file."""
    with open(path) as stream:
        return json.load(stream)


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
            f"visit file {path}: instrument {visit.instrument!r} but this run is configured "
            f"for {expected_instrument!r}"
        )
    if path.stem != str(visit.detector) or path.parent.name != visit.groupId:
        raise InvalidVisit(
            f"visit file {path}: holds group {visit.groupId} detector {visit.detector}, "
            "which does not match its path"
        )
    return visit


def classify_error(error: BaseException) -> dict[str, Any]:
    """Describe an error for the outcome records: class, retriable, message."""
    if isinstance(error, RetriableError):
        retriable: bool | None = True
    elif isinstance(error, NonRetriableError):
        retriable = False
    else:
        retriable = None  # unexpected: a bug until proven otherwise
    return {"error": type(error).__name__, "retriable": retriable, "message": str(error)}


@contextmanager
def stage(target: TargetPaths, name: str) -> Iterator[StageTime]:
    """Run one stage of a target: time it, and record a failure if it raises.

    The exception is re-raised so that Snakemake fails the job (and only that
    target's chain).
    """
    context = {"instrument": target.instrument, "group": target.group, "detector": target.detector}
    try:
        with timed(name, **context) as record:
            yield record
    except BaseException as exc:
        failure = {**classify_error(exc), "stage": name, **context, "day_obs": target.day_obs,
                   "seconds": round(record.wall_s, 3)}
        write_json(target.failed_file, failure)
        _log.error("%s failed for %s group %s detector %s: %s: %s", name, target.instrument,
                   target.group, target.detector, type(exc).__name__, exc)
        raise
