"""The pool's worker role: work items in, targets of one long-lived Snakemake out.

    python -m stream_shim --role worker --worker-id $POD_NAME --instrument LSSTCam \\
        --workdir /shared/run --state-dir /shared/run/workers/$POD_NAME --status-port 8080

A worker is the all-in-one shim (`stream_shim.service.StreamShim`: state-directory
lock, health checks, journal, raw arrival index, streaming Snakemake with its retry
lane, status server, drain) whose intake is the work topic instead of next_visit:

- `WorkItemHandler` takes one `stream_shim.work_items.WorkItem`: it writes the
  visit file in the shared run directory (workers share it as pods share a volume),
  journals the detector-visit, submits its target; a bad item is counted
  (``work_item_drops``/<reason>) and dropped, never retried;
- `stream_shim.work_consumer.WorkConsumer` consumes in group ``kafka.worker_group``
  with at most ``pool.max_inflight`` targets in flight, and commits per partition
  only the prefix of items whose target ended (at least once).

What differs from the shim, and why:

- every worker records every raw: its raw-notification consumer is in a group of
  its own (``{consumer_group}-raw-arrivals-{worker_id}``), its arrival index in its
  own state directory;
- its Snakemake jobs use its own warm stage server (``PROMPT_SNAKE_STAGE_SOCKET``,
  `stage_socket_for`), so a worker's death takes its stages with it, as a pod's does;
- no journal resume at start-up: Kafka redelivers what was not committed, to
  whichever worker holds the partition now; resuming the journal too would run a
  target on two workers at once.  The journal records what was taken;
- membership is dynamic unless ``pool.static_membership``: Tansu (the embedded
  broker) never hands a dead static member's partitions to another one (measured:
  not within 35 s), and the pool's point is that a live worker takes them over
  after ``session.timeout.ms``.
"""

from __future__ import annotations

__all__ = ["PoolWorker", "WorkItemHandler", "raw_group", "stage_socket_for"]

import collections
import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from stream_shim.consumer import consumer_settings
from stream_shim.fanout import ensure_work_topic
from stream_shim.journal import AcceptedVisit, VisitJournal
from stream_shim.raw_arrival import RawArrivals
from stream_shim.service import ShimOptions, StreamShim
from stream_shim.status import ShimStatus
from stream_shim.submission import Submitter
from stream_shim.target_store import PathOutsideRunDirError, TargetStore, contained_path
from stream_shim.work_consumer import WorkConsumer
from stream_shim.work_items import BadWorkItem, decode_work_item, work_topic
from workflow.core.log_fields import shorten
from workflow.core.visit import BaseVisit
from workflow.runtime.stage_client import SOCKET_ENV
from workflow.runtime.stage_socket import runtime_dir
from workflow.stages.target import TargetPaths

_log = logging.getLogger(__name__)

DROPS = "work_item_drops"
"""Status category of the items dropped, by reason."""
_WORKER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
_EARLY_CHECKED_GROUPS = 1000  # groups whose early-arrival check was made, remembered


def raw_group(config: Mapping[str, Any], worker_id: str) -> str:
    """Return the raw-notification consumer group of a worker: one per worker (each needs every raw)."""
    return f"{config['kafka']['consumer_group']}-raw-arrivals-{worker_id}"


def stage_socket_for(state_dir: Path) -> Path:
    """Return the worker's own stage server socket, in this user's private runtime directory.

    Not in the state directory: that may be on a shared volume (where UNIX sockets
    may not work) and deep enough to exceed a socket path's 108 bytes.
    """
    digest = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:12]
    return runtime_dir() / f"worker-{digest}.sock"


class WorkItemHandler:
    """Take work items: visit file, journal, submission.

    Parameters
    ----------
    config : `~collections.abc.Mapping`
        Merged configuration.
    submitter : `stream_shim.submission.Submitter`
        Where targets go.
    journal : `stream_shim.journal.VisitJournal`
        Where taken detector-visits are recorded.
    status : `stream_shim.status.ShimStatus`
        Drops are counted in `DROPS`.
    workdir : `pathlib.Path`
        The shared run directory.
    store : `stream_shim.target_store.TargetStore`
        Where visit files are written.
    on_first_of_group : callable, optional
        Called with the first item's visit of each group (the early-arrival check).
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        submitter: Submitter,
        journal: VisitJournal,
        status: ShimStatus,
        workdir: Path,
        store: TargetStore,
        on_first_of_group: Callable[[BaseVisit], object] | None = None,
    ) -> None:
        self.config, self.submitter, self.journal, self.status = config, submitter, journal, status
        self.workdir, self.store, self.on_first_of_group = Path(workdir), store, on_first_of_group
        self.instrument = config["instrument"]["name"]
        self._groups: collections.OrderedDict[str, None] = collections.OrderedDict()

    def __call__(self, message: Any) -> str | None:
        """Take one Kafka message; return its target, or `None` if dropped.

        Raises
        ------
        OSError
            If the visit file or the journal cannot be written (the item is taken again later).
        """
        kafka = {"topic": message.topic(), "partition": message.partition(), "offset": message.offset()}
        return self.take(message.value(), kafka=kafka)

    def take(self, value: bytes | str | None, *, kafka: dict[str, Any] | None = None) -> str | None:
        """Take one item's value; return its target (``results/.../done.json``), or `None` if dropped."""
        where = f"work item at {kafka}" if kafka else "work item"
        try:
            item = decode_work_item(value, where=where)
        except BadWorkItem as exc:
            return self._drop(exc.reason, str(exc))
        visit = item.visit
        context = {"instrument": visit.instrument, "group": visit.groupId, "detector": visit.detector}
        if visit.instrument != self.instrument:
            return self._drop(
                "other_instrument", f"{where}: instrument {visit.instrument!r}, this worker serves {self.instrument!r}"
            )
        paths = TargetPaths.from_visit(visit, self.config)
        try:
            contained_path(self.workdir, paths.visit_file)
        except PathOutsideRunDirError as exc:
            return self._drop("outside_run_dir", f"{where} group {shorten(visit.groupId)}: {exc}")
        self.store.write_json(paths.visit_file, visit.to_dict())
        self.journal.append(
            AcceptedVisit(
                instrument=visit.instrument,
                day_obs=visit.day_obs,
                group=visit.groupId,
                detectors=(visit.detector,),
                accepted=time.time(),
                kafka=kafka,
            )
        )
        result = self.submitter.submit([paths], batch_id=visit.groupId)
        _log.debug(
            "%s group %s detector %d: %s",
            visit.instrument,
            visit.groupId,
            visit.detector,
            "submitted" if result.submitted else "already ended or in flight",
            extra=context,
        )
        self._first_of_group(visit)
        return str(paths.done_file)

    def _first_of_group(self, visit: BaseVisit) -> None:
        if self.on_first_of_group is None or visit.groupId in self._groups:
            return
        self._groups[visit.groupId] = None
        while len(self._groups) > _EARLY_CHECKED_GROUPS:
            self._groups.popitem(last=False)
        try:
            self.on_first_of_group(visit)
        except Exception:  # noqa: BLE001 - an early-arrival check is best effort
            _log.exception("early-arrival check for group %s failed", visit.groupId)

    def _drop(self, reason: str, message: str) -> str | None:
        """Count and log a dropped item; return `None`, its "target" (nothing to wait for)."""
        self.status.count(DROPS, reason)
        _log.error("work item dropped (%s): %s", reason, message, extra={"reason": reason})
        return None


