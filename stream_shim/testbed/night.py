"""The night simulator's summit and camera: next_visits and raws at a fixed cadence.

`NightCamera` plays a night against the live stack: visit ``k`` is announced on the
next-visit topic at ``t0 + k * cadence_s``, its exposure starts ``lead_s`` later and
lasts ``exptime_s``; after ``readout_s`` its detectors' raws land in the raw bucket,
spread over ``raw_spread_s`` (in a shuffled, seeded order).  Unlike the camera testers
of `workflow.sim.testers`, which finish one visit before announcing the next, the
next visit is announced while the previous one still exposes, as at the summit.

Raws are tiny stand-in objects (the stand-in workflow only needs their arrival),
under the instrument's real key layout, each followed by its JSON sidecar when the
config asks for one, so the bucket, filer bridge and shim see the summit's traffic.
Before announcing a visit the driver writes ``night/expect/{group}.txt``: for each
detector, the arrival-index entry its raw will have (read by the stand-in ingest,
`stream_shim.testbed.night_standin`).

Every wait is bounded by the ``stop`` event and the deadline given to `NightCamera.run`.
"""

from __future__ import annotations

__all__ = ["Cadence", "NightCamera", "RawRecord", "VisitRecord", "arrival_entry"]

import concurrent.futures
import dataclasses
import functools
import heapq
import itertools
import json
import logging
import random
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from astropy.time import Time, TimeDelta

from stream_shim.testbed.night_standin import EXPECT_DIR
from workflow.core.arrivals import normalize_day_obs
from workflow.core.buckets import Bucket, open_bucket
from workflow.core.instrument import Instrument
from workflow.core.raw_keys import RawKeyLayout, sidecar_key
from workflow.core.visit import CoordSys, Dome, NextVisit, RotSys
from workflow.sim.exposures import make_exposures
from workflow.sim.testers import next_seq_num

_log = logging.getLogger(__name__)

_HALF_DAY = TimeDelta(12 * 3600.0, format="sec")
_POSITION = (150.1, 2.2)  # the demo field (any ICRS position does: the stand-in stages never look)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cadence:
    """The pace of the night.

    Attributes
    ----------
    visits : `int`
        Number of visits.
    cadence_s : `float`
        Seconds between two next_visits (LSSTCam: 32).
    lead_s : `float`
        Seconds from a next_visit to its exposure's start (LSSTCam: at least 20).
    exptime_s : `float`
        Exposure time.
    readout_s : `float`
        From the end of the exposure to the first raw in the bucket.
    raw_spread_s : `float`
        The raws of a visit land over this many seconds.
    """

    visits: int
    cadence_s: float = 32.0
    lead_s: float = 20.0
    exptime_s: float = 30.0
    readout_s: float = 2.0
    raw_spread_s: float = 3.0

    def __post_init__(self) -> None:
        if self.visits < 1 or self.cadence_s <= 0 or min(self.lead_s, self.exptime_s, self.readout_s) < 0:
            raise ValueError(f"{self}: visits >= 1, cadence_s > 0 and non-negative waits are needed")
        if self.raw_spread_s < 0:
            raise ValueError(f"{self}: raw_spread_s must be >= 0")

    def last_raw_after_s(self) -> float:
        """Return the seconds from the first next_visit to the last raw, as planned."""
        return (self.visits - 1) * self.cadence_s + self.lead_s + self.exptime_s + self.readout_s + self.raw_spread_s


@dataclasses.dataclass
class RawRecord:
    """One raw of one detector-visit: its key and when it was planned to land and did."""

    detector: int
    key: str
    entry: str
    """Its arrival-index entry, relative to the index root (`arrival_entry`)."""
    planned: float
    put_done: float | None = None
    error: str | None = None


@dataclasses.dataclass
class VisitRecord:
    """One visit as the summit and camera played it (unix seconds)."""

    index: int
    group: str
    day_obs: str
    """The target's day (``YYYY-MM-DD``, from the next_visit)."""
    announced: float
    exposure_start: float
    raws: dict[int, RawRecord] = dataclasses.field(default_factory=dict)
    publish_error: str | None = None


def arrival_entry(instrument: str, day_obs: str | int, detector: int, key: str) -> str:
    """Return the path of a raw's `workflow.core.arrivals.ArrivalIndex` entry, relative to its root."""
    return f"{instrument}/{normalize_day_obs(day_obs)}/{int(detector)}/{urllib.parse.quote(key, safe='')}.json"


