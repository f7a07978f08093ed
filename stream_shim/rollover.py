"""Rollover of the streaming Snakemake: a fresh process every so many targets.

A long-lived ``snakemake`` fed from a queue keeps every job it ever ran in its
DAG and rebuilds the queue rule's job with every target so far at each queue
update: its CPU per target and its RSS grow with the targets it was fed.  So
`stream_shim.backends.StreamingBackend` feeds one process (a `Generation`) at
most ``threshold`` targets (`RolloverPolicy`), then starts a fresh one with the
same command line, feeds every new target to it, and closes the old one's
stdin (its queue's finish sentinel): the old process completes the targets it
has, then exits.  Until it does it is a retiree (`Retirees`): its targets are
its own, never fed to another process unless it dies without building them.

Both processes run in the same run directory with ``--nolock``, on disjoint
targets, hence disjoint jobs: every output of the workflow is under its
target's ``{instrument}/{day_obs}/{group}/{detector}`` (one target's jobs are
never another's).  The fresh process's ``--rerun-incomplete`` cannot touch the
old process's jobs in progress: Snakemake looks for incomplete outputs only
among the jobs of its own DAG, which holds only the targets it was fed, and
``.snakemake/incomplete`` markers are per output file, so the old process's
markers are outside the fresh one's DAG.
"""

from __future__ import annotations

__all__ = ["Generation", "Retirees", "RolloverPolicy"]

import dataclasses
import subprocess
import threading
import time
from typing import Any


@dataclasses.dataclass(eq=False)
class Generation:
    """One streaming Snakemake process and the targets fed to it.

    Attributes
    ----------
    proc : `subprocess.Popen`
        The process.
    started : `float`
        Monotonic time it was started.
    fed : `set` [`str`]
        Targets written to its stdin.
    output : `object`
        Its output filter (``tail`` holds its last lines).
    reader : `threading.Thread` or `None`
        The thread copying its output to the log; ends at the process's end of output.
    retired_at : `float` or `None`
        Monotonic time it was told to finish (rolled over).
    """

    proc: subprocess.Popen[str]
    started: float
    fed: set[str] = dataclasses.field(default_factory=set)
    output: Any = None
    reader: threading.Thread | None = None
    retired_at: float | None = None

    def exited(self) -> bool:
        """Return whether the process exited (its jobs may still hold its output open)."""
        return self.proc.poll() is not None

    def read_to_end(self, timeout_s: float = 5.0) -> None:
        """Wait (bounded) for its output to be read to the end: call after its jobs were stopped."""
        if self.reader is not None:
            self.reader.join(timeout=timeout_s)


@dataclasses.dataclass(frozen=True)
class RolloverPolicy:
    """When a streaming process has been fed enough targets.

    Attributes
    ----------
    threshold : `int` or `None`
        Targets fed to one process before a fresh one takes the new targets;
        `None` or 0: never roll over.
    """

    threshold: int | None = None

    def due(self, generation: Generation) -> bool:
        """Return whether ``generation`` was fed its share and must be rolled over."""
        return bool(self.threshold) and len(generation.fed) >= int(self.threshold or 0)


class Retirees:
    """Rolled-over streaming processes still finishing their targets (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[Generation] = []

    def add(self, generation: Generation) -> None:
        """Record ``generation`` as told to finish."""
        generation.retired_at = generation.retired_at or time.monotonic()
        with self._lock:
            self._items.append(generation)

    def owned(self) -> set[str]:
        """Return the targets fed to the retirees (no other process may be fed them)."""
        with self._lock:
            return set().union(*(g.fed for g in self._items))

    def ended(self) -> list[Generation]:
        """Remove and return the retirees that exited."""
        with self._lock:
            gone = [g for g in self._items if g.exited()]
            self._items = [g for g in self._items if g not in gone]
        return gone

    def all(self) -> list[Generation]:
        """Return the retirees still recorded."""
        with self._lock:
            return list(self._items)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
