"""Tests for `stream_shim.submission`, `stream_shim.journal`, `stream_shim.status` and
`stream_shim.consumer.NextVisitHandler` (no broker: messages are handed in directly)."""

from __future__ import annotations

import dataclasses
import json
import urllib.request

import pytest
from astropy.time import Time
from prometheus_client.parser import text_string_to_metric_families
from raw_uploads import make_visit
from shared_helpers import wait_until

from stream_shim.backends import Batch, _OutputFilter, job_error_target
from stream_shim.consumer import NextVisitHandler
from stream_shim.journal import AcceptedVisit, VisitJournal
from stream_shim.status import ShimStatus, StatusServer, percentile
from stream_shim.submission import Submitter, target_key
from workflow.core.config import load_config
from workflow.core.instrument import instrument_for_run
from workflow.core.visit import CoordSys, NextVisit, RotSys
from workflow.stages.records import FailedRecord, write_record
from workflow.stages.target import TargetPaths, write_json

GROUP = "2026-11-28T01:02:03.456"


class FakeBackend:
    """Records batches; lets a test end runs and report job errors."""

    name = "fake"

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.on_ended = self.on_job_error = None
        self.drained = False

    def start(self, on_ended, on_job_error) -> None:
        self.on_ended, self.on_job_error = on_ended, on_job_error

    def submit(self, batch: Batch) -> None:
        self.batches.append(batch)

    def drain(self, grace_s: float, term_wait_s: float) -> None:
        self.drained = True

    def processes(self) -> int:
        return len(self.batches)


def _targets(detectors, group=GROUP) -> list[TargetPaths]:
    return [TargetPaths("LSSTComCamSim", "2026-11-27", group, d) for d in detectors]


def _wait(predicate, timeout: float = 10.0) -> bool:
    return wait_until(predicate, timeout)


@pytest.fixture
def submitter(tmp_path):
    backend, status = FakeBackend(), ShimStatus("LSSTComCamSim", "fake")
    sub = Submitter(backend, status, workdir=tmp_path, poll_s=0.05)
    sub.start()
    yield sub, backend, status
    sub.drain(0, 0)


class TestSubmitter:
    """Tests for `stream_shim.submission.Submitter`."""

    def test_dedupes_done_failed_and_in_flight(self, submitter, tmp_path) -> None:
        sub, backend, status = submitter
        done, failed, fresh = _targets([0, 1, 2])
        write_json(tmp_path / done.done_file, {})
        write_json(tmp_path / failed.failed_file, {"error": "RawTimeoutError"})
        result = sub.submit([done, failed, fresh], batch_id=GROUP)
        assert result.submitted == (str(fresh.done_file),)
        assert result.already_done == (str(done.done_file),) and result.already_failed == (str(failed.done_file),)
        again = sub.submit([fresh], batch_id=GROUP)
        assert again.submitted == () and again.in_flight == (str(fresh.done_file),)
        assert [b.targets for b in backend.batches] == [(str(fresh.done_file),)]
        assert status.counts("targets") == {
            "submitted": 1,
            "already_done": 1,
            "already_failed": 1,
            "already_in_flight": 1,
        }

    def test_follows_outcome_files(self, submitter, tmp_path) -> None:
        sub, _, status = submitter
        ok, bad = _targets([3, 4])
        sub.submit([ok, bad], batch_id=GROUP)
        write_json(tmp_path / ok.done_file, {"outcome": "ok"})
        write_record(
            tmp_path / bad.failed_file,
            FailedRecord(
                error="RawTimeoutError",
                retriable=True,
                message="no raw",
                stage="ingest",
                instrument=bad.instrument,
                day_obs=bad.day_obs,
                group=bad.group,
                detector=bad.detector,
            ),
        )
        assert _wait(lambda: not sub.unfinished())
        assert status.counts("targets")["done"] == 1 and status.counts("targets")["failed"] == 1
        assert status.counts("failures") == {"RawTimeoutError": 1}
        assert status.snapshot()["latencies"]["submit_to_outcome"]["count"] == 2
        assert sub.gauges()["done"] == 1 and sub.gauges()["in_flight"] == 0

    def test_run_ended_without_outcome_is_no_outcome(self, submitter, monkeypatch) -> None:
        monkeypatch.setattr("stream_shim.submission._NO_OUTCOME_DELAY_S", 0.1)
        sub, backend, status = submitter
        (target,) = _targets([5])
        sub.submit([target], batch_id=GROUP)
        backend.on_job_error(("LSSTComCamSim", "2026-11-27", GROUP, 5))
        assert _wait(lambda: not sub.unfinished())
        assert status.counts("failures") == {"NoOutcome": 1}

    def test_admission_holds_newer_visits_until_older_targets_end(self, tmp_path) -> None:
        backend, status = FakeBackend(), ShimStatus("LSSTComCamSim", "fake")
        sub = Submitter(backend, status, workdir=tmp_path, poll_s=0.05, max_in_flight=3)
        sub.start()
        try:
            old_group, new_group, newest_group = GROUP, "2026-11-28T01:02:35.000", "2026-11-28T01:03:07.000"
            old = _targets([0, 1], old_group)
            new = _targets([0, 1], new_group)
            newest = _targets([0, 1], newest_group)
            sub.submit(old, batch_id=old_group)
            sub.submit(new, batch_id=new_group)
            sub.submit(newest, batch_id=newest_group)
            # Room for 3: the older visit whole, one target of the next; the newest waits.
            assert [(b.batch_id, len(b.targets)) for b in backend.batches] == [(old_group, 2), (new_group, 1)]
            assert sub.gauges()["in_flight"] == 3 and sub.gauges()["held"] == 3
            assert status.counts("targets") == {"submitted": 3, "held": 3}
            # Held targets count as unfinished (not ended, not resubmittable twice), but a restarted
            # backend is fed only what it had been given.
            assert len(sub.unfinished()) == 6 and len(sub.unfinished(first_attempts_only=True)) == 3
            assert not sub.ended(str(newest[0].done_file))
            assert sub.submit(newest[:1], batch_id=newest_group).in_flight == (str(newest[0].done_file),)
            for target in old:
                write_json(tmp_path / target.done_file, {"outcome": "ok"})
            # The two ended: the next visit's other target first, then the oldest of the newest.
            assert _wait(lambda: len(backend.batches) == 4)
            assert [(b.batch_id, b.targets) for b in backend.batches[2:]] == [
                (new_group, (str(new[1].done_file),)),
                (newest_group, (str(newest[0].done_file),)),
            ]
            assert sub.gauges()["held"] == 1 and status.counts("targets")["submitted"] == 5
        finally:
            sub.drain(0, 0)
        # Stopped with a target still held: it never reached a backend, and stays unfinished.
        assert str(newest[1].done_file) in sub.unfinished()

    def test_admission_limit_must_be_positive(self, tmp_path) -> None:
        with pytest.raises(ValueError, match="max_in_flight 0"):
            Submitter(FakeBackend(), ShimStatus("LSSTComCamSim", "fake"), workdir=tmp_path, max_in_flight=0)

    def test_target_key(self) -> None:
        assert target_key(f"results/LSSTComCamSim/2026-11-27/{GROUP}/7/done.json") == (
            "LSSTComCamSim",
            "2026-11-27",
            GROUP,
            7,
        )


