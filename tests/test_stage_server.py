"""Tests for `workflow.stage_client` / `workflow.stage_server`: warm stage runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from workflow.config import load_config, write_config_snapshot


def _client(tmp_path, stage: str, *args: str) -> subprocess.CompletedProcess:
    config = write_config_snapshot(load_config(), tmp_path / "cfg")
    return subprocess.run([sys.executable, "-m", "workflow.stage_client", stage, str(config),
                           str(tmp_path / "logs" / f"{stage}.log"), "--", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_failed_stage_returns_nonzero_and_records_why(tmp_path):
    visit = tmp_path / "visits" / "LSSTComCamSim" / "2026-11-27" / "G1" / "3.json"
    visit.parent.mkdir(parents=True)
    visit.write_text("{not json")
    result = _client(tmp_path, "prep", str(visit.relative_to(tmp_path)), "work_area/prep.json")
    assert result.returncode == 1, result.stderr
    failed = json.loads((tmp_path / "results/LSSTComCamSim/2026-11-27/G1/3/failed.json").read_text())
    assert (failed["stage"], failed["error"], failed["retriable"]) == ("prep", "InvalidVisit", False)
    assert str(visit.relative_to(tmp_path)) in failed["message"]
    assert "InvalidVisit" in (tmp_path / "logs" / "prep.log").read_text()


def test_bad_usage_is_reported(tmp_path):
    result = subprocess.run([sys.executable, "-m", "workflow.stage_client", "prep"], capture_output=True,
                            text=True, timeout=60)
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
    code = ("import numpy, threadpoolctl; from workflow.stage_server import limit_threads; "
            f"print(limit_threads({{'OMP_NUM_THREADS': '{omp}'}}), "
            "[p['num_threads'] for p in threadpoolctl.threadpool_info() if p['user_api'] == 'blas'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "OMP_NUM_THREADS": "", "OPENBLAS_NUM_THREADS": "4"})
    assert result.returncode == 0, result.stderr
    limit, pools = result.stdout.split(" ", 1)
    assert int(limit) == expected
    assert pools.strip() == str([expected])


def test_no_thread_setting_leaves_the_pools_alone() -> None:
    from workflow.stage_server import limit_threads

    assert limit_threads({}) is None
    assert limit_threads({"OMP_NUM_THREADS": "many"}) is None
