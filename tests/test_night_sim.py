"""Tests for the night simulator (`scripts/bench_night.py`): a short night end to end, streaming design.

One run of the CLI (real Tansu broker, SeaweedFS S3 with the filer bridge, the shim, the
long-lived Snakemake, the stand-in workflow): 3 visits x 9 detectors at a 4 s cadence.
A second run plays 2 visits through the worker pool (``--design pool --workers 2``).
The tests check correctness (every target done exactly once, the report's fields and
their consistency), never speed.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stream_shim.testbed.night_standin import COST_MODELS, CostModel
from workflow.core.config import PROJECT_ROOT

VISITS, DETECTORS = 3, 9
TARGETS = VISITS * DETECTORS
RUN_TIMEOUT_S = 85.0  # the whole run, servers included (the night itself is ~20 s)


@dataclasses.dataclass(frozen=True)
class NightRun:
    """What one simulator run left."""

    returncode: int
    report: dict[str, Any]
    workdir: Path
    stderr: str


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> NightRun:
    base = tmp_path_factory.mktemp("night")
    workdir, out = base / "run", base / "report.json"
    command = [
        sys.executable,
        str(PROJECT_ROOT / "scripts" / "bench_night.py"),
        *("--visits", str(VISITS), "--detectors", str(DETECTORS)),
        *("--cadence-s", "4", "--lead-s", "2", "--exptime-s", "2", "--readout-s", "0.5", "--raw-spread-s", "1"),
        *("--cost-model", "quick-sleep", "--design", "streaming", "--duration-limit", "60"),
        *("--workdir", str(workdir), "--json", str(out), "--no-progress"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=PROJECT_ROOT)
    assert out.exists(), f"no report; exit {result.returncode}; stderr tail:\n{result.stderr[-3000:]}"
    report = json.loads(out.read_text())
    assert json.loads(result.stdout) == report  # one JSON document on stdout, the same as the file
    return NightRun(result.returncode, report, workdir, result.stderr)


class TestNightSimulator:
    """Tests for `scripts/bench_night.py` with the streaming design."""

    def test_every_target_done_exactly_once(self, night: NightRun) -> None:
        assert night.returncode == 0, night.stderr[-3000:]
        counts = night.report["targets"]
        assert counts["planned"] == counts["expected"] == counts["done"] == TARGETS
        assert counts["failed"] == counts["missing"] == counts["done_and_failed"] == 0
        assert counts["ran_a_stage_twice"] == 0
        assert counts["shim"]["submitted"] == counts["shim"]["done"] == TARGETS
        assert counts["shim"]["failed"] == counts["shim"]["in_flight"] == 0
        done = sorted(night.workdir.glob("results/LSSTCam/*/*/*/done.json"))
        assert len(done) == TARGETS
        assert len({(p.parent.parent.name, p.parent.name) for p in done}) == TARGETS  # (group, detector) unique
        assert not list(night.workdir.glob("results/LSSTCam/*/*/*/failed.json"))
        for runs in night.workdir.glob("work_area/LSSTCam/*/*/*/runs.log"):
            stages = [line.split()[0] for line in runs.read_text().splitlines()]
            assert sorted(stages) == sorted(["prep", "ingest", "pipeline", "export", "apdb", "finish"]), runs

    def test_latencies_are_consistent(self, night: NightRun) -> None:
        latency = night.report["latency"]
        cost = CostModel.parse(night.report["flags"]["cost_model"])
        assert latency["modelled_raw_to_alert_s"] == pytest.approx(cost.after_raw_s())
        for name in ("orchestration_added", "raw_landed_to_alert", "raw_landed_to_done"):
            stats = latency[name]
            assert stats["n"] == TARGETS, name
            assert stats["p50_s"] <= stats["p95_s"] <= stats["max_s"], name
        # A job's sleep is never shorter than modelled: the raw -> alert time holds the modelled time.
        assert latency["raw_landed_to_alert"]["p50_s"] >= cost.after_raw_s() - 0.05
        assert latency["orchestration_added"]["max_s"] >= -0.05
        assert set(latency["waits"]) >= {"prep_start", "ingest_start", "pipeline_start", "raw_landed_to_indexed"}

    def test_cpu_rss_backlog_and_machine_are_reported(self, night: NightRun) -> None:
        report = night.report
        cpu = report["cpu_by_role"]
        for role in ("shim", "submitter", "jobs", "broker", "s3"):
            assert cpu[role]["user_s"] >= 0 and cpu[role]["sys_s"] >= 0, role
            assert {"user_s_per_visit", "sys_s_per_visit", "cpu_s_per_target"} <= set(cpu[role]), role
        assert cpu["shim"]["user_s"] + cpu["shim"]["sys_s"] > 0
        assert cpu["submitter"]["user_s"] + cpu["submitter"]["sys_s"] > 0
        assert cpu["submitter"]["processes_seen"] == 1  # one long-lived Snakemake
        for role in ("shim", "submitter"):
            rss = report["rss_by_role"][role]
            assert rss["max_mb"] > 0 and rss["t_mb"], role
        backlog = report["backlog_t_backlog_done"]
        assert backlog and max(row[1] for row in backlog) >= DETECTORS
        assert backlog[-1][1] == 0 and backlog[-1][2] == TARGETS
        assert isinstance(report["saturation"]["saturated"], bool) and not report["saturation"]["saturated"]
        assert len(report["saturation"]["backlog_at_next_visit"]) == VISITS
        extrapolation = report["extrapolation_lsstcam"]
        assert extrapolation["orchestration_cores_needed"] >= 0 and extrapolation["assumptions"]
        assert report["machine"]["cpus_logical"] >= 1 and len(report["load_average"]["start"]) == 3
        assert report["all_ended"] is True and report["shim_exit"] == 0

    def test_flags_are_recorded(self, night: NightRun) -> None:
        flags = night.report["flags"]
        assert (flags["visits"], flags["detectors"], flags["cadence_s"], flags["design"]) == (
            VISITS,
            DETECTORS,
            4.0,
            "streaming",
        )
        assert night.report["cost_model"] == COST_MODELS["quick-sleep"].to_dict()


class TestCostModel:
    """Tests for `stream_shim.testbed.night_standin.CostModel.parse`."""

    def test_named_and_json_models(self) -> None:
        assert CostModel.parse("lsstcam-sleep").of("pipeline") == 13.0
        custom = CostModel.parse('{"base": "lsstcam-sleep", "pipeline": 20, "kind": "spin"}')
        assert (custom.of("pipeline"), custom.of("prep"), custom.kind) == (20.0, 1.0, "spin")

    @pytest.mark.parametrize("text", ["nonsense", '{"pipline": 1}', '{"prep": -1}', '{"kind": "nap"}', "[1]"])
    def test_bad_models_are_refused(self, text: str) -> None:
        with pytest.raises(ValueError):
            CostModel.parse(text)


@pytest.fixture(scope="module")
def pool_night(tmp_path_factory: pytest.TempPathFactory) -> NightRun:
    base = tmp_path_factory.mktemp("pool-night")
    workdir, out = base / "run", base / "report.json"
    command = [
        sys.executable,
        str(PROJECT_ROOT / "scripts" / "bench_night.py"),
        *("--visits", "2", "--detectors", str(DETECTORS), "--design", "pool", "--workers", "2"),
        *("--cadence-s", "4", "--lead-s", "2", "--exptime-s", "2", "--readout-s", "0.5", "--raw-spread-s", "1"),
        *("--cost-model", "quick-sleep", "--duration-limit", "60"),
        *("--workdir", str(workdir), "--json", str(out), "--no-progress"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S + 60, cwd=PROJECT_ROOT)
    assert out.exists(), f"no report; exit {result.returncode}; stderr tail:\n{result.stderr[-3000:]}"
    return NightRun(result.returncode, json.loads(out.read_text()), workdir, result.stderr)


class TestPoolNight:
    """`scripts/bench_night.py --design pool`: the fan-out and two workers instead of the shim."""

    def test_every_target_done_once_and_split_over_the_workers(self, pool_night: NightRun) -> None:
        assert pool_night.returncode == 0, pool_night.stderr[-3000:]
        report, targets = pool_night.report, 2 * DETECTORS
        counts = report["targets"]
        assert counts["planned"] == counts["done"] == targets and counts["ran_a_stage_twice"] == 0
        workers = report["per_worker"]
        assert set(workers) == {"w0", "w1"} and report["pool"]["workers"] == 2
        assert sum(w["targets_done"] for w in workers.values()) == targets
        assert all(w["targets_done"] > 0 for w in workers.values())  # round-robin partitions: both work
        for worker in workers.values():
            assert worker["work_items"]["committed"] == worker["work_items"]["taken"] == worker["targets_done"]
            assert worker["cpu_submitter"]["processes_seen"] == 1 and worker["rss_max_mb"]["service"] > 0
        cpu = report["cpu_by_role"]
        assert cpu["submitter"]["processes_seen"] == 2 and cpu["fanout"]["processes_seen"] == 1
        assert cpu["shim"]["processes_seen"] == 3  # the fan-out and the two workers
        assert report["rss_by_role"]["shim"]["max_mb"] > 0 and report["latency"]["orchestration_added"]["n"] == targets
        assert len(list(pool_night.workdir.glob("results/LSSTCam/*/*/*/done.json"))) == targets
