"""Consumer watchdog: decide when a Kafka consumer is stuck and must be recreated.

A `stream_shim.consumer.ConsumeLoop` feeds its `ConsumerWatchdog` with what
happens (consumer created, partitions assigned or revoked, message handled,
broker error) and asks it, from the poll loop, whether to recreate the
consumer.  Three rules, with bounds from `WatchdogLimits`:

- no assignment ``assign_s`` after the consumer was created (or lost its
  partitions): the group never let it in;
- no progress for ``stall_s`` while the topic has new messages: an assigned
  partition's high watermark stays above the consumer's position (Tansu may
  report a high watermark *below* the true end, never above it, so this rule
  can miss a stall but does not invent one);
- broker errors for ``error_s`` (at least ``errors`` of them) with no success
  in between (a message, an assignment, a watermark read): a broker restart of
  a few seconds is left to librdkafka, which reconnects by itself faster than a
  new member joins.

Each broker error is counted ``kafka_error`` and each recreation
``consumer_restarted`` (category: the loop's name).  From a decision to recreate
until the new consumer is assigned and caught up (or handles a message), the
health condition ``consumer:<name>`` is ``degraded`` (`ShimStatus.set_condition`).
"""

from __future__ import annotations

__all__ = ["WatchdogLimits", "ConsumerWatchdog", "lagging_partitions"]

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from stream_shim.status import ShimStatus

_log = logging.getLogger(__name__)

_VALID_OFFSET = 0  # librdkafka's logical offsets (OFFSET_INVALID -1001, ...) are negative


@dataclasses.dataclass(frozen=True)
class WatchdogLimits:
    """Bounds of the watchdog's rules (seconds, unless said otherwise).

    Attributes
    ----------
    assign_s : `float`
        Longest wait for an assignment (Tansu assigns a new member in ~6-7 s).
    stall_s : `float`
        Longest time without progress while the topic has new messages.
    errors : `int`
        Least number of broker errors of the error rule.
    error_s : `float`
        How long broker errors must go on, with no success in between, before
        the consumer is recreated.
    check_s : `float`
        Interval between two looks at the high watermarks.
    min_restart_s : `float`
        Least time between two recreations (no restart storm while a broker is down).
    """

    assign_s: float = 20.0
    stall_s: float = 20.0
    errors: int = 5
    error_s: float = 15.0
    check_s: float = 2.0
    min_restart_s: float = 5.0


def lagging_partitions(consumer: Any, timeout_s: float = 2.0) -> list[tuple[int, int, int]]:
    """Return ``(partition, offset, high watermark)`` of the assigned partitions with new messages.

    The offset is the consumer's position, else (nothing consumed yet) the
    group's committed offset, else (nothing committed: ``earliest``) the low
    watermark; a partition counts when it is below the high watermark (asked
    from the broker, not cached).

    Parameters
    ----------
    consumer : `confluent_kafka.Consumer`
        An assigned consumer.
    timeout_s : `float`, optional
        Bound on each broker request.
    """
    assigned = consumer.assignment()
    if not assigned:
        return []
    positions = consumer.position(assigned)
    unknown = [part for part in positions if part.offset < _VALID_OFFSET]
    committed = (
        {part.partition: part.offset for part in consumer.committed(unknown, timeout=timeout_s)} if unknown else {}
    )
    lagging = []
    for part in positions:
        low, high = consumer.get_watermark_offsets(part, timeout=timeout_s, cached=False)
        offset = part.offset
        if offset < _VALID_OFFSET:
            offset = committed.get(part.partition, -1)
        if offset < _VALID_OFFSET:
            offset = low
        if high > offset:
            lagging.append((part.partition, offset, high))
    return lagging


class ConsumerWatchdog:
    """Rules and bookkeeping of one consumer's watchdog.

    Parameters
    ----------
    name : `str`
        The consumer loop's name (count category; condition ``consumer:<name>``).
    status : `stream_shim.status.ShimStatus`
        Counts and the health condition go here.
    limits : `WatchdogLimits`, optional
        Bounds of the rules.
    clock : callable, optional
        Monotonic clock in seconds (tests pass a fake one).
    """

    def __init__(
        self,
        name: str,
        status: ShimStatus,
        limits: WatchdogLimits | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name, self.status, self.limits, self.clock = name, status, limits or WatchdogLimits(), clock
        self.condition = f"consumer:{name}"
        self.is_assigned = False
        self.degraded = False
        now = clock()
        self._since = now  # creation, or loss of the assignment
        self._progress = now
        self._next_check = now
        self._last_restart = float("-inf")
        self._errors: list[float] = []  # times of the broker errors since the last success

    # -- events -------------------------------------------------------------------------

    def created(self) -> None:
        """Note that a new consumer was created (not assigned yet)."""
        now = self.clock()
        self.is_assigned = False
        self._since = self._progress = self._next_check = now
        self._errors = []

    def assigned(self) -> None:
        """Note that the consumer got its partitions."""
        self.is_assigned = True
        self._progress = self.clock()
        self._errors = []

    def revoked(self) -> None:
        """Note that the consumer lost its partitions (a rebalance follows)."""
        self.is_assigned = False
        self._since = self.clock()

    def progressed(self) -> None:
        """Note that a message was handled; ends a degraded period."""
        self._progress = self.clock()
        self._errors = []
        self._recovered("a message was handled")

    def error(self, error: Any) -> int:
        """Count one broker error (``kafka_error``); return how many came since the last success."""
        self.status.count(self.name, "kafka_error")
        self._errors.append(self.clock())
        return len(self._errors)

    # -- decisions ----------------------------------------------------------------------

    def check(self, consumer: Any) -> str | None:
        """Return why ``consumer`` must be recreated now, or `None`.

        Called from the poll loop after each poll; asks the broker for
        watermarks at most every ``check_s``.
        """
        now, limits = self.clock(), self.limits
        if now - self._last_restart < limits.min_restart_s:
            return None
        if len(self._errors) >= limits.errors and now - self._errors[0] > limits.error_s:
            return f"{len(self._errors)} broker errors in {now - self._errors[0]:.0f} s"
        if not self.is_assigned:
            if now - self._since > limits.assign_s:
                return f"no partition assignment within {limits.assign_s:g} s"
            return None
        if now < self._next_check:
            return None
        self._next_check = now + limits.check_s
        try:
            lagging = lagging_partitions(consumer, timeout_s=min(2.0, limits.check_s))
        except Exception as exc:  # noqa: BLE001 - a failed look is a broker error, not a verdict
            _log.debug("%s: cannot read watermarks: %s", self.name, exc)
            self.error(exc)
            return None
        self._errors = []  # the broker answered
        if not lagging:
            self._progress = now  # caught up: idle is not stalled
            self._recovered("caught up")
            return None
        if now - self._progress > limits.stall_s:
            where = ", ".join(f"partition {p} at {pos} of {high}" for p, pos, high in lagging)
            return f"no progress for {now - self._progress:.0f} s with new messages ({where})"
        return None

    def restarting(self, reason: str) -> None:
        """Record a recreation: count ``consumer_restarted``, raise the degraded condition."""
        self._last_restart = self.clock()
        self.status.count(self.name, "consumer_restarted")
        self.status.set_condition(self.condition, "degraded", f"consumer recreated: {reason}")
        self.degraded = True
        _log.warning("%s: recreating the Kafka consumer: %s", self.name, reason)

    def _recovered(self, why: str) -> None:
        if self.degraded:
            self.degraded = False
            self.status.set_condition(self.condition, None)
            _log.info("%s: consumer healthy again (%s)", self.name, why)
