"""A small on-disk index of raw arrivals, written by the stream shim, read by ingest.

The stream shim hears of every new raw from the raw-notification topic and
records it here, one tiny JSON file per raw under
``<root>/<instrument>/<day_obs>/<detector>/``.  Ingest (`workflow.stages.ingest.RawFinder`)
then looks in its own detector's directory instead of listing the raw bucket
on every poll: a day's listing holds every raw of the night (800 visits x 189
detectors at LSSTCam), a detector's directory a few hundred entries.

The index is an accelerator, never the truth: a raw whose notification was
missed is still found by the occasional bucket listing that ingest keeps doing.
Where the index lives is handed to Snakemake's jobs in the environment variable
`ENV_VAR` (read at call time, never at import); without it ingest lists the bucket.
"""

from __future__ import annotations

__all__ = ["ENV_VAR", "Arrival", "ArrivalIndex", "normalize_day_obs"]

import dataclasses
import json
import logging
import os
import tempfile
import time
import urllib.parse
from pathlib import Path

_log = logging.getLogger(__name__)

ENV_VAR = "PROMPT_SNAKE_ARRIVALS_DIR"
"""Environment variable naming the index root for Snakemake's jobs."""


def normalize_day_obs(day_obs: str | int) -> str:
    """Return ``YYYY-MM-DD`` for a day given as ``YYYYMMDD`` or ``YYYY-MM-DD``.

    Raises
    ------
    ValueError
        If ``day_obs`` is neither form.
    """
    text = str(day_obs).replace("-", "")
    if len(text) != 8 or not text.isdigit():
        raise ValueError(f"day_obs {day_obs!r}: expected YYYYMMDD or YYYY-MM-DD")
    return f"{text[:4]}-{text[4:6]}-{text[6:]}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Arrival:
    """One raw recorded in the index."""

    key: str
    """Object key in the raw bucket."""
    bucket: str
    """Bucket name."""
    detector: int
    """Detector id."""
    received: float
    """Unix time at which the notification (or listing) told us about it."""
    size: int | None = None
    """Object size in bytes, if the notification said."""
    source: str = "notification"
    """``notification`` or ``listing`` (found by the early-arrival check)."""


class ArrivalIndex:
    """The index under one root directory.

    Parameters
    ----------
    root : `str` or `pathlib.Path`
        Directory of the index (created on first record).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def from_environment(cls) -> ArrivalIndex | None:
        """Return the index named by `ENV_VAR`, or `None` if it is unset or empty."""
        root = os.environ.get(ENV_VAR)
        return cls(root) if root else None

    def _dir(self, instrument: str, day_obs: str | int, detector: int) -> Path:
        return self.root / instrument / normalize_day_obs(day_obs) / str(int(detector))

    @staticmethod
    def _name(key: str) -> str:
        return urllib.parse.quote(key, safe="") + ".json"

    def record(self, instrument: str, day_obs: str | int, arrival: Arrival) -> bool:
        """Record one arrival; return `False` if it was already recorded.

        The entry is written atomically (temporary file, then rename), so a
        reader never sees half of one.
        """
        directory = self._dir(instrument, day_obs, arrival.detector)
        path = directory / self._name(arrival.key)
        if path.exists():
            return False
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, prefix=".tmp-") as tmp:
            json.dump(dataclasses.asdict(arrival), tmp)
        os.replace(tmp.name, path)
        return True

    def arrivals(self, instrument: str, day_obs: str | int, detector: int) -> list[Arrival]:
        """Return the arrivals recorded for one detector and day, oldest first."""
        directory = self._dir(instrument, day_obs, detector)
        try:
            names = [p for p in directory.iterdir() if p.suffix == ".json" and not p.name.startswith(".tmp-")]
        except FileNotFoundError:
            return []
        found = []
        for path in names:
            try:
                found.append(Arrival(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError) as exc:  # a damaged entry: skip it, ingest lists anyway
                _log.warning("arrival index entry %s unreadable: %s", path, exc)
        return sorted(found, key=lambda a: (a.received, a.key))

    def keys(self, instrument: str, day_obs: str | int, detector: int) -> list[str]:
        """Return the object keys recorded for one detector and day."""
        return [a.key for a in self.arrivals(instrument, day_obs, detector)]

    def prune(self, older_than_s: float, *, now: float | None = None) -> int:
        """Delete day directories whose newest entry is older than ``older_than_s``; return how many."""
        now = time.time() if now is None else now
        removed = 0
        for day in sorted(self.root.glob("*/*")):
            entries = list(day.rglob("*.json"))
            if entries and max(p.stat().st_mtime for p in entries) >= now - older_than_s:
                continue
            for path in entries:
                path.unlink(missing_ok=True)
            for sub in sorted(day.glob("*"), reverse=True):
                if sub.is_dir():
                    sub.rmdir()
            day.rmdir()
            removed += 1
        return removed
