"""Submit detector-visit targets once each, and follow them to their outcome.

`Submitter` sits between the consumers and a `stream_shim.backends.Backend`:

- dedupe: a target with ``done.json`` (finished) or ``failed.json`` (failed, with
  its classified error) is not submitted again, nor is one already in flight, so
  a redelivered next_visit or a journal replay never runs a target twice at once;
- batch per visit: a visit's targets go to the backend together;
- outcome: every ``poll_s`` it looks for the outcome files of the targets in
  flight, and records submit-to-outcome latency; a target whose run ended (or
  whose job Snakemake reported failed) without an outcome file is failed as
  ``NoOutcome`` after a short delay;
- admission (``max_in_flight``): beyond that many targets in flight, a visit's new
  targets wait in a first-in first-out queue (counted ``held``) and enter as older
  ones end, so under overload the oldest visits, whose alerts are due first,
  finish first, and no target already started waits behind a newer one;
- retry (`stream_shim.retry_policy.RetryPolicy`): a target failed retriably, or
  without an outcome, stays in flight and is submitted again after a back-off,
  its stale ``failed.json`` removed first; each retry is counted
  (``retries``/<error class>) and logged; after the last attempt the failure
  stands.  Retries go to ``retry_backend`` when there is one (the streaming
  design: its long-lived Snakemake never reruns a job that failed in it).
"""

from __future__ import annotations

__all__ = ["Submitter", "SubmitResult", "target_key"]

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from stream_shim.backends import Backend, Batch
from stream_shim.retry_policy import NO_OUTCOME, RetryPolicy
from stream_shim.status import ShimStatus
from stream_shim.target_store import LocalStore, TargetStore
from workflow.stages.records import FailedRecord, RecordVersionError, failed_from_dict
from workflow.stages.target import TargetPaths

_log = logging.getLogger(__name__)

_NO_OUTCOME_DELAY_S = 3.0  # after a run ended, how long an outcome file may take to appear


def target_key(target: str) -> tuple[str, str, str, int]:
    """Return ``(instrument, day_obs, group, detector)`` of ``results/.../{detector}/done.json``."""
    parts = Path(target).parts
    return parts[-5], parts[-4], parts[-3], int(parts[-2])


@dataclasses.dataclass(frozen=True)
class SubmitResult:
    """What `Submitter.submit` did with a visit's targets."""

    submitted: tuple[str, ...]
    already_done: tuple[str, ...]
    already_failed: tuple[str, ...]
    in_flight: tuple[str, ...]


@dataclasses.dataclass
class _InFlight:
    target: str
    batch_id: str
    submitted: float  # wall time of the latest submission (failed.json mtimes are compared with it)
    ended_at: float | None = None
    reason: str = ""
    attempt: int = 1
    first_submitted: float = 0.0
    ends_pending: int = 0  # runs whose end the backend will still report (an earlier attempt's is stale)
    retry_at: float | None = None  # monotonic time of the next attempt, while backing off
    failure: FailedRecord | None = None  # why the last attempt failed, while backing off

    def __post_init__(self) -> None:
        self.first_submitted = self.first_submitted or self.submitted


def _reports_ends(backend: Backend | None) -> bool:
    """Whether a backend calls ``on_ended`` once per submitted target (not the streaming design)."""
    return backend is not None and backend.name != "streaming"


