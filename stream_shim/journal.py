"""The journal of accepted visits: what a restarted shim must finish.

The shim commits a next_visit's Kafka offset only after the visit's targets are
written, submitted and appended here (fsync'd).  On restart it reads the journal
and submits again every target that has neither ``done.json`` nor ``failed.json``,
so a crash between the commit and the end of the targets loses nothing; the
journal is then compacted to the visits still unfinished.

One JSON object per line::

    {"instrument": ..., "day_obs": ..., "group": ..., "detectors": [...],
     "accepted": <unix time>, "kafka": {"topic": ..., "partition": ..., "offset": ...}}
"""

from __future__ import annotations

__all__ = ["AcceptedVisit", "VisitJournal"]

import dataclasses
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AcceptedVisit:
    """One accepted visit, as journaled."""

    instrument: str
    day_obs: str
    group: str
    detectors: tuple[int, ...]
    accepted: float
    kafka: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the journal line's content."""
        return {**dataclasses.asdict(self), "detectors": list(self.detectors)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AcceptedVisit:
        """Read one journal line's content.

        Raises
        ------
        KeyError, TypeError, ValueError
            If a field is missing or mistyped.
        """
        return cls(
            instrument=str(data["instrument"]),
            day_obs=str(data["day_obs"]),
            group=str(data["group"]),
            detectors=tuple(int(d) for d in data["detectors"]),
            accepted=float(data["accepted"]),
            kafka=data.get("kafka"),
        )


class VisitJournal:
    """An append-only JSON-lines file of `AcceptedVisit`.

    Parameters
    ----------
    path : `str` or `pathlib.Path`
        The journal file (created with its directory on first append).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def append(self, visit: AcceptedVisit) -> None:
        """Append one visit and fsync, so it survives a crash right after."""
        line = json.dumps(visit.to_dict(), sort_keys=True) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as stream:
                stream.write(line)
                stream.flush()
                os.fsync(stream.fileno())

    def load(self) -> list[AcceptedVisit]:
        """Return the journaled visits, oldest first.

        A damaged line (e.g. the last one, torn by a crash mid-write) is
        logged and skipped.
        """
        with self._lock:
            try:
                lines = self.path.read_text().splitlines()
            except FileNotFoundError:
                return []
        visits = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                visits.append(AcceptedVisit.from_dict(json.loads(line)))
            except (ValueError, KeyError, TypeError) as exc:
                _log.warning("journal %s line %d unreadable, skipped: %s", self.path, number, exc)
        return visits

    def remove_target(self, instrument: str, day_obs: str, group: str, detector: int) -> bool:
        """Drop one detector-visit from the journal (a quarantined target); return whether it was there.

        The visit's other detectors stay; a visit left with none is dropped.
        """
        with self._lock:
            try:
                lines = self.path.read_text().splitlines()
            except FileNotFoundError:
                return False
        visits, found = [], False
        for line in lines:
            try:
                visit = AcceptedVisit.from_dict(json.loads(line))
            except (ValueError, KeyError, TypeError):
                continue
            if (visit.instrument, visit.day_obs, visit.group) == (instrument, day_obs, group) and (
                detector in visit.detectors
            ):
                found = True
                visit = dataclasses.replace(visit, detectors=tuple(d for d in visit.detectors if d != detector))
                if not visit.detectors:
                    continue
            visits.append(visit)
        if found:
            self.rewrite(visits)
            _log.info("journal %s: %s/%s/%s/%d removed", self.path, instrument, day_obs, group, detector)
        return found

    def rewrite(self, visits: Iterable[AcceptedVisit]) -> None:
        """Replace the journal by ``visits`` atomically (compaction)."""
        text = "".join(json.dumps(v.to_dict(), sort_keys=True) + "\n" for v in visits)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, prefix=".tmp-journal-") as tmp:
                tmp.write(text)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp.name, self.path)
