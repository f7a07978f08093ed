"""Crash loops of the long-lived Snakemake: spotting one, and finding the target behind it.

`CrashLoop` counts quick exits in a row of the streaming Snakemake (each lived
less than ``stable_s``); ``exits`` of them in a row are a crash loop.
`find_culprits` then bisects the suspects (the targets without an outcome)
with a probe, a ``snakemake --dry-run`` of a subset: a subset whose DAG builds
holds no culprit; a single target whose DAG does not is one.
"""

from __future__ import annotations

__all__ = ["CrashLoop", "find_culprits"]

import logging
from collections.abc import Callable, Sequence

_log = logging.getLogger(__name__)

Probe = Callable[[Sequence[str]], bool | None]
"""``probe(targets)``: `True` if Snakemake can build them, `False` if not, `None` to give up."""


class CrashLoop:
    """Quick exits in a row of a supervised process.

    Parameters
    ----------
    exits : `int`
        Quick exits in a row that make a crash loop.
    stable_s : `float`
        A process that lived this long ends the run of quick exits.
    """

    def __init__(self, exits: int = 3, stable_s: float = 60.0) -> None:
        self.exits, self.stable_s = exits, stable_s
        self.quick = 0

    def exited(self, lived_s: float) -> bool:
        """Record an exit after ``lived_s`` seconds; return whether the process is in a crash loop."""
        self.quick = self.quick + 1 if lived_s < self.stable_s else 0
        return self.quick >= self.exits

    def reset(self) -> None:
        """Forget the quick exits (the cause was found and removed)."""
        self.quick = 0


def find_culprits(suspects: Sequence[str], probe: Probe) -> list[str] | None:
    """Return the suspects that Snakemake cannot build, by bisection.

    Parameters
    ----------
    suspects : sequence of `str`
        Targets that may cause the crashes.
    probe : callable
        See `Probe`.

    Returns
    -------
    culprits : `list` [`str`] or `None`
        The targets whose probe fails alone (empty if all of them build
        together: the crashes have another cause), or `None` if the probe gave up.
    """

    def search(group: Sequence[str]) -> list[str] | None:
        ok = probe(group)
        if ok is None:
            return None
        if ok:
            return []
        if len(group) == 1:
            return list(group)
        half = len(group) // 2
        found = []
        for part in (group[:half], group[half:]):
            culprits = search(part)
            if culprits is None:
                return None
            found += culprits
        return found

    if not suspects:
        return []
    culprits = search(list(suspects))
    _log.info("crash-loop search over %d target(s): culprit(s) %s", len(suspects), culprits)
    return culprits
