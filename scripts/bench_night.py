"""Night simulator: a summit and camera at LSSTCam's cadence through the real shim and Snakemake.

    python scripts/bench_night.py [--visits 10] [--detectors 189] [--cadence-s 32] [--lead-s 20]
        [--exptime-s 30] [--readout-s 2] [--raw-spread-s 3] [--cost-model lsstcam-sleep|quick-sleep|zero|JSON]
        [--design streaming|subprocess|pool] [--workers N] [--slots N] [--rollover-targets N]
        [--duration-limit S] [--sample-s 1]
        [--workdir demo/bench_night] [--json out.json] [--no-progress]

Starts the live stack (`stream_shim.testbed.live_stack.LiveStack`: Tansu broker,
SeaweedFS S3 with the filer bridge, ``python -m stream_shim`` on profiles/local) with
a stand-in workflow of the project's shape whose stages only take the cost model's
time (`stream_shim.testbed.night_standin`; no stage server), plays ``--visits`` visits
of the first ``--detectors`` LSSTCam detectors at the cadence
(`stream_shim.testbed.night.NightCamera`), samples every process with psutil
(`stream_shim.testbed.night_sampler`) and prints one JSON document
(`stream_shim.testbed.night_report`): orchestration-added latency per detector-visit,
CPU seconds per visit of the shim, submitter Snakemake and jobs, RSS and backlog over
time, target counts, saturation, an extrapolation to 189 detectors every 32 s, the
load average, the machine, and every flag used.  Progress goes to stderr.

``--design pool`` runs the worker pool instead of the single shim
(`stream_shim.testbed.night_pool.PoolStack`): the fan-out and ``--workers`` workers,
each with its own long-lived Snakemake of ``--slots / --workers`` cores; the roles
``shim``, ``submitter`` and ``jobs`` are then summed over the fan-out and the workers,
and ``per_worker`` gives each worker's own figures.

The run directory is wiped at start (only one this script made: it holds
``.bench_night``).  Exit status: 0 when every target ended done, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from tqdm import tqdm

from stream_shim.testbed.live_stack import LiveStack
from stream_shim.testbed.night import Cadence, NightCamera, VisitRecord
from stream_shim.testbed.night_pool import PoolStack, merge_roles, merge_ticks
from stream_shim.testbed.night_report import (
    backlog_series,
    collect_targets,
    cpu_summary,
    extrapolate,
    latency_summary,
    saturation,
    target_counts,
)
from stream_shim.testbed.night_sampler import ProcessSampler, shim_roles
from stream_shim.testbed.night_standin import COST_MODELS, CostModel, write_standin_snakefile
from workflow.core.config import PROJECT_ROOT, load_config
from workflow.core.instrument import Instrument
from workflow.stages.ingest import poll_interval

_log = logging.getLogger("bench_night")

INSTRUMENT = "LSSTCam"
_MARKER = ".bench_night"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--visits", type=int, default=10, help="visits (default 10)")
    parser.add_argument("--detectors", type=int, default=189, help="active detectors, the first N (default 189)")
    parser.add_argument("--cadence-s", type=float, default=32.0, help="seconds between next_visits (default 32)")
    parser.add_argument("--lead-s", type=float, default=20.0, help="next_visit -> exposure start (default 20)")
    parser.add_argument("--exptime-s", type=float, default=None, help="exposure (default cadence - readout)")
    parser.add_argument("--readout-s", type=float, default=2.0, help="exposure end -> first raw (default 2)")
    parser.add_argument("--raw-spread-s", type=float, default=3.0, help="a visit's raws land over this (default 3)")
    parser.add_argument(
        "--cost-model",
        default="lsstcam-sleep",
        help=f'one of {sorted(COST_MODELS)} or JSON, e.g. \'{{"base": "lsstcam-sleep", "pipeline": 20}}\'',
    )
    parser.add_argument("--design", default="streaming", choices=("streaming", "subprocess", "pool"))
    parser.add_argument("--workers", type=int, default=4, help="pool: number of workers (default 4)")
    parser.add_argument(
        "--slots", type=int, default=None, help="Snakemake --cores (default: detectors x (visits in flight + 1), >= 8)"
    )
    parser.add_argument(
        "--broker-storage",
        choices=("memory", "s3"),
        default="memory",
        help="embedded broker storage (default memory: Tansu's S3 engine lagged filer events at this rate, see README)",
    )
    parser.add_argument(
        "--rollover-targets",
        type=int,
        default=None,
        help="streaming: targets per Snakemake before a fresh one (config submission.rollover_targets; 0: never)",
    )
    parser.add_argument("--duration-limit", type=float, default=None, help="stop after this many seconds of night")
    parser.add_argument("--sample-s", type=float, default=1.0, help="sampling interval (default 1)")
    parser.add_argument("--upload-threads", type=int, default=8, help="concurrent raw uploads (default 8)")
    parser.add_argument("--workdir", default=str(PROJECT_ROOT / "demo" / "bench_night"), help="run directory")
    parser.add_argument("--json", default=None, help="also write the report here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.exptime_s is None:
        args.exptime_s = max(args.cadence_s - args.readout_s, 0.0)
    return args


def _warmup_visits(args: argparse.Namespace, cost: CostModel) -> int:
    """Visits in flight at once when every job starts at once: a visit's lifetime over the cadence."""
    lifetime = args.lead_s + args.exptime_s + args.readout_s + args.raw_spread_s + cost.after_raw_s()
    return math.ceil(lifetime / args.cadence_s)


