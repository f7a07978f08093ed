"""Play fault scenarios on the live stack: the night simulator's camera, a fault, bounded waits.

`FaultSuite` builds a live stack (`stream_shim.testbed.live_stack.LiveStack`: Tansu
broker, SeaweedFS S3, the real shim with its streaming Snakemake) running the fault
stand-in workflow (`stream_shim.testbed.fault_standin`), plays the camera
(`PatientCamera`, in a thread) and, from the calling thread, injects the scenario's
fault at its trigger (`stream_shim.testbed.faults`), then waits until every target
announced has an outcome and the shim has nothing in flight, or the scenario's
timeout; `stream_shim.testbed.fault_report.account` judges the result.

A scenario whose stand-in *apdb* stores rows (``Scenario.apdb_rows``) gets a
PostgreSQL server (`stream_shim.testbed.local_services.PostgresServer`, one for the
suite, under ``<workdir>/postgres``) and the stand-in's table
(`stream_shim.testbed.fault_standin.ApdbRows`); its rows are counted at the end.
On a shared stack every scenario's *apdb* stores rows if one's does.

Each scenario gets a fresh stack in its own directory by default; ``shared_stack``
plays them one after the other on one stack (quicker; a scenario with an
unbuildable target must then come first, as the streaming Snakemake reads its
Snakefile once).  The camera's producer holds a next_visit up to ``kafka_timeout_s``
(a broker outage shorter than that loses none), and its uploads are retried for
``put_patience_s`` (the summit buffers its raws through an S3 outage).
"""

from __future__ import annotations

__all__ = ["FaultSuite", "PatientCamera", "SuiteSettings", "Timeline", "empty_central_repo"]

import dataclasses
import logging
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from stream_shim.testbed.fault_report import Observed, account
from stream_shim.testbed.fault_standin import ApdbRows, Unbuildable, write_fault_snakefile
from stream_shim.testbed.faults import BrokerDown, FaultContext, FaultWindow, PostgresDown, S3Down, Scenario
from stream_shim.testbed.live_stack import LiveStack
from stream_shim.testbed.local_services import HOST, PostgresServer
from stream_shim.testbed.night import Cadence, NightCamera, RawRecord, VisitRecord
from stream_shim.testbed.night_standin import CostModel
from workflow.core.buckets import Bucket
from workflow.core.config import PROJECT_ROOT, load_config
from workflow.core.instrument import Instrument
from workflow.stages.ingest import poll_interval

_log = logging.getLogger(__name__)

_POLL_S = 0.5


