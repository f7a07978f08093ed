"""End-to-end tests of the stream shim (`python -m stream_shim`) on real Tansu + SeaweedFS.

One scenario, run once per APDB backend (SQLite file; PostgreSQL server, own
namespace), the central repo being SQLite + files: the camera (scripts/upload.py) announces 2
groups of LSSTComCamSim (9 detectors, 1/8-size images) in the summit's framed
Avro and uploads their raws - detector 4 late, detector 8 never.  The shim (with
the filer bridge) submits the 18 targets to Snakemake.  Junk next_visits and
notifications are mixed in.  When some targets have ended and others run, the
shim is killed with SIGKILL and started again on the same run directory; the
second one is stopped with SIGTERM once every target has ended.  The tests then
read what landed: outcomes, exported datasets in the central repo, APDB rows and
the alerts on the alert topic.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
import yaml
from astropy.time import Time
from confluent_kafka import Consumer, Producer
from conftest import FILER_TOPIC
from raw_uploads import make_visit

from stream_shim.bridge import s3_event
from stream_shim.process_group import group_members
from stream_shim.testbed.live_stack import ensure_central_repo
from workflow.apdb.alerts import deserialize_alert
from workflow.apdb.store import create_apdb
from workflow.core.config import PROJECT_ROOT
from workflow.repo.central_repo import open_central_repo
from workflow.repo.export_batch import receipts
from workflow.stages.export import output_chain
from workflow.stages.records import read_stage_record

INSTRUMENT = "LSSTComCamSim"
SCALE = 0.25
DETECTORS = range(9)
MISSING, LATE = 8, 4
ALL_ENDED_TIMEOUT = 600.0


@dataclasses.dataclass
class Scenario:
    """What the run left behind."""

    workdir: Path
    config_file: Path
    first_status: dict[str, Any]
    second_status: dict[str, Any]
    first_log: str
    second_log: str
    second_exit: int
    groups: list[str]
    leftovers_at_kill: set[int]
    ended_at_kill: int
    repo: Path
    apdb_url: str
    apdb_namespace: str | None
    bootstrap: str
    alerts_topic: str

    def result_dirs(self) -> dict[tuple[str, int], Path]:
        return {
            (g, d): next(self.workdir.glob(f"results/{INSTRUMENT}/*/{g}/{d}")) for g in self.groups for d in DETECTORS
        }

    def work_dir(self, group: str, detector: int) -> Path:
        return next(self.workdir.glob(f"work_area/{INSTRUMENT}/*/{group}/{detector}"))

    def dia_source_rows(self) -> dict[tuple[int, int], tuple[int, int]]:
        """``(visit, detector): (rows, distinct diaSourceIds)`` of the APDB's DiaSource table, in SQL."""
        table = f'"{self.apdb_namespace}"."DiaSource"' if self.apdb_namespace else '"DiaSource"'
        engine = sqlalchemy.create_engine(self.apdb_url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(
                    sqlalchemy.text(
                        f'SELECT visit, detector, COUNT(*), COUNT(DISTINCT "diaSourceId") FROM {table} '
                        "GROUP BY visit, detector"
                    )
                )
                return {(int(v), int(d)): (int(n), int(distinct)) for v, d, n, distinct in rows}
        finally:
            engine.dispose()


def _shim(workdir: Path, config_file: Path, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "ab") as stream:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stream_shim",
                "--instrument",
                INSTRUMENT,
                "--config-file",
                str(config_file),
                "--workdir",
                str(workdir),
                "--filer-topic",
                FILER_TOPIC,
                "--grace-s",
                "20",
                "--term-wait-s",
                "5",
            ],
            stdout=stream,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=PROJECT_ROOT,
        )