def _fresh_workdir(workdir: Path) -> None:
    if workdir.exists():
        if not (workdir / _MARKER).exists():
            raise SystemExit(f"bench_night: {workdir} exists and was not made by this script; choose another")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / _MARKER).write_text("made by scripts/bench_night.py; wiped at each run\n")


def _empty_central_repo(repo: Path) -> None:
    """An empty Butler repo, for the shim's start-up health check (the stand-in stages never read it)."""
    code = "import sys; from workflow.repo.central_repo import create_central_repo; create_central_repo(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(repo)], check=True, cwd=PROJECT_ROOT, timeout=300)


def _machine() -> dict[str, Any]:
    memory = psutil.virtual_memory()
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus_logical": os.cpu_count(),
        "cpus_physical": psutil.cpu_count(logical=False),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_total_mb": round(memory.total / 2**20),
        "memory_available_mb_at_start": round(memory.available / 2**20),
        "snakemake": importlib.metadata.version("snakemake"),
        "psutil": psutil.__version__,
    }


def _bars(progress: bool, visits: int, targets: int) -> tuple[tqdm[Any], tqdm[Any]]:
    announced = tqdm(total=visits, desc="visits announced", unit="visit", disable=not progress, position=0)
    done = tqdm(total=targets, desc="targets ended", unit="target", disable=not progress, position=1)
    return announced, done


def _alive(stack: LiveStack) -> bool:
    """Whether the shim (or every pool worker) still runs."""
    if isinstance(stack, PoolStack):
        return all(proc.poll() is None for proc in stack.workers.values())
    return stack.shim is not None and stack.shim.poll() is None


def _wait_ended(stack: LiveStack, expected: int, deadline: float, bar: tqdm[Any]) -> bool:
    """Wait until the shim reports ``expected`` targets ended; bounded by ``deadline`` (monotonic)."""
    while time.monotonic() < deadline:
        totals = stack.status().get("gauges", {}).get("targets", {})
        ended = int(totals.get("done", 0)) + int(totals.get("failed", 0))
        bar.n = min(ended, expected)
        bar.refresh()
        if ended >= expected:
            return True
        if not _alive(stack):
            return False
        time.sleep(1.0)
    return False


