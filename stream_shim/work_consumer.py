"""The worker's consumer of the work topic: take items, bound what is in flight, commit what ended.

`WorkConsumer` polls the work topic in the worker group (``kafka.worker_group``) and
hands each message to a ``take`` callable (`stream_shim.worker.WorkItemHandler`),
which writes the visit file, journals and submits the target, and returns it
(`None` for a dropped item).  Then:

- offsets (`stream_shim.offsets.OffsetTracker`): per partition, only the contiguous
  prefix of items whose target ended (``ended``: done or failed for good) is
  committed, so a worker that dies loses nothing (at least once);
- admission control: with ``max_inflight`` targets taken and not ended, every
  assigned partition is paused (and the message polled meanwhile is put back with a
  seek): older detector-visits finish first, and the backlog stays in Kafka, where
  the consumer lag (what KEDA scales the pool on) shows it;
- rebalance: on revoke, items of the partitions going away are no longer taken; the
  consumer waits (at most ``revoke_wait_s``) for their targets to end, commits, and
  lets them go; on loss it lets them go without a commit;
- drain: once ``intake_stop`` is set it takes nothing more but keeps committing as
  targets end, until ``stop``; then a last commit and ``close`` (the group rebalances).

Counts go to the status category ``work_items`` (``taken``, ``committed``,
``paused``, ``resumed``, ``put_back``, ``handler_error``, ``commit_failed``,
``revoked``, ``lost``); gauge ``work_items`` shows ``in_flight``, ``max_inflight``,
``assigned_partitions``, ``paused_partitions``.
"""

from __future__ import annotations

__all__ = ["WorkConsumer"]

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from stream_shim.offsets import OffsetTracker
from stream_shim.status import ShimStatus

_log = logging.getLogger(__name__)

CATEGORY = "work_items"
_SETTLE_EVERY_S = 0.5


