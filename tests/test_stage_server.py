"""Tests for `workflow.runtime.stage_client` / `workflow.runtime.stage_server`: warm stage runs."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys

import pytest

from workflow.core.config import PROJECT_ROOT, load_config, write_config_snapshot
from workflow.runtime.stage_server import StageArgumentError, stage_function, stage_kwargs
from workflow.stages import STAGES
from workflow.stages.records import read_failed


def _client(tmp_path, stage: str, *args: str) -> subprocess.CompletedProcess:
    config = write_config_snapshot(load_config(), tmp_path / "cfg")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "workflow.runtime.stage_client",
            stage,
            "--config",
            str(config),
            "--log",
            str(tmp_path / "logs" / f"{stage}.log"),
            *args,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _bad_visit(tmp_path) -> str:
    visit = tmp_path / "visits" / "LSSTComCamSim" / "2026-11-27" / "G1" / "3.json"
    visit.parent.mkdir(parents=True)
    visit.write_text("{not json")
    return str(visit.relative_to(tmp_path))


@pytest.mark.parametrize("order", ["visit-first", "manifest-first"])
def test_failed_stage_returns_nonzero_and_records_why(tmp_path, order):
    """Arguments go by name: their order on the command line does not matter."""
    visit = _bad_visit(tmp_path)
    args = ["--visit", visit, "--manifest", "work_area/prep.json"]
    result = _client(tmp_path, "prep", *(args if order == "visit-first" else args[2:] + args[:2]))
    assert result.returncode == 1, result.stderr
    failed = read_failed(tmp_path / "results/LSSTComCamSim/2026-11-27/G1/3/failed.json")
    assert (failed.stage, failed.error, failed.retriable) == ("prep", "InvalidVisit", False)
    assert visit in failed.message
    assert "InvalidVisit" in (tmp_path / "logs" / "prep.log").read_text()


def test_renamed_argument_fails_loudly_without_running_the_stage(tmp_path):
    visit = _bad_visit(tmp_path)
    result = _client(tmp_path, "prep", "--visit_file", visit, "--manifest", "work_area/prep.json")
    assert result.returncode == 1
    log = (tmp_path / "logs" / "prep.log").read_text()
    assert "StageArgumentError: stage prep: unknown argument(s) --visit_file; it takes --visit, --manifest" in log
    assert not (tmp_path / "results").exists()  # the stage never ran


def test_stage_kwargs_match_the_run_signature():
    assert stage_kwargs("finish", {"visit": ["v.json"], "records": ["a.json", "b.json"], "done": ["d.json"]}) == {
        "visit": "v.json",
        "records": ["a.json", "b.json"],
        "done": "d.json",
    }
    with pytest.raises(StageArgumentError, match="stage pipeline: missing argument --ingest"):
        stage_kwargs("pipeline", {"visit": ["v"], "prep": ["p"], "record": ["r"]})
    with pytest.raises(StageArgumentError, match="stage ingest: --visit takes one value, got 2"):
        stage_kwargs("ingest", {"visit": ["a", "b"], "record": ["r"]})
    with pytest.raises(StageArgumentError, match="unknown stage 'run_pipeline'"):
        stage_kwargs("run_pipeline", {})


def _rule_shells() -> dict[str, str]:
    """Rule name -> its shell command text, from rules/*.smk."""
    shells = {}
    for smk in sorted((PROJECT_ROOT / "rules").glob("*.smk")):
        for name, body in re.findall(r"^rule (\w+):\n(.*?)(?=^rule |\Z)", smk.read_text(), re.M | re.S):
            match = re.search(r'shell:\s*STAGE\s*\+\s*"(.*?)"', body, re.S)
            if match:
                shells[name] = match.group(1)
    return shells


def test_every_rule_is_its_stage_and_passes_its_arguments_by_name():
    """One word per stage: rule name = stage = module; each flag is the rule's own input/output name."""
    shells = _rule_shells()
    assert sorted(shells) == sorted(STAGES)
    for rule, shell in shells.items():
        words = shell.split()
        assert words[0] == rule, shell
        flags = dict(zip(words[1::2], words[2::2], strict=False))
        assert flags.pop("--config") == "{params.config:q}" and flags.pop("--log") == "{log:q}"
        for flag, value in flags.items():
            assert re.fullmatch(rf"\{{(input|output)\.{flag[2:]}:q\}}", value), (rule, flag, value)
        params = set(inspect.signature(stage_function(rule)).parameters) - {"config", "log"}
        assert {f[2:] for f in flags} == params, rule
        stage_kwargs(rule, {f[2:]: ["x"] for f in flags})  # every flag is accepted


def test_bad_usage_is_reported(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "workflow.runtime.stage_client", "prep"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "usage" in result.stderr


def test_config_snapshot_is_content_addressed(tmp_path):
    config = load_config()
    first = write_config_snapshot(config, tmp_path)
    assert first == write_config_snapshot(config, tmp_path)
    assert json.loads(first.read_text())["instrument"]["name"] == "LSSTComCamSim"
    other = write_config_snapshot({**config, "visit": {"max_age_s": 1.0}}, tmp_path)
    assert other != first


@pytest.mark.parametrize(("omp", "expected"), [("1", 1), ("0", 1), ("2", 2)])
def test_forked_stage_holds_blas_to_the_jobs_threads(omp: str, expected: int) -> None:
    """numpy is imported before the limit (as in the server); the child's BLAS pool follows OMP_NUM_THREADS."""
    code = (
        "import numpy, threadpoolctl; from workflow.runtime.stage_server import limit_threads; "
        f"print(limit_threads({{'OMP_NUM_THREADS': '{omp}'}}), "
        "[p['num_threads'] for p in threadpoolctl.threadpool_info() if p['user_api'] == 'blas'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "OMP_NUM_THREADS": "", "OPENBLAS_NUM_THREADS": "4"},
    )
    assert result.returncode == 0, result.stderr
    limit, pools = result.stdout.split(" ", 1)
    assert int(limit) == expected
    assert pools.strip() == str([expected])


def test_no_thread_setting_leaves_the_pools_alone() -> None:
    from workflow.runtime.stage_server import limit_threads

    assert limit_threads({}) is None
    assert limit_threads({"OMP_NUM_THREADS": "many"}) is None