def _run(args: argparse.Namespace, cost: CostModel) -> dict[str, Any]:
    workdir = Path(args.workdir).resolve()
    warmup = _warmup_visits(args, cost)
    if args.slots is None:
        args.slots = max(args.detectors * (warmup + 1), 8)
    _fresh_workdir(workdir)
    started = time.monotonic()
    _empty_central_repo(workdir / "central_repo")
    base = load_config(instrument=INSTRUMENT)
    active = [d.id for d in Instrument.from_config(base).active_detectors()]
    chosen = active[: args.detectors]
    cadence = Cadence(
        visits=args.visits,
        cadence_s=args.cadence_s,
        lead_s=args.lead_s,
        exptime_s=args.exptime_s,
        readout_s=args.readout_s,
        raw_spread_s=args.raw_spread_s,
    )
    raw_timeout_s = 2 * (args.lead_s + args.exptime_s + args.readout_s) + float(base["raw"]["image_timeout_s"])
    snakefile = write_standin_snakefile(
        workdir / "night" / "Snakefile",
        cost,
        paths=base["paths"],
        poll_s=poll_interval(base["ingest"], indexed=True),
        raw_timeout_s=raw_timeout_s,
    )
    overrides: dict[str, Any] = {"active_detectors": {"default": False, "overrides": {str(d): True for d in chosen}}}
    if args.rollover_targets is not None:
        overrides["submission"] = {"rollover_targets": args.rollover_targets}
    stack = _stack(args, workdir, snakefile, overrides)
    night_s = cadence.last_raw_after_s()
    limit = args.duration_limit if args.duration_limit is not None else night_s + 10 * cost.after_raw_s() + 300.0
    stop = threading.Event()
    load_start = os.getloadavg()
    with stack:
        assert stack.broker is not None and stack.s3 is not None
        print(f"live stack up in {time.monotonic() - started:.0f} s; playing {args.visits} visits", file=sys.stderr)
        broker, s3 = stack.broker, stack.s3
        os.environ.update({k: v for k, v in stack.env.items() if k.startswith("AWS_")})  # the camera's uploads
        shim_pid = stack.shim.pid if stack.shim is not None else None
        if isinstance(stack, PoolStack):
            stack.wait_assigned()

        def discover() -> dict[str, set[int]]:
            roles = stack.roles() if isinstance(stack, PoolStack) else shim_roles(shim_pid) if shim_pid else {}
            return {
                **roles,
                "broker": broker.process_ids(),
                "s3": s3.process_ids(),
                "bench_camera": {os.getpid()},
            }

        def probe() -> dict[str, int]:
            totals = stack.status().get("gauges", {}).get("targets", {})
            return {"backlog": int(totals.get("in_flight", 0)), "done": int(totals.get("done", 0))}

        sampler = ProcessSampler(discover, interval_s=args.sample_s, probe=probe)
        camera = NightCamera(
            stack.config, chosen, cadence, workdir=workdir, stop=stop, upload_threads=args.upload_threads
        )
        announced_bar, done_bar = _bars(not args.no_progress, args.visits, args.visits * len(chosen))
        night_started = time.monotonic()
        deadline = night_started + limit
        sampler.start()
        visits: list[VisitRecord] = camera.run(
            deadline, lambda what, visit: announced_bar.update() if what == "announced" else None
        )
        expected = sum(len(v.raws) for v in visits if v.publish_error is None)
        all_ended = _wait_ended(stack, expected, deadline, done_bar)
        wall_s = time.monotonic() - night_started
        sampler.stop()
        announced_bar.close()
        done_bar.close()
        status = stack.status()
        arrivals, per_worker_status = stack.state_dir / "arrivals", {}
        if isinstance(stack, PoolStack):  # every worker records every raw: the first one's index will do
            arrivals = stack.worker_state_dir(stack.worker_ids[0]) / "arrivals"
            per_worker_status = {w: stack.role_status(stack.worker_state_dir(w)) for w in stack.worker_ids}
        targets = collect_targets(
            visits, workdir=workdir, instrument=INSTRUMENT, paths=base["paths"], arrivals_root=arrivals
        )
    counts = target_counts(targets, planned=args.visits * len(chosen), shim=status.get("gauges", {}).get("targets", {}))
    raw_cpu = sampler.cpu_by_role()
    if per_worker_status:
        merge_ticks(sampler.ticks)
        raw_cpu = merge_roles(raw_cpu)
    cpu = cpu_summary(
        {r: v for r, v in raw_cpu.items() if ":" not in r}, visits=len(visits), targets=max(counts["done"], 1)
    )
    extra: dict[str, Any] = {}
    if per_worker_status:
        extra["per_worker"] = _per_worker(raw_cpu, per_worker_status, sampler.rss_series(), visits=len(visits))
        extra["pool"] = {"workers": args.workers, "slots_per_worker": math.ceil(args.slots / args.workers)}
    return {
        "flags": vars(args),
        "cost_model": cost.to_dict(),
        "design": args.design,
        "instrument": INSTRUMENT,
        "detectors": len(chosen),
        "visits_announced": len(visits),
        "night_wall_s": round(wall_s, 1),
        "all_ended": all_ended,
        "targets": counts,
        "latency": latency_summary(targets, cost),
        "cpu_by_role": cpu,
        "extrapolation_lsstcam": extrapolate(cpu, cores=len(os.sched_getaffinity(0))),
        "saturation": saturation(
            sampler.ticks,
            visits,
            sampler_started=sampler.started,
            detectors=len(chosen),
            cadence_s=args.cadence_s,
            warmup_visits=warmup,
            all_ended=all_ended,
        ),
        "backlog_t_backlog_done": backlog_series(sampler.ticks),
        "rss_by_role": sampler.rss_series(),
        "load_average": {
            "start": [round(v, 2) for v in load_start],
            "end": [round(v, 2) for v in os.getloadavg()],
            "load1_max": max((t["load1"] for t in sampler.ticks), default=None),
        },
        "machine": _machine(),
        "shim_exit": stack.shim_exit,
        "shim_latencies": status.get("latencies", {}),
        "shim_counts": status.get("counts", {}),
        "workdir": str(workdir),
        **extra,
    }


