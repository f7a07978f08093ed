"""Tests for the Snakefile's config handling and import hygiene."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from workflow.config import PROJECT_ROOT, known_instruments

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def _dry_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*SNAKEMAKE, "-n", "--cores", "1", "--snakefile", str(PROJECT_ROOT / "Snakefile"),
         "--directory", str(PROJECT_ROOT), "--nolock", *args],
        capture_output=True, text=True, timeout=120,
        cwd=tmp_path,
    )


def test_no_bare_import_of_workflow_package():
    """Snakemake binds the global name `workflow`; `import workflow...` would shadow it."""
    bad = re.compile(r"^\s*import\s+workflow(\.|\s|$)(?!.*\bas\b)", re.M)
    files = [PROJECT_ROOT / "Snakefile", *sorted((PROJECT_ROOT / "rules").glob("*.smk"))]
    offenders = [str(f) for f in files if bad.search(f.read_text())]
    assert not offenders, f"use 'from workflow.x import y' in {offenders}"


@pytest.mark.parametrize("instrument", known_instruments())
def test_dry_run_accepts_each_instrument(tmp_path, instrument):
    result = _dry_run(tmp_path, "--configfile", str(PROJECT_ROOT / "config" / "instruments" / f"{instrument}.yaml"))
    assert result.returncode == 0, result.stderr[-2000:]


def test_dry_run_rejects_bad_config_naming_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    data = yaml.safe_load((PROJECT_ROOT / "config/instruments/HSC.yaml").read_text())
    data["raw"]["image_timeout_s"] = "two minutes"
    bad.write_text(yaml.safe_dump(data))
    result = _dry_run(tmp_path, "--configfile", str(bad))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"{bad}: key 'raw.image_timeout_s': expected number, got 'two minutes'" in output
