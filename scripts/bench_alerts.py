"""Benchmark alert production at Rubin's volume through the project's serializer, sink and a real broker.

Builds a pool of distinct alert packets once, the way the APDB stage does
(`workflow.apdb.alerts.build_alerts`: every DiaSource and DiaObject field filled,
0..``--max-prv`` previous DiaSources, three FITS cutouts from `CutoutMaker` with
stamps of 30x30 to 60x60 pixels), then replays visits on a Tansu broker (memory
storage, as the night simulator runs it): at each visit's start (every
``--cadence-s`` seconds) 189 detector-visit senders, threads spread over
``--procs`` forked processes, each send their share of the visit's alerts
(``--avg-alerts`` per visit, ``--peak-alerts`` for the peak visits, split over the
detectors at random) through `KafkaAlertSink`.  ``per-visit`` mode does what the
APDB stage does: a new sink (producer) per detector-visit, ``check`` then
``send``; ``reused`` keeps one producer per detector across visits.

Each run (``--runs``: named producer settings, see `RUNS`) has its own broker and
topic and ends by consuming the topic: every alert must arrive exactly once
(count, distinct ``diaSourceId`` read from the Avro body, key equal to it).

Prints one JSON document: per detector-visit send latency (first produce to last
delivery report) p50/p95/max, per-alert delivery latency, alerts/s and bytes/s,
serialization CPU per alert, sender and broker CPU user/sys, peak RSS, load
averages, and how many detector-visits were still sending when the next visit
started.

Usage: ``.venv/bin/python scripts/bench_alerts.py [--visits 5] [--peak-visits 1] [--runs before,after,reused]``
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import io
import json
import logging
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import pandas as pd
import psutil
from astropy.wcs import WCS

from stream_shim.testbed.local_services import KafkaBroker
from workflow.apdb.alerts import (
    CutoutMaker,
    KafkaAlertSink,
    alert_schema,
    build_alerts,
    deserialize_alert,
    serialize_alert,
    serialize_alert_fastavro,
    write_alert_file,
)

_log = logging.getLogger("bench_alerts")

N_DETECTORS = 189
IMAGE_SHAPE = (1024, 1024)
STAMP_SIDES = (30, 36, 42, 48, 54, 60)
"""Cutout sides drawn per alert (Rubin: 30x30 at least, larger for extended sources)."""
BAND = "i"
SEND_TIMEOUT_S = 30.0
"""`KafkaAlertSink` default, as the APDB stage builds it (`make_alert_sink(config, path)`)."""

BEFORE_SETTINGS: dict[str, Any] = {"linger.ms": 10, "compression.type": "none", "enable.idempotence": False}
"""The producer settings of `KafkaAlertSink` before this benchmark (librdkafka defaults otherwise)."""
CALIBRATION_ALERTS = 500
"""Alerts sent once more, to a scratch topic, by a producer that reports librdkafka statistics."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One configuration to measure: extra producer settings and the producer lifetime."""

    producer_config: Mapping[str, Any] | None
    """Passed to `KafkaAlertSink` (`None`: the sink's own defaults, i.e. what production uses now)."""
    mode: str
    """``per-visit`` (a producer per detector-visit, as the APDB stage) or ``reused`` (one per detector)."""
    serializer: str
    """``fastavro`` (`serialize_alert_fastavro`, the serializer before) or ``compiled`` (`serialize_alert`)."""


SERIALIZERS = {"fastavro": serialize_alert_fastavro, "compiled": serialize_alert}
RUNS = {
    "before": Run(BEFORE_SETTINGS, "per-visit", "fastavro"),
    "after": Run(None, "per-visit", "compiled"),
    "reused": Run(None, "reused", "compiled"),
    "compiled": Run(BEFORE_SETTINGS, "per-visit", "compiled"),
    "no-lz4": Run({"compression.type": "none"}, "per-visit", "compiled"),
    "idempotence": Run({"enable.idempotence": True}, "per-visit", "compiled"),
    "zstd": Run({"compression.type": "zstd"}, "per-visit", "compiled"),
}
"""before: the old serializer and settings; compiled: the new serializer alone; after: what
`KafkaAlertSink` does now; reused: that with one producer per detector for all visits; the
others: ``after`` without lz4, with zstd, or with idempotence."""


