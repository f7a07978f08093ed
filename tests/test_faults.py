"""Tests for the fault suite (`scripts/bench_faults.py`, `stream_shim.testbed.faults` and friends).

One live stack (real Tansu broker, SeaweedFS S3 with the filer bridge, the shim and its
streaming Snakemake, the fault stand-in workflow whose ingest reads its raw from S3)
plays two scenarios one after the other, 3 visits x 4 detectors at a 13 s cadence: the
baseline and a broker restart (``KafkaBroker.stop()``; 1 s; ``start()``) between visit 1's
raws and visit 2's next_visit.  The tests check correctness with generous bounds (every
target done once, one alert marker each, the next_visit sent during the restart
consumed within 30 s), never speed.  The accounting itself is tested on a made-up
run directory, the stand-in APDB stage (`stream_shim.testbed.fault_standin.main`) on
a real PostgreSQL server, and the PostgreSQL outage (`PostgresDown`) on a private one.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stream_shim.testbed.fault_report import Observed, account, format_table
from stream_shim.testbed.fault_run import FaultSuite, SuiteSettings, empty_central_repo
from stream_shim.testbed.fault_standin import ApdbRows, Unbuildable, main, write_fault_snakefile
from stream_shim.testbed.faults import (
    SCENARIOS,
    FaultContext,
    FaultWindow,
    PostgresDown,
    Scenario,
    scenarios_named,
)
from stream_shim.testbed.local_services import HOST, PostgresServer, free_port
from stream_shim.testbed.night import Cadence, RawRecord, VisitRecord
from stream_shim.testbed.night_standin import COST_MODELS
from workflow.core.config import load_config

VISITS, DETECTORS = 3, 4
TARGETS = VISITS * DETECTORS
CADENCE = Cadence(visits=VISITS, cadence_s=13.0, lead_s=3.0, exptime_s=1.0, readout_s=0.5, raw_spread_s=0.5)
INTAKE_BOUND_S = 30.0


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    base = tmp_path_factory.mktemp("faults")
    settings = SuiteSettings(cadence=CADENCE, detectors=DETECTORS, cost=COST_MODELS["quick-sleep"], tail_s=40.0)
    suite = FaultSuite(
        base / "run", repo=empty_central_repo(base / "central_repo"), settings=settings, shared_stack=True
    )
    played = suite.run(scenarios_named(["baseline", "broker_restart"], CADENCE))
    return {report["scenario"]: report for report in played}


def _assert_clean(report: dict[str, Any]) -> None:
    targets = report["targets"]
    assert report["goals"]["violations"] == [], json.dumps(report, indent=1)[-4000:]
    assert targets["planned"] == targets["expected"] == targets["done"] == TARGETS
    assert targets["failed"] == targets["lost"] == 0
    assert report["duplicate_stage_runs"] == 0
    assert report["alerts"] == {"sent": TARGETS, "duplicate": 0, "missing": 0}
    assert report["all_ended"] and report["shim_alive"]


class TestLiveScenarios:
    """The baseline and a broker restart on the live stack."""

    def test_baseline_loses_and_duplicates_nothing(self, reports: dict[str, dict[str, Any]]) -> None:
        report = reports["baseline"]
        _assert_clean(report)
        assert report["fault"] is None and report["recovery"] == {}
        assert report["next_visit_drops"] == {}

    def test_broker_restart_loses_and_duplicates_nothing(self, reports: dict[str, dict[str, Any]]) -> None:
        report = reports["broker_restart"]
        _assert_clean(report)
        assert report["fault_error"] is None
        assert report["fault"]["lasted_s"] >= 1.0  # stopped, 1 s away, started again
        assert report["camera"]["publish_errors"] == []

    def test_intake_recovers_after_the_restart_without_restarting_the_shim(
        self, reports: dict[str, dict[str, Any]]
    ) -> None:
        recovery = reports["broker_restart"]["recovery"]
        assert recovery["intake_s"] is not None and 0 <= recovery["intake_s"] <= INTAKE_BOUND_S
        assert recovery["first_done_s"] is not None and recovery["last_outcome_s"] is not None
        assert reports["broker_restart"]["shim_alive"]

    def test_table_has_a_row_per_scenario(self, reports: dict[str, dict[str, Any]]) -> None:
        table = format_table(list(reports.values()))
        lines = table.splitlines()
        assert lines[0].split()[:5] == ["scenario", "expected", "done", "failed", "lost"]
        assert [line.split()[0] for line in lines[2:4]] == ["baseline", "broker_restart"]
        assert all(line.split()[-1] == "met" for line in lines[2:4])


def _visit(index: int, group: str, detectors: list[int], announced: float) -> VisitRecord:
    visit = VisitRecord(index, group, "2026-12-01", announced=announced, exposure_start=announced + 5.0)
    for detector in detectors:
        visit.raws[detector] = RawRecord(detector, f"raw/{group}/{detector}", "entry", planned=1010.0)
    return visit


def _target(root: Path, group: str, detector: int, stages: list[str], outcome: str | None, at: float) -> None:
    tail = f"LSSTCam/2026-12-01/{group}/{detector}"
    visit_file = root / "visits" / f"{tail}.json"
    visit_file.parent.mkdir(parents=True, exist_ok=True)
    visit_file.write_text("{}")
    _touch(visit_file, at - 5.0)
    work = root / "work_area" / tail
    work.mkdir(parents=True, exist_ok=True)
    (work / "runs.log").write_text("".join(f"{stage} 1 2\n" for stage in stages))
    if outcome is not None:
        result = root / "results" / tail
        result.mkdir(parents=True, exist_ok=True)
        (result / outcome).write_text("{}")
        _touch(result / outcome, at)


def _touch(path: Path, when: float) -> None:
    import os

    os.utime(path, (when, when))


class TestAccounting:
    """`stream_shim.testbed.fault_report.account` on a made-up run directory."""

    def test_counts_duplicates_alerts_and_recovery(self, tmp_path: Path) -> None:
        all_stages = ["prep", "ingest", "pipeline", "export", "apdb", "finish"]
        _target(tmp_path, "g0", 1, all_stages, "done.json", 1020.0)
        _target(tmp_path, "g0", 2, [*all_stages, "apdb", "pipeline"], "done.json", 1030.0)  # ran twice
        _target(tmp_path, "g1", 1, ["prep"], "failed.json", 1040.0)
        _target(tmp_path, "g1", 2, ["prep", "ingest", "pipeline", "export", "finish"], "done.json", 1050.0)
        scenario = Scenario("s", "test")
        observed = Observed(
            scenario=scenario,
            visits=[_visit(0, "g0", [1, 2], 1000.0), _visit(1, "g1", [1, 2], 1031.0), _visit(2, "g2", [1, 2], 1040.0)],
            planned_visits=3,
            detectors=[1, 2],
            window=FaultWindow(1025.0, 1027.0),
            fault_error=None,
            unbuildable=None,
            counts_before={"next_visit": {"accepted": 2}},
            counts_after={"next_visit": {"accepted": 3, "invalid_group": 1, "kafka_error": 4}},
            all_ended=False,
            wall_s=1.0,
            upload_retries=0,
            shim_alive=True,
        )
        report = account(observed, workdir=tmp_path, instrument="LSSTCam", paths=load_config()["paths"])
        assert {k: report["targets"][k] for k in ("expected", "done", "failed", "lost")} == {
            "expected": 6,
            "done": 3,
            "failed": 1,
            "lost": 2,
        }
        assert report["duplicate_stage_runs"] == 2
        assert report["alerts"] == {"sent": 2, "duplicate": 1, "missing": 1}
        assert report["next_visit_drops"] == {"invalid_group": 1}
        # g1's first visit file is from 1035: consumed 8 s after the fault ended (1027), 4 s after it was sent
        assert report["recovery"] == {
            "intake_s": 8.0,
            "intake_lag_s": 4.0,
            "first_done_s": 3.0,
            "last_outcome_s": 23.0,
        }
        violations = " | ".join(report["goals"]["violations"])
        for words in ("2 lost", "2 duplicate stage run", "1 duplicate alert", "without an alert", "1 failed"):
            assert words in violations


class TestScenarios:
    """Scenario definitions and the stand-in Snakefile."""

    def test_suite_names_and_unknown_names(self) -> None:
        assert SCENARIOS == (
            "baseline",
            "broker_restart",
            "broker_outage",
            "s3_outage",
            "postgres_outage",
            "poison",
            "kill_snakemake",
        )
        chosen = scenarios_named(["kill_snakemake", "baseline"], CADENCE)
        assert [s.name for s in chosen] == ["baseline", "kill_snakemake"]
        (postgres,) = scenarios_named(["postgres_outage"], CADENCE)
        assert postgres.apdb_rows and isinstance(postgres.fault, PostgresDown) and postgres.fault.down_s == 20.0
        assert (postgres.trigger.event, postgres.trigger.visit) == ("raws_landed", 1)
        with pytest.raises(ValueError, match="unknown scenario"):
            scenarios_named(["baseline", "meteor"], CADENCE)
        with pytest.raises(ValueError, match="the broker faults need 7 s more"):
            scenarios_named(["baseline"], Cadence(visits=3, cadence_s=10.0, lead_s=2.0, exptime_s=2.0))

    def test_snakefile_reads_raws_from_s3_and_holds_the_poison(self, tmp_path: Path) -> None:
        path = write_fault_snakefile(
            tmp_path / "Snakefile",
            COST_MODELS["quick-sleep"],
            paths=load_config()["paths"],
            poll_s=0.5,
            raw_timeout_s=30.0,
            unbuildable=Unbuildable(2, 94),
        )
        text = path.read_text()
        assert "RAW_S3 = config" in text and "--aws-sigv4" in text and "raw_s3=RAW_S3" in text
        assert "def unbuildable_input(wildcards):" in text and "poison=unbuildable_input" in text
        assert text.count("unbuildable_input") == 2  # defined once, an input of prep once
        assert "groups[2] == wildcards.group" in text and "int(wildcards.detector) != 94" in text

    def test_snakefile_apdb_stores_its_row_first(self, tmp_path: Path) -> None:
        rows = ApdbRows(HOST, 5999, "db", "someone", "rows_t")
        text = write_fault_snakefile(
            tmp_path / "Snakefile",
            COST_MODELS["quick-sleep"],
            paths=load_config()["paths"],
            poll_s=0.5,
            raw_timeout_s=30.0,
            apdb=rows,
        ).read_text()
        apdb_rule = text[text.index("rule apdb:") : text.index("rule finish:")]
        assert "-m stream_shim.testbed.fault_standin --host=127.0.0.1 --port=5999 --database=db" in apdb_rule
        assert "--table=rows_t" in apdb_rule and "--detector={wildcards.detector}" in apdb_rule
        assert apdb_rule.index("fault_standin") < apdb_rule.index("sleep 0.3")  # the row, then the time
        assert text.count("fault_standin") == 1  # no other rule touches the database


def _rows_observed(rows: list[tuple[str, int]] | None, *, scenario: Scenario) -> Observed:
    return Observed(
        scenario=scenario,
        visits=[_visit(0, "g0", [1, 2], 1000.0)],
        planned_visits=1,
        detectors=[1, 2],
        window=None,
        fault_error=None,
        unbuildable=None,
        counts_before={},
        counts_after={},
        all_ended=True,
        wall_s=1.0,
        upload_retries=0,
        shim_alive=True,
        apdb_rows=rows,
    )


class TestApdbRows:
    """The stand-in APDB rows: their accounting, the stage on a real server, and the outage."""

    def test_accounting_counts_duplicate_missing_and_stray_rows(self, tmp_path: Path) -> None:
        all_stages = ["prep", "ingest", "pipeline", "export", "apdb", "finish"]
        _target(tmp_path, "g0", 1, all_stages, "done.json", 1020.0)
        _target(tmp_path, "g0", 2, all_stages, "done.json", 1021.0)
        paths, scenario = load_config()["paths"], Scenario("p", "test", apdb_rows=True)
        clean = account(
            _rows_observed([("g0", 1), ("g0", 2)], scenario=scenario),
            workdir=tmp_path,
            instrument="LSSTCam",
            paths=paths,
        )
        assert clean["apdb_rows"] == {
            "expected": 2,
            "total": 2,
            "distinct": 2,
            "duplicate": 0,
            "missing": 0,
            "not_done": 0,
            "error": None,
        }
        assert clean["goals"]["violations"] == []
        assert "2/2/2" in format_table([clean]).splitlines()[2]
        bad = account(
            _rows_observed([("g0", 1), ("g0", 1), ("g9", 5)], scenario=scenario),
            workdir=tmp_path,
            instrument="LSSTCam",
            paths=paths,
        )
        assert {k: bad["apdb_rows"][k] for k in ("total", "distinct", "duplicate", "missing", "not_done")} == {
            "total": 3,
            "distinct": 2,
            "duplicate": 1,
            "missing": 1,
            "not_done": 1,
        }
        violations = " | ".join(bad["goals"]["violations"])
        for words in ("1 done target(s) without an APDB row", "1 duplicate APDB row", "1 APDB row(s) of targets"):
            assert words in violations
        unstored = account(_rows_observed(None, scenario=scenario), workdir=tmp_path, instrument="LSSTCam", paths=paths)
        assert unstored["apdb_rows"] is None and "rows were not stored" in " | ".join(unstored["goals"]["violations"])

    def test_stage_is_retriable_while_the_server_is_away_and_stores_once(
        self, postgres_server: PostgresServer, tmp_path: Path
    ) -> None:
        table = f"rows_{uuid.uuid4().hex[:8]}"
        up = ApdbRows(HOST, postgres_server.port, postgres_server.database, postgres_server.user, table)
        down = ApdbRows(HOST, free_port(), postgres_server.database, postgres_server.user, table, connect_timeout_s=2)
        up.create()
        target = ["--instrument=LSSTCam", "--day-obs=2026-12-02", "--group=g1", "--detector=7"]
        failed = tmp_path / "results" / "failed.json"
        assert main([*down.args(), *target, f"--failed={failed}"]) == 1
        record = json.loads(failed.read_text())
        assert record["retriable"] is True and record["error"] == "StandinApdbUnavailable"
        assert record["stage"] == "apdb" and (record["group"], record["detector"]) == ("g1", 7)
        assert f"127.0.0.1:{down.port}" in record["message"]
        for _ in range(2):  # the retry, then a rerun: one row
            assert main([*up.args(), *target, f"--failed={tmp_path / 'again.json'}"]) == 0
        assert up.rows(["g1"]) == [("g1", 7)] and not (tmp_path / "again.json").exists()


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of its own (it is stopped), in a directory its OS user can reach (a stop keeps it)."""
    base = Path(tempfile.mkdtemp(prefix="pg-fault-"))
    base.chmod(0o755)
    try:
        with PostgresServer(base) as server:
            yield server
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_postgres_down_stops_and_restarts_the_same_cluster(private_postgres: PostgresServer, tmp_path: Path) -> None:
    rows = ApdbRows(HOST, private_postgres.port, private_postgres.database, private_postgres.user, "rows_outage")
    rows.create()
    stored = main(
        [
            *rows.args(),
            "--instrument=LSSTCam",
            "--day-obs=2026-12-02",
            "--group=g1",
            "--detector=1",
            f"--failed={tmp_path / 'failed.json'}",
        ]
    )
    assert stored == 0
    no_stack: Any = None  # a PostgreSQL fault does not touch the live stack
    context = FaultContext(stack=no_stack, stop=threading.Event(), publish=lambda _v: None, postgres=private_postgres)
    window = PostgresDown(1.0).inject(context)
    assert window is not None and window.ended - window.started >= 1.0
    assert window.detail["start_s"] > 0
    assert rows.rows(["g1"]) == [("g1", 1)]  # the table and its row survived the outage
    with pytest.raises(RuntimeError, match="no PostgreSQL server"):
        PostgresDown(1.0).inject(FaultContext(stack=no_stack, stop=threading.Event(), publish=lambda _v: None))
