"""Benchmark exports at scale: ``--detectors`` concurrent detector-visit exports to a PostgreSQL registry.

Starts a throw-away PostgreSQL server (`stream_shim.testbed.local_services.PostgresServer`,
``max_connections`` raised to ``--max-connections``), creates one central repo per mode
(PostgreSQL registry in its own schema, local file datastore) with the LSSTCam records,
and writes stand-in products for ``--visits`` visits: per detector the five datasets the
export stage writes (`workflow.stages.export.OUTPUT_DATASET_TYPES`: two small FITS images,
two Parquet tables, the pipeline metadata JSON), with real raw headers from the simulator.

For each visit the warm parent (Butler and the stages already imported, as in the stage
server) forks one process per detector; all wait on a pipe and start together, then run
`workflow.stages.export.export_outputs` with ``export.mode`` set to

``direct``
    each process opens the repo and puts its datasets;
``batched``
    each process queues a request in the spool, and one writer process (forked once per
    mode, like a node's long-lived writer) ingests pending requests in batches.

Per visit it reports export latency (release -> in the registry: the process's end for
direct, the batch commit for batched) p50/p95/max, the stage time itself, the visit's
wall time (release -> last commit), CPU user/sys of the export processes, the writer and
the PostgreSQL server, peak RSS, peak PostgreSQL connections, and load averages.  After
all visits it checks that each mode's repo holds every dataset exactly once and reads one
of each type back.  Prints one JSON document.

Usage: ``.venv/bin/python scripts/bench_export.py [--detectors 189] [--visits 3] [--modes direct,batched]``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from astropy.io import fits

from stream_shim.testbed.local_services import PostgresServer
from workflow.core.config import load_config
from workflow.core.instrument import instrument_for_run
from workflow.repo.central_repo import create_central_repo, open_central_repo, register_instrument
from workflow.repo.export_batch import BatchResult, ExportWriter, receipts, request_id
from workflow.sim.exposures import make_exposures
from workflow.sim.simulate import raw_header
from workflow.stages.export import OUTPUT_DATASET_TYPES, export_outputs, output_chain, output_run

_log = logging.getLogger("bench_export")
INSTRUMENT, DAY_OBS, PIPELINE = "LSSTCam", "2026-12-01", "ApPipe"
NIGHT = "2026-12-02"
"""Visits start at 03:00 TAI on NIGHT (day_obs DAY_OBS)."""
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--detectors", type=int, default=189, help="concurrent exports per visit")
    p.add_argument("--visits", type=int, default=3)
    p.add_argument("--modes", default="direct,batched", help="comma-separated: direct, batched")
    p.add_argument("--max-connections", type=int, default=400, help="PostgreSQL max_connections")
    p.add_argument("--image-size", type=int, default=64, help="side of the stand-in images (pixels)")
    p.add_argument("--max-batch", type=int, default=1000, help="requests per writer transaction")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for one visit")
    p.add_argument("--workdir", help="keep files here (default: a temporary directory, removed)")
    return p.parse_args(argv)


# --- resources -------------------------------------------------------------------------------


def _proc_cpu(pid: int, *, children: bool = False) -> tuple[float, float]:
    """User and system CPU seconds of a process (plus its reaped children's)."""
    try:
        with open(f"/proc/{pid}/stat") as stream:
            fields = stream.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0, 0.0
    user, system = int(fields[11]), int(fields[12])
    if children:
        user, system = user + int(fields[13]), system + int(fields[14])
    return user / _TICK, system / _TICK


def _children_of(ppid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stream:
                if int(stream.read().rsplit(")", 1)[1].split()[1]) == ppid:
                    out.append(int(entry))
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return out


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm") as stream:
            return int(stream.read().split()[1]) * _PAGE / 2**20
    except FileNotFoundError:
        return 0.0


class _PostgresMonitor:
    """The server's CPU (postmaster, its reaped and live backends) and, sampled, connections and RSS."""

    def __init__(self, server: PostgresServer) -> None:
        import psycopg2

        assert server.pid is not None
        self.pid = server.pid
        self.conn = psycopg2.connect(host=server.host, port=server.port, user="postgres", dbname="postgres")
        self.conn.autocommit = True
        with self.conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            self.own = cur.fetchone()[0]
        self._stop = threading.Event()
        self.peak_connections = 0
        self.peak_rss_mb = 0.0
        self._thread: threading.Thread | None = None

    def cpu(self) -> tuple[float, float]:
        user, system = _proc_cpu(self.pid, children=True)
        for child in _children_of(self.pid):
            u, s = _proc_cpu(child)
            user, system = user + u, system + s
        return user, system

    def _sample(self) -> None:
        while not self._stop.wait(0.25):
            with self.conn.cursor() as cur:
                cur.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> %s",
                    (self.own,),
                )
                self.peak_connections = max(self.peak_connections, cur.fetchone()[0])
            rss = _rss_mb(self.pid) + sum(_rss_mb(c) for c in _children_of(self.pid))
            self.peak_rss_mb = max(self.peak_rss_mb, rss)

    def start(self) -> None:
        self.peak_connections, self.peak_rss_mb = 0, 0.0
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _raise_max_connections(server: PostgresServer, n: int) -> int:
    """Set ``max_connections`` (a restart setting) and restart the server on the same cluster."""
    import psycopg2

    conn = psycopg2.connect(host=server.host, port=server.port, user="postgres", dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"ALTER SYSTEM SET max_connections = {int(n)}")
    conn.close()
    server.stop()
    server.start()
    conn = psycopg2.connect(host=server.host, port=server.port, user="postgres", dbname="postgres")
    with conn.cursor() as cur:
        cur.execute("SHOW max_connections")
        value = int(cur.fetchone()[0])
    conn.close()
    return value


# --- stand-in data ---------------------------------------------------------------------------


def _json_header(header: fits.Header) -> dict[str, Any]:
    return {k: header[k] for k in header if k not in ("COMMENT", "HISTORY", "")}


def _write_products(directory: Path, visit: int, detector: int, size: int, rng: np.random.Generator) -> dict[str, str]:
    """The five products of one detector-visit, shaped like the pipeline stage's files."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in ("preliminary_visit_image", "difference_image"):
        path = directory / f"{name}.fits"
        hdus = [fits.PrimaryHDU(rng.normal(0, 1, (size, size)).astype(np.float32))]
        hdus.append(fits.ImageHDU(np.zeros((size, size), np.int32), name="MASK"))
        fits.HDUList(hdus).writeto(path)
        paths[name] = str(path)
    for name, rows in (("single_visit_star", 400), ("dia_source_unfiltered", 40)):
        path = directory / f"{name}.parquet"
        pd.DataFrame(
            {
                "id": (np.int64(visit) << 16) + detector * 1000 + np.arange(rows),
                "ra": rng.uniform(0, 1, rows),
                "dec": rng.uniform(0, 1, rows),
                "flux": rng.normal(1000, 10, rows),
            }
        ).to_parquet(path)
        paths[name] = str(path)
    meta = directory / "pipeline_metadata.json"
    meta.write_text(json.dumps({"pipeline": PIPELINE, "visit": visit, "detector": detector, "outputs": sorted(paths)}))
    paths["pipeline_metadata"] = str(meta)
    return paths


def _make_visits(config: Mapping[str, Any], n_visits: int, n_detectors: int, root: Path, size: int) -> list[dict]:
    instrument = instrument_for_run(config)
    detectors = [d.id for d in instrument.detectors][:n_detectors]
    rng = np.random.default_rng(0)
    visits = []
    for i in range(n_visits):
        (info,) = make_exposures(
            instrument,
            start=f"{NIGHT}T03:{i // 60:02d}:{i % 60:02d}.000",
            seq_num=100 + i,
            ra=150.0 + 0.5 * i,
            dec=2.0,
            rotation_deg=0.0,
            physical_filter=next(iter(instrument.filters)),
            n_snaps=1,
        )
        targets = []
        for det in detectors:
            header = _json_header(raw_header(instrument, det, info))
            products = _write_products(root / f"v{info.exposure_id}" / f"d{det}", info.exposure_id, det, size, rng)
            targets.append({"detector": det, "header": header, "outputs": products})
        visits.append({"visit": info.exposure_id, "targets": targets})
    return visits


# --- forked exports --------------------------------------------------------------------------


def _fork_waiting(work: Callable[[], Any], release_r: int, release_w: int, result: Path) -> int:
    """Fork a child that waits for the release (the pipe's writers all closed), runs ``work``, writes ``result``."""
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        os.close(release_w)
        os.read(release_r, 1)  # returns b"" once every write end is closed
        start = time.time()
        error = None
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - the benchmark counts failures, it does not stop on one
            error = f"{type(exc).__name__}: {exc}"[:500]
        end = time.time()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        result.write_text(
            json.dumps(
                {
                    "start": start,
                    "end": end,
                    "error": error,
                    "user_s": usage.ru_utime,
                    "sys_s": usage.ru_stime,
                    "max_rss_mb": usage.ru_maxrss / 1024,
                }
            )
        )
    except BaseException:  # noqa: BLE001 - a forked child must never return into the parent's code
        code = 1
    finally:
        os._exit(code)


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "max": None}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"p50": round(statistics.median(ordered), 3), "p95": round(p95, 3), "max": round(ordered[-1], 3)}