class PoolWorker(StreamShim):
    """One worker of the pool (see the module docstring).

    Parameters
    ----------
    options : `stream_shim.service.ShimOptions`
        Command-line options (normally the streaming design on profiles/local: the
        worker's pod runs its jobs itself).
    config : `~collections.abc.Mapping`
        Merged configuration.
    worker_id : `str`
        This worker's name (the pod's): its raw-notification group, its static
        member id (with ``pool.static_membership``), its logs.
    """

    intake_outlives_drain = True

    def __init__(self, options: ShimOptions, config: Mapping[str, Any], *, worker_id: str) -> None:
        if not _WORKER_ID.fullmatch(worker_id):
            raise ValueError(f"--worker-id {shorten(worker_id)}: expected letters, digits, '.', '_', '-' (a pod name)")
        super().__init__(options, config)
        self.worker_id = worker_id
        self.status.design = "worker"
        pool = config["pool"]
        self.topic = work_topic(config)
        max_inflight = pool.get("max_inflight")
        self.max_inflight = int(max_inflight) if max_inflight else self.max_targets
        self.stage_socket = stage_socket_for(self.state_dir)

    def _before_health_checks(self) -> None:
        # Before the health checks, which would create a missing work topic with one partition.
        ensure_work_topic(self.config["kafka"]["bootstrap"], self.topic, int(self.config["pool"]["partitions"]))

    def _health_topics(self) -> list[str]:
        topics = self.config["kafka_topics"]
        needed = [self.topic, topics["raw_notification"], topics["alerts"]]
        return needed + ([self.options.filer_topic] if self.options.filer_topic else [])

    def _raw_group(self) -> str:
        return raw_group(self.config, self.worker_id)

    def _child_env(self) -> dict[str, str]:
        return {**super()._child_env(), SOCKET_ENV: str(self.stage_socket)}

    def _own_export_spool(self) -> Path:
        # Workers may share a run directory (one claim for the pool): each writer its own spool.
        return self.state_dir / "export-spool"

    def _resume(self, submitter: Submitter) -> int:
        """Resume nothing: Kafka redelivers the uncommitted items (see the module docstring)."""
        visits = self.journal.load()
        if visits:
            self.journal.rewrite([])
            _log.info(
                "worker %s: journal of %d detector-visit(s) cleared; uncommitted ones come again from %s",
                self.worker_id,
                len(visits),
                self.topic,
            )
        return 0

    def _intake(
        self, arrivals: RawArrivals, intake_stop: threading.Event, stop_all: threading.Event, submitter: Submitter
    ) -> threading.Thread:
        config = self.config
        group = config["kafka"]["worker_group"]
        static = bool(config["pool"]["static_membership"])
        # roundrobin: consecutive partitions go to different workers (range would give the first worker
        # partitions 0..P/N-1, where a camera of fewer detectors than partitions puts all its items)
        session_ms = int(float(config["pool"]["session_timeout_s"]) * 1000)
        tuning = {
            "partition.assignment.strategy": "roundrobin",
            "session.timeout.ms": session_ms,
            "heartbeat.interval.ms": max(session_ms // 4, 100),
        }
        settings = consumer_settings(
            config["kafka"]["bootstrap"], group, member=self.worker_id, static=static, **tuning
        )
        handler = WorkItemHandler(
            config,
            submitter=submitter,
            journal=self.journal,
            status=self.status,
            workdir=self.workdir,
            store=self.store,
            on_first_of_group=arrivals.check_early,
        )
        _log.info(
            "worker %s: work topic %s, group %s, stage server %s", self.worker_id, self.topic, group, self.stage_socket
        )
        return WorkConsumer(
            settings,
            self.topic,
            take=handler,
            ended=submitter.ended,
            max_inflight=self.max_inflight,
            revoke_wait_s=float(config["pool"]["revoke_wait_s"]),
            intake_stop=intake_stop,
            stop=stop_all,
            status=self.status,
        )