def _status(workdir: Path) -> dict[str, Any]:
    try:
        return json.loads((workdir / "shim" / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"shim exited with {proc.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.5)


def _outcomes(workdir: Path) -> list[Path]:
    return [p for p in workdir.glob(f"results/{INSTRUMENT}/*/*/*/*.json") if p.name in ("done.json", "failed.json")]


def _junk_visit(**changes: Any) -> bytes:
    visit = make_visit(INSTRUMENT, "2026-01-01T00:00:00.000", "r_03", snd_stamp=Time.now().unix_tai, duration=3.0)
    return dataclasses.replace(visit, **changes).to_json().encode()


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for value in values:
        producer.produce(topic, value)
    assert producer.flush(10) == 0


def _apdb_section(backend: str, base: Path, request: pytest.FixtureRequest) -> tuple[dict[str, Any], str, str | None]:
    """The ``apdb`` config of one backend, its SQLAlchemy URL and namespace."""
    if backend == "sqlite":
        return {"db_url": f"sqlite:///{base / 'apdb.sqlite3'}"}, f"sqlite:///{base / 'apdb.sqlite3'}", None
    server = request.getfixturevalue("postgres_server")
    namespace = f"e2e{uuid.uuid4().hex[:10]}"
    create_apdb(server.url, namespace=namespace, config_path=base / "apdb.yaml")
    return {"config_file": str(base / "apdb.yaml")}, server.url, namespace


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def scenario(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, kafka_broker, s3_server
) -> Scenario:
    base = tmp_path_factory.mktemp(f"shim-e2e-{request.param}")
    ensure_central_repo(base / "repo", INSTRUMENT, SCALE)
    apdb, apdb_url, apdb_namespace = _apdb_section(request.param, base, request)
    token = uuid.uuid4().hex[:8]
    topics = {
        "next_visit": f"next-visit-{token}",
        "raw_notification": f"raw-notification-{token}",
        "alerts": f"alerts-{token}",
    }
    bucket = f"raw-{token}"
    config_file = base / "shim-e2e.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "central_repo": str(base / "repo"),
                "kafka": {"bootstrap": kafka_broker.bootstrap, "consumer_group": f"shim-{token}"},
                "storage": {"endpoint_url": s3_server.endpoint_url, "local_root": str(base / "unused")},
                "kafka_topics": topics,
                "buckets": {"raw": bucket},
                "simulation": {"scale": SCALE, "seed": 0},
                "apdb": apdb,
                "raw": {"image_timeout_s": 4.0},
                "submission": {"max_concurrent_targets": 2, "retry": {"max_attempts": 1}},  # one outcome each
            }
        )
    )
    s3_server.client().create_bucket(Bucket=bucket)
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_DEFAULT_REGION": s3_server.region,
    }
    workdir = base / "run"
    first = _shim(workdir, config_file, base / "shim-1.log", env)
    second = None
    try:
        _wait(lambda: _status(workdir).get("state") == "running", 120, "the first shim to run", first)
        stale = Time.now().unix_tai - 7200
        _produce(
            kafka_broker.bootstrap,
            topics["next_visit"],
            [
                b"{not json",
                _junk_visit(instrument="NoSuchCam"),
                _junk_visit(instrument="HSC"),
                _junk_visit(private_sndStamp=stale, startTime=stale),
            ],
        )
        vanished = f"{INSTRUMENT}/20260101/CC_S_20260101_000001/CC_S_20260101_000001_R22_S00.fits"
        _produce(
            kafka_broker.bootstrap,
            topics["raw_notification"],
            [
                json.dumps(s3_event(bucket, "notes/readme.txt")).encode(),
                json.dumps(s3_event(bucket, vanished)).encode(),
                b"<xml/>",
            ],
        )
        upload = subprocess.run(
            [
                sys.executable,
                str(PROJECT_ROOT / "scripts" / "upload.py"),
                INSTRUMENT,
                "2",
                "--config-file",
                str(config_file),
                "--avro",
                "--scale",
                str(SCALE),
                "--slew-s",
                "1",
                "--exptime",
                "1",
                "--exposure-s",
                "1",
                "--skip-detector",
                str(MISSING),
                "--late-detector",
                str(LATE),
                "--late-delay-s",
                "3",
                "--no-progress",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert upload.returncode == 0, upload.stderr
        groups = [line.split(": ")[0] for line in upload.stdout.splitlines()]
        assert len(groups) == 2
        # Kill the shim while some targets have ended and others still run.
        _wait(lambda: len(_outcomes(workdir)) >= 4, ALL_ENDED_TIMEOUT, "4 targets to end", first)
        first_status = _status(workdir)
        ended_at_kill = len(_outcomes(workdir))
        groups_started = json.loads((workdir / "shim" / "children.json").read_text())
        first.send_signal(signal.SIGKILL)
        first.wait()
        time.sleep(0.5)
        leftovers = {p for pgid in groups_started for p in group_members(int(pgid))}
        second = _shim(workdir, config_file, base / "shim-2.log", env)
        _wait(lambda: len(_outcomes(workdir)) >= 2 * len(DETECTORS), ALL_ENDED_TIMEOUT, "every target to end", second)
        time.sleep(1.5)  # the status file catches up
        second.send_signal(signal.SIGTERM)
        second_exit = second.wait(timeout=120)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    return Scenario(
        workdir=workdir,
        config_file=config_file,
        first_status=first_status,
        second_status=_status(workdir),
        first_log=(base / "shim-1.log").read_text(),
        second_log=(base / "shim-2.log").read_text(),
        second_exit=second_exit,
        groups=groups,
        leftovers_at_kill=leftovers,
        ended_at_kill=ended_at_kill,
        repo=base / "repo",
        apdb_url=apdb_url,
        apdb_namespace=apdb_namespace,
        bootstrap=kafka_broker.bootstrap,
        alerts_topic=topics["alerts"],
    )


class TestShimEndToEnd:
    """Tests for `python -m stream_shim` on real Kafka (Tansu) and S3 (SeaweedFS) with the real Snakefile."""

    def test_every_target_ends_once(self, scenario: Scenario) -> None:
        dirs = scenario.result_dirs()
        assert len(dirs) == 18
        for (group, detector), path in dirs.items():
            outcomes = [p.name for p in path.iterdir() if p.name in ("done.json", "failed.json")]
            assert len(outcomes) == 1, (group, detector, outcomes)

    def test_missing_raw_is_a_classified_timeout_of_that_target_only(self, scenario: Scenario) -> None:
        for (group, detector), path in scenario.result_dirs().items():
            if detector == MISSING:
                failure = json.loads((path / "failed.json").read_text())
                assert (failure["error"], failure["retriable"], failure["stage"]) == ("RawTimeoutError", True, "ingest")
                assert f"group {group} detector {MISSING}: 0 of 1 raw(s) arrived" in failure["message"]
            else:
                ingest = read_stage_record(scenario.work_dir(group, detector) / "ingest.json", "ingest").body
                assert len(ingest["raws"]) == 1 and ingest["header"]["DETECTOR"] == detector, (group, detector)

    def test_late_raw_is_waited_for(self, scenario: Scenario) -> None:
        for group in scenario.groups:
            ingest = read_stage_record(scenario.work_dir(group, LATE) / "ingest.json", "ingest").body
            assert ingest["header"]["GROUPID"] == group

    def test_science_chain_completes_for_every_detector_with_a_raw(self, scenario: Scenario) -> None:
        failures = {}
        for (group, detector), path in scenario.result_dirs().items():
            if detector != MISSING and not (path / "done.json").exists():
                failures[(group, detector)] = json.loads((path / "failed.json").read_text())
        assert failures == {}

    def test_restart_loses_nothing_and_duplicates_no_apdb_row(self, scenario: Scenario) -> None:
        assert 4 <= scenario.ended_at_kill < 18
        # The second shim resubmitted the unfinished targets (jobs orphaned by the kill may have
        # finished a few before it started) ...
        resumed = scenario.second_status["counts"]["targets"].get("resumed", 0)
        assert 1 <= resumed <= 18 - scenario.ended_at_kill
        # ... and nothing of the killed shim outlived the new one's start (its jobs were killed then,
        # unless they ended by themselves before).
        assert all(not Path(f"/proc/{pid}").exists() for pid in scenario.leftovers_at_kill)
        rows = scenario.dia_source_rows()
        for (group, detector), path in scenario.result_dirs().items():
            if not (path / "done.json").exists():
                continue
            done = json.loads((path / "done.json").read_text())
            visit_id = read_stage_record(scenario.work_dir(group, detector) / "pipeline.json", "pipeline").body[
                "visit_id"
            ]
            expected = done["apdb"]["n_dia_sources"]
            assert rows.get((visit_id, detector), (0, 0)) == (expected, expected), (group, detector)
        assert (
            json.loads((scenario.workdir / "shim" / "journal.jsonl").read_text().splitlines()[0])["group"]
            in scenario.groups
        )

    def test_exported_outputs_are_in_the_central_repo(self, scenario: Scenario) -> None:
        # Under the shim exports are batched (export.mode auto): each stage queued a request and
        # the shim's writer committed it, also those the killed first shim left pending.
        exported: dict[str, set[tuple[int, int]]] = {}
        chains = set()
        committed = receipts(scenario.workdir / "export-spool")
        for (group, detector), path in scenario.result_dirs().items():
            if (path / "done.json").exists():
                export = read_stage_record(scenario.work_dir(group, detector) / "export.json", "export").body
                chains.add(export["chain"])
                assert export["queued"] and not export["exported"], (group, detector)
                receipt = committed[export["request"]]
                assert set(receipt.exported + receipt.skipped) == set(export["queued"]), (group, detector)
                for dataset_type in receipt.exported + receipt.skipped:  # skipped: a rerun found it there
                    exported.setdefault(dataset_type, set()).add(
                        (export["data_id"]["visit"], export["data_id"]["detector"])
                    )
        (chain,) = chains
        assert chain == output_chain(INSTRUMENT, chain.rsplit("output-", 1)[1])
        # Every detector with a raw ended done and exported its metadata; at this size most fall back to Isr.
        assert len(exported["pipeline_metadata"]) == 2 * (len(DETECTORS) - 1)
        assert exported.get("difference_image")
        butler = open_central_repo(str(scenario.repo))
        for dataset_type, data_ids in exported.items():
            refs = butler.query_datasets(dataset_type, collections=chain, limit=None, explain=False)
            assert {(ref.dataId["visit"], ref.dataId["detector"]) for ref in refs} == data_ids, dataset_type

    def test_alerts_of_every_stored_dia_source_are_on_the_topic(self, scenario: Scenario) -> None:
        consumer = Consumer(
            {
                "bootstrap.servers": scenario.bootstrap,
                "group.id": f"e2e-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "session.timeout.ms": 2000,
                "heartbeat.interval.ms": 500,
            }
        )
        consumer.subscribe([scenario.alerts_topic])
        alerts, idle_since = [], time.monotonic()
        try:
            while time.monotonic() - idle_since < 5.0:
                message = consumer.poll(0.5)
                if message is not None and message.error() is None:
                    alerts.append(deserialize_alert(message.value()))
                    idle_since = time.monotonic()
        finally:
            consumer.close()
        by_target: dict[tuple[int, int], set[int]] = {}
        for alert in alerts:
            source = alert["diaSource"]
            by_target.setdefault((source["visit"], source["detector"]), set()).add(source["diaSourceId"])
        expected = {key: rows for key, (rows, _) in scenario.dia_source_rows().items()}
        assert sum(expected.values()) > 0
        # At least once: a target killed mid-send may send again, but every stored source has its alert.
        assert {key: len(ids) for key, ids in by_target.items()} == expected

    def test_junk_is_counted_and_skipped(self, scenario: Scenario) -> None:
        counts: dict[str, dict[str, int]] = {}
        for status in (scenario.first_status, scenario.second_status):
            for category, reasons in status.get("counts", {}).items():
                for reason, n in reasons.items():
                    counts.setdefault(category, {}).setdefault(reason, 0)
                    counts[category][reason] += n
        next_visit = counts["next_visit"]
        assert next_visit["accepted"] == 2
        for reason in ("malformed", "unknown_instrument", "other_instrument", "stale"):
            assert next_visit.get(reason, 0) >= 1, reason
        raws = counts["raw_notification"]
        for reason in ("no_layout_match", "vanished", "malformed"):
            assert raws.get(reason, 0) >= 1, reason
        # Raws also arrive through the early-arrival bucket listing, so how many came by
        # notification before the status snapshot varies with load: only require some.
        assert raws["recorded"] >= 1 and raws["sidecar"] >= 1
        assert counts["bridge"]["forwarded"] >= 2

    def test_graceful_stop_and_structured_logs(self, scenario: Scenario) -> None:
        assert scenario.second_exit == 0
        assert scenario.second_status["state"] == "stopped"
        writer = scenario.second_status["counts"]["export_writer"]
        assert writer["started"] == 1 and writer["stopped"] == 1 and "exited" not in writer
        records = [json.loads(line) for line in scenario.first_log.splitlines() if line.startswith("{")]
        assert any(r.get("group") in scenario.groups and "detector" in r and "instrument" in r for r in records)
        assert any(
            "stopped;" in json.loads(line)["message"]
            for line in scenario.second_log.splitlines()
            if line.startswith("{")
        )