def _run_visit(
    mode: str,
    config: Mapping[str, Any],
    visit: Mapping[str, Any],
    results: Path,
    monitor: _PostgresMonitor,
    writer_pid: int | None,
    spool: Path | None,
    timeout: float,
) -> dict[str, Any]:
    results.mkdir(parents=True, exist_ok=True)
    release_r, release_w = os.pipe()
    pids = []
    for target in visit["targets"]:

        def work(target: Mapping[str, Any] = target) -> None:
            logging.disable(logging.WARNING)
            export_outputs(
                config,
                day_obs=DAY_OBS,
                pipeline=PIPELINE,
                outputs=target["outputs"],
                raw_header=target["header"],
                where=f"{INSTRUMENT} visit {visit['visit']} detector {target['detector']}",
            )

        pids.append(_fork_waiting(work, release_r, release_w, results / f"{target['detector']}.json"))
    os.close(release_r)
    load_before = os.getloadavg()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    pg_before = monitor.cpu()
    writer_before = _proc_cpu(writer_pid) if writer_pid else (0.0, 0.0)
    monitor.start()
    released = time.time()
    os.close(release_w)
    for pid in pids:
        os.waitpid(pid, 0)
    stages_done = time.time()
    run = output_run(config, DAY_OBS, PIPELINE)
    committed: dict[str, float] = {}
    if mode == "batched":
        assert spool is not None
        ids = [
            request_id(run, {"instrument": INSTRUMENT, "visit": visit["visit"], "detector": t["detector"]})
            for t in visit["targets"]
        ]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            committed = {k: r.committed_at for k, r in receipts(spool, ids).items()}
            if len(committed) == len(ids):
                break
            time.sleep(0.1)
    finished = time.time()
    monitor.stop()
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    pg_after = monitor.cpu()
    writer_after = _proc_cpu(writer_pid) if writer_pid else (0.0, 0.0)
    load_after = os.getloadavg()
    per = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    errors = [r["error"] for r in per if r["error"]]
    stage_s = [r["end"] - r["start"] for r in per]
    if mode == "direct":
        latency = [r["end"] - released for r in per if not r["error"]]
        wall = (max(r["end"] for r in per) if per else stages_done) - released
    else:
        latency = [t - released for t in committed.values()]
        wall = (max(committed.values()) if committed else finished) - released
    return {
        "visit": visit["visit"],
        "exports": len(visit["targets"]),
        "failed": len(errors) + (len(visit["targets"]) - len(committed) if mode == "batched" else 0),
        "errors": sorted(set(errors))[:5],
        "latency_s": _percentiles(latency),
        "stage_s": _percentiles(stage_s),
        "wall_s": round(wall, 3),
        "cpu_exports_user_s": round(children_after.ru_utime - children_before.ru_utime, 2),
        "cpu_exports_sys_s": round(children_after.ru_stime - children_before.ru_stime, 2),
        "cpu_writer_user_s": round(writer_after[0] - writer_before[0], 2),
        "cpu_writer_sys_s": round(writer_after[1] - writer_before[1], 2),
        "cpu_postgres_user_s": round(pg_after[0] - pg_before[0], 2),
        "cpu_postgres_sys_s": round(pg_after[1] - pg_before[1], 2),
        "peak_rss_export_mb": round(max((r["max_rss_mb"] for r in per), default=0.0), 1),
        "peak_rss_postgres_total_mb": round(monitor.peak_rss_mb, 1),
        "peak_postgres_connections": monitor.peak_connections,
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in load_after],
    }


