"""The fault suite's scenarios: what goes wrong, when, and what must still hold.

A `Scenario` names one `Fault` (or none), the moment it strikes (a `Trigger`: so
many seconds after the camera announced visit ``k``, or after visit ``k``'s raws
all landed), and its goals beyond the common ones (0 lost, 0 duplicated stage
runs, one alert marker per done target): failures and next_visit drops expected,
a bound on intake recovery.  `stream_shim.testbed.fault_run` plays a scenario on
a live stack and `stream_shim.testbed.fault_report` judges it.

Faults act on the live stack's own servers and processes (`FaultContext`):

- `BrokerDown`: ``KafkaBroker.stop()``, a pause, ``start()`` on the same port and
  storage (a restart when the pause is short, an outage when it is long);
- `S3Down`: the same with the raw bucket's SeaweedFS (``LiveStack.s3``);
- `PostgresDown`: the same with the PostgreSQL server of the stand-in *apdb*
  (``FaultContext.postgres``; `stream_shim.testbed.fault_standin.ApdbRows`);
- `KillSnakemake`: SIGKILL of the shim's streaming Snakemake (that process only:
  its jobs are the shim's to stop);
- `PoisonNextVisits`: next_visits the shim must drop (e.g. groupId ``../../x``).

The crafted target no rule can build is a property of the workflow, not a fault:
`Scenario.unbuildable` (`stream_shim.testbed.fault_standin`).

Servers are restarted from the calling thread: `LocalServer` children die with the
thread that started them, so a fault must be injected from a thread that outlives
the stack (the driver's main thread).
"""

from __future__ import annotations

__all__ = [
    "BrokerDown",
    "build_scenarios",
    "FaultContext",
    "FaultWindow",
    "Fault",
    "KillSnakemake",
    "NoFault",
    "PoisonNextVisits",
    "PostgresDown",
    "S3Down",
    "SCENARIOS",
    "Scenario",
    "Trigger",
    "poison_next_visit",
    "scenarios_named",
    "streaming_snakemake_pids",
]

import dataclasses
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import psutil
from astropy.time import Time

from stream_shim.testbed.live_stack import LiveStack
from stream_shim.testbed.night import Cadence
from workflow.core.visit import CoordSys, Dome, NextVisit, RotSys

_log = logging.getLogger(__name__)

_BROKER_LEAD_S = 7.0
"""A broker fault starts this long before the next next_visit (Tansu serves ~5 s after SIGTERM, then stops)."""


@dataclasses.dataclass(frozen=True)
class Trigger:
    """When a fault strikes: ``offset_s`` after the camera's ``event`` of visit ``visit``.

    Attributes
    ----------
    event : `str`
        ``announced`` (its next_visit was delivered to the broker) or ``raws_landed`` (its last raw landed).
    visit : `int`
        Visit index (0-based).
    offset_s : `float`
        Seconds after that event (>= 0).
    """

    event: str = "announced"
    visit: int = 1
    offset_s: float = 0.0

    def __post_init__(self) -> None:
        if self.event not in ("announced", "raws_landed") or self.offset_s < 0:
            raise ValueError(f"trigger {self}: event must be 'announced' or 'raws_landed', offset_s >= 0")


@dataclasses.dataclass
class FaultWindow:
    """When a fault was in force (unix seconds) and what it did."""

    started: float
    ended: float
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the window as a JSON-able mapping."""
        return {
            "started": round(self.started, 3),
            "ended": round(self.ended, 3),
            "lasted_s": round(self.ended - self.started, 3),
            **self.detail,
        }


@dataclasses.dataclass
class FaultContext:
    """What a fault may act on.

    Attributes
    ----------
    stack : `stream_shim.testbed.live_stack.LiveStack`
        The running stack (``broker``, ``s3``, ``shim``, ``config``).
    stop : `threading.Event`
        Set when the scenario must end early; every pause waits on it.
    publish : callable
        ``publish(value)`` sends raw bytes on the next_visit topic (bounded), or raises.
    postgres : `stream_shim.testbed.local_services.PostgresServer` or `None`
        The stand-in *apdb*'s server, when the scenario stores rows.
    """

    stack: LiveStack
    stop: threading.Event
    publish: Callable[[bytes], None]
    postgres: Any = None

    def next_visit_template(self) -> dict[str, Any]:
        """Return the fields of a good next_visit of the stack's instrument, sent now (`NextVisit.to_dict`)."""
        now = Time.now().tai
        visit = NextVisit(
            salIndex=1,
            scriptSalIndex=1,
            instrument=self.stack.config["instrument"]["name"],
            groupId=now.isot,
            coordinateSystem=CoordSys.ICRS,
            position=[150.1, 2.2],
            startTime=now.unix_tai,
            rotationSystem=RotSys.SKY,
            cameraAngle=0.0,
            filters="",
            dome=Dome.OPEN,
            duration=10.0,
            nimages=1,
            survey="SURVEY",
            totalCheckpoints=0,
            private_sndStamp=now.unix_tai,
        )
        return visit.to_dict()


