"""Submit detector-visit targets once each, and follow them to their outcome.

`Submitter` sits between the consumers and a `stream_shim.backends.Backend`:

- dedupe: a target with ``done.json`` (finished) or ``failed.json`` (failed, with
  its classified error) is not submitted again, nor is one already in flight, so
  a redelivered next_visit or a journal replay never runs a target twice at once;
- batch per visit: a visit's targets go to the backend together;
- outcome: every ``poll_s`` it looks for the outcome files of the targets in
  flight, and records submit-to-outcome latency; a target whose run ended (or
  whose job Snakemake reported failed) without an outcome file is failed as
  ``NoOutcome`` after a short delay.
"""

from __future__ import annotations

__all__ = ["Submitter", "SubmitResult", "target_key"]

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from workflow.target import TargetPaths

from .backends import Backend, Batch
from .status import ShimStatus
from .target_store import LocalStore, TargetStore

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
    submitted: float
    ended_at: float | None = None
    reason: str = ""


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
    """

    def __init__(self, backend: Backend | None, status: ShimStatus, *, workdir: Path,
                 store: TargetStore | None = None, poll_s: float = 0.5) -> None:
        self.backend: Backend | None
        self.backend, self.status, self.workdir, self.poll_s = backend, status, Path(workdir), poll_s
        self.store: TargetStore = store if store is not None else LocalStore(self.workdir)
        self._lock = threading.Lock()
        self._flight: dict[str, _InFlight] = {}
        self._by_key: dict[tuple[str, str, str, int], str] = {}
        self._totals = {"submitted": 0, "done": 0, "failed": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._monitor, name="outcomes", daemon=True)
        status.gauge("targets", self.gauges)

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> None:
        """Start the backend and the outcome monitor."""
        if self.backend is None:
            raise RuntimeError("Submitter.start: no backend set")
        self.backend.start(self._ended, self._job_error)
        self._thread.start()

    def drain(self, grace_s: float, term_wait_s: float) -> None:
        """Let the backend finish within ``grace_s`` (then stop it); record the last outcomes."""
        if self.backend is not None:
            self.backend.drain(grace_s, term_wait_s)
        self._check_outcomes(final=True)
        self._stop.set()
        self._thread.join(timeout=5.0)

    # -- submission ---------------------------------------------------------------------

    def submit(self, targets: Sequence[TargetPaths], *, batch_id: str) -> SubmitResult:
        """Submit a visit's targets, skipping finished and in-flight ones.

        Parameters
        ----------
        targets : sequence of `workflow.target.TargetPaths`
            Paths relative to the working directory (``root`` ``.``).
        batch_id : `str`
            Name of the batch (the group id) for logs.
        """
        fresh, done, failed, flying = [], [], [], []
        now = time.time()
        with self._lock:
            for paths in targets:
                target = str(paths.done_file)
                if target in self._flight:
                    flying.append(target)
                elif self.store.exists(paths.done_file):
                    done.append(target)
                elif self.store.exists(paths.failed_file):
                    failed.append(target)
                else:
                    fresh.append(target)
                    self._flight[target] = _InFlight(target, batch_id, now)
                    self._by_key[target_key(target)] = target
            self._totals["submitted"] += len(fresh)
        for reason, items in (("submitted", fresh), ("already_done", done), ("already_failed", failed),
                              ("already_in_flight", flying)):
            if items:
                self.status.count("targets", reason, len(items))
        if fresh and self.backend is not None:
            self.backend.submit(Batch(batch_id, tuple(fresh)))
        return SubmitResult(tuple(fresh), tuple(done), tuple(failed), tuple(flying))

    def unfinished(self) -> list[str]:
        """Return the targets in flight (submitted, no outcome yet)."""
        with self._lock:
            return sorted(self._flight)

    def gauges(self) -> dict[str, int]:
        """Return targets by state, for the status report."""
        with self._lock:
            processes = self.backend.processes() if self.backend is not None else 0
            return {"in_flight": len(self._flight), "processes": processes, **self._totals}

    # -- outcomes -----------------------------------------------------------------------

    def _ended(self, targets: Sequence[str], reason: str) -> None:
        now = time.monotonic()
        with self._lock:
            for target in targets:
                if target in self._flight and self._flight[target].ended_at is None:
                    self._flight[target].ended_at, self._flight[target].reason = now, reason

    def _job_error(self, key: tuple[str, str, str, int]) -> None:
        with self._lock:
            target = self._by_key.get(key)
        if target is not None:
            self._ended([target], "snakemake reported a failed job")

    def _monitor(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._check_outcomes()
            except Exception:  # noqa: BLE001 - keep following targets whatever happens
                _log.exception("outcome check failed")

    def _check_outcomes(self, *, final: bool = False) -> None:
        with self._lock:
            flight = list(self._flight.values())
        for item in flight:
            outcome = self._outcome(item, final=final)
            if outcome is None:
                continue
            state, detail = outcome
            with self._lock:
                if self._flight.pop(item.target, None) is None:
                    continue
                self._by_key.pop(target_key(item.target), None)
                self._totals[state] += 1
            seconds = time.time() - item.submitted
            self.status.count("targets", state)
            if state == "failed":
                self.status.count("failures", str(detail.get("error")))
            self.status.observe("submit_to_outcome", seconds)
            instrument, day_obs, group, detector = target_key(item.target)
            log = _log.info if state == "done" else _log.warning
            log("target %s: %s in %.1f s%s", item.target, state, seconds,
                f" ({detail.get('stage')}: {detail.get('error')}: {detail.get('message')})" if state == "failed" else "",
                extra={"instrument": instrument, "group": group, "detector": detector, "outcome": state,
                       "seconds": round(seconds, 3), **({"error": detail.get("error"),
                                                         "retriable": detail.get("retriable")}
                                                        if state == "failed" else {})})

    def _outcome(self, item: _InFlight, *, final: bool) -> tuple[str, dict[str, Any]] | None:
        """``("done"|"failed", detail)`` if the target has an outcome now, else `None`."""
        done = Path(item.target)
        failed = done.with_name("failed.json")
        if self.store.exists(done):
            return "done", {}
        failed_at = self.store.mtime(failed)
        if failed_at is not None and failed_at >= item.submitted - 1.0:
            try:
                return "failed", self.store.read_json(failed)
            except (OSError, ValueError):
                pass  # being replaced: read it next time
        if item.ended_at is not None and (final or time.monotonic() - item.ended_at > _NO_OUTCOME_DELAY_S):
            return "failed", {"error": "NoOutcome", "retriable": None, "stage": "snakemake",
                              "message": f"run ended ({item.reason}) without done.json or failed.json"}
        return None