def _writer_process(config: Mapping[str, Any], spool: Path, max_batch: int, batches: Path) -> int:
    """Fork the node's writer: drains ``spool`` until SIGTERM, one JSON line per batch in ``batches``."""
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        logging.disable(logging.WARNING)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        writer = ExportWriter(str(config["central_repo"]), spool, instrument_for_run(config), max_batch=max_batch)

        def log_batch(result: BatchResult) -> None:
            with open(batches, "a") as stream:
                stream.write(json.dumps({**result.__dict__, "at": time.time()}) + "\n")

        writer.warm_up(OUTPUT_DATASET_TYPES)  # as run_writer does
        batches.with_suffix(".ready").touch()  # a node's writer is long-lived: visits find it warm
        writer.run(poll_s=0.1, should_stop=stop.is_set, on_batch=log_batch)
    except BaseException:  # noqa: BLE001 - a forked child must never return into the parent's code
        code = 1
    finally:
        os._exit(code)


# --- checks ----------------------------------------------------------------------------------


def _check(config: Mapping[str, Any], visits: list[dict]) -> dict[str, Any]:
    butler = open_central_repo(config["central_repo"])
    chain = output_chain(INSTRUMENT, DAY_OBS)
    expected = {(v["visit"], t["detector"]) for v in visits for t in v["targets"]}
    out: dict[str, Any] = {"expected_per_type": len(expected), "types": {}}
    ok = True
    for name in OUTPUT_DATASET_TYPES:
        refs = butler.query_datasets(name, collections=chain, find_first=False, limit=None, explain=False)
        keys = [(int(r.dataId["visit"]), int(r.dataId["detector"])) for r in refs]
        exactly_once = len(keys) == len(set(keys)) and set(keys) == expected
        readable = bool(refs) and butler.get(refs[0]) is not None
        out["types"][name] = {"datasets": len(keys), "exactly_once": exactly_once, "read_back": readable}
        ok = ok and exactly_once and readable
    out["ok"] = ok
    return out