class Timeline:
    """The camera's events (``announced``, ``raws_landed``) per visit index, with bounded waits."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.events: dict[tuple[str, int], float] = {}

    def note(self, what: str, visit: VisitRecord) -> None:
        """Record that ``what`` happened to ``visit`` now (the camera's ``on_event``)."""
        with self._cond:
            self.events[(what, visit.index)] = time.time()
            self._cond.notify_all()

    def wait(self, what: str, index: int, deadline: float, stop: threading.Event) -> float | None:
        """Return when ``what`` happened to visit ``index`` (unix), or `None` at ``deadline`` (monotonic)."""
        with self._cond:
            while (what, index) not in self.events:
                left = deadline - time.monotonic()
                if left <= 0 or stop.is_set():
                    return None
                self._cond.wait(min(left, _POLL_S))
            return self.events[(what, index)]


class PatientCamera(NightCamera):
    """A `stream_shim.testbed.night.NightCamera` whose uploads ride through an S3 outage.

    Parameters
    ----------
    *args, **kwargs
        As for `NightCamera`.
    put_patience_s : `float`, optional
        How long one raw's upload is retried (every ``retry_s``).
    retry_s : `float`, optional
        Pause between two tries.
    """

    def __init__(self, *args: Any, put_patience_s: float = 90.0, retry_s: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.put_patience_s, self.retry_s = put_patience_s, retry_s
        self.upload_retries = 0
        self._retry_lock = threading.Lock()

    def _put(self, bucket: Bucket, visit: VisitRecord, raw: RawRecord) -> None:
        give_up = time.monotonic() + self.put_patience_s
        tries = 0
        while True:
            tries += 1
            raw.error = None
            super()._put(bucket, visit, raw)
            if raw.error is None or time.monotonic() > give_up or self.stop.wait(self.retry_s):
                break
        if tries > 1:
            with self._retry_lock:
                self.upload_retries += tries - 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class SuiteSettings:
    """How the suite plays each scenario.

    Attributes
    ----------
    cadence : `stream_shim.testbed.night.Cadence`
        Visits and their pace.
    detectors : `int`
        The first so many active detectors of the instrument.
    cost : `stream_shim.testbed.night_standin.CostModel`
        Seconds per stand-in stage.
    instrument : `str`
        Instrument (its config file).
    slots : `int` or `None`
        Snakemake ``--cores`` (default: detectors x 3, at least 8).
    tail_s : `float`
        Time allowed after the last planned raw (plus the fault's pause) for every outcome.
    kafka_timeout_s : `float`
        The camera's bound on delivering a next_visit.
    put_patience_s : `float`
        The camera's bound on uploading a raw.
    retry : `~collections.abc.Mapping` or `None`
        Overrides of the shim's ``submission.retry`` section (`None`: the config's).
    """

    cadence: Cadence
    detectors: int
    cost: CostModel
    instrument: str = "LSSTCam"
    slots: int | None = None
    tail_s: float = 75.0
    kafka_timeout_s: float = 60.0
    put_patience_s: float = 90.0
    retry: Mapping[str, Any] | None = None

    def timeout_s(self, scenario: Scenario) -> float:
        """Return the scenario's bound: the night, the fault's pause, and the tail."""
        pause = scenario.fault.down_s if isinstance(scenario.fault, BrokerDown | S3Down | PostgresDown) else 0.0
        return self.cadence.last_raw_after_s() + pause + self.tail_s + 2 * self.cost.after_raw_s()


def empty_central_repo(repo: Path, timeout_s: float = 300.0) -> Path:
    """Create an empty Butler repo at ``repo`` unless one is there (the shim's start-up check opens it)."""
    if not (repo / "butler.yaml").exists():
        code = (
            "import sys; from workflow.repo.central_repo import create_central_repo; create_central_repo(sys.argv[1])"
        )
        subprocess.run([sys.executable, "-c", code, str(repo)], check=True, cwd=PROJECT_ROOT, timeout=timeout_s)
    return repo


def _producer(bootstrap: str, timeout_s: float) -> Any:
    from confluent_kafka import Producer

    return Producer(
        {
            "bootstrap.servers": bootstrap,
            "client.id": "prompt-snake-faults",
            "message.timeout.ms": int(timeout_s * 1000),
            "linger.ms": 0,
        }
    )


class FaultSuite:
    """Play scenarios on live stacks.

    Parameters
    ----------
    workdir : `pathlib.Path`
        Where the stacks' run directories go (one per scenario, or ``shared``).
    repo : `pathlib.Path`
        A central repository (the shim's health check opens it; the stand-in never reads it).
    settings : `SuiteSettings`
        The pace and scale.
    shared_stack : `bool`, optional
        One stack for all scenarios (see the module docstring).
    progress : callable, optional
        Called with a line of progress.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        repo: Path,
        settings: SuiteSettings,
        shared_stack: bool = False,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.workdir, self.repo, self.settings = Path(workdir).resolve(), Path(repo).resolve(), settings
        self.shared_stack = shared_stack
        self.progress = progress or (lambda line: _log.info("%s", line))
        self.base = load_config(instrument=settings.instrument)
        active = [d.id for d in Instrument.from_config(self.base).active_detectors()]
        if settings.detectors < 1 or settings.detectors > len(active):
            raise ValueError(f"detectors: {settings.detectors}; between 1 and {len(active)} for {settings.instrument}")
        self.detectors = active[: settings.detectors]
        self.postgres: PostgresServer | None = None
        self.apdb: ApdbRows | None = None
        self._stores_rows: set[Path] = set()  # run directories of the stacks whose apdb stores rows

    # -- the stack ----------------------------------------------------------------------

    def _start_postgres(self, resources: ExitStack) -> None:
        """Start the suite's PostgreSQL server and create the stand-in *apdb*'s table."""
        server = PostgresServer(self.workdir / "postgres")
        resources.enter_context(server)
        if server.data_dir is None or not server.data_dir.is_relative_to(server.base_dir):
            raise RuntimeError(
                f"PostgreSQL cluster in {server.data_dir}, outside {server.base_dir}: a stop would remove it"
            )
        self.postgres, self.apdb = server, ApdbRows(HOST, server.port, server.database, server.user)
        self.apdb.create()
        self.progress(f"PostgreSQL up on port {server.port} ({self.apdb.where})")

    def _stack(self, workdir: Path, unbuildable: Unbuildable | None, *, rows: bool) -> LiveStack:
        settings, cadence = self.settings, self.settings.cadence
        raw_timeout_s = 2 * (cadence.lead_s + cadence.exptime_s + cadence.readout_s) + float(
            self.base["raw"]["image_timeout_s"]
        )
        snakefile = write_fault_snakefile(
            workdir / "night" / "Snakefile",
            settings.cost,
            paths=self.base["paths"],
            poll_s=poll_interval(self.base["ingest"], indexed=True),
            raw_timeout_s=raw_timeout_s,
            unbuildable=unbuildable,
            apdb=self.apdb if rows else None,
        )
        if rows:
            self._stores_rows.add(workdir.resolve())
        slots = settings.slots or max(len(self.detectors) * 3, 8)
        overrides: dict[str, Any] = {
            "active_detectors": {"default": False, "overrides": {str(d): True for d in self.detectors}}
        }
        if settings.retry is not None:
            overrides["submission"] = {"retry": dict(settings.retry)}
        return LiveStack(
            workdir,
            repo=self.repo,
            instrument=settings.instrument,
            scale=1.0,
            design="streaming",
            overrides=overrides,
            shim_args=["--snakefile", str(snakefile), "--max-concurrent-targets", str(slots), "--grace-s", "30"],
        )

    def _unbuildable(self, scenario: Scenario, ordinal_base: int) -> Unbuildable | None:
        if scenario.unbuildable is None:
            return None
        visit, position = scenario.unbuildable
        return Unbuildable(ordinal_base + visit, self.detectors[position])

    @contextmanager
    def _entered(self, stack: LiveStack) -> Iterator[LiveStack]:
        started = time.monotonic()
        with stack:
            os.environ.update({k: v for k, v in stack.env.items() if k.startswith("AWS_")})  # the camera's uploads
            self.progress(f"live stack up in {time.monotonic() - started:.0f} s ({stack.workdir})")
            yield stack

    # -- the suite ----------------------------------------------------------------------

    def run(self, scenarios: Sequence[Scenario]) -> list[dict[str, Any]]:
        """Play ``scenarios`` in order; return one report per scenario (`fault_report.account`)."""
        with ExitStack() as resources:
            if any(s.apdb_rows for s in scenarios):
                self._start_postgres(resources)
            return self._run(scenarios)

    def _run(self, scenarios: Sequence[Scenario]) -> list[dict[str, Any]]:
        reports = []
        if not self.shared_stack:
            for scenario in scenarios:
                workdir = self.workdir / scenario.name
                stack = self._stack(workdir, self._unbuildable(scenario, 0), rows=scenario.apdb_rows)
                with self._entered(stack):
                    reports.append(self.play(scenario, stack))
            return reports
        late = [s.name for s in scenarios[1:] if s.unbuildable is not None]
        if late:
            raise ValueError(f"shared stack: scenario(s) {late} with an unbuildable target must come first")
        first = self._unbuildable(scenarios[0], 0) if scenarios else None
        rows = any(s.apdb_rows for s in scenarios)
        with self._entered(self._stack(self.workdir / "shared", first, rows=rows)) as stack:
            for scenario in scenarios:
                reports.append(self.play(scenario, stack))
        return reports

    def play(self, scenario: Scenario, stack: LiveStack) -> dict[str, Any]:
        """Play one scenario on a running ``stack``; return its report."""
        settings = self.settings
        started, load_start = time.monotonic(), os.getloadavg()
        deadline = started + settings.timeout_s(scenario)
        self.progress(f"scenario {scenario.name}: {scenario.description} (timeout {deadline - started:.0f} s)")
        counts_before = stack.status().get("counts", {})
        expect_dir = stack.workdir / "night" / "expect"
        ordinal_base = len(list(expect_dir.glob("*.txt"))) if expect_dir.is_dir() else 0
        stop, timeline = threading.Event(), Timeline()
        camera = PatientCamera(
            stack.config,
            self.detectors,
            settings.cadence,
            workdir=stack.workdir,
            stop=stop,
            kafka_timeout_s=settings.kafka_timeout_s,
            put_patience_s=settings.put_patience_s,
        )
        played: list[list[VisitRecord]] = []
        camera_error: list[BaseException] = []

        def night() -> None:
            try:
                played.append(camera.run(deadline, timeline.note))
            except BaseException as exc:  # noqa: BLE001 - reported with the scenario
                camera_error.append(exc)
                _log.exception("camera failed")

        thread = threading.Thread(target=night, name=f"camera-{scenario.name}", daemon=True)
        thread.start()
        window, fault_error = self._inject(scenario, stack, timeline, deadline, stop)
        if window is not None or fault_error is not None:
            what = fault_error if window is None else window.to_dict()
            self.progress(f"scenario {scenario.name}: fault {scenario.fault.name}: {what}")
        thread.join(timeout=max(deadline - time.monotonic(), 0.0) + settings.kafka_timeout_s)
        if thread.is_alive():
            stop.set()
            thread.join(timeout=settings.kafka_timeout_s)
        if camera_error and fault_error is None:
            fault_error = f"camera: {type(camera_error[0]).__name__}: {camera_error[0]}"
        visits = played[0] if played else list(camera.visits)
        all_ended = self._wait_outcomes(stack, visits, deadline)
        unbuildable = None
        if scenario.unbuildable is not None:
            target = self._unbuildable(scenario, ordinal_base)
            visit = next((v for v in visits if v.index == scenario.unbuildable[0]), None)
            if target is not None and visit is not None:
                unbuildable = (visit.group, target.detector)
        apdb_rows, apdb_error = None, None
        if self.apdb is not None and stack.workdir in self._stores_rows:
            try:
                apdb_rows = self.apdb.rows([v.group for v in visits])
            except Exception as exc:  # noqa: BLE001 - reported with the scenario
                apdb_error = f"{type(exc).__name__}: {exc}"
        observed = Observed(
            scenario=scenario,
            visits=visits,
            planned_visits=settings.cadence.visits,
            detectors=list(self.detectors),
            window=window,
            fault_error=fault_error,
            unbuildable=unbuildable,
            counts_before=counts_before,
            counts_after=stack.status().get("counts", {}),
            all_ended=all_ended,
            wall_s=time.monotonic() - started,
            upload_retries=camera.upload_retries,
            shim_alive=stack.shim is not None and stack.shim.poll() is None,
            apdb_rows=apdb_rows,
            apdb_error=apdb_error,
        )
        report = account(observed, workdir=stack.workdir, instrument=settings.instrument, paths=self.base["paths"])
        report["workdir"] = str(stack.workdir)
        report["load_average"] = {
            "start": [round(v, 2) for v in load_start],
            "end": [round(v, 2) for v in os.getloadavg()],
        }
        self.progress(
            f"scenario {scenario.name}: {report['targets']['done']}/{report['targets']['expected']} done, "
            f"{report['targets']['failed']} failed, {report['targets']['lost']} lost in {report['wall_s']:.0f} s; "
            f"goals {'met' if report['goals']['met'] else 'MISSED: ' + '; '.join(report['goals']['violations'])}"
        )
        return report

    def _inject(
        self, scenario: Scenario, stack: LiveStack, timeline: Timeline, deadline: float, stop: threading.Event
    ) -> tuple[FaultWindow | None, str | None]:
        """Wait for the trigger, then inject the fault from this thread; return its window or why not."""
        trigger = scenario.trigger
        if scenario.fault.name == "none":
            return None, None
        when = timeline.wait(trigger.event, trigger.visit, deadline, stop)
        if when is None:
            return None, f"trigger {trigger} never came"
        wait_s = when + trigger.offset_s - time.time()
        if wait_s > 0 and stop.wait(min(wait_s, max(deadline - time.monotonic(), 0.0))):
            return None, "stopped before the trigger"
        bootstrap, topic = stack.config["kafka"]["bootstrap"], stack.config["kafka_topics"]["next_visit"]
        producer: Any = None

        def publish(value: bytes) -> None:
            nonlocal producer
            producer = producer or _producer(bootstrap, self.settings.kafka_timeout_s)
            delivered: list[Any] = []
            producer.produce(topic, value, key=b"faults", on_delivery=lambda error, _m: delivered.append(error))
            producer.flush(self.settings.kafka_timeout_s)
            if not delivered or delivered[0] is not None:
                raise ConnectionError(f"poison next_visit not delivered: {delivered[:1]}")

        try:
            context = FaultContext(stack=stack, stop=stop, publish=publish, postgres=self.postgres)
            return scenario.fault.inject(context), None
        except Exception as exc:  # noqa: BLE001 - reported with the scenario
            _log.exception("fault %s failed", scenario.fault.name)
            return None, f"{type(exc).__name__}: {exc}"

    def _wait_outcomes(self, stack: LiveStack, visits: Sequence[VisitRecord], deadline: float) -> bool:
        """Wait until every announced target has an outcome file and the shim has none in flight."""
        results = stack.workdir / self.base["paths"]["results"] / self.settings.instrument
        targets = [results / v.day_obs / v.group / str(d) for v in visits for d in self.detectors]
        while True:
            ended = all((t / "done.json").exists() or (t / "failed.json").exists() for t in targets)
            flying = stack.status().get("gauges", {}).get("targets", {}).get("in_flight", math.inf)
            if ended and flying == 0:
                return True
            if time.monotonic() >= deadline or (stack.shim is not None and stack.shim.poll() is not None):
                return False
            time.sleep(1.0)