class Submitter:
    """Dedupe, batch and follow targets for one backend.

    Parameters
    ----------
    backend : `stream_shim.backends.Backend` or `None`
        How Snakemake runs (may be set later, before `start`, as ``backend``).
    status : `stream_shim.status.ShimStatus`
        Counts and latencies go here.
    workdir : `pathlib.Path`
        Snakemake's working directory: target paths are relative to it.
    store : `stream_shim.target_store.TargetStore`, optional
        Where outcome files are (default: under ``workdir``).
    poll_s : `float`, optional
        How often outcome files are looked for.
    retry : `stream_shim.retry_policy.RetryPolicy`, optional
        When failed targets are submitted again (default: never).
    retry_backend : `stream_shim.backends.Backend`, optional
        Where retries go (default: ``backend``); started and drained with it.
    max_in_flight : `int`, optional
        Admission: most targets in flight (submitted to a backend, no outcome yet);
        newer ones wait their turn.  Default: no limit.
    """

    def __init__(
        self,
        backend: Backend | None,
        status: ShimStatus,
        *,
        workdir: Path,
        store: TargetStore | None = None,
        poll_s: float = 0.5,
        retry: RetryPolicy | None = None,
        retry_backend: Backend | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError(f"max_in_flight {max_in_flight}: expected at least 1 (or None: no limit)")
        self.max_in_flight = max_in_flight
        self._held: collections.deque[tuple[str, str]] = collections.deque()  # (batch id, target), oldest first
        self._held_set: set[str] = set()
        self.backend: Backend | None
        self.backend, self.status, self.workdir, self.poll_s = backend, status, Path(workdir), poll_s
        self.store: TargetStore = store if store is not None else LocalStore(self.workdir)
        self.retry = retry if retry is not None else RetryPolicy(max_attempts=1)
        self.retry_backend = retry_backend
        self._lock = threading.Lock()
        self._flight: dict[str, _InFlight] = {}
        self._by_key: dict[tuple[str, str, str, int], str] = {}
        self._totals = {"submitted": 0, "done": 0, "failed": 0, "retried": 0}
        self._gave_up: set[str] = set()  # failed for good with no failed.json (NoOutcome after the last attempt)
        self._cut_short: set[str] = set()  # failed, a retry due, but stopping: not ended for good
        self._draining = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._monitor, name="outcomes", daemon=True)
        status.gauge("targets", self.gauges)

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> None:
        """Start the backend and the outcome monitor."""
        if self.backend is None:
            raise RuntimeError("Submitter.start: no backend set")
        self.backend.start(self._ended, self._job_error)
        if self.retry_backend is not None:
            self.retry_backend.start(self._ended, self._job_error)
        self._thread.start()

    def drain(self, grace_s: float, term_wait_s: float) -> None:
        """Let the backends finish within ``grace_s`` (then stop them); record the last outcomes.

        No retry starts once draining: a failure waiting for its retry stands.
        """
        self._draining.set()
        lane = None
        if self.retry_backend is not None:
            retry_backend = self.retry_backend
            lane = threading.Thread(target=retry_backend.drain, args=(grace_s, term_wait_s), name="drain-retries")
            lane.start()
        if self.backend is not None:
            self.backend.drain(grace_s, term_wait_s)
        if lane is not None:
            lane.join()
        self._check_outcomes(final=True)
        self._stop.set()
        self._thread.join(timeout=5.0)

    # -- submission ---------------------------------------------------------------------

    def submit(self, targets: Sequence[TargetPaths], *, batch_id: str) -> SubmitResult:
        """Submit a visit's targets, skipping finished and in-flight ones.

        Parameters
        ----------
        targets : sequence of `workflow.stages.target.TargetPaths`
            Paths relative to the working directory (``root`` ``.``).
        batch_id : `str`
            Name of the batch (the group id) for logs.
        """
        fresh, done, failed, flying = [], [], [], []
        with self._lock:
            for paths in targets:
                target = str(paths.done_file)
                if target in self._flight or target in self._held_set:
                    flying.append(target)
                elif self.store.exists(paths.done_file):
                    done.append(target)
                elif self.store.exists(paths.failed_file):
                    failed.append(target)
                else:
                    fresh.append(target)
                    self._held.append((batch_id, target))
                    self._held_set.add(target)
                    self._gave_up.discard(target)
        for reason, items in (
            ("already_done", done),
            ("already_failed", failed),
            ("already_in_flight", flying),
        ):
            if items:
                self.status.count("targets", reason, len(items))
        self._admit()
        with self._lock:
            waiting = len(self._held_set.intersection(fresh))
        if waiting:  # counted once per target: it waits for older visits' targets to end
            self.status.count("targets", "held", waiting)
            _log.warning(
                "admission: %d of %d target(s) of %s held: in flight is at submission.max_in_flight (%d)",
                waiting,
                len(fresh),
                batch_id,
                self.max_in_flight,
            )
        return SubmitResult(tuple(fresh), tuple(done), tuple(failed), tuple(flying))

    def _admit(self) -> None:
        """Submit held targets, oldest first, while there is room in flight (a batch per visit)."""
        batches: dict[str, list[str]] = {}
        with self._lock:
            room = len(self._held) if self.max_in_flight is None else self.max_in_flight - len(self._flight)
            now = time.time()
            while self._held and room > 0:
                batch_id, target = self._held.popleft()
                self._held_set.discard(target)
                self._flight[target] = _InFlight(target, batch_id, now, ends_pending=int(_reports_ends(self.backend)))
                self._by_key[target_key(target)] = target
                batches.setdefault(batch_id, []).append(target)
                room -= 1
            admitted = sum(len(b) for b in batches.values())
            self._totals["submitted"] += admitted
            held = len(self._held)
        if admitted:
            self.status.count("targets", "submitted", admitted)
            if held:
                _log.info("admission: %d target(s) submitted, %d still held until older ones end", admitted, held)
        if self.backend is not None:
            for batch_id, batch in batches.items():
                self.backend.submit(Batch(batch_id, tuple(batch)))

    def unfinished(self, *, first_attempts_only: bool = False) -> list[str]:
        """Return the targets in flight (submitted, no outcome yet; retries included).

        Parameters
        ----------
        first_attempts_only : `bool`, optional
            Leave out the targets backing off or retried on ``retry_backend``: what a
            restarted streaming Snakemake is fed again.
        """
        with self._lock:
            if first_attempts_only and self.retry_backend is not None:
                return sorted(t for t, item in self._flight.items() if item.attempt == 1 and item.retry_at is None)
            if first_attempts_only:  # what a restarted backend is fed: not the held ones, never submitted
                return sorted(self._flight)
            return sorted([*self._flight, *self._held_set])

    def ended(self, target: str) -> bool:
        """Return whether ``target`` ended for good: not in flight, and done or failed.

        Failed means a ``failed.json``, or no outcome file after the last attempt.
        A failure that stands only because the submitter stopped before its
        retry is not an end: the pool's worker does not commit it, so the
        next worker of its partition tries again.

        Parameters
        ----------
        target : `str`
            The target (``results/.../done.json``), as submitted.
        """
        with self._lock:
            if target in self._flight or target in self._held_set or target in self._cut_short:
                return False
            if target in self._gave_up:
                return True
        done = Path(target)
        return self.store.exists(done) or self.store.exists(done.with_name("failed.json"))

    def gauges(self) -> dict[str, int]:
        """Return targets by state, for the status report."""
        with self._lock:
            processes = sum(b.processes() for b in (self.backend, self.retry_backend) if b is not None)
            retrying = sum(item.retry_at is not None for item in self._flight.values())
            return {
                "in_flight": len(self._flight),
                "held": len(self._held),
                "backing_off": retrying,
                "processes": processes,
                **self._totals,
            }

    # -- outcomes -----------------------------------------------------------------------

    def _ended(self, targets: Sequence[str], reason: str) -> None:
        now = time.monotonic()
        with self._lock:
            for target in targets:
                item = self._flight.get(target)
                if item is None:
                    continue
                if item.retry_at is not None or item.ends_pending > 1:
                    item.ends_pending = max(item.ends_pending - 1, 0)  # the end of an earlier attempt's run
                    continue
                item.ends_pending = 0
                if item.ended_at is None:
                    item.ended_at, item.reason = now, reason

    def _job_error(self, key: tuple[str, str, str, int]) -> None:
        with self._lock:
            target = self._by_key.get(key)
            item = self._flight.get(target) if target is not None else None
            if item is None or item.retry_at is not None or (item.attempt > 1 and self.retry_backend is not None):
                return  # job errors come from the primary (streaming) backend: not this attempt's
            if item.ended_at is None:
                item.ended_at, item.reason = time.monotonic(), "snakemake reported a failed job"

    def _monitor(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._check_outcomes()
            except Exception:  # noqa: BLE001 - keep following targets whatever happens
                _log.exception("outcome check failed")

    def _check_outcomes(self, *, final: bool = False) -> None:
        stopping = final or self._draining.is_set()  # no retry starts
        now = time.monotonic()
        with self._lock:
            flight = list(self._flight.values())
        due = []
        for item in flight:
            if item.retry_at is not None:  # backing off: its last failure stands if the shim stops
                if stopping and item.failure is not None:
                    with self._lock:
                        self._cut_short.add(item.target)
                    self._finish(item, "failed", item.failure)
                elif now >= item.retry_at:
                    due.append(item)
                continue
            outcome = self._outcome(item, final=final)
            if outcome is None:
                continue
            state, detail = outcome
            if detail is not None and self.retry.should_retry(detail, item.attempt):
                if not stopping:
                    self._back_off(item, detail)
                    continue
                with self._lock:
                    self._cut_short.add(item.target)
            elif detail is not None and detail.error == NO_OUTCOME:
                with self._lock:
                    self._gave_up.add(item.target)
            self._finish(item, state, detail)
        if due:
            self._resubmit(due)
        if not stopping:
            self._admit()

    def _log_extra(self, item: _InFlight, **fields: object) -> dict[str, object]:
        instrument, _, group, detector = target_key(item.target)
        return {"instrument": instrument, "group": group, "detector": detector, "attempt": item.attempt, **fields}

    def _finish(self, item: _InFlight, state: str, detail: FailedRecord | None) -> None:
        """Record a target's final outcome and stop following it."""
        with self._lock:
            if self._flight.pop(item.target, None) is None:
                return
            self._by_key.pop(target_key(item.target), None)
            self._totals[state] += 1
        seconds = time.time() - item.first_submitted
        self.status.count("targets", state)
        if detail is not None:
            self.status.count("failures", detail.error)
        self.status.observe("submit_to_outcome", seconds)
        log = _log.info if detail is None else _log.warning
        log(
            "target %s: %s in %.1f s%s%s",
            item.target,
            state,
            seconds,
            f" after {item.attempt} attempts" if item.attempt > 1 else "",
            f" ({detail.stage}: {detail.error}: {detail.message})" if detail is not None else "",
            extra=self._log_extra(
                item,
                outcome=state,
                seconds=round(seconds, 3),
                **({"error": detail.error, "retriable": detail.retriable} if detail is not None else {}),
            ),
        )

    def _back_off(self, item: _InFlight, failure: FailedRecord) -> None:
        """Keep a retriably failed target in flight; `_resubmit` submits it after the back-off."""
        delay = self.retry.delay_s(item.attempt)
        with self._lock:
            if item.target not in self._flight:
                return
            item.retry_at, item.failure = time.monotonic() + delay, failure
        _log.warning(
            "target %s: attempt %d of %d failed (%s: %s: %s); retrying in %.1f s",
            item.target,
            item.attempt,
            self.retry.max_attempts,
            failure.stage,
            failure.error,
            failure.message,
            delay,
            extra=self._log_extra(item, error=failure.error, retriable=failure.retriable, backoff_s=delay),
        )

    def _resubmit(self, due: Sequence[_InFlight]) -> None:
        """Submit targets whose back-off is over, a batch per visit, after removing their stale failed.json."""
        backend = self.retry_backend if self.retry_backend is not None else self.backend
        batches: dict[tuple[str, int], list[str]] = {}
        for item in due:
            done = Path(item.target)
            if self.store.exists(done):  # finished meanwhile (e.g. fed again to a restarted Snakemake)
                with self._lock:
                    item.retry_at = None
                continue
            failure = item.failure
            assert failure is not None
            try:
                self.store.remove(done.with_name("failed.json"))
            except Exception as exc:  # noqa: BLE001 - cannot retry: the failure stands
                _log.error("target %s: cannot remove the stale failed.json, not retrying: %s", item.target, exc)
                self._finish(item, "failed", failure)
                continue
            with self._lock:
                if item.target not in self._flight:
                    continue
                item.attempt += 1
                item.retry_at, item.failure, item.ended_at, item.reason = None, None, None, ""
                item.submitted = time.time()
                item.ends_pending += int(_reports_ends(backend))
                self._totals["retried"] += 1
            self.status.count("retries", failure.error)
            _log.info(
                "target %s: attempt %d of %d submitted (after %s)",
                item.target,
                item.attempt,
                self.retry.max_attempts,
                failure.error,
                extra=self._log_extra(item, error=failure.error),
            )
            batches.setdefault((item.batch_id, item.attempt), []).append(item.target)
        if backend is None:
            return
        for (batch_id, attempt), targets in batches.items():
            backend.submit(Batch(f"{batch_id}-attempt{attempt}", tuple(targets)))

    def _outcome(self, item: _InFlight, *, final: bool) -> tuple[str, FailedRecord | None] | None:
        """``("done"|"failed", detail)`` if the target has an outcome now, else `None`."""
        done = Path(item.target)
        failed = done.with_name("failed.json")
        if self.store.exists(done):
            return "done", None
        failed_at = self.store.mtime(failed)
        if failed_at is not None and failed_at >= item.submitted - 1.0:
            try:
                return "failed", failed_from_dict(self.store.read_json(failed), str(failed))
            except RecordVersionError as exc:  # written by another version: failed, and say why
                instrument, day_obs, group, detector = target_key(item.target)
                return "failed", FailedRecord(
                    error=type(exc).__name__,
                    retriable=False,
                    stage="snakemake",
                    message=str(exc),
                    instrument=instrument,
                    day_obs=day_obs,
                    group=group,
                    detector=detector,
                )
            except (OSError, ValueError):
                pass  # being replaced: read it next time
        if item.ended_at is not None and (final or time.monotonic() - item.ended_at > _NO_OUTCOME_DELAY_S):
            instrument, day_obs, group, detector = target_key(item.target)
            return "failed", FailedRecord(
                error=NO_OUTCOME,
                retriable=None,
                stage="snakemake",
                message=f"run ended ({item.reason}) without done.json or failed.json",
                instrument=instrument,
                day_obs=day_obs,
                group=group,
                detector=detector,
            )
        return None
