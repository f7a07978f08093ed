"""End-to-end tests of the Snakemake chain on small simulated images.

A small central repo (SQLite + files) is built in a temp run directory; targets are
run with real Snakemake on profiles/local.  Replay reads raws from the repo; the
"live" cases put raws in the (local-directory) raw bucket: a raw with no template
(fallback), a corrupt raw, a missing raw (timeout).  A rerun must do nothing.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
import yaml
from raw_uploads import make_visit, upload_raw

from workflow.core.buckets import open_bucket
from workflow.core.config import instrument_config_path, load_config
from workflow.core.instrument import instrument_for_run
from workflow.outcomes.summary import collect_outcomes, summarize
from workflow.repo.central_repo import open_central_repo
from workflow.runtime.replay import replay, write_visit_files
from workflow.runtime.snakemake_runner import run_snakemake
from workflow.sim.demo_repo import build_demo_repo

SCALE = 0.125


def _site(run_dir: Path) -> Path:
    site = {
        "central_repo": str(run_dir / "repo"),
        "simulation": {"scale": SCALE, "seed": 0},
        "storage": {"endpoint_url": None, "local_root": str(run_dir / "buckets")},
        "paths": {"results": "results", "work": "work_area", "visits": "visits", "cache": str(run_dir / "cache")},
        "raw": {"image_timeout_s": 2.0},
    }
    path = run_dir / "site.yaml"
    path.write_text(yaml.safe_dump(site))
    return path


def _apdb_site(run_dir: Path, instrument: str) -> Path:
    path = run_dir / f"apdb-{instrument}.yaml"
    cfg = load_config(instrument=instrument)["apdb"]
    cfg["db_url"] = f"sqlite:///{run_dir}/apdb-{instrument}.sqlite3"
    path.write_text(yaml.safe_dump({"apdb": cfg}))
    return path


class ChainRun:
    """A run directory with its config files, for one instrument."""

    def __init__(self, run_dir: Path, instrument: str) -> None:
        self.dir = run_dir
        self.instrument = instrument
        self.files = [_site(run_dir), _apdb_site(run_dir, instrument)]
        self.config = load_config(instrument=instrument, extra_files=self.files)

    def snakemake(self, targets: list[str]):
        return run_snakemake(
            targets,
            configfiles=[instrument_config_path(self.instrument), *self.files],
            directory=self.dir,
            log_file=self.dir / "snakemake.log",
            timeout=600,
        )

    def outcome(self, target) -> dict:
        done, failed = self.dir / target.done_file, self.dir / target.failed_file
        return json.loads((done if done.exists() else failed).read_text())


@pytest.fixture(scope="module")
def comcam(tmp_path_factory, monkeypatch_module):
    run_dir = tmp_path_factory.mktemp("chain-comcam")
    monkeypatch_module.chdir(run_dir)
    run = ChainRun(run_dir, "LSSTComCamSim")
    build_demo_repo(
        run.config["central_repo"], ["LSSTComCamSim"], n_visits=1, scale=SCALE, n_detectors=1, progress=False
    )
    return run


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_replay_runs_the_whole_chain(comcam):
    batches = replay(
        comcam.config, instrument_file=instrument_config_path("LSSTComCamSim"), limit=1, extra_configfiles=comcam.files
    )
    assert len(batches) == 1 and batches[0]["targets"] == 1, batches
    (record,) = collect_outcomes(comcam.dir / "results", "LSSTComCamSim")
    assert record.outcome == "ok", (
        record,
        (comcam.dir / "snakemake.log").read_text()[-3000:] if (comcam.dir / "snakemake.log").exists() else "",
    )
    assert record.pipeline == "ApPipe"
    assert set(record.stage_seconds) == {"prep", "ingest", "pipeline", "export", "apdb"}
    assert set(record.stage_resources) == set(record.stage_seconds)  # what the forked stages used
    assert record.stage_resources["pipeline"].cpu_user_s > 0 and record.stage_resources["pipeline"].max_rss_mb > 50
    assert record.apdb["stored"] is True
    # Exported products are in the central repo, in the night's output chain.
    butler = open_central_repo(comcam.config["central_repo"])
    chain = f"LSSTComCamSim/prompt/output-{record.day_obs}"
    types = {
        ref.datasetType.name
        for ref in butler.query_datasets("difference_image", collections=chain, limit=None, explain=False)
    }
    assert types == {"difference_image"}


def _live_target(run: ChainRun, detector: int, group: str, **upload):
    instrument = instrument_for_run(run.config)
    visit = make_visit(
        run.instrument, group, run.config["filters"][1]["physical_filter"], snd_stamp=time.time() + 37.0, duration=0.0
    )
    bucket = open_bucket(run.config, run.config["buckets"]["raw"])
    if upload is not None and upload.get("skip") is not True:
        upload_raw(bucket, run.config, instrument, visit, detector, corrupt=upload.get("corrupt", False))
    (target,) = write_visit_files(run.config, visit, [detector])
    return target


def test_live_targets_fallback_corrupt_and_missing(comcam):
    # Detector 0 has no template patch in the demo repo: ApPipe cannot run.
    fallback = _live_target(comcam, 0, "2026-11-28T01:00:00.000")
    corrupt = _live_target(comcam, 2, "2026-11-28T01:00:00.000", corrupt=True)
    missing = _live_target(comcam, 3, "2026-11-28T01:00:00.000", skip=True)
    run = comcam.snakemake([str(t.done_file) for t in (fallback, corrupt, missing)])
    assert run.returncode != 0  # two targets failed; --keep-going ran the others
    ok = comcam.outcome(fallback)
    assert ok["outcome"] == "fallback" and ok["pipeline"] == "SingleFrame", ok
    assert ok["attempts"][0]["pipeline"] == "ApPipe" and ok["attempts"][0]["error"] == "NoTemplateError"
    bad = comcam.outcome(corrupt)
    assert (bad["stage"], bad["error"], bad["retriable"]) == ("ingest", "CorruptRawError", False)
    late = comcam.outcome(missing)
    assert (late["stage"], late["error"], late["retriable"]) == ("ingest", "RawTimeoutError", True)
    assert "0 of 1 raw(s) arrived" in late["message"]
    counts = summarize(collect_outcomes(comcam.dir / "results", "LSSTComCamSim"))["outcomes"]
    assert counts["failed"] == 2 and counts["fallback"] == 1


def test_rerun_does_nothing(comcam):
    targets = [str(p.relative_to(comcam.dir)) for p in (comcam.dir / "results").glob("**/done.json")]
    assert targets
    apdb = comcam.dir / "apdb-LSSTComCamSim.sqlite3"
    rows_before = sqlite3.connect(apdb).execute('SELECT COUNT(*) FROM "DiaSource"').fetchone()[0]
    stamps = {t: (comcam.dir / t).stat().st_mtime for t in targets}
    run = comcam.snakemake(targets)
    assert run.returncode == 0, run.log_tail
    assert "Nothing to be done" in (comcam.dir / "snakemake.log").read_text()
    assert stamps == {t: (comcam.dir / t).stat().st_mtime for t in targets}
    assert sqlite3.connect(apdb).execute('SELECT COUNT(*) FROM "DiaSource"').fetchone()[0] == rows_before


def test_second_instrument_replays(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = ChainRun(tmp_path, "HSC")
    build_demo_repo(run.config["central_repo"], ["HSC"], n_visits=1, scale=SCALE, n_detectors=1, progress=False)
    batches = replay(run.config, instrument_file=instrument_config_path("HSC"), limit=1, extra_configfiles=run.files)
    assert batches[0]["returncode"] == 0, batches
    (record,) = collect_outcomes(tmp_path / "results", "HSC")
    assert record.outcome in {"ok", "fallback"} and record.pipeline is not None, record
