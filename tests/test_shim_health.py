"""Tests for `stream_shim.health`, `stream_shim.target_store.LocalStore` and the CLI's start-up failures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stream_shim.health import HealthCheckError, run_health_checks
from stream_shim.target_store import LocalStore, store_for_profile
from workflow.core.config import PROJECT_ROOT, load_config


def _local_config(tmp_path: Path) -> Path:
    path = tmp_path / "local.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "central_repo": str(tmp_path / "no-repo"),
                "storage": {"endpoint_url": None, "local_root": str(tmp_path / "buckets")},
                "apdb": {"db_url": f"sqlite:///{tmp_path / 'apdb.sqlite3'}"},
            }
        )
    )
    return path


class TestHealthChecks:
    """Tests for `stream_shim.health.run_health_checks`."""

    def test_every_failure_in_one_message(self, tmp_path: Path) -> None:
        config = load_config(instrument="LSSTComCamSim", extra_files=[_local_config(tmp_path)])
        with pytest.raises(HealthCheckError) as info:
            run_health_checks(config, workdir=tmp_path, topics=["t"])
        message = str(info.value)
        assert message.startswith("start-up health check failed: ")
        assert "kafka: ValueError: kafka.bootstrap is null: the shim consumes Kafka topics" in message
        assert f"central_repo: NonRetriableError: {tmp_path / 'no-repo'}: no Butler repository" in message
        assert "s3:" not in message and "apdb:" not in message  # a local bucket, a new SQLite APDB: fine
        assert (tmp_path / "apdb.sqlite3").exists()

    def test_cli_fails_fast_with_one_clear_line(self, tmp_path: Path) -> None:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "stream_shim",
                "--instrument",
                "LSSTComCamSim",
                "--config-file",
                str(_local_config(tmp_path)),
                "--workdir",
                str(tmp_path / "run"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=PROJECT_ROOT,
        )
        assert result.returncode == 69
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("stream_shim: start-up health check failed: kafka: ValueError: kafka.bootstrap is null")

    def test_cli_rejects_a_bad_config_file(self, tmp_path: Path) -> None:
        bad = tmp_path / "bad.yaml"
        bad.write_text("visit: {max_age_s: soon}\n")
        result = subprocess.run(
            [sys.executable, "-m", "stream_shim", "--instrument", "LSSTComCamSim", "--config-file", str(bad)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 78
        assert f"{bad}: key 'visit.max_age_s': expected number, got 'soon'" in result.stderr


class TestTargetStore:
    """Tests for `stream_shim.target_store`."""

    def test_local_store_and_profile_choice(self, tmp_path: Path) -> None:
        store = store_for_profile("profiles/local", tmp_path)
        assert isinstance(store, LocalStore)
        path = Path("visits/X/2026-11-27/g/1.json")
        assert not store.exists(path) and store.mtime(path) is None
        store.write_json(path, {"a": 1})
        store.write_json(path, {"a": 2})  # visit files never change
        assert store.read_json(path) == {"a": 1} and store.mtime(path) is not None