class Fault(Protocol):
    """A fault: ``inject`` it now and return its window (`None`: nothing was done)."""

    @property
    def name(self) -> str:
        """Short name of the fault."""
        ...

    def inject(self, context: FaultContext) -> FaultWindow | None: ...  # noqa: D102


@dataclasses.dataclass(frozen=True)
class NoFault:
    """Nothing goes wrong (the baseline)."""

    name: str = "none"

    def inject(self, context: FaultContext) -> FaultWindow | None:
        """Do nothing."""
        return None


def _pause(stop: threading.Event, seconds: float) -> None:
    stop.wait(max(seconds, 0.0))


class _PortWatch(threading.Thread):
    """Note the first moment a TCP port on 127.0.0.1 refuses connections (polled every 50 ms)."""

    def __init__(self, port: int) -> None:
        super().__init__(name=f"port-watch-{port}", daemon=True)
        self.port = port
        self.refused_at: float | None = None
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
            except OSError:
                self.refused_at = time.time()
                return
            self.done.wait(0.05)

    def finish(self) -> float | None:
        """Stop watching; return when the port first refused (unix), or `None`."""
        self.done.set()
        self.join(timeout=2.0)
        return self.refused_at


def _outage(server: Any, port: int, stop: threading.Event, down_s: float) -> FaultWindow:
    """Stop ``server``, keep it down ``down_s`` after its port first refuses, start it; return the window."""
    watch = _PortWatch(port)
    watch.start()
    called = time.time()
    server.stop()
    stopped = time.time()
    down = watch.finish() or stopped
    _pause(stop, down_s)
    server.start()
    ended = time.time()
    return FaultWindow(
        down,
        ended,
        {
            "stop_called": round(called, 3),
            "served_after_stop_s": round(down - called, 3),
            "stop_s": round(stopped - called, 3),
            "start_s": round(server.start_seconds or 0.0, 3),
        },
    )


@dataclasses.dataclass(frozen=True)
class BrokerDown:
    """Stop the broker (and its storage), wait ``down_s``, start it again on the same port.

    Tansu keeps serving its connected clients for a few seconds after SIGTERM (~5 s
    with the shim's consumers), so the window starts when its port first refuses a
    connection (``stop_called`` is when ``stop()`` was called) and ends when it
    answers again.
    """

    down_s: float
    name: str = "broker_down"

    def inject(self, context: FaultContext) -> FaultWindow | None:
        """Stop, pause, start; return the time the broker was away."""
        broker = context.stack.broker
        if broker is None:
            raise RuntimeError("the live stack has no broker")
        window = _outage(broker, broker.port, context.stop, self.down_s)
        _log.warning(
            "fault: broker away %.1f s (it served %.1f s after stop() was called; start %.1f s)",
            window.ended - window.started,
            window.detail["served_after_stop_s"],
            window.detail["start_s"],
        )
        return window


@dataclasses.dataclass(frozen=True)
class S3Down:
    """Stop the raw bucket's S3 server, wait ``down_s``, start it again on the same ports.

    SeaweedFS, too, takes seconds to stop with clients connected: the window starts
    when its S3 port first refuses a connection and ends when it answers again.
    """

    down_s: float
    name: str = "s3_down"

    def inject(self, context: FaultContext) -> FaultWindow | None:
        """Stop, pause, start; return the time S3 was away."""
        server = context.stack.s3
        if server is None:
            raise RuntimeError("the live stack has no S3 server")
        window = _outage(server, server.port, context.stop, self.down_s)
        _log.warning(
            "fault: S3 away %.1f s (stop() took %.1f s)", window.ended - window.started, window.detail["stop_s"]
        )
        return window


