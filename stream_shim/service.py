"""The stream shim service: wiring, start-up, resume, and graceful shutdown.

Start-up: take the state directory's lock (one shim per run directory), run the
health checks, kill what a crashed predecessor left running, start Snakemake
(`stream_shim.backends`), submit again the unfinished targets of the journal,
then consume three topics, each in its own thread:

- next_visit -> `stream_shim.consumer.NextVisitHandler` (targets before the raws);
- raw notifications -> `stream_shim.raw_arrival.RawArrivals` (the arrival index);
- optionally SeaweedFS filer events -> `stream_shim.bridge.FilerBridge`.

Shutdown (the ``stop`` event, set by the signal handlers of ``__main__``): stop
taking next_visits, let Snakemake finish within the grace period, stop it
(SIGTERM, then SIGKILL of its process group), stop the other consumers, write
the final status.  Whatever did not finish is in the journal for the next run.
"""

from __future__ import annotations

__all__ = ["DESIGNS", "ShimOptions", "StreamShim"]

import dataclasses
import functools
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from stream_shim.backends import Backend, StreamingBackend, SubprocessPoolBackend
from stream_shim.bridge import bridge_for_config
from stream_shim.consumer import ConsumeLoop, NextVisitHandler, consumer_settings
from stream_shim.export_writer_child import (
    ExportWriterChild,
    adopt_orphaned_requests,
    live_export_overrides,
    wants_export_writer,
)
from stream_shim.health import run_health_checks
from stream_shim.journal import AcceptedVisit, VisitJournal
from stream_shim.process_group import ChildRegistry
from stream_shim.queue_runner import write_wrapper_snakefile
from stream_shim.raw_arrival import RawArrivals
from stream_shim.retry_policy import RetryPolicy
from stream_shim.state_lock import take_state_lock
from stream_shim.status import ShimStatus, StatusServer, StatusWriter
from stream_shim.submission import Submitter
from stream_shim.target_store import (
    LocalStore,
    PathOutsideRunDirError,
    TargetStore,
    contained_path,
    store_for_profile,
)
from workflow.core.arrivals import ENV_VAR, ArrivalIndex
from workflow.core.buckets import open_bucket
from workflow.core.config import instrument_config_path
from workflow.core.exceptions import InvalidIdentifier
from workflow.core.identifiers import check_identifier
from workflow.core.instrument import instrument_for_run
from workflow.runtime.snakemake_runner import is_kubernetes_profile, snakemake_command, snakemake_entry
from workflow.runtime.versions import check_startup
from workflow.stages.records import FailedRecord
from workflow.stages.target import TargetPaths

_log = logging.getLogger(__name__)

DESIGNS = ("streaming", "subprocess")
"""Submission designs: one long-lived Snakemake fed targets, or one Snakemake per batch."""
_ARRIVALS_KEEP_S = 3 * 86400.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShimOptions:
    """How the shim runs (the command line's options).

    Attributes
    ----------
    instrument : `str`
        Instrument served (its shipped config file is used).
    workdir : `pathlib.Path`
        Run directory: Snakemake's ``--directory``; the config's relative paths are under it.
    profile : `str`
        Snakemake profile (``profiles/local`` or ``profiles/k8s``).
    config_files : `tuple` [`pathlib.Path`, ...]
        Extra config files merged after the instrument's (absolute paths).
    state_dir : `pathlib.Path` or `None`
        Journal, status, logs, arrival index (default ``<workdir>/shim``).
    design : `str`
        One of `DESIGNS`; ``subprocess`` is forced with ``profiles/k8s``.
    filer_topic : `str` or `None`
        If set, run the bridge from this SeaweedFS filer topic.
    status_port : `int` or `None`
        Serve status over HTTP on this port (0: any).
    status_host : `str`
        Address the status server binds (``0.0.0.0`` in a pod, for its probes).
    grace_s, term_wait_s : `float`
        Shutdown: time for Snakemake to finish, then between SIGTERM and SIGKILL.
    health_check : `bool`
        Run the start-up health checks.
    max_concurrent_targets : `int` or `None`
        Overrides ``submission.max_concurrent_targets``.
    snakefile : `pathlib.Path` or `None`
        Snakefile (default: the checkout's).  With ``profiles/k8s`` Snakemake ships
        the sources below its working directory to the pods: run the shim in a
        checkout (``--workdir`` = the Snakefile's directory).
    storage_prefix, storage_endpoint_url : `str` or `None`
        Override the profile's ``default-storage-prefix`` and ``storage-s3-endpoint-url``.
    snakemake_args : `tuple` [`str`, ...]
        Further Snakemake flags, passed on as they are.
    """

    instrument: str
    workdir: Path
    profile: str = "profiles/local"
    config_files: tuple[Path, ...] = ()
    state_dir: Path | None = None
    design: str = "streaming"
    filer_topic: str | None = None
    status_port: int | None = None
    status_host: str = "127.0.0.1"
    grace_s: float = 60.0
    term_wait_s: float = 10.0
    health_check: bool = True
    max_concurrent_targets: int | None = None
    snakefile: Path | None = None
    storage_prefix: str | None = None
    storage_endpoint_url: str | None = None
    snakemake_args: tuple[str, ...] = ()


