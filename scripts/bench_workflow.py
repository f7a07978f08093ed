"""Benchmark: Snakemake overhead per detector-visit target (1, 9 and 189 targets).

Builds a tiny LSSTCam central repo (calibs and refcats only, scale 0.05), puts one
simulated raw per detector in a local raw bucket, and runs the real workflow on
profiles/local for 1, 9 and 189 targets.  Overhead = wall time x cores minus the
seconds spent inside the stages (from the targets' stage records), per target:
what Snakemake scheduling, job start-up and Python imports cost on top of the work.
It is split into job start-up (Snakemake's benchmark of each job minus the stage's
own seconds) and idle cores (start-up of Snakemake and of the warm stage server,
scheduling gaps, and the one idle core of a single sequential chain).  Prints JSON.

``--profile profiles/slurm`` runs the same targets as sbatch jobs (one per chain) on a
single-node SLURM cluster this script starts in ``DIR`` (`stream_shim.testbed.slurm_cluster`),
unless ``SLURM_CONF`` already names one.  Each run also reports the CPU (user, sys) and
peak RSS of the submitting Snakemake and its children (on SLURM the jobs are not its
children: see ``machine_cpu_s``, all of the machine's CPU during the run) and the load
average.

Usage: python scripts/bench_workflow.py [--counts 1 9 189] [--dir DIR] [--scale 0.05] [--profile profiles/local]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from stream_shim.testbed.slurm_cluster import SlurmCluster
from workflow.core.buckets import open_bucket
from workflow.core.config import instrument_config_path, load_config
from workflow.core.instrument import instrument_for_run
from workflow.core.raw_keys import RawKeyLayout, sidecar_key
from workflow.core.visit import CoordSys, Dome, NextVisit, RotSys
from workflow.outcomes.metrics import read_benchmarks
from workflow.outcomes.summary import collect_outcomes
from workflow.runtime.replay import write_visit_files
from workflow.runtime.snakemake_runner import resolve_profile, run_snakemake
from workflow.sim.demo_repo import build_demo_repo
from workflow.sim.exposures import exposure_from_visit
from workflow.sim.simulate import simulate_raw

INSTRUMENT = "LSSTCam"


def _site(run_dir: Path, scale: float) -> Path:
    site = {
        "central_repo": str(run_dir / "repo"),
        "simulation": {"scale": scale, "seed": 0},
        "storage": {"endpoint_url": None, "local_root": str(run_dir / "buckets")},
        "paths": {"results": "results", "work": "work_area", "visits": "visits", "cache": str(run_dir / "cache")},
        "apdb": {
            "db_url": f"sqlite:///{run_dir}/apdb.sqlite3",
            "association_radius_arcsec": 1.0,
            "preload_padding_arcsec": 50.0,
        },
    }
    path = run_dir / "site.yaml"
    path.write_text(yaml.safe_dump(site))
    return path


def _visit(group: str, physical_filter: str) -> NextVisit:
    stamp = time.time() + 37.0
    return NextVisit(
        salIndex=1,
        scriptSalIndex=1,
        instrument=INSTRUMENT,
        groupId=group,
        coordinateSystem=CoordSys.ICRS,
        position=[150.1, 2.2],
        startTime=stamp,
        rotationSystem=RotSys.SKY,
        cameraAngle=0.0,
        filters=physical_filter,
        dome=Dome.OPEN,
        duration=0.0,
        nimages=1,
        survey="bench",
        totalCheckpoints=0,
        private_sndStamp=stamp,
    )


def _upload_raws(config: dict, visit: NextVisit, detectors: list[int]) -> None:
    instrument = instrument_for_run(config)
    bucket = open_bucket(config, config["buckets"]["raw"])
    layout = RawKeyLayout.from_config(config)
    exposure = exposure_from_visit(instrument, visit, seq_num=int(visit.groupId[-3:]))[0]
    for det_id in detectors:
        det = instrument.detector(det_id)
        raw = simulate_raw(instrument, det_id, exposure, seed=0)
        key = layout.format(
            instrument=INSTRUMENT,
            day_obs=str(exposure.day_obs),
            obs_id=exposure.obs_id,
            detector=det.id,
            detector_name=det.name,
            group=exposure.group_id,
            snap=0,
            exposure=exposure.exposure_id,
            physical_filter=exposure.physical_filter,
        )
        with tempfile.NamedTemporaryFile(suffix=".fits") as tmp:
            raw.write(tmp.name)
            bucket.put(key, Path(tmp.name).read_bytes())
        bucket.put(sidecar_key(key), json.dumps(raw.sidecar()).encode())


def _machine_cpu_s() -> float:
    """User + system CPU seconds of the whole machine so far (/proc/stat), all processes."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return (int(fields[0]) + int(fields[1]) + int(fields[2])) / os.sysconf("SC_CLK_TCK")