class WorkConsumer(threading.Thread):
    """Consume the work topic with bounded work in flight and contiguous-prefix commits.

    Parameters
    ----------
    settings : `~collections.abc.Mapping`
        Consumer settings (`stream_shim.consumer.consumer_settings`, group ``kafka.worker_group``).
    topic : `str`
        The work topic.
    take : callable
        ``take(message)`` handles one item and returns its target, or `None` if it
        was dropped; an exception puts the message back (it is taken again later).
    ended : callable
        ``ended(target)``: whether the target ended for good
        (`stream_shim.submission.Submitter.ended`).
    max_inflight : `int`
        Targets taken and not ended above which the partitions are paused.
    revoke_wait_s : `float`
        On revoke, how long to wait for the in-flight targets of the partitions going away.
    intake_stop : `threading.Event`
        Take nothing more (drain); keep committing.
    stop : `threading.Event`
        Commit a last time and leave.
    status : `stream_shim.status.ShimStatus`
        Counts and gauges go here.

    Attributes
    ----------
    failed : `BaseException` or `None`
        Why the consumer ended by itself (the service then stops).
    assigned : `threading.Event`
        Set once it got partitions.
    """

    def __init__(
        self,
        settings: Mapping[str, Any],
        topic: str,
        *,
        take: Callable[[Any], str | None],
        ended: Callable[[str], bool],
        max_inflight: int,
        revoke_wait_s: float,
        intake_stop: threading.Event,
        stop: threading.Event,
        status: ShimStatus,
    ) -> None:
        super().__init__(name="detector_visit", daemon=True)
        if max_inflight < 1:
            raise ValueError(f"pool.max_inflight {max_inflight}: must be >= 1")
        self.settings, self.topic, self._take, self._ended = dict(settings), topic, take, ended
        self.max_inflight, self.revoke_wait_s = int(max_inflight), float(revoke_wait_s)
        self.intake_stop, self.stop, self.status = intake_stop, stop, status
        self.tracker = OffsetTracker()
        self.failed: BaseException | None = None
        self.assigned = threading.Event()
        self._paused = False
        self._last_settle = 0.0
        self._gauges: dict[str, int] = {"in_flight": 0, "max_inflight": self.max_inflight}
        self._gauges |= {"assigned_partitions": 0, "paused_partitions": 0}
        status.gauge(CATEGORY, lambda: dict(self._gauges))

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> None:
        from confluent_kafka import Consumer

        try:
            consumer = Consumer({**self.settings, "error_cb": self._on_error})
        except Exception as exc:  # noqa: BLE001 - reported by the service
            self.failed = exc
            return
        try:
            consumer.subscribe(
                [self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
            )
            _log.info(
                "consuming %s as group %s (at most %d target(s) in flight)",
                self.topic,
                self.settings["group.id"],
                self.max_inflight,
            )
            while not self.stop.is_set():
                message = consumer.poll(0.5)
                if message is not None and message.error() is not None:
                    _log.warning("%s: Kafka error: %s", self.topic, message.error())
                elif message is not None:
                    self._handle(consumer, message)
                self._step(consumer)
            self._step(consumer, force=True)
        except Exception as exc:  # noqa: BLE001 - reported by the service, which stops
            self.failed = exc
            _log.exception("%s consumer stopped", self.topic)
        finally:
            try:
                consumer.close()
            except Exception as exc:  # noqa: BLE001 - a consumer that cannot close is dropped anyway
                _log.warning("%s: closing the consumer failed: %s", self.topic, exc)

    def _step(self, consumer: Any, *, force: bool = False) -> None:
        """Every half second: settle ended targets, commit, pause or resume."""
        now = time.monotonic()
        if force or now - self._last_settle >= _SETTLE_EVERY_S:
            self._last_settle = now
            self.tracker.settle(self._ended)
            self._commit(consumer, self.tracker.commit_points())
        self._admit(consumer)
        self._gauges.update(
            in_flight=self.tracker.in_flight(),
            assigned_partitions=len(self.tracker.partitions()),
            paused_partitions=len(self.tracker.partitions()) if self._paused else 0,
        )

    def _full(self) -> bool:
        return self.intake_stop.is_set() or self.tracker.in_flight() >= self.max_inflight

    def _handle(self, consumer: Any, message: Any) -> None:
        partition, offset = message.partition(), message.offset()
        if partition not in self.tracker.partitions():
            return  # a late message of a partition given away
        if self._full():
            self._put_back(consumer, message)
            return
        try:
            target = self._take(message)
        except Exception:  # noqa: BLE001 - an item must not stop the worker: taken again later
            _log.exception(
                "%s: taking offset %d of partition %d failed; it is taken again", self.topic, offset, partition
            )
            self.status.count(CATEGORY, "handler_error")
            self._put_back(consumer, message)
            self.stop.wait(1.0)
            return
        self.tracker.take(partition, offset, target)
        self.status.count(CATEGORY, "taken" if target is not None else "dropped")

    def _put_back(self, consumer: Any, message: Any) -> None:
        """Pause, then rewind the partition to ``message``: it is polled again after the resume."""
        from confluent_kafka import TopicPartition

        self._pause(consumer)
        consumer.seek(TopicPartition(self.topic, message.partition(), message.offset()))
        self.status.count(CATEGORY, "put_back")

    def _admit(self, consumer: Any) -> None:
        if self._full():
            self._pause(consumer)
        elif self._paused:
            assignment = consumer.assignment()
            if assignment:
                consumer.resume(assignment)
            self._paused = False
            self.status.count(CATEGORY, "resumed")

    def _pause(self, consumer: Any) -> None:
        if self._paused:
            return
        assignment = consumer.assignment()
        if assignment:
            consumer.pause(assignment)
        self._paused = True
        self.status.count(CATEGORY, "paused")
        _log.info(
            "%s: %d target(s) in flight (at most %d)%s: %d partition(s) paused",
            self.topic,
            self.tracker.in_flight(),
            self.max_inflight,
            ", draining" if self.intake_stop.is_set() else "",
            len(assignment),
        )

    def _commit(self, consumer: Any, points: dict[int, int]) -> bool:
        """Commit ``points`` (partition -> next offset) synchronously; return whether it worked."""
        if not points:
            return True
        from confluent_kafka import KafkaException, TopicPartition

        try:
            consumer.commit(
                offsets=[TopicPartition(self.topic, p, o) for p, o in sorted(points.items())], asynchronous=False
            )
        except KafkaException as exc:
            self.status.count(CATEGORY, "commit_failed")
            _log.warning("%s: commit of %s failed (tried again): %s", self.topic, points, exc)
            return False
        self.status.count(CATEGORY, "committed", self.tracker.committed_to(points))
        _log.debug("%s: committed %s", self.topic, points)
        return True

    # -- rebalance callbacks (called inside poll, in this thread) ---------------------

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        numbers = sorted(tp.partition for tp in partitions)
        self.tracker.assign(numbers)
        self._paused = False  # a fresh assignment fetches; _admit pauses it again if full
        self.assigned.set()
        _log.info("%s: assigned partition(s) %s", self.topic, numbers)

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        numbers = sorted(tp.partition for tp in partitions)
        deadline = time.monotonic() + self.revoke_wait_s
        waiting = self.tracker.unsettled(numbers)
        if waiting:
            _log.info(
                "%s: partition(s) %s revoked with %d target(s) in flight; waiting up to %.0f s for them",
                self.topic,
                numbers,
                len(waiting),
                self.revoke_wait_s,
            )
        while waiting and time.monotonic() < deadline and not self.stop.wait(_SETTLE_EVERY_S):
            self.tracker.settle(self._ended)
            waiting = self.tracker.unsettled(numbers)
        self.tracker.settle(self._ended)
        self._commit(consumer, self.tracker.commit_points(numbers))
        left = self.tracker.unsettled(numbers)
        if left:
            _log.warning(
                "%s: let go of partition(s) %s with %d target(s) not ended (their next worker takes them again)",
                self.topic,
                numbers,
                len(left),
            )
        self.tracker.forget(numbers)
        self.status.count(CATEGORY, "revoked", len(numbers))

    def _on_lost(self, consumer: Any, partitions: list[Any]) -> None:
        numbers = sorted(tp.partition for tp in partitions)
        _log.warning("%s: partition(s) %s lost (no commit: their next worker takes them again)", self.topic, numbers)
        self.tracker.forget(numbers)
        self.status.count(CATEGORY, "lost", len(numbers))

    def _on_error(self, error: Any) -> None:
        _log.warning("%s: Kafka error: %s", self.topic, error)
