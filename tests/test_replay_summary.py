"""Tests for ``scripts/replay.py``'s summary: it counts the run's own targets only."""

from __future__ import annotations

import importlib.util
import logging

from workflow.core.config import PROJECT_ROOT
from workflow.stages.records import DoneRecord, FailedRecord, write_record


def _script():
    spec = importlib.util.spec_from_file_location("replay_script", PROJECT_ROOT / "scripts" / "replay.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _target(root, group: str, detector: int):
    return root / "results" / "LSSTComCamSim" / "2025-01-09" / group / str(detector) / "done.json"


def test_run_outcomes_reads_only_the_given_targets(tmp_path) -> None:
    script = _script()
    mine_ok, mine_failed, mine_missing, other = (
        _target(tmp_path, "g1", 0),
        _target(tmp_path, "g1", 1),
        _target(tmp_path, "g1", 2),
        _target(tmp_path, "g0", 0),
    )
    ids = {"instrument": "LSSTComCamSim", "day_obs": "2025-01-09", "group": "g1"}
    write_record(mine_ok, DoneRecord(**ids, detector=0, outcome="ok", pipeline="ApPipe"))
    write_record(
        mine_failed.with_name("failed.json"),
        FailedRecord(**ids, detector=1, stage="ingest", error="E", retriable=True, message="m"),
    )
    write_record(other, DoneRecord(**{**ids, "group": "g0"}, detector=0, outcome="ok", pipeline="ApPipe"))
    records, missing = script.run_outcomes([mine_ok, mine_failed, mine_missing])
    assert sorted((r.group, r.detector, r.outcome) for r in records) == [("g1", 0, "ok"), ("g1", 1, "failed")]
    assert missing == [mine_missing]


def test_a_run_that_replayed_nothing_says_so(tmp_path, monkeypatch, caplog) -> None:
    """results/ holds another run's outcome; a replay with no visits must not summarize it."""
    script = _script()
    ids = {"instrument": "LSSTComCamSim", "day_obs": "2025-01-09", "group": "g0"}
    write_record(_target(tmp_path, "g0", 0), DoneRecord(**ids, detector=0, outcome="ok", pipeline="ApPipe"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(script, "replay", lambda config, **kwargs: [])
    monkeypatch.setattr(script, "configure_logging", lambda *args, **kwargs: None)
    with caplog.at_level(logging.INFO, logger="replay"):
        assert script.main(["--instrument", "LSSTComCamSim"]) == 0
    assert "nothing replayed" in caplog.text and "targets:" not in caplog.text


def test_targets_a_run_left_without_an_outcome_are_failed_as_no_outcome(tmp_path, monkeypatch) -> None:
    from workflow.runtime.replay import fail_targets_without_outcome
    from workflow.runtime.snakemake_runner import has_remote_outputs
    from workflow.stages.records import NO_OUTCOME, read_failed
    from workflow.stages.target import TargetPaths

    monkeypatch.chdir(tmp_path)  # target paths are relative to the run directory
    done, failed, killed = (TargetPaths("LSSTComCamSim", "2026-12-01", "g1", d) for d in (0, 1, 2))
    ids = {"instrument": "LSSTComCamSim", "day_obs": "2026-12-01", "group": "g1"}
    write_record(done.done_file, DoneRecord(**ids, detector=0, outcome="ok", pipeline="ApPipe"))
    write_record(
        failed.failed_file,
        FailedRecord(**ids, detector=1, stage="ingest", error="RawMissingError", retriable=True, message="m"),
    )
    left = fail_targets_without_outcome([done, failed, killed], returncode=1, log_file="logs/replay/b.log")
    assert left == [killed]
    record = read_failed(killed.failed_file)
    assert record.error == NO_OUTCOME and record.retriable is True and record.stage == "snakemake"
    assert "detector 2" in record.message and "logs/replay/b.log" in record.message
    assert not done.failed_file.exists()  # a target with an outcome keeps it
    assert read_failed(failed.failed_file).error == "RawMissingError"
    # Nothing left to explain: a second look writes nothing.
    assert fail_targets_without_outcome([done, failed, killed], returncode=1, log_file="x") == []
    # With S3 default storage the outcome files are not local: replay does not look for them here.
    assert has_remote_outputs("profiles/k8s") and not has_remote_outputs("profiles/slurm")
