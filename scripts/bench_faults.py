"""Fault suite: replay faults on the live stack and check that nothing is lost or duplicated.

    python scripts/bench_faults.py [--scenarios baseline,broker_restart,...] [--visits 5] [--detectors 9]
        [--cadence-s 15] [--lead-s 3] [--exptime-s 2] [--readout-s 1] [--raw-spread-s 1]
        [--cost-model quick-sleep|lsstcam-sleep|zero|JSON] [--shared-stack] [--tail-s 75]
        [--retry-max-attempts N] [--retry-backoff-s S] [--workdir demo/bench_faults] [--json out.json]

For each scenario (`stream_shim.testbed.faults`: ``baseline``, ``broker_restart``,
``broker_outage``, ``s3_outage``, ``postgres_outage``, ``poison``, ``kill_snakemake``) a fresh live stack
(Tansu broker, SeaweedFS S3 with the filer bridge, ``python -m stream_shim`` with its
streaming Snakemake) runs the fault stand-in workflow (`stream_shim.testbed.fault_standin`:
the night simulator's sleeping stages, ingest reading its raw from S3, and for
``postgres_outage`` *apdb* storing a row per detector-visit in a PostgreSQL server), the night
simulator's camera plays ``--visits`` visits of ``--detectors`` LSSTCam detectors, and
the fault strikes at its trigger (`stream_shim.testbed.fault_run`).  Every wait is
bounded: each scenario ends at its timeout (the night, the fault's pause, ``--tail-s``).

Prints one JSON document on stdout (a report per scenario, `stream_shim.testbed.fault_report`:
targets expected / done / failed / lost, duplicate stage runs, duplicate and missing
alert markers, the stand-in APDB rows (total / distinct / expected), recovery times
from the end of the fault, the shim's counts, the goals and what missed them, the
load averages) and a table on stderr.  ``--retry-*`` override the shim's automatic
retries (``submission.retry``).  The run directory is wiped at start
(only one this script made: it holds ``.bench_faults``).  Exit status: 0 when every
scenario met its goals, 1 otherwise, 2 on bad options.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from stream_shim.testbed.fault_report import format_table
from stream_shim.testbed.fault_run import FaultSuite, SuiteSettings, empty_central_repo
from stream_shim.testbed.faults import SCENARIOS, Scenario, scenarios_named
from stream_shim.testbed.night import Cadence
from stream_shim.testbed.night_standin import COST_MODELS, CostModel
from workflow.core.config import PROJECT_ROOT

_MARKER = ".bench_faults"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {','.join(SCENARIOS)} (default: all)"
    )
    parser.add_argument("--visits", type=int, default=5, help="visits per scenario (default 5)")
    parser.add_argument("--detectors", type=int, default=9, help="active detectors, the first N (default 9)")
    parser.add_argument("--cadence-s", type=float, default=15.0, help="seconds between next_visits (default 15)")
    parser.add_argument("--lead-s", type=float, default=3.0, help="next_visit -> exposure start (default 3)")
    parser.add_argument("--exptime-s", type=float, default=2.0, help="exposure (default 2)")
    parser.add_argument("--readout-s", type=float, default=1.0, help="exposure end -> first raw (default 1)")
    parser.add_argument("--raw-spread-s", type=float, default=1.0, help="a visit's raws land over this (default 1)")
    parser.add_argument(
        "--cost-model", default="quick-sleep", help=f"one of {sorted(COST_MODELS)} or JSON (default quick-sleep)"
    )
    parser.add_argument("--shared-stack", action="store_true", help="one live stack for every scenario (quicker)")
    parser.add_argument("--tail-s", type=float, default=75.0, help="time after the night for the outcomes (default 75)")
    parser.add_argument(
        "--retry-max-attempts", type=int, default=None, help="shim submission.retry.max_attempts (default: config)"
    )
    parser.add_argument(
        "--retry-backoff-s", type=float, default=None, help="shim submission.retry.backoff_s (default: config)"
    )
    parser.add_argument("--workdir", default=str(PROJECT_ROOT / "demo" / "bench_faults"), help="run directory")
    parser.add_argument("--json", default=None, help="also write the report here")
    return parser.parse_args(argv)


def _fresh_workdir(workdir: Path) -> None:
    if workdir.exists():
        if not (workdir / _MARKER).exists():
            raise SystemExit(f"bench_faults: {workdir} exists and was not made by this script; choose another")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / _MARKER).write_text("made by scripts/bench_faults.py; wiped at each run\n")


def _cadence(args: argparse.Namespace) -> Cadence:
    return Cadence(
        visits=args.visits,
        cadence_s=args.cadence_s,
        lead_s=args.lead_s,
        exptime_s=args.exptime_s,
        readout_s=args.readout_s,
        raw_spread_s=args.raw_spread_s,
    )


def _scenarios(args: argparse.Namespace) -> list[Scenario]:
    return scenarios_named([n.strip() for n in args.scenarios.split(",") if n.strip()], _cadence(args))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the suite as ``args`` say; return the JSON document."""
    cost = CostModel.parse(args.cost_model)
    cadence, scenarios = _cadence(args), _scenarios(args)
    workdir = Path(args.workdir).resolve()
    _fresh_workdir(workdir)
    started = time.monotonic()
    repo = empty_central_repo(workdir / "central_repo")
    retry = {
        key: value
        for key, value in (("max_attempts", args.retry_max_attempts), ("backoff_s", args.retry_backoff_s))
        if value is not None
    }
    settings = SuiteSettings(
        cadence=cadence, detectors=args.detectors, cost=cost, tail_s=args.tail_s, retry=retry or None
    )
    load_start = os.getloadavg()
    suite = FaultSuite(
        workdir,
        repo=repo,
        settings=settings,
        shared_stack=args.shared_stack,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    reports = suite.run(scenarios)
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "flags": vars(args),
        "cost_model": cost.to_dict(),
        "instrument": settings.instrument,
        "detectors": suite.detectors,
        "suite_wall_s": round(time.monotonic() - started, 1),
        "all_goals_met": all(r["goals"]["met"] for r in reports),
        "scenarios": reports,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus_usable": len(os.sched_getaffinity(0)),
            "load_average_start": [round(v, 2) for v in load_start],
            "load_average_end": [round(v, 2) for v in os.getloadavg()],
        },
        "resources": {
            "note": "this driver and the children it waited for (the shims, servers and tools it ran)",
            "cpu_user_s": round(own.ru_utime + children.ru_utime, 1),
            "cpu_sys_s": round(own.ru_stime + children.ru_stime, 1),
            "peak_rss_mb_driver": round(own.ru_maxrss / 1024.0, 1),
            "peak_rss_mb_largest_child": round(children.ru_maxrss / 1024.0, 1),
        },
    }


def main(argv: list[str] | None = None) -> int:
    """Run the suite; print the JSON document (stdout) and the table (stderr); return the exit status."""
    args = _parse(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    try:
        CostModel.parse(args.cost_model)
        _scenarios(args)
    except ValueError as exc:
        print(f"bench_faults: {exc}", file=sys.stderr)
        return 2
    document = run(args)
    text = json.dumps(document, indent=1)
    print(text)
    print(format_table(document["scenarios"]), file=sys.stderr)
    print(f"suite: {document['suite_wall_s']:.0f} s", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(text)
    return 0 if document["all_goals_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