class TestSnakemakeOutput:
    """Tests for `stream_shim.backends.job_error_target` and the output filter."""

    def test_job_error_target(self) -> None:
        line = f"    output: work_area/LSSTComCamSim/2026-11-27/{GROUP}/3/ingest.json"
        assert job_error_target(line) == ("LSSTComCamSim", "2026-11-27", GROUP, 3)
        assert job_error_target("    output: out/3.txt") is None

    def test_filter_drops_queue_chatter_and_spots_errors(self, tmp_path) -> None:
        seen, log_path = [], tmp_path / "log"
        with open(log_path, "w") as log:
            output = _OutputFilter(log, seen.append)
            for line in [
                "Waiting for queue input...\n",
                "Error in rule ingest:\n",
                "    jobid: 3\n",
                f"    output: work_area/LSSTComCamSim/2026-11-27/{GROUP}/3/ingest.json\n",
                "\n",
            ]:
                output.feed(line)
        assert seen == [("LSSTComCamSim", "2026-11-27", GROUP, 3)]
        assert "Waiting" not in log_path.read_text() and "Error in rule ingest" in log_path.read_text()


class TestVisitJournal:
    """Tests for `stream_shim.journal.VisitJournal`."""

    def test_append_load_skip_torn_line_rewrite(self, tmp_path) -> None:
        journal = VisitJournal(tmp_path / "j" / "journal.jsonl")
        assert journal.load() == []
        first = AcceptedVisit(
            instrument="X",
            day_obs="2026-11-27",
            group="g1",
            detectors=(1, 2),
            accepted=1.0,
            kafka={"topic": "t", "partition": 0, "offset": 5},
        )
        second = AcceptedVisit(instrument="X", day_obs="2026-11-27", group="g2", detectors=(3,), accepted=2.0)
        journal.append(first)
        journal.append(second)
        with open(journal.path, "a") as stream:
            stream.write('{"instrument": "X", "gro')  # a crash mid-write
        assert journal.load() == [first, second]
        journal.rewrite([second])
        assert journal.load() == [second]


