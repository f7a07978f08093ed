"""Tests for `workflow.runtime.snakemake_tuning`: the scheduler adjustment the Snakefile applies on start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from workflow.core.config import PROJECT_ROOT
from workflow.runtime.snakemake_tuning import disable_job_rate_limiter

TOY_SNAKEFILE = """
from workflow.runtime.snakemake_tuning import disable_job_rate_limiter

onstart:
    had = workflow.scheduler.job_rate_limiter is not None
    removed = disable_job_rate_limiter(workflow)
    with open("limiter.txt", "w") as out:
        print(had, removed, workflow.scheduler.job_rate_limiter, file=out)

rule all:
    input: expand("out/{i}.txt", i=range(6))

rule one:
    output: "out/{i}.txt"
    shell: "echo {wildcards.i} > {output}"
"""


def test_removes_the_limiter_of_a_real_snakemake_run(tmp_path: Path) -> None:
    """In a real run (Snakemake's default 100/1s limit) the hook finds the limiter and removes it."""
    (tmp_path / "Snakefile").write_text(TOY_SNAKEFILE)
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2", "--nolock", "--scheduler", "greedy"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT_ROOT)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "limiter.txt").read_text().split() == ["True", "True", "None"]
    assert sorted(p.read_text().strip() for p in (tmp_path / "out").iterdir()) == [str(i) for i in range(6)]


def test_no_scheduler_or_no_limiter_is_left_alone() -> None:
    assert disable_job_rate_limiter(SimpleNamespace()) is False
    scheduler = SimpleNamespace(job_rate_limiter=None)
    assert disable_job_rate_limiter(SimpleNamespace(scheduler=scheduler)) is False
    assert scheduler.job_rate_limiter is None


def test_the_workflow_applies_it_on_start() -> None:
    common = (PROJECT_ROOT / "rules" / "common.smk").read_text()
    assert "onstart:\n    disable_job_rate_limiter(workflow)\n" in common