@dataclasses.dataclass(frozen=True)
class PostgresDown:
    """Stop the stand-in *apdb*'s PostgreSQL server, wait ``down_s``, start it again (same port and cluster).

    The server stops in "fast" mode (SIGINT: open connections are cut), so an
    *apdb* job in the middle of its insert fails like one that cannot connect.
    """

    down_s: float
    name: str = "postgres_down"

    def inject(self, context: FaultContext) -> FaultWindow | None:
        """Stop, pause, start; return the time PostgreSQL was away."""
        server = context.postgres
        if server is None:
            raise RuntimeError("the scenario has no PostgreSQL server (Scenario.apdb_rows is false)")
        window = _outage(server, server.port, context.stop, self.down_s)
        _log.warning(
            "fault: PostgreSQL away %.1f s (stop() took %.1f s)", window.ended - window.started, window.detail["stop_s"]
        )
        return window


def streaming_snakemake_pids(shim_pid: int) -> list[int]:
    """Return the pids of the shim's streaming Snakemake processes (``-m stream_shim.queue_runner``)."""
    try:
        children = psutil.Process(shim_pid).children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []
    found = []
    for child in children:
        try:
            words = child.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if "stream_shim.queue_runner" in words[1:3]:
            found.append(child.pid)
    return sorted(found)


@dataclasses.dataclass(frozen=True)
class KillSnakemake:
    """SIGKILL the shim's streaming Snakemake (the newest one, if a rollover left two)."""

    name: str = "kill_snakemake"

    def inject(self, context: FaultContext) -> FaultWindow | None:
        """Kill it; the window is the instant of the kill."""
        shim = context.stack.shim
        if shim is None:
            raise RuntimeError("the live stack has no shim")
        pids = streaming_snakemake_pids(shim.pid)
        if not pids:
            raise RuntimeError(f"no streaming Snakemake under shim pid {shim.pid}")
        victim = pids[-1]
        try:
            jobs = len(psutil.Process(victim).children(recursive=True))
        except psutil.Error:
            jobs = -1
        now = time.time()
        os.kill(victim, signal.SIGKILL)
        _log.warning("fault: SIGKILL to streaming snakemake pid %d (%d job process(es) below it)", victim, jobs)
        return FaultWindow(now, now, {"pid": victim, "job_processes": jobs})


def poison_next_visit(template: Mapping[str, Any], group: str) -> bytes:
    """Return a next_visit JSON like ``template`` (a `NextVisit.to_dict`) with groupId ``group``, unchecked."""
    return json.dumps({**template, "groupId": group}).encode()