def _measure(config: dict, files: list[Path], run_dir: Path, count: int, index: int, profile: str) -> dict:
    detectors = [d.id for d in instrument_for_run(config).active_detectors()][:count]
    visit = _visit(f"2026-11-28T02:00:00.{index:03d}", config["filters"][2]["physical_filter"])
    _upload_raws(config, visit, detectors)
    targets = write_visit_files(config, visit, detectors)
    before, machine_before = resource.getrusage(resource.RUSAGE_CHILDREN), _machine_cpu_s()
    run = run_snakemake(
        [str(t.done_file) for t in targets],
        profile=profile,
        configfiles=[instrument_config_path(INSTRUMENT), *files],
        directory=run_dir,
        log_file=run_dir / f"snakemake-{count}.log",
    )
    after, machine_after = resource.getrusage(resource.RUSAGE_CHILDREN), _machine_cpu_s()
    records = [r for r in collect_outcomes(run_dir / "results", INSTRUMENT) if r.group == visit.groupId]
    in_steps = sum(sum(v for v in r.stage_seconds.values() if v) for r in records)
    in_jobs = sum(
        row.wall_s
        for row in read_benchmarks(run_dir / "benchmarks", instrument=INSTRUMENT)
        if row.group == visit.groupId
    )
    cores = 2
    return {
        "targets": count,
        "returncode": run.returncode,
        "wall_s": round(run.seconds, 2),
        "in_stage_s": round(in_steps, 2),
        "outcomes": sorted({r.outcome for r in records}),
        "overhead_per_target_s": round((run.seconds * cores - in_steps) / count, 2),
        # where it goes: job start-up around each stage, and cores idle between jobs
        "job_startup_per_target_s": round((in_jobs - in_steps) / count, 2),
        "idle_core_s_per_target": round((run.seconds * cores - in_jobs) / count, 2),
        "submitter_cpu_user_s": round(after.ru_utime - before.ru_utime, 2),
        "submitter_cpu_sys_s": round(after.ru_stime - before.ru_stime, 2),
        "submitter_peak_rss_mb": round(after.ru_maxrss / 1024.0, 1),  # largest child so far (this process's)
        "machine_cpu_s": round(machine_after - machine_before, 1),
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


@contextlib.contextmanager
def _cluster_for(profile: str, run_dir: Path) -> Iterator[SlurmCluster | None]:
    """A single-node SLURM cluster for a slurm profile (unless SLURM_CONF names one), else nothing."""
    settings = yaml.safe_load((resolve_profile(profile) / "config.yaml").read_text())
    if settings.get("executor") != "slurm" or os.environ.get("SLURM_CONF"):
        yield None
        return
    with SlurmCluster(run_dir / "slurm") as cluster:
        saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "PATH")}
        os.environ.update({k: cluster.env[k] for k in saved})
        try:
            yield cluster
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 9, 189])
    parser.add_argument("--dir", default=None)
    parser.add_argument("--scale", type=float, default=0.05)
    parser.add_argument("--profile", default="profiles/local")
    args = parser.parse_args()
    run_dir = Path(args.dir or tempfile.mkdtemp(prefix="bench-workflow-")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    os.chdir(run_dir)
    files = [_site(run_dir, args.scale)]
    config = load_config(instrument=INSTRUMENT, extra_files=files)
    started = time.monotonic()
    build_demo_repo(config["central_repo"], [INSTRUMENT], n_visits=1, scale=args.scale, n_detectors=1, progress=False)
    report: dict = {
        "instrument": INSTRUMENT,
        "scale": args.scale,
        "profile": args.profile,
        "repo_build_s": round(time.monotonic() - started, 1),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }
    with _cluster_for(args.profile, run_dir) as cluster:
        if cluster:
            report["slurm"] = {"node_cpus": cluster.hardware["CPUs"], "status_command": "squeue"}
        report["runs"] = [_measure(config, files, run_dir, n, i, args.profile) for i, n in enumerate(args.counts)]
    print(json.dumps(report, indent=2))
    if args.dir is None:
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
