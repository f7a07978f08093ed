"""Benchmark association + APDB store + alert production for one detector-visit.

Seeds an APDB with ``--objects`` DiaObjects (one DiaSource each) on one detector
footprint, then processes ``--repeats`` new visits of ``--sources`` DIA sources
(half of them at known objects, half new) and times each step the way
`workflow.apdb.load.associate_store_alert` runs them: preload (from the APDB),
association, store, alert build (with three 30x30 cutouts per alert) and alert
delivery (Avro file, and Kafka when a local broker starts).  Backends: SQLite, then
PostgreSQL on a throw-away local server.  Prints one JSON document with seconds.

Usage: ``.venv/bin/python scripts/bench_apdb.py [--sources 1000] [--objects 10000]``
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import astropy.time
import numpy as np
import pandas as pd
from astropy.wcs import WCS

from stream_shim.testbed.local_services import KafkaBroker, PostgresServer
from workflow.apdb.alerts import AvroFileAlertSink, CutoutMaker, KafkaAlertSink, build_alerts
from workflow.apdb.association import associate, footprint_radec, padded_region
from workflow.apdb.store import create_apdb, open_apdb, preload, store_detector_visit

_log = logging.getLogger("bench_apdb")
DETECTOR, SHAPE, BAND = 42, (4096, 4096), "i"


def _wcs() -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype, wcs.wcs.crval, wcs.wcs.crpix = ["RA---TAN", "DEC--TAN"], [53.0, -28.0], [2048.5, 2048.5]
    wcs.wcs.cd = [[-0.2 / 3600, 0.0], [0.0, 0.2 / 3600]]
    return wcs


def _table(visit: int, mjd: float, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
    """A DIA source table with the columns `workflow.science.dia_sources` produces (subset)."""
    n = len(x)
    ra, dec = _wcs().all_pix2world(x, y, 0)
    return pd.DataFrame(
        {
            "diaSourceId": (np.int64(visit) << 22) | (np.int64(DETECTOR) << 14) | np.arange(n, dtype=np.int64),
            "visit": visit,
            "detector": DETECTOR,
            "midpointMjdTai": mjd,
            "ra": ra,
            "dec": dec,
            "raErr": 2e-5,
            "decErr": 2e-5,
            "x": x.astype(np.float32),
            "y": y.astype(np.float32),
            "xErr": 0.3,
            "yErr": 0.3,
            "psfFlux": rng.normal(2000, 300, n),
            "psfFluxErr": 60.0,
            "apFlux": rng.normal(2000, 300, n),
            "apFluxErr": 70.0,
            "snr": 30.0,
            "psfNdata": 49,
            "trailNdata": 0,
            "dipoleNdata": 0,
            "isDipole": False,
            "timeProcessedMjdTai": mjd + 0.0005,
            "bboxSize": 19,
            "band": BAND,
            "reliability": np.float32(0.8),
            "pixelFlags_bad": False,
            "pixelFlags_saturated": False,
            "scienceFlux": 5000.0,
            "scienceFluxErr": 80.0,
        }
    )


def _timed(action: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = action()
    return result, time.perf_counter() - start


def _seed(apdb: Any, n_objects: int, rng: np.random.Generator) -> np.ndarray:
    """Store ``n_objects`` single-source objects (visit 1); return their pixel positions."""
    xy = rng.uniform(20, SHAPE[0] - 20, size=(n_objects, 2))
    table = _table(1, 60200.0, xy[:, 0], xy[:, 1], rng)
    result = associate(
        table,
        pd.DataFrame(columns=[]),
        pd.DataFrame(),
        visit=1,
        detector=DETECTOR,
        radius_arcsec=1.0,
        object_columns=_object_columns(apdb),
    )
    store_detector_visit(apdb, _tai(60200.0), result.objects, result.sources, visit=1, detector=DETECTOR)
    return xy


def _object_columns(apdb: Any) -> list[str]:
    from lsst.dax.apdb import ApdbTables

    return [c.name for c in apdb.schema.tableSchemas[ApdbTables.DiaObject].columns]


def _tai(mjd: float) -> astropy.time.Time:
    return astropy.time.Time(mjd, format="mjd", scale="tai")


def _one_visit(
    apdb: Any,
    visit: int,
    known_xy: np.ndarray,
    n_sources: int,
    cutouts: dict[str, CutoutMaker],
    sink: Any,
    rng: np.random.Generator,
) -> dict[str, float]:
    mjd = 60200.0 + visit
    region = padded_region(*footprint_radec(_wcs(), SHAPE), padding_arcsec=50.0)
    pre, t_preload = _timed(lambda: preload(apdb, region, _tai(mjd)))
    half = n_sources // 2
    old = known_xy[rng.choice(len(known_xy), half, replace=False)] + rng.normal(0, 0.5, (half, 2))
    new = rng.uniform(20, SHAPE[0] - 20, size=(n_sources - half, 2))
    xy = np.vstack([old, new])
    table = _table(visit, mjd, xy[:, 0], xy[:, 1], rng)
    result, t_assoc = _timed(
        lambda: associate(
            table, pre.objects, pre.sources, visit=visit, detector=DETECTOR, radius_arcsec=1.0, visit_mjd_tai=mjd
        )
    )
    alerts, t_build = _timed(
        lambda: build_alerts(result.sources, result.objects, pre.sources, cutouts=cutouts, visit_mjd_tai=mjd)
    )
    outcome, t_store = _timed(
        lambda: store_detector_visit(apdb, _tai(mjd), result.objects, result.sources, visit=visit, detector=DETECTOR)
    )
    assert outcome.stored
    summary, t_send = _timed(lambda: (sink.check(), sink.send(alerts, visit=visit, detector=DETECTOR))[1])
    return {
        "preload_s": t_preload,
        "association_s": t_assoc,
        "store_s": t_store,
        "alert_build_s": t_build,
        "alert_send_s": t_send,
        "total_s": t_assoc + t_store + t_build + t_send,
        "matched": result.n_matched,
        "preloaded_objects": len(pre.objects),
        "alert_bytes": summary.n_bytes,
    }


def _backend(db_url: str, args: argparse.Namespace, sink_for: Callable[[int], Any]) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    create_apdb(db_url)
    apdb = open_apdb({"db_url": db_url})
    known, t_seed = _timed(lambda: _seed(apdb, args.objects, rng))
    cutouts = {
        k: CutoutMaker(rng.standard_normal(SHAPE, dtype=np.float32), _wcs())
        for k in ("difference", "science", "template")
    }
    runs = [_one_visit(apdb, 10 + i, known, args.sources, cutouts, sink_for(10 + i), rng) for i in range(args.repeats)]
    out: dict[str, Any] = {"seed_store_s": round(t_seed, 3)}
    for key in runs[0]:
        out[key] = round(statistics.median(r[key] for r in runs), 4)
    out["total_s_each"] = [round(r["total_s"], 3) for r in runs]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, default=1000)
    parser.add_argument("--objects", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    report: dict[str, Any] = {
        "sources": args.sources,
        "seed_objects": args.objects,
        "repeats": args.repeats,
        "statistic": "median",
        "alert_sink": "avro file",
    }
    with tempfile.TemporaryDirectory(prefix="bench_apdb_") as tmp:
        work = Path(tmp)
        avro = lambda visit: AvroFileAlertSink(work / "alerts" / f"{visit}_{DETECTOR}.avro")  # noqa: E731
        report["sqlite"] = _backend(f"sqlite:///{work}/apdb.sqlite3", args, avro)
        if not args.no_postgres:
            with PostgresServer(work / "pg") as server:
                report["postgresql"] = _backend(server.url, args, avro)
        try:
            with KafkaBroker(work / "kafka") as broker:
                topic = f"alerts-{uuid.uuid4().hex[:6]}"
                kafka = lambda visit: KafkaAlertSink(broker.bootstrap, topic, timeout_s=30.0)  # noqa: E731
                report["sqlite_kafka"] = _backend(f"sqlite:///{work}/apdb_kafka.sqlite3", args, kafka)
        except Exception as exc:  # noqa: BLE001 - the broker is optional for this benchmark
            report["sqlite_kafka"] = {"error": str(exc)}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