@dataclasses.dataclass(frozen=True)
class PoisonNextVisits:
    """Publish next_visits the shim must drop: each of ``groups`` as the groupId of a good message.

    Attributes
    ----------
    groups : `tuple` [`str`, ...]
        Group ids that must not become paths (e.g. ``../../x``).
    """

    groups: tuple[str, ...]
    name: str = "poison_next_visits"

    def inject(self, context: FaultContext) -> FaultWindow | None:
        """Publish them; the window is the time it took."""
        started = time.time()
        fields = context.next_visit_template()
        for group in self.groups:
            context.publish(poison_next_visit(fields, group))
        _log.warning("fault: %d poison next_visit(s) published: %s", len(self.groups), list(self.groups))
        return FaultWindow(started, time.time(), {"groups": list(self.groups)})


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One scenario of the suite.

    Attributes
    ----------
    name : `str`
        Short name (the table's row).
    description : `str`
        One line.
    fault : `Fault`
        What goes wrong.
    trigger : `Trigger`
        When.
    unbuildable : `tuple` [`int`, `int`] or `None`
        ``(visit index, detector position)`` of the one target no rule builds (expected failed).
    expected_drops : `~collections.abc.Mapping` [`str`, `int`]
        next_visit drops by reason the shim must count (e.g. ``{"invalid_group": 1}``).
    intake_bound_s : `float` or `None`
        Goal: the first next_visit after the fault is consumed within this many seconds of its end.
    apdb_rows : `bool`
        The stand-in *apdb* stores a row per detector-visit in PostgreSQL (goal: one row per done
        target, none twice).
    """

    name: str
    description: str
    fault: Fault = dataclasses.field(default_factory=NoFault)
    trigger: Trigger = Trigger()
    unbuildable: tuple[int, int] | None = None
    expected_drops: Mapping[str, int] = dataclasses.field(default_factory=dict)
    intake_bound_s: float | None = None
    apdb_rows: bool = False

    @property
    def expected_failures(self) -> int:
        """Targets that must end failed (the crafted unbuildable one, if any)."""
        return int(self.unbuildable is not None)


def build_scenarios(cadence: Cadence) -> list[Scenario]:
    """Return the suite's scenarios, timed for the camera's ``cadence``.

    The broker faults strike after visit 1's raws all landed, 7 s before visit 2's
    next_visit is due (Tansu goes on serving ~5 s after SIGTERM): that next_visit is
    sent while the broker is away (the camera's producer holds it), so the first
    next_visit consumed after the broker is back measures the shim's recovery, not the
    cadence; and a short restart is over before visit 2's raws land.  The S3 outage
    starts halfway through visit 1's raws: some are in the bucket and being read, the
    others not uploaded yet.  The PostgreSQL outage starts 1 s after visit 1's raws
    landed, before its *apdb* jobs (after ingest and pipeline), and lasts into visit 2's.

    Raises
    ------
    ValueError
        If the cadence leaves less than 7 s between a visit's last raw and the next next_visit.
    """
    landed = cadence.lead_s + cadence.exptime_s + cadence.readout_s + cadence.raw_spread_s
    gap = cadence.cadence_s - landed
    if gap < _BROKER_LEAD_S:
        raise ValueError(
            f"{cadence}: a visit's raws land {landed:g} s after its next_visit; the broker faults need "
            f"{_BROKER_LEAD_S:g} s more before the next one (cadence_s >= {landed + _BROKER_LEAD_S:g})"
        )
    before_next = Trigger("raws_landed", 1, gap - _BROKER_LEAD_S)
    mid_raws = Trigger("announced", 1, landed - cadence.raw_spread_s / 2)
    return [
        Scenario("baseline", "no fault"),
        Scenario(
            "broker_restart",
            "KafkaBroker.stop(); 1 s; start(), between visit 1's raws and visit 2's next_visit",
            BrokerDown(1.0, name="broker_restart"),
            before_next,
            intake_bound_s=30.0,
        ),
        Scenario(
            "broker_outage",
            "the broker away for 20 s, from between visit 1's raws and visit 2's next_visit",
            BrokerDown(20.0, name="broker_outage"),
            before_next,
        ),
        Scenario(
            "s3_outage",
            "the raw bucket's S3 away for 20 s from halfway through visit 1's raws (ingest reads them from S3)",
            S3Down(20.0),
            mid_raws,
        ),
        Scenario(
            "postgres_outage",
            "the stand-in APDB's PostgreSQL away for 20 s from 1 s after visit 1's raws landed (its apdb stages)",
            PostgresDown(20.0, name="postgres_outage"),
            Trigger("raws_landed", 1, 1.0),
            apdb_rows=True,
        ),
        Scenario(
            "poison",
            "a next_visit with groupId ../../x after visit 1, and visit 2's first detector unbuildable",
            PoisonNextVisits(("../../x",)),
            Trigger("announced", 1, 0.5),
            unbuildable=(2, 0),
            expected_drops={"invalid_group": 1},
        ),
        Scenario(
            "kill_snakemake",
            "SIGKILL of the streaming Snakemake 1 s after visit 1's raws landed (its jobs running)",
            KillSnakemake(),
            Trigger("raws_landed", 1, 1.0),
        ),
    ]


SCENARIOS: tuple[str, ...] = (
    "baseline",
    "broker_restart",
    "broker_outage",
    "s3_outage",
    "postgres_outage",
    "poison",
    "kill_snakemake",
)
"""Names of the suite's scenarios, in order (`build_scenarios`)."""


def scenarios_named(names: Sequence[str], cadence: Cadence) -> list[Scenario]:
    """Return the scenarios of ``names`` (in the suite's order), timed for ``cadence``.

    Raises
    ------
    ValueError
        If a name is not one of `SCENARIOS`.
    """
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; expected some of {list(SCENARIOS)}")
    return [s for s in build_scenarios(cadence) if s.name in names]