# ----------------------------------------------------------------------------- packets


def _wcs() -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype, wcs.wcs.crval = ["RA---TAN", "DEC--TAN"], [53.0, -28.0]
    wcs.wcs.crpix = [IMAGE_SHAPE[1] / 2 + 0.5, IMAGE_SHAPE[0] / 2 + 0.5]
    wcs.wcs.cd = [[-0.2 / 3600, 0.0], [0.0, 0.2 / 3600]]
    return wcs


def _record_schema(name: str) -> list[dict[str, Any]]:
    """Fields of the named record (``diaSource``, ``diaObject``) inside the parsed alert schema."""
    for field in alert_schema()["fields"]:
        if field["name"] == name:
            kinds = field["type"] if isinstance(field["type"], list) else [field["type"]]
            fields: list[dict[str, Any]] = next(k for k in kinds if isinstance(k, dict))["fields"]
            return fields
    raise KeyError(name)


def _fill(fields: Sequence[dict[str, Any]], n: int, rng: np.random.Generator) -> dict[str, Any]:
    """A column for every field: real numbers where the pipeline fills them (all of them here)."""
    columns: dict[str, Any] = {}
    for field in fields:
        kinds = field["type"] if isinstance(field["type"], list) else [field["type"]]
        kind = next(k for k in kinds if k != "null")
        if kind == "double":
            columns[field["name"]] = rng.normal(1000.0, 50.0, n)
        elif kind == "float":
            columns[field["name"]] = rng.normal(1.0, 0.1, n).astype(np.float32)
        elif kind in ("int", "long"):
            columns[field["name"]] = rng.integers(0, 50, n)
        elif kind == "boolean":
            columns[field["name"]] = rng.random(n) < 0.05
        else:
            columns[field["name"]] = BAND
    return columns


