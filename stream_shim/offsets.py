"""Which offsets of the work topic a worker may commit: the contiguous prefix of settled items.

A worker takes work items in offset order on each partition, but their targets end in
any order (a detector whose raw comes late ends after later ones).  Committing an
offset tells Kafka that everything before it is finished; so `OffsetTracker` keeps,
per partition, the items taken in order and commits only up to the first one still
unsettled.  A worker that dies loses nothing: whoever takes the partition over reads
again from that first unsettled item (at least once; finished targets are skipped
by their ``done.json``/``failed.json``).

Single-threaded: the worker's consumer thread calls every method.
"""

from __future__ import annotations

__all__ = ["OffsetTracker"]

import collections
import dataclasses
from collections.abc import Callable, Iterable


@dataclasses.dataclass
class _Taken:
    offset: int
    target: str | None  # None: dropped (bad item), settled at once
    settled: bool = False


class OffsetTracker:
    """Items taken per partition, and the offsets safe to commit.

    Attributes
    ----------
    committed : `dict` [`int`, `int`]
        Per partition, the last offset committed (the next item to read).
    """

    def __init__(self) -> None:
        self._taken: dict[int, collections.deque[_Taken]] = {}
        self._next: dict[int, int] = {}  # per partition: offset after the last item taken
        self.committed: dict[int, int] = {}

    def assign(self, partitions: Iterable[int]) -> None:
        """Start tracking ``partitions`` (a new assignment; known ones are kept)."""
        for partition in partitions:
            self._taken.setdefault(partition, collections.deque())

    def forget(self, partitions: Iterable[int]) -> None:
        """Stop tracking ``partitions`` (revoked or lost): their unsettled items are someone else's now."""
        for partition in partitions:
            self._taken.pop(partition, None)
            self._next.pop(partition, None)
            self.committed.pop(partition, None)

    def partitions(self) -> list[int]:
        """Return the partitions tracked."""
        return sorted(self._taken)

    def take(self, partition: int, offset: int, target: str | None) -> None:
        """Record an item taken: its target (`None` for a dropped item, settled at once).

        An offset at or before one already taken (a redelivery after a seek) is ignored.
        """
        queue = self._taken.setdefault(partition, collections.deque())
        if offset < self._next.get(partition, -1):
            return
        queue.append(_Taken(offset, target, settled=target is None))
        self._next[partition] = offset + 1

    def settle(self, is_settled: Callable[[str], bool]) -> None:
        """Mark settled every unsettled item whose target ``is_settled`` says has its outcome."""
        for queue in self._taken.values():
            for item in queue:
                if not item.settled and item.target is not None and is_settled(item.target):
                    item.settled = True

    def unsettled(self, partitions: Iterable[int] | None = None) -> list[str]:
        """Return the targets taken and not settled (of ``partitions``, default all), oldest first per partition."""
        chosen = self._taken if partitions is None else {p: self._taken.get(p, ()) for p in partitions}
        return [i.target for q in chosen.values() for i in q if not i.settled and i.target is not None]

    def in_flight(self) -> int:
        """Return how many items are taken and not settled."""
        return sum(not i.settled for q in self._taken.values() for i in q)

    def commit_points(self, partitions: Iterable[int] | None = None) -> dict[int, int]:
        """Return, per partition whose settled prefix grew, the offset to commit.

        The offset is the one after the last item of the contiguous settled
        prefix (Kafka's convention: the next offset to read).  Nothing changes
        until `committed_to` records the commit, so a failed commit is tried again.
        """
        points = {}
        for partition in self._taken if partitions is None else list(partitions):
            last = None
            for item in self._taken.get(partition, ()):
                if not item.settled:
                    break
                last = item.offset
            if last is not None and last + 1 > self.committed.get(partition, -1):
                points[partition] = last + 1
        return points

    def committed_to(self, points: dict[int, int]) -> int:
        """Record that ``points`` (from `commit_points`) were committed; return how many items that covered."""
        covered = 0
        for partition, offset in points.items():
            queue = self._taken.get(partition)
            while queue and queue[0].offset < offset:
                queue.popleft()
                covered += 1
            self.committed[partition] = max(offset, self.committed.get(partition, -1))
        return covered
