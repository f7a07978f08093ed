"""The two ways the shim runs Snakemake on its targets.

`SubprocessPoolBackend` ("subprocess"): one ``snakemake --nolock`` process per
batch (a visit's targets), in the shim's run directory, bounded so that the
batches running hold at most ``max_cores`` cores; a batch waits for free cores.
Each batch pays Snakemake's start-up (import, parse, DAG: ~2-3 s).

`StreamingBackend` ("streaming"): one long-lived Snakemake process
(`stream_shim.queue_runner`) whose DAG grows as targets arrive on its stdin;
all visits share its ``--cores`` bound, and a new target starts within
``--queue-input-wait-time`` (1 s).  Draining is closing stdin: Snakemake
finishes what it has and exits.  Every ``rollover_targets`` targets a fresh
process takes the new targets while the old one finishes its own and exits
(`stream_shim.rollover`): no process grows with the night.

Both hand every child to `stream_shim.process_group` (own process group, dies
with the shim, recorded for cleanup, stopped with SIGTERM then SIGKILL after
bounded waits), and tell the `stream_shim.submission.Submitter` when a run
ended or a job failed; the submitter reads the outcome files.

One bad target must not stop the streaming process (`stream_shim.quarantine`):
a target whose path is not a well-formed target is never fed; one that the
streaming Snakemake's output names as unbuildable when it exits is quarantined
(``failed.json``, ``UnbuildableTarget``) and never fed again.  Exits in a row
that name no target are a crash loop (`stream_shim.crash_loop`): counted
(``backend``/``crash_loop``), ``/healthz`` unhealthy, and the targets without
an outcome bisected with ``snakemake --dry-run`` to quarantine the culprits.
"""

from __future__ import annotations

__all__ = ["Batch", "Backend", "SubprocessPoolBackend", "StreamingBackend", "job_error_target"]

import collections
import dataclasses
import logging
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

from stream_shim.crash_loop import CrashLoop, find_culprits
from stream_shim.process_group import ChildRegistry, group_members, signal_group, spawn, stop_group
from stream_shim.quarantine import INVALID_TARGET, UNBUILDABLE, quarantine, unbuildable_targets
from stream_shim.rollover import Generation, Retirees, RolloverPolicy
from stream_shim.status import ShimStatus
from workflow.core.identifiers import target_key
from workflow.core.log_fields import shorten
from workflow.stages.records import FailedRecord

_log = logging.getLogger(__name__)

_DAY_OBS = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_NOISE = ("Waiting for queue input...", "Updating jobs with queue input...")
_TAIL_LINES = 2000  # of the streaming process's output, read for unbuildable targets when it exits


@dataclasses.dataclass(frozen=True)
class Batch:
    """Targets submitted together (one visit's, normally)."""

    batch_id: str
    targets: tuple[str, ...]


EndedCallback = Callable[[Sequence[str], str], None]
"""``(targets, reason)``: these targets' run ended; check their outcome files."""
JobErrorCallback = Callable[[tuple[str, str, str, int]], None]
"""``(instrument, day_obs, group, detector)`` of a job Snakemake reported failed."""
QuarantineCallback = Callable[[str, FailedRecord], None]
"""``(target, record)``: this target was quarantined (its ``failed.json`` written)."""


class Backend(Protocol):
    """What the submitter needs from a submission design."""

    name: str

    def start(self, on_ended: EndedCallback, on_job_error: JobErrorCallback) -> None: ...  # noqa: D102

    def submit(self, batch: Batch) -> None: ...  # noqa: D102

    def drain(self, grace_s: float, term_wait_s: float) -> None: ...  # noqa: D102

    def processes(self) -> int: ...  # noqa: D102


def job_error_target(output_line: str) -> tuple[str, str, str, int] | None:
    """Return ``(instrument, day_obs, group, detector)`` from an ``output:`` line of a Snakemake error.

    Outputs look like ``.../{instrument}/{day_obs}/{group}/{detector}/<name>.json``.
    """
    for path in output_line.split(":", 1)[-1].replace(",", " ").split():
        parts = Path(path).parts
        if len(parts) >= 5 and _DAY_OBS.match(parts[-4]) and parts[-2].isdigit():
            return parts[-5], parts[-4], parts[-3], int(parts[-2])
    return None


