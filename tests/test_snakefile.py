"""Tests for the Snakefile's config handling and import hygiene."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from workflow.core.config import PROJECT_ROOT, known_instruments, load_config

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def _dry_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            *SNAKEMAKE,
            "-n",
            "--cores",
            "1",
            "--snakefile",
            str(PROJECT_ROOT / "Snakefile"),
            "--directory",
            str(PROJECT_ROOT),
            "--nolock",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )


def test_no_bare_import_of_workflow_package():
    """Snakemake binds the global name `workflow`; `import workflow...` would shadow it."""
    bad = re.compile(r"^\s*import\s+workflow(\.|\s|$)(?!.*\bas\b)", re.M)
    files = [PROJECT_ROOT / "Snakefile", *sorted((PROJECT_ROOT / "rules").glob("*.smk"))]
    offenders = [str(f) for f in files if bad.search(f.read_text())]
    assert not offenders, f"use 'from workflow.x import y' in {offenders}"


def _write_visit_files(run_dir: Path, instrument: str, detectors: list[int]) -> None:
    from raw_uploads import make_visit

    config = load_config(instrument=instrument)
    visit = make_visit(
        instrument, "2026-11-28T03:00:00.000", config["filters"][0]["physical_filter"], snd_stamp=1_795_000_000.0
    )
    for detector_visit in visit.fan_out(detectors):
        path = run_dir / "visits" / instrument / visit.day_obs / visit.groupId / f"{detector_visit.detector}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(detector_visit.to_json())


def _run(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            *SNAKEMAKE,
            "--cores",
            "1",
            "--snakefile",
            str(PROJECT_ROOT / "Snakefile"),
            "--directory",
            str(run_dir),
            "--nolock",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=run_dir,
    )


@pytest.mark.parametrize("instrument", known_instruments())
def test_dry_run_dag_and_rulegraph_for_each_instrument(tmp_path, instrument):
    """`--configfile config/instruments/X.yaml` switches instrument with no code change."""
    _write_visit_files(tmp_path, instrument, [0, 1])
    configfile = ["--configfile", str(PROJECT_ROOT / "config" / "instruments" / f"{instrument}.yaml")]
    dry = _run(tmp_path, "-n", *configfile)
    assert dry.returncode == 0, dry.stderr[-2000:]
    for rule in ("prep", "ingest", "pipeline", "export", "apdb", "finish"):
        assert any(line.split()[:2] == [rule, "2"] for line in dry.stdout.splitlines()), (rule, dry.stdout)
    graph = _run(tmp_path, "--rulegraph", *configfile)
    assert graph.returncode == 0 and graph.stdout.lstrip().startswith("digraph"), graph.stderr[-2000:]
    assert "pipeline" in graph.stdout and "apdb" in graph.stdout
    dag = _run(tmp_path, "--dag", *configfile)
    assert dag.returncode == 0 and dag.stdout.count("finish") == 2, dag.stderr[-2000:]


def test_dry_run_rejects_bad_config_naming_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    data = yaml.safe_load((PROJECT_ROOT / "config/instruments/HSC.yaml").read_text())
    data["raw"]["image_timeout_s"] = "two minutes"
    bad.write_text(yaml.safe_dump(data))
    result = _dry_run(tmp_path, "--configfile", str(bad))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"{bad}: key 'raw.image_timeout_s': expected number, got 'two minutes'" in output
