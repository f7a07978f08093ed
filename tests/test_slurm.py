"""Replay through a real SLURM cluster: `scripts/replay.py --profile profiles/slurm`.

`stream_shim.testbed.slurm_cluster.SlurmCluster` starts munged, slurmctld and slurmd
(Debian's slurm-wlm) on 127.0.0.1 in a temp dir for this module; every detector-visit
chain is one sbatch job.  A small LSSTComCamSim central repo (2 visits x `DETECTORS`
detectors; the issue's 9 detectors take minutes on 2 cores, one job start-up each) is
replayed with one registered raw deleted from the repo: every other target is done,
exported and in the APDB, the broken one is classified; a rerun submits nothing.
Bad input: slurmctld unreachable at submission fails the batch's targets (not yet
classified: no ``failed.json`` for a scheduler failure).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from stream_shim.testbed.local_services import free_port
from stream_shim.testbed.slurm_cluster import SlurmCluster
from workflow.core.config import PROJECT_ROOT, instrument_config_path, load_config
from workflow.outcomes.summary import collect_outcomes
from workflow.repo.central_repo import open_central_repo, raw_collection
from workflow.sim.demo_repo import build_demo_repo
from workflow.stages.records import read_failed

INSTRUMENT = "LSSTComCamSim"
SCALE = 0.25
DETECTORS = 2
VISITS = 2
REPLAY_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A running single-node SLURM cluster; its ``env`` (``SLURM_CONF``, ``PATH``) is set for the module."""
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster, pytest.MonkeyPatch.context() as patch:
        for name in ("SLURM_CONF", "PATH"):
            patch.setenv(name, cluster.env[name])
        yield cluster


def _write_site(run_dir: Path) -> list[Path]:
    site = {
        "central_repo": str(run_dir / "repo"),
        "simulation": {"scale": SCALE, "seed": 0},
        "storage": {"endpoint_url": None, "local_root": str(run_dir / "buckets")},
        "paths": {"results": "results", "work": "work_area", "visits": "visits", "cache": str(run_dir / "cache")},
    }
    apdb = load_config(instrument=INSTRUMENT)["apdb"]
    apdb["db_url"] = f"sqlite:///{run_dir}/apdb.sqlite3"
    files = [run_dir / "site.yaml", run_dir / "apdb.yaml"]
    files[0].write_text(yaml.safe_dump(site))
    files[1].write_text(yaml.safe_dump({"apdb": apdb}))
    return files