class _OutputFilter:
    """Copy a child's output to its log, dropping queue chatter, and spot failed jobs."""

    def __init__(self, log: IO[str], on_job_error: JobErrorCallback, lock: threading.Lock | None = None) -> None:
        self.log, self.on_job_error = log, on_job_error
        self._lock = lock or threading.Lock()  # shared by the processes writing to one log
        self._in_error = False
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self.failed: set[tuple[str, str, str, int]] = set()
        """Targets of the jobs reported failed."""

    def feed(self, line: str) -> None:
        if line.strip() in _NOISE:
            return
        self.tail.append(line)
        with self._lock:
            self.log.write(line)
            self.log.flush()
        stripped = line.strip()
        if stripped.startswith("Error in rule "):
            self._in_error = True
        elif self._in_error and stripped.startswith("output:"):
            self._in_error = False
            key = job_error_target(stripped)
            if key is not None:
                self.failed.add(key)
                self.on_job_error(key)
        elif self._in_error and not stripped:
            self._in_error = False


class SubprocessPoolBackend:
    """One Snakemake subprocess per batch, at most ``max_cores`` cores in use.

    Parameters
    ----------
    command : callable
        ``command(targets, cores)`` returns the Snakemake command line.
    max_cores : `int` or `None`
        Bound on the sum of ``--cores`` of the running batches; `None`: no bound
        and no ``--cores`` (Kubernetes: the cluster bounds).
    env : `~collections.abc.Mapping`
        Environment of the children.
    log_dir : `pathlib.Path`
        One log file per batch here.
    registry : `stream_shim.process_group.ChildRegistry`
        Where children are recorded.
    workdir : `pathlib.Path`
        Working directory of the children.
    max_processes : `int`, optional
        Bound on the Snakemake processes running at once; when set, the batches
        waiting are merged into one process as they start (one start-up for all:
        under overload, retries must not add a cold Snakemake each).
    """

    name = "subprocess"

    def __init__(
        self,
        command: Callable[[Sequence[str], int | None], list[str]],
        *,
        max_cores: int | None,
        env: Mapping[str, str],
        log_dir: Path,
        registry: ChildRegistry,
        workdir: Path,
        max_processes: int | None = None,
    ) -> None:
        self._command, self.max_cores, self._env = command, max_cores, dict(env)
        self.max_processes = max_processes
        self._log_dir, self._registry, self._workdir = Path(log_dir), registry, Path(workdir)
        self._pending: collections.deque[Batch] = collections.deque()
        self._running: dict[int, tuple[subprocess.Popen[Any], Batch, int]] = {}
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._draining: tuple[float, float] | None = None
        self._thread = threading.Thread(target=self._dispatch, name="snakemake-pool", daemon=True)
        self._on_ended: EndedCallback = lambda targets, reason: None
        self._count = 0

    def start(self, on_ended: EndedCallback, on_job_error: JobErrorCallback) -> None:
        """Start dispatching batches."""
        self._on_ended = on_ended
        self._thread.start()

    def submit(self, batch: Batch) -> None:
        """Queue a batch; it starts when cores are free."""
        with self._lock:
            self._pending.append(batch)
        self._wake.set()

    def processes(self) -> int:
        """Return how many Snakemake processes run."""
        with self._lock:
            return len(self._running)

    def _used(self) -> int:
        return sum(cores for _, _, cores in self._running.values())

    def _launch(self, batch: Batch, cores: int | None) -> None:
        self._count += 1
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", batch.batch_id)
        log_path = self._log_dir / f"snakemake-{self._count:05d}-{safe}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as log:
            proc = spawn(
                self._command(batch.targets, cores),
                registry=self._registry,
                cwd=self._workdir,
                env=self._env,
                stdout=log,
            )
        self._running[proc.pid] = (proc, batch, cores or 0)
        _log.info(
            "batch %s: %d target(s) started as pid %d with %s core(s); log %s",
            batch.batch_id,
            len(batch.targets),
            proc.pid,
            cores or "profile's",
            log_path,
        )

    def _merged(self) -> Batch:
        """Take every waiting batch as one (call with the lock held, ``_pending`` not empty)."""
        batches = [self._pending.popleft() for _ in range(len(self._pending))]
        if len(batches) == 1:
            return batches[0]
        targets = tuple(t for b in batches for t in b.targets)
        return Batch(f"{batches[0].batch_id}+{len(batches) - 1}-more", targets)

    def _reap(self) -> list[tuple[Batch, str]]:
        """Forget the batches whose process exited; return them (call back outside the lock)."""
        ended = []
        for pid, (proc, batch, _) in list(self._running.items()):
            if proc.poll() is None:
                continue
            how = stop_group(proc, wait_s=0, registry=self._registry)  # its jobs' leftovers, if any
            del self._running[pid]
            _log.info("batch %s: snakemake pid %d exited with %d (%s)", batch.batch_id, pid, proc.returncode, how)
            ended.append((batch, f"snakemake exit {proc.returncode}"))
        return ended

    def _dispatch(self) -> None:
        while True:
            with self._lock:
                ended = self._reap()
                draining = self._draining is not None
            for batch, reason in ended:
                self._on_ended(batch.targets, reason)
            if draining:
                break
            with self._lock:
                while self._pending:
                    free = None if self.max_cores is None else self.max_cores - self._used()
                    if free is not None and free < 1:
                        break
                    if self.max_processes is not None and len(self._running) >= self.max_processes:
                        break
                    batch = self._merged() if self.max_processes is not None else self._pending.popleft()
                    cores = None if free is None else min(free, len(batch.targets))
                    self._launch(batch, cores)
            self._wake.wait(0.2)
            self._wake.clear()
        # Draining (in this thread: the children's death signal follows it).
        assert self._draining is not None  # the loop ends only once drain() set it
        grace_s, term_wait_s = self._draining
        deadline = time.monotonic() + grace_s
        with self._lock:
            dropped = len(self._pending)
            self._pending.clear()
            running = list(self._running.values())
        if dropped:
            _log.info("drain: %d batch(es) not started; the journal keeps them for the next run", dropped)
        for proc, batch, _ in running:
            how = stop_group(proc, wait_s=deadline - time.monotonic(), term_wait_s=term_wait_s, registry=self._registry)
            _log.info("drain: batch %s snakemake pid %d %s", batch.batch_id, proc.pid, how)
            if how.startswith("exited"):  # stopped ones stay unfinished: the next run resumes them
                self._on_ended(batch.targets, f"snakemake exit {proc.returncode}")
        with self._lock:
            self._running.clear()

    def drain(self, grace_s: float, term_wait_s: float) -> None:
        """Start no more batches; let running ones finish within ``grace_s``, then stop them."""
        self._draining = (grace_s, term_wait_s)
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()