class StreamShim:
    """One shim run.

    Parameters
    ----------
    options : `ShimOptions`
        Command-line options.
    config : `~collections.abc.Mapping`
        Merged configuration of the instrument (with the extra files).
    """

    def __init__(self, options: ShimOptions, config: Mapping[str, Any]) -> None:
        self.options, self.config = options, config
        self.workdir = Path(options.workdir).resolve()
        self.state_dir = Path(options.state_dir or self.workdir / "shim").resolve()
        self.k8s = is_kubernetes_profile(options.profile)
        self.design = "subprocess" if self.k8s else options.design
        if self.design not in DESIGNS:
            raise ValueError(f"design {options.design!r}: expected one of {DESIGNS}")
        self.max_targets = int(options.max_concurrent_targets or config["submission"]["max_concurrent_targets"])
        self.status = ShimStatus(config["instrument"]["name"], self.design)
        self.journal = VisitJournal(self.state_dir / "journal.jsonl")
        self.registry = ChildRegistry(self.state_dir / "children.json")
        self.index = ArrivalIndex(self.state_dir / "arrivals")
        self.store: TargetStore = store_for_profile(
            options.profile,
            self.workdir,
            storage_prefix=options.storage_prefix,
            endpoint_url=options.storage_endpoint_url,
        )
        self._lock_file: IO[str] | None = None
        self.submitter: Submitter | None = None
        self.export_writer: ExportWriterChild | None = None
        self._live_configfiles: list[Path] = []  # the shim's own config layers (batched export)

    # -- pieces -------------------------------------------------------------------------

    def _take_lock(self) -> None:
        self._lock_file = take_state_lock(self.state_dir, "stream shim")

    def _command(
        self,
        targets: Sequence[str],
        cores: int | None,
        extra: list[str],
        *,
        snakefile: Path | None = None,
        entry: list[str] | None = None,
    ) -> list[str]:
        flags = ["--nolock", "--rerun-incomplete", "--set-threads", "ingest=0", *extra, *self.options.snakemake_args]
        if cores is not None:
            flags += ["--cores", str(cores)]
        if self.options.storage_prefix:
            flags += ["--default-storage-prefix", self.options.storage_prefix]
        if self.options.storage_endpoint_url:
            flags += ["--storage-s3-endpoint-url", self.options.storage_endpoint_url]
        return snakemake_command(
            list(targets),
            profile=self.options.profile,
            snakefile=snakefile or self.options.snakefile,
            entry=entry,
            configfiles=self._configfiles(),
            directory=self.workdir,
            extra=flags,
        )

    def _configfiles(self) -> list[Path]:
        """Config files of the shim's Snakemakes (and writer): instrument, extra files, the shim's layers."""
        instrument_file = instrument_config_path(self.config["instrument"]["name"])
        return [Path(instrument_file), *self.options.config_files, *self._live_configfiles]

    def _start_export_writer(self) -> None:
        """With ``export.mode`` auto or batched and a local spool: batched export and the node's writer."""
        if not wants_export_writer(self.config, local_store=isinstance(self.store, LocalStore)):
            return
        from workflow.stages.export import spool_dir

        own = self._own_export_spool()
        self._live_configfiles = [live_export_overrides(self.state_dir, own)]
        spool = own or spool_dir(self.config)
        if own is not None:  # a pool worker: what a dead sibling left pending is ours to commit
            adopted = adopt_orphaned_requests(self.state_dir, own)
            if adopted:
                self.status.count("export_writer", "adopted", adopted)
        self.export_writer = ExportWriterChild(
            self._configfiles(),
            workdir=self.workdir,
            spool=spool if spool.is_absolute() else self.workdir / spool,
            log_path=self.state_dir / "logs" / "export-writer.log",
            registry=self.registry,
            status=self.status,
            env=self._child_env(),
        )
        self.export_writer.start()

    # -- hooks of the roles (`stream_shim.worker.PoolWorker` overrides them) ----------------

    intake_outlives_drain = False
    """Whether the intake consumer keeps running (committing) while the submitter drains."""

    def _before_health_checks(self) -> None:
        """Start-up work before the health checks (the worker creates the work topic)."""

    def _own_export_spool(self) -> Path | None:
        """A spool of this process's own for batched export (`None`: ``export.spool_dir``, the node's)."""
        return None

    def _child_env(self) -> dict[str, str]:
        """Environment of the Snakemake children: the shim's, plus where the arrival index is."""
        return {**os.environ, ENV_VAR: str(self.index.root)}

    def _health_topics(self) -> list[str]:
        """Topics that must exist at start-up (created if missing)."""
        topics = self.config["kafka_topics"]
        needed = [topics["next_visit"], topics["raw_notification"], topics["alerts"]]
        return needed + ([self.options.filer_topic] if self.options.filer_topic else [])

    def _raw_group(self) -> str:
        """Consumer group of the raw notifications."""
        return f"{self.config['kafka']['consumer_group']}-raw-arrivals"

    def _intake(
        self, arrivals: RawArrivals, intake_stop: threading.Event, stop_all: threading.Event, submitter: Submitter
    ) -> threading.Thread:
        """Return the intake consumer (not started): next_visit -> `NextVisitHandler`."""
        config = self.config
        handler = NextVisitHandler(
            config,
            detectors=[d.id for d in arrivals.instrument.active_detectors()],
            submitter=submitter,
            journal=self.journal,
            status=self.status,
            workdir=self.workdir,
            on_accepted=arrivals.check_early,
            store=self.store,
        )
        return ConsumeLoop(
            "next_visit",
            consumer_settings(
                config["kafka"]["bootstrap"], config["kafka"]["consumer_group"], member=str(self.state_dir)
            ),
            config["kafka_topics"]["next_visit"],
            handler,
            intake_stop,
            self.status,
        )

    # -- pieces, continued ----------------------------------------------------------------

    def _backend(self, submitter_unfinished: Any) -> Backend:
        env = self._child_env()
        logs = self.state_dir / "logs"
        if self.design == "subprocess":
            max_cores = None if self.k8s else self.max_targets
            return SubprocessPoolBackend(
                lambda targets, cores: self._command(targets, cores, []),
                max_cores=max_cores,
                env=env,
                log_dir=logs,
                registry=self.registry,
                workdir=self.workdir,
            )
        from workflow.core.config import PROJECT_ROOT

        wrapper = write_wrapper_snakefile(
            self.state_dir / "stream", self.options.snakefile or PROJECT_ROOT / "Snakefile"
        )
        k8s = snakemake_entry(self.options.profile)[-1] == "workflow.runtime.k8s_executor"
        command = self._command(
            [],
            self.max_targets,
            ["--queue-input-wait-time", "1"],
            snakefile=wrapper,
            entry=["-m", "stream_shim.queue_runner", *(["--k8s"] if k8s else [])],
        )
        return StreamingBackend(
            command,
            env=env,
            log_dir=logs,
            registry=self.registry,
            workdir=self.workdir,
            unfinished=submitter_unfinished,
            status=self.status,
            on_quarantined=self._forget_quarantined,
            rollover_targets=self.config["submission"].get("rollover_targets"),
        )

    def _forget_quarantined(self, target: str, record: FailedRecord) -> None:
        """A target was quarantined: drop it from the journal, so no restart resumes it."""
        self.journal.remove_target(record.instrument, record.day_obs, record.group, record.detector)

    def _journaled_targets(self, visit: AcceptedVisit) -> list[TargetPaths] | None:
        """The journaled visit's targets, or `None` (logged, counted) if one would be a bad path."""
        try:
            check_identifier("instrument", visit.instrument, where=f"journal {self.journal.path}")
            check_identifier("day_obs", visit.day_obs, where=f"journal {self.journal.path}")
            check_identifier("group", visit.group, where=f"journal {self.journal.path}")
            for detector in visit.detectors:
                check_identifier("detector", detector, where=f"journal {self.journal.path}")
            targets = [
                TargetPaths(visit.instrument, visit.day_obs, visit.group, d, Path("."), self.config["paths"])
                for d in visit.detectors
            ]
            for target in targets:
                contained_path(self.workdir, target.visit_file)
        except (InvalidIdentifier, PathOutsideRunDirError) as exc:
            self.status.count("journal", "invalid_visit")
            _log.error("journaled visit not resumed and dropped from the journal: %s", exc)
            return None
        return targets

    def _retry_lane(self) -> Backend | None:
        """Streaming design: retries run as Snakemake subprocesses (its long-lived one never reruns a failed job)."""
        if self.design != "streaming":
            return None
        env = self._child_env()
        return SubprocessPoolBackend(
            lambda targets, cores: self._command(list(targets), cores, []),
            max_cores=self.max_targets,
            env=env,
            log_dir=self.state_dir / "logs" / "retries",
            registry=self.registry,
            workdir=self.workdir,
            max_processes=int(self.config["submission"]["retry"]["max_processes"]),
        )

    def _resume(self, submitter: Submitter) -> int:
        """Submit again the journal's targets that have no outcome; compact the journal."""
        keep, again = [], 0
        for visit in self.journal.load():
            journaled = self._journaled_targets(visit)
            if journaled is None:
                continue
            targets = [t for t in journaled if (self.workdir / t.visit_file).exists()]
            open_targets = [
                t for t in targets if not self.store.exists(t.done_file) and not self.store.exists(t.failed_file)
            ]
            if open_targets:
                keep.append(visit)
                again += len(submitter.submit(open_targets, batch_id=visit.group).submitted)
        self.journal.rewrite(keep)
        if again:
            self.status.count("targets", "resumed", again)
            _log.info("resumed %d unfinished target(s) of %d journaled visit(s)", again, len(keep))
        return again

    def _loops(
        self, intake_stop: threading.Event, stop_all: threading.Event, submitter: Submitter
    ) -> list[threading.Thread]:
        config, topics = self.config, self.config["kafka_topics"]
        bootstrap, group = config["kafka"]["bootstrap"], config["kafka"]["consumer_group"]
        instrument = instrument_for_run(config)
        arrivals = RawArrivals(
            config,
            instrument=instrument,
            bucket=open_bucket(config, config["buckets"]["raw"]),
            index=self.index,
            status=self.status,
        )
        loops: list[threading.Thread] = [
            ConsumeLoop(
                "raw_notification",
                consumer_settings(bootstrap, self._raw_group(), member=str(self.state_dir)),
                topics["raw_notification"],
                arrivals,
                stop_all,
                self.status,
            ),
            self._intake(arrivals, intake_stop, stop_all, submitter),
        ]
        if self.options.filer_topic:
            bridge = bridge_for_config(config, self.status, stop=stop_all)
            loops.append(
                ConsumeLoop(
                    "bridge",
                    consumer_settings(bootstrap, f"{group}-filer-bridge", member=str(self.state_dir)),
                    self.options.filer_topic,
                    bridge,
                    stop_all,
                    self.status,
                )
            )
        return loops

    # -- the run ------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> int:
        """Run until ``stop`` is set (or a consumer fails); return the exit status (0 or 1).

        Raises
        ------
        stream_shim.state_lock.ShimAlreadyRunningError
            If another shim uses the same state directory.
        stream_shim.health.HealthCheckError
            If a service is unavailable at start-up.
        """
        started = time.monotonic()
        self._take_lock()
        self.registry.kill_leftovers()  # first: a crashed predecessor's jobs must not run beside ours
        self._before_health_checks()
        if self.options.health_check:
            run_health_checks(self.config, workdir=self.workdir, topics=self._health_topics())
            check_startup(self.config, base_dir=self.workdir)  # APDB, dimension universe, alert schema versions
        self.index.prune(_ARRIVALS_KEEP_S)
        self._start_export_writer()
        writer_stop = threading.Event()
        writer = StatusWriter(self.status, self.state_dir / "status.json", writer_stop)
        writer.start()
        server = None
        if self.options.status_port is not None:
            server = StatusServer(self.status, self.options.status_port, self.options.status_host)
            server.start()
        submitter = self.submitter = Submitter(
            None,
            self.status,
            workdir=self.workdir,
            store=self.store,
            poll_s=2.0 if self.k8s else 0.5,
            retry=RetryPolicy.from_config(self.config),
            retry_backend=self._retry_lane(),
            max_in_flight=self.config["submission"].get("max_in_flight"),
        )
        submitter.backend = self._backend(functools.partial(submitter.unfinished, first_attempts_only=True))
        submitter.start()
        self._resume(submitter)
        intake_stop, stop_all = threading.Event(), threading.Event()
        loops = self._loops(intake_stop, stop_all, submitter)
        for loop in loops:
            loop.start()
        self.status.state = "running"
        _log.info(
            "stream shim running for %s (design %s, %d concurrent target(s), profile %s) after %.1f s; state in %s",
            self.config["instrument"]["name"],
            self.design,
            self.max_targets,
            self.options.profile,
            time.monotonic() - started,
            self.state_dir,
        )
        code = 0
        while not stop.wait(0.5):
            dead = [loop for loop in loops if not loop.is_alive()]
            if dead:
                _log.error("consumer %s stopped (%s): shutting down", dead[0].name, getattr(dead[0], "failed", None))
                code = 1
                break
        self._shutdown(loops, intake_stop, stop_all, submitter)
        if server is not None:
            server.stop()
        writer_stop.set()
        writer.join(timeout=5.0)
        return code

    def _shutdown(
        self,
        loops: list[threading.Thread],
        intake_stop: threading.Event,
        stop_all: threading.Event,
        submitter: Submitter,
    ) -> None:
        self.status.state = "draining"
        _log.info(
            "stopping: no more next_visits; %d target(s) in flight get %.0f s to finish",
            len(submitter.unfinished()),
            self.options.grace_s,
        )
        intake_stop.set()
        for loop in loops:
            if loop.name == "next_visit" and not self.intake_outlives_drain:
                loop.join(timeout=10.0)
        submitter.drain(self.options.grace_s, self.options.term_wait_s)
        stop_all.set()
        for loop in loops:
            loop.join(timeout=10.0)
        if self.export_writer is not None:
            self.export_writer.stop(grace_s=self.options.grace_s)
        left = submitter.unfinished()
        self.status.state = "stopped"
        _log.info("stopped; %d unfinished target(s) stay in the journal for the next run", len(left))