def _producer(bootstrap: str, timeout_s: float) -> Any:
    from confluent_kafka import Producer

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "client.id": "prompt-snake-night",
            "message.timeout.ms": int(timeout_s * 1000),
            "linger.ms": 0,
        }
    )
    producer.list_topics(timeout=timeout_s)
    return producer


class NightCamera:
    """Announce visits and land their raws at a cadence.

    Parameters
    ----------
    config : `~collections.abc.Mapping`
        Merged configuration of the live run (broker, bucket, raw key layout, topics).
    detectors : sequence of `int`
        Detector ids exposed in every visit.
    cadence : `Cadence`
        The pace.
    workdir : `pathlib.Path`
        Run directory (``night/expect`` is written under it).
    stop : `threading.Event`
        Ends the night early.
    upload_threads : `int`, optional
        Concurrent uploads.
    seed : `int`, optional
        Seed of the raws' landing order.
    kafka_timeout_s : `float`, optional
        Bound on reaching the broker and on each delivery.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        detectors: Sequence[int],
        cadence: Cadence,
        *,
        workdir: Path,
        stop: threading.Event,
        upload_threads: int = 8,
        seed: int = 0,
        kafka_timeout_s: float = 10.0,
    ) -> None:
        self.config, self.cadence, self.stop = config, cadence, stop
        self.instrument = Instrument.from_config(config)
        self.detectors = [self.instrument.detector(int(d)) for d in detectors]
        self.layout = RawKeyLayout.from_config(config)
        self.sidecars = bool(config["raw"].get("sidecar"))
        self.expect_dir = Path(workdir) / EXPECT_DIR
        self.upload_threads, self.seed, self.kafka_timeout_s = upload_threads, seed, kafka_timeout_s
        self.visits: list[VisitRecord] = []
        self._lock = threading.Lock()

    def run(self, deadline: float, on_event: Callable[[str, VisitRecord], None] | None = None) -> list[VisitRecord]:
        """Play the night; return the visits (also in ``visits``).

        Parameters
        ----------
        deadline : `float`
            `time.monotonic` time after which nothing more is announced or uploaded.
        on_event : callable, optional
            Called with ``("announced"|"raws_landed", visit)``, for progress.
        """
        notify = on_event or (lambda what, visit: None)
        bucket = open_bucket(self.config, self.config["buckets"]["raw"])
        producer = _producer(self.config["kafka"]["bootstrap"], self.kafka_timeout_s)
        self.expect_dir.mkdir(parents=True, exist_ok=True)
        seqs: dict[int, int] = {}
        counter = itertools.count()
        start = time.time() + 1.0
        events: list[tuple[float, int, Callable[[], None]]] = []
        pending: dict[int, int] = {}  # visit index -> raws not landed yet

        def announce(index: int) -> None:
            visit = self._announce(index, producer, bucket, seqs)
            notify("announced", visit)
            with self._lock:
                pending[index] = len(visit.raws)
            for raw in visit.raws.values():
                action: Callable[[], None] = functools.partial(upload, visit, raw)
                heapq.heappush(events, (raw.planned, next(counter), action))

        def upload(visit: VisitRecord, raw: RawRecord) -> None:
            future = pool.submit(self._put, bucket, visit, raw)
            future.add_done_callback(functools.partial(landed, visit))

        def landed(visit: VisitRecord, _future: object) -> None:
            with self._lock:
                pending[visit.index] -= 1
                last = pending[visit.index] == 0
            if last:
                notify("raws_landed", visit)

        for index in range(self.cadence.visits):
            first: Callable[[], None] = functools.partial(announce, index)
            heapq.heappush(events, (start + index * self.cadence.cadence_s, next(counter), first))
        with concurrent.futures.ThreadPoolExecutor(self.upload_threads, thread_name_prefix="night-upload") as pool:
            while events and not self.stop.is_set():
                due, _, action = events[0]
                wait = due - time.time()
                if time.monotonic() + max(wait, 0.0) > deadline:
                    _log.warning("night: duration limit reached with %d event(s) left", len(events))
                    break
                if wait > 0:
                    self.stop.wait(min(wait, 1.0))
                    continue
                heapq.heappop(events)
                action()
            producer.flush(self.kafka_timeout_s)
        return self.visits

    def _announce(self, index: int, producer: Any, bucket: Bucket, seqs: dict[int, int]) -> VisitRecord:
        """Plan visit ``index`` now, write its expectations, publish its next_visit."""
        cadence = self.cadence
        sent = Time(time.time(), format="unix").tai
        start = sent + TimeDelta(cadence.lead_s, format="sec")
        if (start - _HALF_DAY).strftime("%Y%m%d") != (sent - _HALF_DAY).strftime("%Y%m%d"):
            start = sent  # keep the raws' day_obs equal to the next_visit's
        day = int((start - _HALF_DAY).strftime("%Y%m%d"))
        if day not in seqs:
            seqs[day] = next_seq_num(bucket, self.layout, day)
        seq, seqs[day] = seqs[day], seqs[day] + 1
        (exposure,) = make_exposures(
            self.instrument,
            start=start,
            seq_num=seq,
            ra=_POSITION[0],
            dec=_POSITION[1],
            rotation_deg=0.0,
            physical_filter=next(iter(self.instrument.filters)),
            exptime=cadence.exptime_s,
            group_id=sent.isot,
            n_snaps=1,
        )
        visit = NextVisit(
            salIndex=1,
            scriptSalIndex=index + 1,
            instrument=self.instrument.name,
            groupId=exposure.group_id,
            coordinateSystem=CoordSys.ICRS,
            position=list(_POSITION),
            startTime=start.unix_tai,
            rotationSystem=RotSys.SKY,
            cameraAngle=0.0,
            filters=exposure.physical_filter,
            dome=Dome.OPEN,
            duration=cadence.lead_s + cadence.exptime_s + cadence.readout_s,
            nimages=1,
            survey="SURVEY",
            totalCheckpoints=0,
            private_sndStamp=sent.unix_tai,
        )
        exposure_start = float(start.unix)
        record = VisitRecord(
            index, visit.groupId, visit.day_obs, announced=float(sent.unix), exposure_start=exposure_start
        )
        first = exposure_start + cadence.exptime_s + cadence.readout_s
        order = list(self.detectors)
        random.Random(self.seed * 100_003 + index).shuffle(order)
        step = cadence.raw_spread_s / max(len(order) - 1, 1)
        for position, det in enumerate(order):
            key = self.layout.format(
                instrument=self.instrument.name,
                day_obs=exposure.day_obs,
                obs_id=exposure.obs_id,
                detector=det.id,
                detector_name=det.name,
                group=exposure.group_id,
                snap=exposure.snap,
                exposure=exposure.exposure_id,
                physical_filter=exposure.physical_filter,
            )
            entry = arrival_entry(self.instrument.name, exposure.day_obs, det.id, key)
            record.raws[det.id] = RawRecord(det.id, key, entry, planned=first + position * step)
        lines = "".join(f"{det} {raw.entry}\n" for det, raw in sorted(record.raws.items()))
        expect = self.expect_dir / f"{visit.groupId}.txt"
        expect.with_suffix(".tmp").write_text(lines)
        expect.with_suffix(".tmp").replace(expect)
        delivered: list[Any] = []
        try:
            producer.produce(
                self.config["kafka_topics"]["next_visit"],
                visit.to_json().encode(),
                key=b"night",
                on_delivery=lambda error, _message: delivered.append(error),
            )
            producer.flush(self.kafka_timeout_s)
            if not delivered or delivered[0] is not None:
                raise ConnectionError(f"not delivered within {self.kafka_timeout_s:g} s: {delivered[:1]}")
        except Exception as exc:  # noqa: BLE001 - recorded: its targets then never appear
            record.publish_error = f"{type(exc).__name__}: {exc}"
            _log.error("next_visit %s not published: %s", visit.groupId, exc)
        self.visits.append(record)
        _log.info("visit %d announced: group %s, %d raws planned", index, visit.groupId, len(record.raws))
        return record

    def _put(self, bucket: Bucket, visit: VisitRecord, raw: RawRecord) -> None:
        """Upload one stand-in raw (and its sidecar) and record when it was complete."""
        try:
            bucket.put(raw.key, f"stand-in raw {raw.key}\n".encode())
            raw.put_done = time.time()
            if self.sidecars:
                bucket.put(
                    sidecar_key(raw.key), json.dumps({"GROUPID": visit.group, "DETECTOR": raw.detector}).encode()
                )
        except Exception as exc:  # noqa: BLE001 - recorded: that target waits for a raw that never comes
            raw.error = f"{type(exc).__name__}: {exc}"
            _log.error("raw %s not uploaded: %s", raw.key, exc)