def _stack(args: argparse.Namespace, workdir: Path, snakefile: Path, overrides: dict[str, Any]) -> LiveStack:
    """The live stack of the design: one shim, or the pool's fan-out and workers."""
    common = {
        "repo": workdir / "central_repo",
        "instrument": INSTRUMENT,
        "scale": 1.0,
        "broker_storage": args.broker_storage,
    }
    if args.design != "pool":
        shim_args = ["--snakefile", str(snakefile), "--max-concurrent-targets", str(args.slots), "--grace-s", "30"]
        return LiveStack(workdir, design=args.design, overrides=overrides, shim_args=shim_args, **common)
    if args.workers < 1:
        raise SystemExit("bench_night: --workers must be >= 1")
    per_worker = math.ceil(args.slots / args.workers)
    overrides = {**overrides, "kafka": {"worker_group": f"bench-night-workers-{os.getpid()}"}}
    worker_args = ["--snakefile", str(snakefile), "--max-concurrent-targets", str(per_worker)]
    return PoolStack(workdir, workers=args.workers, overrides=overrides, worker_args=worker_args, **common)


def _per_worker(
    cpu: dict[str, dict[str, float]],
    statuses: dict[str, dict[str, Any]],
    rss: dict[str, Any],
    *,
    visits: int,
) -> dict[str, Any]:
    """Each worker's CPU (service, its Snakemake, its jobs), RSS and counts."""
    out: dict[str, Any] = {}
    for worker_id, status in statuses.items():
        targets = status.get("gauges", {}).get("targets", {})
        done = int(targets.get("done", 0) or 0)
        roles = {
            "shim": cpu.get(f"worker:{worker_id}", {}),
            "submitter": cpu.get(f"submitter:{worker_id}", {}),
            "jobs": cpu.get(f"jobs:{worker_id}", {}),
        }
        summary = cpu_summary(roles, visits=visits, targets=max(done, 1))
        out[worker_id] = {
            "targets_done": done,
            "targets_failed": int(targets.get("failed", 0) or 0),
            "cpu_service": summary["shim"],
            "cpu_submitter": summary["submitter"],
            "cpu_jobs": summary["jobs"],
            "rss_max_mb": {
                "service": rss.get(f"worker:{worker_id}", {}).get("max_mb"),
                "submitter": rss.get(f"submitter:{worker_id}", {}).get("max_mb"),
            },
            "work_items": status.get("counts", {}).get("work_items", {}),
            "latencies": status.get("latencies", {}),
        }
    return out


def _print_summary(report: dict[str, Any]) -> None:
    """A few lines for the operator on stderr: outcome, latency, saturation, the extrapolation."""
    counts, added = report["targets"], report["latency"]["orchestration_added"]
    extra, saturated = report["extrapolation_lsstcam"], report["saturation"]
    lines = [
        f"targets: {counts['done']}/{counts['planned']} done, {counts['failed']} failed, {counts['missing']} missing",
        f"orchestration-added latency p50/p95/max: {added['p50_s']} / {added['p95_s']} / {added['max_s']} s",
        f"saturated: {saturated['saturated']} ({saturated['reason']})",
        f"extrapolation to 189 detectors / 32 s ({extra['formula']}): shim + submitter need "
        f"{extra['orchestration_cores_needed']} cores, {extra['cores_here']} here; assuming: "
        + "; ".join(extra["assumptions"]),
    ]
    print("\n".join(lines), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the night; print (and optionally save) the JSON report; return the exit status."""
    args = _parse(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    try:
        cost = CostModel.parse(args.cost_model)
    except ValueError as exc:
        print(f"bench_night: {exc}", file=sys.stderr)
        return 2
    report = _run(args, cost)
    text = json.dumps(report, indent=1)
    print(text)
    _print_summary(report)
    if args.json:
        Path(args.json).write_text(text)
    counts = report["targets"]
    return 0 if report["all_ended"] and counts["done"] == counts["planned"] else 1


if __name__ == "__main__":
    sys.exit(main())