def _run(command: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in its own session; on a timeout kill the session (Snakemake too), then fail."""
    proc = subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{command[:3]} did not finish in {timeout:g} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


class ReplayRun:
    """A run directory with a small central repo, replayed with profiles/slurm."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        self.files = _write_site(run_dir)
        self.config = load_config(instrument=INSTRUMENT, extra_files=self.files)

    def replay(self, *extra: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, str(PROJECT_ROOT / "scripts" / "replay.py"), "--instrument", INSTRUMENT]
        command += ["--ordered", "--batch-visits", str(VISITS), "--profile", "profiles/slurm", *extra]
        for path in self.files:
            command += ["--extra-config", str(path)]
        return _run(command, self.dir, REPLAY_TIMEOUT_S)

    def snakemake_log(self) -> str:
        logs = sorted((self.dir / "logs" / "replay").glob("*.log"))
        return "\n".join(p.read_text(errors="replace") for p in logs)

    def outcomes(self) -> dict[tuple[str, int], object]:
        return {(r.group, r.detector): r for r in collect_outcomes(self.dir / "results", INSTRUMENT)}

    def dia_sources(self) -> int:
        with sqlite3.connect(self.dir / "apdb.sqlite3") as db:
            return int(db.execute('SELECT COUNT(*) FROM "DiaSource"').fetchone()[0])


@pytest.fixture(scope="module")
def replay_run(tmp_path_factory: pytest.TempPathFactory, slurm_cluster: SlurmCluster) -> ReplayRun:
    """A central repo of `VISITS` x `DETECTORS`, one raw of which is registered but missing."""
    run = ReplayRun(tmp_path_factory.mktemp("slurm-replay"))
    build_demo_repo(
        run.config["central_repo"], [INSTRUMENT], n_visits=VISITS, scale=SCALE, n_detectors=DETECTORS, progress=False
    )
    butler = open_central_repo(run.config["central_repo"])
    refs = sorted(
        butler.query_datasets("raw", collections=raw_collection(INSTRUMENT), limit=None, explain=False),
        key=lambda ref: (str(ref.dataId["exposure"]), ref.dataId["detector"]),
    )
    os.unlink(butler.getURI(refs[-1]).ospath)
    run.missing = refs[-1]  # type: ignore[attr-defined]
    return run


def test_replay_through_sbatch_jobs(replay_run: ReplayRun, slurm_cluster: SlurmCluster) -> None:
    result = replay_run.replay()
    log = replay_run.snakemake_log()
    assert result.returncode == 1, (result.stderr[-3000:], log)  # one target failed; --keep-going ran the rest
    # Every chain was an sbatch job of the SLURM executor, one job per detector-visit.
    assert "SLURM run ID" in log and log.count("has been submitted with SLURM jobid") == VISITS * DETECTORS, log
    outcomes = replay_run.outcomes()
    assert len(outcomes) == VISITS * DETECTORS, (outcomes, log)
    failed = [r for r in outcomes.values() if r.outcome == "failed"]
    assert len(failed) == 1, (failed, log)
    (broken,) = failed
    assert (broken.stage, broken.error, broken.retriable) == ("ingest", "RawMissingError", True), broken
    assert "registered but missing" in broken.message
    done = [r for r in outcomes.values() if r.outcome != "failed"]
    assert all(r.outcome in {"ok", "fallback"} and r.apdb["stored"] is True for r in done), done
    # Exports are in the central repo's output chain, DiaSources in the APDB.
    butler = open_central_repo(replay_run.config["central_repo"])
    day_obs = done[0].day_obs
    exported = butler.query_datasets(
        "difference_image", collections=f"{INSTRUMENT}/prompt/output-{day_obs}", limit=None, explain=False
    )
    assert {(ref.dataId["detector"]) for ref in exported} >= {r.detector for r in done if r.outcome == "ok"}
    assert replay_run.dia_sources() == sum(int(r.apdb.get("n_dia_sources") or 0) for r in done) > 0


def test_rerun_submits_nothing(replay_run: ReplayRun, slurm_cluster: SlurmCluster) -> None:
    targets = sorted(str(p.relative_to(replay_run.dir)) for p in (replay_run.dir / "results").glob("**/done.json"))
    assert len(targets) == VISITS * DETECTORS - 1
    stamps = {t: (replay_run.dir / t).stat().st_mtime for t in targets}
    rows = replay_run.dia_sources()
    jobs_before = slurm_cluster.command("squeue", "--states=all", "--noheader", "--format=%i").stdout.split()
    run = _run(
        [sys.executable, "-m", "snakemake", "--profile", str(PROJECT_ROOT / "profiles" / "slurm")]
        + ["--snakefile", str(PROJECT_ROOT / "Snakefile"), "--configfile", str(instrument_config_path(INSTRUMENT))]
        + [str(p) for p in replay_run.files]
        + ["--", *targets],
        replay_run.dir,
        120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Nothing to be done" in run.stderr + run.stdout
    assert slurm_cluster.command("squeue", "--states=all", "--noheader", "--format=%i").stdout.split() == jobs_before
    assert stamps == {t: (replay_run.dir / t).stat().st_mtime for t in targets}
    assert replay_run.dia_sources() == rows


def test_slurmctld_unreachable_fails_its_targets(
    replay_run: ReplayRun, slurm_cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A copy of the cluster's slurm.conf whose controller port nobody listens on.
    dead = replay_run.dir / "dead-slurm.conf"
    port = f"SlurmctldPort={slurm_cluster.ctld_port}"
    dead.write_text(slurm_cluster.conf.read_text().replace(port, f"SlurmctldPort={free_port()}"))
    monkeypatch.setenv("SLURM_CONF", str(dead))
    monkeypatch.setenv("PATH", os.environ["PATH"].split(os.pathsep, 1)[1])  # not the wrappers: they set SLURM_CONF
    (done,) = sorted((replay_run.dir / "results").glob("**/done.json"))[:1]
    done.unlink()
    jobs_before = slurm_cluster.command("squeue", "--states=all", "--noheader", "--format=%i").stdout.split()
    result = replay_run.replay()
    assert result.returncode == 1, result.stderr[-3000:]
    # No job reached the (real) controller; the batch ends with the group failed.  The
    # executor's own sbatch message does not reach Snakemake's log for a group job, so
    # replay classifies the target it left without an outcome (docs/slurm.md).
    assert slurm_cluster.command("squeue", "--states=all", "--noheader", "--format=%i").stdout.split() == jobs_before
    assert "Error in group detector_visit" in replay_run.snakemake_log().rsplit("SLURM run ID", 1)[1]
    assert not done.exists()
    failed = read_failed(done.parent / "failed.json")
    assert failed.error == "NoOutcome" and failed.retriable is True and failed.stage == "snakemake"
    assert f"detector {failed.detector}" in failed.message and "batch-" in failed.message
