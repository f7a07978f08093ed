"""Wall and CPU time of each stage, logged on ``timer.*`` loggers like Rubin's.

Every stage runs inside `timed`; the seconds go to the stage record (and from there
to the target summary) and to the logger ``timer.<name>`` at DEBUG, so operators
switch them on with ``log_levels: "timer=DEBUG"``.
"""

from __future__ import annotations

__all__ = ["StageTime", "timed"]

import dataclasses
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager


@dataclasses.dataclass
class StageTime:
    """Seconds spent in one stage."""

    name: str
    wall_s: float = 0.0
    cpu_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        """Return ``{"wall_s": ..., "cpu_s": ...}`` rounded to milliseconds."""
        return {"wall_s": round(self.wall_s, 3), "cpu_s": round(self.cpu_s, 3)}


@contextmanager
def timed(name: str, **context: object) -> Iterator[StageTime]:
    """Measure the enclosed block and log it on ``timer.<name>``.

    Parameters
    ----------
    name : `str`
        Stage name, e.g. ``"prep"`` or ``"pipeline.calibrate"``.
    **context
        Fields logged with the timing (instrument, group, detector, ...).

    Yields
    ------
    record : `StageTime`
        Filled in when the block exits (also when it raises).
    """
    record = StageTime(name)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    try:
        yield record
    finally:
        record.wall_s = time.perf_counter() - wall0
        record.cpu_s = time.process_time() - cpu0
        logging.getLogger(f"timer.{name}").debug(
            "%s took %.3f s wall, %.3f s CPU %s",
            name,
            record.wall_s,
            record.cpu_s,
            " ".join(f"{k}={v}" for k, v in context.items()),
        )