def _setup_repo(config: Mapping[str, Any], server: PostgresServer, mode: str) -> None:
    butler = create_central_repo(config["central_repo"], registry_url=server.url, registry_namespace=f"bench_{mode}")
    register_instrument(butler, instrument_for_run(config))
    butler.close()  # the forked exports must not share this process's connections
    del butler


def _summary(per_visit: list[dict], wall_budget_s: float = 32.0) -> dict[str, Any]:
    return {
        "latency_p95_s_worst_visit": max((v["latency_s"]["p95"] or float("inf")) for v in per_visit),
        "wall_s_worst_visit": max(v["wall_s"] for v in per_visit),
        "within_32s_cadence": all(v["wall_s"] < wall_budget_s and v["failed"] == 0 for v in per_visit),
        "failed": sum(v["failed"] for v in per_visit),
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    modes = [m for m in args.modes.split(",") if m]
    temp = args.workdir is None
    root = Path(tempfile.mkdtemp(prefix="bench-export-", dir="/tmp") if temp else args.workdir).absolute()
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)  # the postgres user must reach its cluster, so a restart keeps it
    report: dict[str, Any] = {
        "detectors": args.detectors,
        "visits": args.visits,
        "image_size": args.image_size,
        "cores": os.cpu_count(),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        "modes": {},
    }
    try:
        with PostgresServer(root / "pg") as server:
            report["postgres_max_connections"] = _raise_max_connections(server, args.max_connections)
            monitor = _PostgresMonitor(server)
            base = load_config(instrument=INSTRUMENT)
            started = time.monotonic()
            visits = _make_visits(base, args.visits, args.detectors, root / "products", args.image_size)
            report["products_setup_s"] = round(time.monotonic() - started, 1)
            for mode in modes:
                spool = root / f"spool-{mode}"
                export_cfg = {**base["export"], "mode": mode, "spool_dir": str(spool)}
                config = {**base, "central_repo": str(root / f"repo-{mode}"), "export": export_cfg}
                _setup_repo(config, server, mode)
                writer_pid = None
                if mode == "batched":
                    writer_pid = _writer_process(config, spool, args.max_batch, root / "batches.jsonl")
                    deadline = time.monotonic() + 300
                    while not (root / "batches.ready").exists() and time.monotonic() < deadline:
                        time.sleep(0.1)
                per_visit = []
                try:
                    for i, visit in enumerate(visits):
                        per_visit.append(
                            _run_visit(
                                mode,
                                config,
                                visit,
                                root / "results" / mode / str(i),
                                monitor,
                                writer_pid,
                                spool if mode == "batched" else None,
                                args.timeout,
                            )
                        )
                finally:
                    if writer_pid is not None:
                        os.kill(writer_pid, signal.SIGTERM)
                        os.waitpid(writer_pid, 0)
                entry: dict[str, Any] = {"per_visit": per_visit, **_summary(per_visit), "check": _check(config, visits)}
                if mode == "batched" and (root / "batches.jsonl").exists():
                    batches = [json.loads(line) for line in (root / "batches.jsonl").read_text().splitlines()]
                    entry["batches"] = [
                        {k: (round(v, 3) if isinstance(v, float) else v) for k, v in b.items() if k != "at"}
                        for b in batches
                    ]
                report["modes"][mode] = entry
            monitor.conn.close()
    finally:
        report["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
        if temp:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(report, indent=1))
    return 0 if all(m["check"]["ok"] and m["failed"] == 0 for m in report["modes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