class TestShimStatus:
    """Tests for `stream_shim.status`."""

    def test_counts_gauges_latencies_prometheus(self, tmp_path) -> None:
        status = ShimStatus("LSSTComCamSim", "streaming")
        status.count("next_visit", "stale", 2)
        status.gauge("targets", lambda: {"running": 3})
        for seconds in (1.0, 2.0, 3.0, 10.0):
            status.observe("submit_to_outcome", seconds)
        snap = status.snapshot()
        assert snap["counts"] == {"next_visit": {"stale": 2}} and snap["gauges"]["targets"] == {"running": 3}
        assert snap["latencies"]["submit_to_outcome"] == {"count": 4, "p50_s": 2.0, "p95_s": 10.0, "max_s": 10.0}
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(status.prometheus())
            for s in family.samples
        }
        assert samples[("prompt_snake_shim_events_total", (("category", "next_visit"), ("reason", "stale")))] == 2
        assert samples[("prompt_snake_shim_gauge", (("key", "running"), ("name", "targets")))] == 3
        latency = (("name", "submit_to_outcome"),)
        assert samples[("prompt_snake_shim_latency_seconds", (*latency, ("quantile", "0.95")))] == 10.0
        assert samples[("prompt_snake_shim_latency_seconds_sum", latency)] == 16.0
        status.write(tmp_path / "status.json")
        assert json.loads((tmp_path / "status.json").read_text())["counts"] == snap["counts"]
        assert percentile([], 50) is None and percentile([5.0], 95) == 5.0

    def test_http_endpoint(self) -> None:
        status = ShimStatus("LSSTComCamSim", "streaming")
        server = StatusServer(status, 0)
        server.start()
        try:
            base = f"http://127.0.0.1:{server.port}"
            with pytest.raises(urllib.error.HTTPError, match="503"):
                urllib.request.urlopen(base + "/healthz", timeout=5)
            status.state = "running"
            assert urllib.request.urlopen(base + "/healthz", timeout=5).read() == b"running\n"
            assert json.loads(urllib.request.urlopen(base + "/status", timeout=5).read())["state"] == "running"
            status.set_condition("consumer_next_visit", "degraded", "recreating the consumer")
            assert urllib.request.urlopen(base + "/healthz", timeout=5).read() == (
                b"running (degraded)\nconsumer_next_visit=degraded: recreating the consumer\n"
            )
            status.set_condition("backend", "unhealthy", "crash loop")
            with pytest.raises(urllib.error.HTTPError, match="503"):
                urllib.request.urlopen(base + "/healthz", timeout=5)
            status.set_condition("backend", None)
            status.set_condition("consumer_next_visit", None)
            assert urllib.request.urlopen(base + "/healthz", timeout=5).read() == b"running\n"
            assert b"prompt_snake_shim_uptime_seconds" in urllib.request.urlopen(base + "/metrics", timeout=5).read()
        finally:
            server.stop()


def _visit(**changes) -> NextVisit:
    visit = make_visit("LSSTComCamSim", GROUP, "r_03", snd_stamp=Time.now().unix_tai, duration=10.0)
    return dataclasses.replace(visit, **changes)


class TestNextVisitHandler:
    """Tests for `stream_shim.consumer.NextVisitHandler`."""

    @pytest.fixture
    def handler(self, submitter, tmp_path):
        sub, backend, status = submitter
        config = load_config(instrument="LSSTComCamSim")
        detectors = [d.id for d in instrument_for_run(config).active_detectors()]
        early: list[str] = []
        handler = NextVisitHandler(
            config,
            detectors=detectors,
            submitter=sub,
            journal=VisitJournal(tmp_path / "journal.jsonl"),
            status=status,
            workdir=tmp_path,
            on_accepted=lambda v: early.append(v.groupId),
        )
        return handler, backend, status, early

    def test_accepts_json_and_framed_avro_once(self, handler, tmp_path) -> None:
        handler, backend, status, early = handler
        visit = _visit()
        assert handler.handle(visit.to_json().encode(), kafka={"topic": "t", "partition": 0, "offset": 1}) == "accepted"
        files = sorted((tmp_path / "visits" / "LSSTComCamSim" / visit.day_obs / GROUP).glob("*.json"))
        assert [int(f.stem) for f in files] == list(range(9))
        assert json.loads(files[4].read_text())["detector"] == 4
        assert len(backend.batches) == 1 and len(backend.batches[0].targets) == 9
        # The same visit again (redelivery), as the summit's framed Avro: nothing new is submitted.
        assert handler.handle(visit.to_avro(schema_id=1)) == "duplicate"
        assert len(backend.batches) == 1 and early == [GROUP, GROUP]
        assert [v.group for v in handler.journal.load()] == [GROUP, GROUP]
        assert status.counts("next_visit") == {"accepted": 1, "duplicate": 1}

    def test_drops_with_counted_reasons(self, handler) -> None:
        handler, backend, status, _ = handler
        assert handler.handle(b"{not json") == "malformed"
        assert handler.handle(b"\x00\x00\x00\x00\x01garbage") == "malformed"
        assert handler.handle(None) == "malformed"
        assert handler.handle(_visit(instrument="NoSuchCam").to_json()) == "unknown_instrument"
        assert handler.handle(_visit(instrument="HSC").to_json()) == "other_instrument"
        assert handler.handle(_visit(private_sndStamp=Time.now().unix_tai - 7200).to_json()) == "stale"
        assert handler.handle(_visit(coordinateSystem=CoordSys.OBSERVED).to_json()) == "not_icrs"
        assert handler.handle(_visit(rotationSystem=RotSys.MOUNT).to_json()) == "not_sky_rotation"
        assert backend.batches == []
        assert status.counts("next_visit") == {
            "malformed": 3,
            "unknown_instrument": 1,
            "other_instrument": 1,
            "stale": 1,
            "not_icrs": 1,
            "not_sky_rotation": 1,
        }