class StreamingBackend:
    """One long-lived Snakemake process fed targets on stdin (`stream_shim.queue_runner`).

    Parameters
    ----------
    command : `list` [`str`]
        Full command line of the child.
    env : `~collections.abc.Mapping`
        Environment of the child.
    log_dir : `pathlib.Path`
        The child's log (queue chatter removed) goes here.
    registry : `stream_shim.process_group.ChildRegistry`
        Where the child is recorded.
    workdir : `pathlib.Path`
        Working directory of the child.
    unfinished : callable
        Returns the targets without an outcome, fed again to a restarted child.
    status : `stream_shim.status.ShimStatus`, optional
        Crash loops are counted here (``backend``/``crash_loop``, quarantined
        targets as ``backend``/``quarantined``) and raise the ``backend`` health
        condition: ``unhealthy`` while the loop lasts, ``degraded`` once its
        culprits are quarantined, cleared when a process has lived ``stable_s``.
    on_quarantined : callable, optional
        Called with each target quarantined and its record (the service removes
        it from the journal).
    crash_loop_exits : `int`, optional
        Quick exits in a row (each process lived less than ``stable_s``) that
        are a crash loop.
    stable_s : `float`, optional
        How long a process must live for its exit not to count as quick.
    probe_timeout_s : `float`, optional
        Bound on each ``--dry-run`` of the crash-loop search.
    rollover_targets : `int` or `None`, optional
        Targets fed to one process before a fresh one takes the new targets
        (`stream_shim.rollover`; counted as ``backend``/``rollover``); `None`: never.
    """

    name = "streaming"
    _RESTART_DELAY_S = 1.0  # doubled after each quick death (a broken workflow), up to _RESTART_MAX_S
    _RESTART_MAX_S = 60.0
    CONDITION = "backend"
    """Name of the health condition raised by a crash loop."""

    def __init__(
        self,
        command: list[str],
        *,
        env: Mapping[str, str],
        log_dir: Path,
        registry: ChildRegistry,
        workdir: Path,
        unfinished: Callable[[], list[str]],
        status: ShimStatus | None = None,
        on_quarantined: QuarantineCallback | None = None,
        crash_loop_exits: int = 3,
        stable_s: float = 60.0,
        probe_timeout_s: float = 600.0,
        rollover_targets: int | None = None,
    ) -> None:
        self._command, self._env, self._log_dir = command, dict(env), Path(log_dir)
        self._registry, self._workdir, self._unfinished = registry, Path(workdir), unfinished
        self._status, self._on_quarantined = status, on_quarantined
        self._loop = CrashLoop(crash_loop_exits, stable_s)
        self._probe_timeout_s = probe_timeout_s
        self.quarantined: set[str] = set()
        """Targets given a ``failed.json`` by this backend: never fed again."""
        self._policy = RolloverPolicy(rollover_targets)
        self._retirees = Retirees()
        self._lock = threading.Lock()
        self._gen: Generation | None = None
        self._proc: subprocess.Popen[str] | None = None  # the current generation's
        self._log: IO[str] | None = None
        self._log_lock = threading.Lock()
        self._draining: tuple[float, float] | None = None
        self._drain_requested = threading.Event()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="snakemake-stream", daemon=True)
        self._on_ended: EndedCallback = lambda targets, reason: None
        self._on_job_error: JobErrorCallback = lambda key: None
        self.restarts = 0
        self.rollovers = 0

    def start(self, on_ended: EndedCallback, on_job_error: JobErrorCallback) -> None:
        """Start the Snakemake process (and restart it if it dies)."""
        self._on_ended, self._on_job_error = on_ended, on_job_error
        self._thread.start()
        self._started.wait(30.0)

    def processes(self) -> int:
        """Return how many Snakemake processes run (a rolled-over one finishing its targets included)."""
        procs = [self._proc, *(g.proc for g in self._retirees.all())]
        return sum(proc is not None and proc.poll() is None for proc in procs)

    def submit(self, batch: Batch) -> None:
        """Hand the targets to Snakemake (or keep them for the restarted process).

        A target whose path is not a well-formed target (`workflow.core.identifiers.target_key`)
        is quarantined instead of fed.
        """
        targets = self._admit(batch.targets)
        if not targets:
            return
        with self._lock:
            gen = self._gen
            if gen is not None and self._draining is None and self._policy.due(gen) and gen.proc.poll() is None:
                gen = self._roll_over(gen)
            if gen is None or not self._write(gen, targets):
                return  # fed by _spawn from the submitter's unfinished targets
            _log.debug("batch %s: %d target(s) fed to pid %d", batch.batch_id, len(targets), gen.proc.pid)

    def _write(self, gen: Generation, targets: Sequence[str]) -> bool:
        """Feed ``targets`` to ``gen`` (lock held); return whether it took them."""
        proc = gen.proc
        if proc.poll() is not None or proc.stdin is None or proc.stdin.closed:
            return False
        try:
            proc.stdin.write("".join(t + "\n" for t in targets))
            proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as exc:
            _log.warning("snakemake pid %d not taking targets (%s); it will be restarted", proc.pid, exc)
            return False
        gen.fed.update(targets)
        return True

    def _roll_over(self, old: Generation) -> Generation:
        """Start a fresh process for the new targets; tell ``old`` to finish its own (lock held)."""
        new = self._spawn_locked(again=[])
        self._retirees.add(old)
        if old.proc.stdin is not None:
            try:
                old.proc.stdin.close()  # -> FINISHED: it completes its DAG and exits
            except OSError:
                pass
        self.rollovers += 1
        if self._status is not None:
            self._status.count("backend", "rollover")
        _log.info(
            "rollover %d: snakemake streaming pid %d was fed %d target(s); new targets go to pid %d, "
            "pid %d finishes its own and exits (%d process(es) finishing)",
            self.rollovers,
            old.proc.pid,
            len(old.fed),
            new.proc.pid,
            old.proc.pid,
            len(self._retirees),
        )
        return new

    def _admit(self, targets: Sequence[str]) -> list[str]:
        """Return the targets to feed: not quarantined, and well-formed (the others are quarantined)."""
        admitted = []
        for target in targets:
            if target in self.quarantined:
                continue
            if target_key(target) is None or "\n" in target:
                self._quarantine(
                    [target], INVALID_TARGET, "not a results/{instrument}/{day_obs}/{group}/{detector}/done.json path"
                )
                continue
            admitted.append(target)
        return admitted

    def _quarantine(self, targets: Sequence[str], error: str, message: str) -> None:
        """Fail each target alone (``failed.json``), never feed it again, tell the submitter."""
        for target in targets:
            self.quarantined.add(target)
            record = quarantine(self._workdir, target, error=error, message=message)
            if self._status is not None:
                self._status.count("backend", "quarantined")
            if record is not None and self._on_quarantined is not None:
                try:
                    self._on_quarantined(target, record)
                except Exception:  # noqa: BLE001 - the target is quarantined whatever the callback does
                    _log.exception("quarantine callback failed for target %s", shorten(target))
            self._on_ended([target], f"quarantined: {error}")

    def _spawn(self) -> Generation:
        """Start a process (first start or restart) fed the unfinished targets no retiree holds."""
        with self._lock:
            owned = self._retirees.owned()
            again = [t for t in self._unfinished() if t not in self.quarantined and t not in owned]
            gen = self._spawn_locked(again)
        _log.info(
            "snakemake streaming process started, pid %d%s",
            gen.proc.pid,
            f"; {len(again)} unfinished target(s) fed again" if again else "",
        )
        return gen

    def _spawn_locked(self, again: Sequence[str]) -> Generation:
        """Start a process, make it the current one and feed it ``again`` (lock held)."""
        proc = spawn(
            self._command,
            registry=self._registry,
            cwd=self._workdir,
            env=self._env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._log is not None  # opened by _supervise before the first process
        gen = Generation(proc, time.monotonic(), output=_OutputFilter(self._log, self._on_job_error, self._log_lock))
        gen.reader = threading.Thread(target=self._pump, args=(gen,), name=f"snakemake-{proc.pid}", daemon=True)
        gen.reader.start()
        self._gen, self._proc = gen, proc
        if again:
            self._write(gen, again)
        return gen

    @staticmethod
    def _pump(gen: Generation) -> None:
        """Copy a process's output to the log (its own thread: processes run side by side)."""
        assert gen.proc.stdout is not None
        try:
            for line in gen.proc.stdout:
                gen.output.feed(line)
        except (OSError, ValueError):  # the log closed at the end of a drain
            pass

    def _follow(self) -> Generation:
        """Wait until the current process ends, through rollovers; return its generation."""
        while True:
            with self._lock:
                current = self._gen
            assert current is not None
            if current.exited():
                return current
            try:
                current.proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
            self._reap_retirees()

    def _reap_retirees(self) -> None:
        """Handle the rolled-over processes that exited: a clean exit built all their targets.

        One that died (a signal, a crash, or a failed job: exit not 0) has its
        unbuildable targets quarantined and the others without an outcome fed to
        the current process, as a restart would, except those whose job it
        reported failed (the submitter fails or retries them).  A planned exit
        is no crash: the crash-loop count is left alone.
        """
        for gen in self._retirees.ended():
            self._kill_group(gen.proc)  # its jobs' leftovers, if any
            gen.read_to_end()
            code = gen.proc.returncode
            lasted = time.monotonic() - (gen.retired_at or gen.started)
            if code == 0:
                _log.info(
                    "rolled-over snakemake pid %d exited after finishing its %d target(s), %.0f s after its rollover",
                    gen.proc.pid,
                    len(gen.fed),
                    lasted,
                )
                continue
            culprits = [t for t in unbuildable_targets(gen.output.tail, gen.fed) if t not in self.quarantined]
            if culprits:
                self._quarantine(culprits, UNBUILDABLE, "Snakemake cannot build this target (no rule produces it)")
            with self._lock:
                left = [
                    t
                    for t in self._unfinished()
                    if t in gen.fed and t not in self.quarantined and target_key(t) not in gen.output.failed
                ]
                current = self._gen
                fed = current is not None and self._draining is None and bool(left) and self._write(current, left)
            _log.error(
                "rolled-over snakemake pid %d exited with %d %.0f s after its rollover; %d of its %d target(s) "
                "without an outcome %s",
                gen.proc.pid,
                code,
                lasted,
                len(left),
                len(gen.fed),
                f"fed to pid {current.proc.pid}" if fed and current is not None else "left for the next process",
            )

    def _supervise(self) -> None:
        self._log_dir.mkdir(parents=True, exist_ok=True)
        delay = self._RESTART_DELAY_S
        with open(self._log_dir / "snakemake-stream.log", "a") as log:
            self._log = log
            while self._draining is None:
                gen = self._spawn()
                self._started.set()
                stable = threading.Timer(self._loop.stable_s, self._lived_long)
                stable.daemon = True
                stable.start()
                gen = self._follow()  # the current process, once it ended (rollovers followed)
                proc, output = gen.proc, gen.output
                stable.cancel()
                if self._draining is not None:
                    break
                self.restarts += 1
                lived = time.monotonic() - gen.started
                delay = self._RESTART_DELAY_S if lived > self._RESTART_MAX_S else delay
                self._kill_group(proc)
                gen.read_to_end()  # its last lines (an unbuildable target's name), once its jobs are gone
                with self._lock:
                    fed = gen.fed | set(self._unfinished())
                culprits = [t for t in unbuildable_targets(output.tail, fed) if t not in self.quarantined]
                if culprits:
                    _log.error(
                        "snakemake streaming process pid %d exited with %d: no rule builds %d target(s) %s; "
                        "quarantining them and restarting (see %s)",
                        proc.pid,
                        proc.returncode,
                        len(culprits),
                        ", ".join(culprits[:5]),
                        log.name,
                    )
                    self._quarantine(culprits, UNBUILDABLE, "Snakemake cannot build this target (no rule produces it)")
                    self._loop.reset()
                    delay = self._RESTART_DELAY_S
                    self._drain_requested.wait(delay)
                    continue
                if self._loop.exited(lived) and self._isolate(proc, log):
                    delay = self._RESTART_DELAY_S
                _log.error(
                    "snakemake streaming process pid %d exited with %d; restarting it in %.0f s (see %s)",
                    proc.pid,
                    proc.returncode,
                    delay,
                    log.name,
                )
                self._drain_requested.wait(delay)
                delay = min(2 * delay, self._RESTART_MAX_S)
        self._started.set()

    def _lived_long(self) -> None:
        """A process lived ``stable_s``: a crash loop, if any, is over."""
        self._loop.reset()
        if self._status is not None:
            self._status.set_condition(self.CONDITION, None)

    def _isolate(self, proc: subprocess.Popen[str], log: IO[str]) -> bool:
        """Handle a crash loop: count it, report it, bisect the suspects; return whether culprits were found."""
        suspects = sorted(t for t in self._unfinished() if t not in self.quarantined)
        detail = (
            f"snakemake streaming process exited {self._loop.quick} times in a row (last: pid {proc.pid}, "
            f"exit {proc.returncode}); searching {len(suspects)} unfinished target(s) for the cause"
        )
        _log.error("crash loop: %s", detail)
        if self._status is not None:
            self._status.count("backend", "crash_loop")
            self._status.set_condition(self.CONDITION, "unhealthy", detail)
        self._loop.reset()  # the next search only after as many quick exits again
        control = self._probe([], log)  # no target: does the workflow itself parse?
        if control is False:
            culprits: list[str] | None = []
            why = "the workflow fails with no target at all"
        else:
            culprits = None if control is None else find_culprits(suspects, lambda t: self._probe(t, log))
            why = "the search was interrupted" if culprits is None else "every target builds: the workflow itself fails"
        if not culprits:
            _log.error("crash loop: no culprit target found (%s); restarting with back-off (see %s)", why, log.name)
            if self._status is not None:
                self._status.set_condition(self.CONDITION, "unhealthy", f"{detail}: no culprit found ({why})")
            return False
        self._quarantine(
            culprits,
            UNBUILDABLE,
            "quarantined after a crash loop of the streaming Snakemake: "
            "'snakemake --dry-run' of this target fails (see the shim's snakemake-stream.log)",
        )
        if self._status is not None:
            self._status.set_condition(
                self.CONDITION,
                "degraded",
                f"crash loop broken: {len(culprits)} target(s) quarantined ({', '.join(culprits[:3])})",
            )
        return True

    def _probe(self, targets: Sequence[str], log: IO[str]) -> bool | None:
        """Return whether ``snakemake --dry-run`` builds the DAG of ``targets`` (`None`: draining, gave up)."""
        if self._draining is not None:
            return None
        with self._log_lock:
            log.write(f"--- shim: crash-loop probe, --dry-run of {len(targets)} target(s)\n")
            log.flush()
        proc = spawn(
            [*self._command, "--dry-run", *(["--", *targets] if targets else [])],
            registry=self._registry,
            cwd=self._workdir,
            env=self._env,
            stdin=subprocess.DEVNULL,
            stdout=log,
        )
        try:
            code = proc.wait(timeout=self._probe_timeout_s)
        except subprocess.TimeoutExpired:
            stop_group(proc, wait_s=0, term_wait_s=5.0, registry=self._registry)
            _log.error("crash-loop probe of %d target(s) timed out after %.0f s", len(targets), self._probe_timeout_s)
            return None
        stop_group(proc, wait_s=0, registry=self._registry)
        with self._log_lock:
            log.write(f"--- shim: probe exit {code}\n")
            log.flush()
        return code == 0

    def _kill_group(self, proc: subprocess.Popen[str]) -> None:
        if group_members(proc.pid):
            signal_group(proc.pid, signal.SIGKILL)
        stop_group(proc, wait_s=0, registry=self._registry)

    def drain(self, grace_s: float, term_wait_s: float) -> None:
        """Close Snakemake's input: it finishes what it has, within ``grace_s``; then stop it."""
        self._draining = (grace_s, term_wait_s)
        self._drain_requested.set()
        deadline = time.monotonic() + grace_s
        with self._lock:
            procs = [g.proc for g in self._retirees.all()] + ([self._proc] if self._proc is not None else [])
            for proc in procs:
                if proc.stdin is not None and not proc.stdin.closed:
                    try:
                        proc.stdin.close()  # -> FINISHED: Snakemake completes its DAG and exits
                    except OSError:
                        pass
        for proc in procs:  # the rolled-over ones first: their targets are the older
            how = stop_group(
                proc, wait_s=max(deadline - time.monotonic(), 0.0), term_wait_s=term_wait_s, registry=self._registry
            )
            _log.info("drain: snakemake streaming process pid %d %s", proc.pid, how)
        self._thread.join(timeout=term_wait_s + 15.0)
