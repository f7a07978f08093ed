"""Tests for `workflow.stage_client` / `workflow.stage_server`: warm stage runs."""

from __future__ import annotations

import json
import subprocess
import sys

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