def _sources(visit: int, detector: int, ids: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
    n = len(ids)
    columns = _fill(_record_schema("diaSource"), n, rng)
    x, y = rng.uniform(40, IMAGE_SHAPE[1] - 40, n), rng.uniform(40, IMAGE_SHAPE[0] - 40, n)
    ra, dec = _wcs().all_pix2world(x, y, 0)
    columns |= {
        "diaSourceId": ids,
        "diaObjectId": ids,
        "visit": visit,
        "detector": detector,
        "x": x.astype(np.float32),
        "y": y.astype(np.float32),
        "ra": ra,
        "dec": dec,
        "midpointMjdTai": 60300.0 + visit * 1e-3,
        "band": BAND,
    }
    return pd.DataFrame(columns)


def build_pool(n: int, max_prv: int, seed: int) -> list[dict[str, Any]]:
    """Build ``n`` distinct alert records with `build_alerts` (cutouts from three images).

    Parameters
    ----------
    n : `int`
        Pool size.
    max_prv : `int`
        Previous DiaSources per alert drawn uniformly from ``0..max_prv``.
    seed : `int`
        Random seed.

    Returns
    -------
    pool : `list` [`dict`]
        Alert records of the pinned schema.
    """
    rng = np.random.default_rng(seed)
    images = {
        "science": 1000.0 + rng.normal(0, 30, IMAGE_SHAPE),
        "template": 1000.0 + rng.normal(0, 10, IMAGE_SHAPE),
        "difference": rng.normal(0, 30, IMAGE_SHAPE),
    }
    pool: list[dict[str, Any]] = []
    sides = rng.choice(STAMP_SIDES, n)
    for side in STAMP_SIDES:
        count = int((sides == side).sum())
        if not count:
            continue
        makers = {k: CutoutMaker(v.astype(np.float32), _wcs(), size=int(side)) for k, v in images.items()}
        ids = np.arange(len(pool), len(pool) + count, dtype=np.int64) + 1
        sources = _sources(1, 0, ids, rng)
        objects = pd.DataFrame(_fill(_record_schema("diaObject"), count, rng))
        objects["diaObjectId"] = ids
        n_prv = rng.integers(0, max_prv + 1, count)
        prv_obj = np.repeat(ids, n_prv)
        history = _sources(0, 0, np.arange(len(prv_obj), dtype=np.int64) + 10_000_000, rng)
        history["diaObjectId"] = prv_obj
        history["midpointMjdTai"] = 60000.0 + rng.uniform(0, 300, len(prv_obj))
        pool.extend(build_alerts(sources, objects, history, cutouts=makers, visit_mjd_tai=60300.0))
    order = rng.permutation(len(pool))
    return [pool[i] for i in order]


def _alert_id(visit: int, detector: int, index: int) -> int:
    return (visit << 22) | (detector << 14) | index


def _visit_alerts(
    pool: Sequence[dict[str, Any]], visit: int, detector: int, n: int, offset: int
) -> list[dict[str, Any]]:
    """This detector-visit's alerts: pool packets with new ids (shallow copies: cutouts are shared bytes)."""
    out = []
    for i in range(n):
        base = pool[(offset + i) % len(pool)]
        alert_id = _alert_id(visit, detector, i)
        source = dict(base["diaSource"], diaSourceId=alert_id, visit=visit, detector=detector)
        out.append(dict(base, diaSourceId=alert_id, diaSource=source))
    return out


# ----------------------------------------------------------------------------- senders


def _sink(job: WorkerJob) -> TimedSink:
    run = job.run
    return TimedSink(
        job.bootstrap,
        job.topic,
        timeout_s=SEND_TIMEOUT_S,
        producer_config=run.producer_config,
        serializer=SERIALIZERS[run.serializer],
    )


class _Recorder:
    """Times of one send: first produce, last delivery report, each alert's produce-to-report latency."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.last: float | None = None
        self.latencies: list[float] = []
        self.serialize_cpu_s = 0.0


class TimedSink(KafkaAlertSink):
    """`KafkaAlertSink` that times each alert from ``produce`` to its delivery report (same code path)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._local = threading.local()
        serialize = self._serialize

        def timed_serialize(alert: Mapping[str, Any]) -> bytes:
            start = time.thread_time()
            payload = serialize(alert)
            self._local.recorder.serialize_cpu_s += time.thread_time() - start
            return payload

        self._serialize = timed_serialize

    def timed_send(self, alerts: Sequence[Mapping[str, Any]], *, visit: int, detector: int) -> tuple[Any, _Recorder]:
        """`send`, returning its summary and the recorder."""
        recorder = self._local.recorder = _Recorder()
        return self.send(alerts, visit=visit, detector=detector), recorder

    def _produce(self, payload: bytes, key: bytes, callback: Any) -> None:
        recorder: _Recorder = self._local.recorder
        start = time.monotonic()
        if recorder.first is None:
            recorder.first = start

        def timed(err: Any, msg: Any) -> None:
            now = time.monotonic()
            recorder.latencies.append(now - start)
            recorder.last = now
            callback(err, msg)

        super()._produce(payload, key, timed)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkerJob:
    """What one sender process does (crosses the fork as a pickle-free argument)."""

    schema_version: int
    bootstrap: str
    topic: str
    run: Run
    detectors: tuple[int, ...]
    visits: tuple[int, ...]
    counts: tuple[tuple[int, ...], ...]
    """Alerts per (visit index, detector index in ``detectors``)."""
    t0: float
    cadence_s: float


def _send_one(
    job: WorkerJob, sink: TimedSink | None, alerts: list[dict[str, Any]], k: int, detector: int, start: float
) -> dict[str, Any]:
    visit = job.visits[k]
    row: dict[str, Any] = {"k": k, "visit": visit, "detector": detector, "n": len(alerts), "late_start_s": 0.0}
    row["late_start_s"] = time.time() - start
    t_setup = time.monotonic()
    try:
        if sink is None:  # the APDB stage: a sink per detector-visit, checked before the store
            sink = _sink(job)
            sink.check()
        setup = time.monotonic() - t_setup
        t_send = time.monotonic()
        summary, rec = sink.timed_send(alerts, visit=visit, detector=detector)
        row |= {
            "setup_s": setup,
            "send_call_s": time.monotonic() - t_send,
            "first_to_last_s": (rec.last - rec.first) if rec.first is not None and rec.last is not None else 0.0,
            "latencies": rec.latencies,
            "serialize_cpu_s": rec.serialize_cpu_s,
            "bytes": summary.n_bytes,
            "error": None,
        }
    except Exception as exc:  # noqa: BLE001 - a failed send is a result to report, not a crash
        row |= {
            "setup_s": time.monotonic() - t_setup,
            "latencies": [],
            "serialize_cpu_s": 0.0,
            "bytes": 0,
            "error": repr(exc),
        }
    row["end_after_start_s"] = time.time() - start
    return row


def _worker(job: WorkerJob, pool: Sequence[dict[str, Any]], results: Any) -> None:
    """One sender process: start its detectors' sends at each visit's start, then report."""
    logging.getLogger("workflow.apdb.alerts").setLevel(logging.ERROR)
    plan = [
        [
            _visit_alerts(pool, visit, det, job.counts[k][j], offset=visit * 7919 + det * 104729)
            for j, det in enumerate(job.detectors)
        ]
        for k, visit in enumerate(job.visits)
    ]
    sinks: dict[int, TimedSink] = {}
    if job.run.mode == "reused":
        for det in job.detectors:
            sinks[det] = _sink(job)
            sinks[det].check()
    rows: list[dict[str, Any]] = []
    lock = threading.Lock()
    threads: list[threading.Thread] = []
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    for k in range(len(job.visits)):
        start = job.t0 + k * job.cadence_s
        time.sleep(max(0.0, start - time.time()))
        for j, det in enumerate(job.detectors):

            def task(k: int = k, j: int = j, det: int = det, start: float = start) -> None:
                row = _send_one(job, sinks.get(det), plan[k][j], k, det, start)
                with lock:
                    rows.append(row)

            thread = threading.Thread(target=task, name=f"v{k}d{det}", daemon=True)
            thread.start()
            threads.append(thread)
    for thread in threads:
        thread.join()
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    sinks.clear()
    results.put(
        {
            "rows": rows,
            "cpu_user_s": usage1.ru_utime - usage0.ru_utime,
            "cpu_sys_s": usage1.ru_stime - usage0.ru_stime,
            "peak_rss_mb": usage1.ru_maxrss / 1024,
        }
    )


# ----------------------------------------------------------------------------- verification


def _zigzag_long(data: bytes, pos: int) -> int:
    """Decode the Avro long at ``pos`` (the alert's first field, ``diaSourceId``)."""
    shift, value = 0, 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return (value >> 1) ^ -(value & 1)
        shift += 7


def verify(bootstrap: str, topic: str, expected: set[int], sample: dict[str, Any]) -> dict[str, Any]:
    """Consume the topic from the start: every expected id exactly once, nothing else.

    ``sample`` is one alert that was sent; its message is decoded in full and compared.
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    start = time.monotonic()
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"verify-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=30)
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        ids: list[int] = []
        key_mismatch, errors, n_bytes, sample_ok = 0, 0, 0, False
        # Until all expected arrived and 3 s pass with nothing new (or 20 s of nothing): not by the
        # watermarks, which Tansu reported a few messages short of what it then delivered.
        deadline, idle_since = time.monotonic() + 600, time.monotonic()
        while time.monotonic() < deadline:
            idle = time.monotonic() - idle_since
            if idle > 20 or (idle > 3 and len(ids) >= len(expected)):
                break
            batch = consumer.consume(500, timeout=1.0)
            if batch:
                idle_since = time.monotonic()
            for message in batch:
                if message.error() is not None:
                    errors += 1
                    continue
                value = message.value() or b""
                alert_id = _zigzag_long(value, 5)
                ids.append(alert_id)
                n_bytes += len(value)
                key_mismatch += message.key() != str(alert_id).encode()
                if alert_id == sample["diaSourceId"]:
                    decoded = deserialize_alert(value)  # fields the builder leaves out come back null
                    sample_ok = decoded == {k: sample.get(k) for k in decoded}
    finally:
        consumer.close()
    got = set(ids)
    return {
        "messages": len(ids),
        "watermark_span": high - low,
        "expected": len(expected),
        "distinct_ids": len(got),
        "duplicates": len(ids) - len(got),
        "missing": len(expected - got),
        "unexpected": len(got - expected),
        "key_mismatch": key_mismatch,
        "consume_errors": errors,
        "sample_decoded_equal": sample_ok,
        "bytes": n_bytes,
        "exactly_once": len(ids) == len(got) == len(expected) and got == expected and not key_mismatch,
        "seconds": round(time.monotonic() - start, 1),
    }


# ----------------------------------------------------------------------------- one run


def wire_bytes(bootstrap: str, topic: str, run: Run, alerts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Send ``alerts`` with ``run``'s settings and return librdkafka's byte counts (compression ratio)."""
    stats: list[dict[str, Any]] = []
    config = dict(run.producer_config or {}) | {
        "statistics.interval.ms": 100,
        "stats_cb": lambda text: stats.append(json.loads(text)),
    }
    sink = KafkaAlertSink(bootstrap, topic, timeout_s=SEND_TIMEOUT_S, producer_config=config)
    summary = sink.send(alerts, visit=0, detector=0)
    before = len(stats)
    deadline = time.monotonic() + 5
    while len(stats) < before + 2 and time.monotonic() < deadline:
        sink._producer.poll(0.1)  # statistics arrive through poll
    last = stats[-1] if stats else {}
    sent = int(last.get("tx_bytes", 0))
    return {
        "alerts": len(alerts),
        "payload_bytes": summary.n_bytes,
        "wire_bytes": sent,
        "wire_over_payload": round(sent / summary.n_bytes, 3) if summary.n_bytes else None,
    }


PRODUCER_VARIANTS: dict[str, dict[str, Any]] = {
    "before": BEFORE_SETTINGS,
    "after": {},
    "zstd": {"compression.type": "zstd"},
    "idempotence": {"enable.idempotence": True},
}
"""One producer, one thread: its CPU per alert with each setting (payloads serialized beforehand)."""


def producer_cost(pool: Sequence[dict[str, Any]], work: Path, n: int = 2000) -> dict[str, Any]:
    """CPU of `KafkaAlertSink` per alert, serialization excluded, for each of `PRODUCER_VARIANTS`."""
    from confluent_kafka.admin import AdminClient, NewTopic

    payloads = [serialize_alert(a) for a in pool]
    out: dict[str, Any] = {"alerts": n}
    with KafkaBroker(work / "kafka-producer-cost", storage="memory") as broker:
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        names = {name: f"cost-{name}" for name in PRODUCER_VARIANTS}
        for future in admin.create_topics([NewTopic(t, 1, 1) for t in names.values()]).values():
            future.result(timeout=30)
        alerts = [{"diaSourceId": i} for i in range(n)]
        for name, settings in PRODUCER_VARIANTS.items():
            sink = KafkaAlertSink(
                broker.bootstrap,
                names[name],
                timeout_s=SEND_TIMEOUT_S,
                producer_config=settings,
                serializer=lambda alert: payloads[alert["diaSourceId"] % len(payloads)],
            )
            sink.check()
            usage0, start = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
            sink.send(alerts, visit=0, detector=0)
            usage1, wall = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - start
            del sink
            out[name] = {
                "cpu_user_us_per_alert": round((usage1.ru_utime - usage0.ru_utime) / n * 1e6, 1),
                "cpu_sys_us_per_alert": round((usage1.ru_stime - usage0.ru_stime) / n * 1e6, 1),
                "wall_s": round(wall, 2),
            }
        del admin
    gc.collect()
    return out


def _pct(values: Sequence[float] | np.ndarray, q: float) -> float:
    return round(float(np.percentile(values, q)), 4) if len(values) else float("nan")


def _dist(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    return {
        "p50": _pct(values, 50),
        "p95": _pct(values, 95),
        "max": round(float(np.max(values)), 4) if len(values) else float("nan"),
    }


def _process_cpu(pid: int) -> tuple[float, float, float]:
    """(user, sys, VmHWM MB) of a process."""
    times = psutil.Process(pid).cpu_times()
    hwm = 0.0
    with open(f"/proc/{pid}/status") as stream:
        for line in stream:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return times.user, times.system, hwm


def run_one(
    name: str,
    run: Run,
    pool: list[dict[str, Any]],
    plan: list[tuple[str, np.ndarray]],
    args: argparse.Namespace,
    work: Path,
) -> dict[str, Any]:
    """Start a broker, replay the visits with ``run``'s settings, verify, stop the broker."""
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"alerts-{name}-{uuid.uuid4().hex[:6]}"
    scratch = f"{topic}-calibration"
    with KafkaBroker(work / f"kafka-{name}", storage="memory") as broker:
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        new = [NewTopic(t, num_partitions=1, replication_factor=1) for t in (topic, scratch)]
        for future in admin.create_topics(new).values():
            future.result(timeout=30)
        del admin
        gc.collect()  # no client of the parent's may live across the fork
        assert broker.pid is not None
        b_user0, b_sys0, _ = _process_cpu(broker.pid)
        visits = tuple(1000 + k for k in range(len(plan)))
        t0 = time.time() + args.start_delay_s
        ctx = mp.get_context("fork")
        results = ctx.Queue()
        shares = np.array_split(np.arange(N_DETECTORS), args.procs)
        procs = []
        for share in shares:
            job = WorkerJob(
                schema_version=1,
                bootstrap=broker.bootstrap,
                topic=topic,
                run=run,
                detectors=tuple(int(d) for d in share),
                visits=visits,
                counts=tuple(tuple(int(c) for c in counts[share]) for _, counts in plan),
                t0=t0,
                cadence_s=args.cadence_s,
            )
            proc = ctx.Process(target=_worker, args=(job, pool, results), name=f"sender-{share[0]}")
            proc.start()
            procs.append(proc)
        load: list[dict[str, Any]] = []
        for k in range(len(plan) + 1):
            time.sleep(max(0.0, t0 + k * args.cadence_s - 0.5 - time.time()))
            load.append({"at_visit": k, "loadavg": [round(x, 2) for x in os.getloadavg()]})
        outs = [results.get(timeout=SEND_TIMEOUT_S * 4 + args.cadence_s * len(plan)) for _ in procs]
        for proc in procs:
            proc.join(timeout=60)
        b_user1, b_sys1, b_hwm = _process_cpu(broker.pid)
        load.append({"at": "sends done", "loadavg": [round(x, 2) for x in os.getloadavg()]})
        expected = {
            _alert_id(v, d, i)
            for v, (_, counts) in zip(visits, plan, strict=True)
            for d in range(N_DETECTORS)
            for i in range(counts[d])
        }
        sample_det = int(np.argmax(plan[0][1]))
        sample = _visit_alerts(
            pool, visits[0], sample_det, int(plan[0][1][sample_det]), offset=visits[0] * 7919 + sample_det * 104729
        )[0]
        _log.info("run %s: sends done, verifying %d alerts", name, len(expected))
        check = verify(broker.bootstrap, topic, expected, sample)
        wire = wire_bytes(broker.bootstrap, scratch, run, pool[:CALIBRATION_ALERTS])
        load.append({"at": "verified", "loadavg": [round(x, 2) for x in os.getloadavg()]})
    rows = [r for out in outs for r in out["rows"]]
    return _summarise(name, run, plan, rows, outs, args) | {
        "broker": {
            "cpu_user_s": round(b_user1 - b_user0, 2),
            "cpu_sys_s": round(b_sys1 - b_sys0, 2),
            "peak_rss_mb": round(b_hwm, 1),
        },
        "verify": check,
        "wire": wire,
        "loadavg": load,
    }


def _summarise(
    name: str,
    run: Run,
    plan: list[tuple[str, np.ndarray]],
    rows: list[dict[str, Any]],
    outs: list[dict[str, Any]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    per_visit = []
    for k, (kind, counts) in enumerate(plan):
        mine = [r for r in rows if r["k"] == k]
        ok = [r for r in mine if r["error"] is None]
        span = max(r["end_after_start_s"] for r in mine)
        n_bytes = sum(r["bytes"] for r in ok)
        per_visit.append(
            {
                "kind": kind,
                "alerts": int(counts.sum()),
                "bytes": n_bytes,
                "errors": len(mine) - len(ok),
                "detector_send_s": _dist([r["first_to_last_s"] for r in ok]),
                "send_call_s_max": round(max((r["send_call_s"] for r in ok), default=float("nan")), 3),
                "setup_s": _dist([r["setup_s"] for r in mine]),
                "late_start_s_max": round(max(r["late_start_s"] for r in mine), 3),
                "last_delivery_after_visit_start_s": round(span, 3),
                "alerts_per_s": round(sum(r["n"] for r in ok) / span, 1),
                "mb_per_s": round(n_bytes / span / 1e6, 2),
                "past_next_visit_start": sum(r["end_after_start_s"] > args.cadence_s for r in mine),
            }
        )
    ok = [r for r in rows if r["error"] is None]
    latencies = np.concatenate([np.asarray(r["latencies"]) for r in ok]) if ok else np.array([])
    user = sum(o["cpu_user_s"] for o in outs)
    system = sum(o["cpu_sys_s"] for o in outs)
    n_alerts = sum(r["n"] for r in ok)
    serialize_cpu = sum(r["serialize_cpu_s"] for r in rows)
    return {
        "producer_config": dict(run.producer_config) if run.producer_config is not None else "KafkaAlertSink defaults",
        "mode": run.mode,
        "serializer": run.serializer,
        "alerts_sent": n_alerts,
        "errors": sorted({r["error"] for r in rows if r["error"] is not None})[:5],
        "detector_visit_send_s": _dist([r["first_to_last_s"] for r in ok]),
        "detector_visit_send_call_s": _dist([r["send_call_s"] for r in ok]),
        "producer_setup_s": _dist([r["setup_s"] for r in rows]),
        "alert_delivery_latency_s": _dist(latencies),
        "detector_visits_past_next_visit_start": sum(v["past_next_visit_start"] for v in per_visit),
        "visits": per_visit,
        "senders": {
            "cpu_user_s": round(user, 2),
            "cpu_sys_s": round(system, 2),
            "cpu_ms_per_alert": round((user + system) / max(n_alerts, 1) * 1e3, 3),
            "serialization_cpu_s": round(serialize_cpu, 2),
            "serialization_cpu_ms_per_alert": round(serialize_cpu / max(n_alerts, 1) * 1e3, 3),
            "other_cpu_ms_per_alert": round((user + system - serialize_cpu) / max(n_alerts, 1) * 1e3, 3),
            "peak_rss_mb_per_process_max": round(max(o["peak_rss_mb"] for o in outs), 1),
            "processes": len(outs),
        },
    }


def _serialization_cost(pool: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """CPU per alert of each serializer over the pool (one thread), and whether their bytes agree."""
    out: dict[str, Any] = {"alerts": len(pool)}
    payloads: dict[str, list[bytes]] = {}
    for name, serializer in SERIALIZERS.items():
        start_cpu, start = time.process_time(), time.perf_counter()
        payloads[name] = [serializer(a) for a in pool]
        cpu, wall = time.process_time() - start_cpu, time.perf_counter() - start
        out[name] = {
            "cpu_us_per_alert": round(cpu / len(pool) * 1e6, 1),
            "wall_us_per_alert": round(wall / len(pool) * 1e6, 1),
            "mb_per_cpu_s": round(sum(map(len, payloads[name])) / cpu / 1e6, 1),
        }
    out["identical_bytes"] = payloads["fastavro"] == payloads["compiled"]
    # The APDB stage also writes the detector-visit's alerts to its outbox (an Avro container) first.
    files: dict[str, Callable[[io.BytesIO], None]] = {
        "fastavro": lambda stream: fastavro.writer(stream, alert_schema(), [dict(a) for a in pool]),
        "compiled": lambda stream: write_alert_file(stream, pool),
    }
    out["outbox_file"] = {}
    for name, write in files.items():
        stream, start_cpu = io.BytesIO(), time.process_time()
        write(stream)
        out["outbox_file"][name] = {"cpu_us_per_alert": round((time.process_time() - start_cpu) / len(pool) * 1e6, 1)}
    sizes = [len(p) for p in payloads["compiled"]]
    return out | {
        "bytes": {
            "mean": round(float(np.mean(sizes))),
            "p50": round(float(np.median(sizes))),
            "p95": round(float(np.percentile(sizes, 95))),
            "max": max(sizes),
            "min": min(sizes),
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--visits", type=int, default=5, help="average visits (default 5)")
    parser.add_argument("--peak-visits", type=int, default=1, help="peak visits, placed mid-way (default 1)")
    parser.add_argument("--avg-alerts", type=int, default=10_000, help="alerts in an average visit")
    parser.add_argument("--peak-alerts", type=int, default=40_000, help="alerts in a peak visit")
    parser.add_argument("--cadence-s", type=float, default=32.0, help="seconds between visit starts")
    parser.add_argument("--pool", type=int, default=3000, help="distinct packets built")
    parser.add_argument("--max-prv", type=int, default=30, help="previous DiaSources per alert: 0..this")
    parser.add_argument("--procs", type=int, default=4, help="sender processes (threads: 189 / procs each)")
    parser.add_argument("--runs", default="before,after,reused", help=f"comma list of {sorted(RUNS)}")
    parser.add_argument("--start-delay-s", type=float, default=5.0, help="from fork to the first visit")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    _log.setLevel(logging.INFO)
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; expected some of {sorted(RUNS)}")

    rng = np.random.default_rng(args.seed)
    kinds = ["average"] * args.visits
    kinds[(args.visits + 1) // 2 : (args.visits + 1) // 2] = ["peak"] * args.peak_visits
    plan = [
        (
            kind,
            rng.multinomial(args.peak_alerts if kind == "peak" else args.avg_alerts, [1 / N_DETECTORS] * N_DETECTORS),
        )
        for kind in kinds
    ]
    report: dict[str, Any] = {
        "schema_version": 1,
        "detectors": N_DETECTORS,
        "cadence_s": args.cadence_s,
        "visits": kinds,
        "sender_processes": args.procs,
        "cpus": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    t_build, c_build = time.perf_counter(), time.process_time()
    pool = build_pool(args.pool, args.max_prv, args.seed)
    _log.info("pool of %d alerts built in %.1f s", len(pool), time.perf_counter() - t_build)
    report["pool"] = {
        "build_s": round(time.perf_counter() - t_build, 1),
        "build_cpu_s": round(time.process_time() - c_build, 1),
        "stamp_sides": list(STAMP_SIDES),
        "max_prv_dia_sources": args.max_prv,
        "serialization": _serialization_cost(pool[:1000]),
    }
    report["runs"] = {}
    with tempfile.TemporaryDirectory(prefix="bench_alerts_") as tmp:
        for name in names:
            _log.info("run %s: %d visits", name, len(plan))
            report["runs"][name] = run_one(name, RUNS[name], pool, plan, args, Path(tmp))
        report["producer_cpu_one_thread"] = producer_cost(pool, Path(tmp))
    report["side_by_side"] = {
        name: {
            "detector_visit_send_s_p95": r["detector_visit_send_s"]["p95"],
            "detector_visit_send_s_max": r["detector_visit_send_s"]["max"],
            "alert_delivery_latency_s_p95": r["alert_delivery_latency_s"]["p95"],
            "peak_visit_mb_per_s": max(v["mb_per_s"] for v in r["visits"]),
            "peak_visit_alerts_per_s": max(v["alerts_per_s"] for v in r["visits"]),
            "sender_cpu_user_s": r["senders"]["cpu_user_s"],
            "sender_cpu_sys_s": r["senders"]["cpu_sys_s"],
            "serialization_cpu_ms_per_alert": r["senders"]["serialization_cpu_ms_per_alert"],
            "other_sender_cpu_ms_per_alert": r["senders"]["other_cpu_ms_per_alert"],
            "producer_setup_s_p50": r["producer_setup_s"]["p50"],
            "broker_cpu_s": round(r["broker"]["cpu_user_s"] + r["broker"]["cpu_sys_s"], 2),
            "past_next_visit_start": r["detector_visits_past_next_visit_start"],
            "exactly_once": r["verify"]["exactly_once"],
            "wire_over_payload": r["wire"]["wire_over_payload"],
        }
        for name, r in report["runs"].items()
    }
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report["main_process"] = {
        "cpu_user_s": round(usage.ru_utime, 1),
        "cpu_sys_s": round(usage.ru_stime, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
    }
    report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
