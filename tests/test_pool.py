"""Tests for the worker pool: work items, partitioning, offsets, fan-out, and the pool end to end.

Unit tests (no broker): the work item codec (`stream_shim.work_items`), the offset
tracker's contiguous-prefix commits (`stream_shim.offsets`), the worker's item
handler (`stream_shim.worker.WorkItemHandler`) and the fan-out's delivery
(`stream_shim.fanout.FanOutHandler`) with a recording producer.

End to end (`TestPool`): real Tansu + SeaweedFS, the fan-out (with the filer bridge)
and two workers (`stream_shim.testbed.night_pool.PoolStack`), each with its own
long-lived Snakemake running the night simulator's stand-in workflow, fed by the
night camera (`stream_shim.testbed.night.NightCamera`): 9 LSSTCam detectors on a
4-partition work topic.  Phase one plays 2 visits with both workers up; phase two
plays 2 more and kills worker ``w0`` as a pod dies (SIGKILL to all its processes)
while it has targets in flight; ``w1`` takes its partitions over.  The tests read
what landed: outcome files, the stand-in's per-target ``runs.log`` (one line per
stage run: an APDB store or an alert run twice would show), the workers'
journals, and the committed offsets of the work topic.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from astropy.time import Time
from raw_uploads import make_visit

from stream_shim.fanout import FanOutHandler, FanOutInterrupted
from stream_shim.journal import VisitJournal
from stream_shim.offsets import OffsetTracker
from stream_shim.status import ShimStatus
from stream_shim.submission import Submitter
from stream_shim.testbed.night import Cadence, NightCamera, VisitRecord
from stream_shim.testbed.night_standin import COST_MODELS, STAGE_NAMES, write_standin_snakefile
from stream_shim.work_items import WORK_ITEM_VERSION, BadWorkItem, WorkItem, decode_work_item, partition_for
from stream_shim.worker import DROPS, WorkItemHandler
from workflow.core.config import load_config
from workflow.core.instrument import Instrument
from workflow.core.visit import DetectorVisit
from workflow.stages.ingest import poll_interval

GROUP = "2026-11-28T01:02:03.456"


def _detector_visit(detector: int = 4, **changes: Any) -> DetectorVisit:
    visit = make_visit("LSSTComCamSim", GROUP, "r_03", snd_stamp=Time.now().unix_tai, duration=10.0)
    return visit.fan_out([detector])[0] if not changes else dataclasses.replace(visit.fan_out([detector])[0], **changes)


class TestWorkItem:
    """Tests for `stream_shim.work_items`."""

    def test_round_trip_carries_the_visit_and_version(self) -> None:
        item = WorkItem(_detector_visit(7))
        data = json.loads(item.encode())
        assert data["schema_version"] == WORK_ITEM_VERSION and data["detector"] == 7 and data["groupId"] == GROUP
        assert decode_work_item(item.encode()) == item
        assert item.key() == b"7"

    @pytest.mark.parametrize(
        ("value", "reason"),
        [
            (None, "malformed"),
            (b"", "malformed"),
            (b"{not json", "malformed"),
            (b"[1, 2]", "malformed"),
            (b"x" * 70_000, "malformed"),
            (b'{"schema_version": 1, "detector": 3}', "malformed"),
        ],
    )
    def test_bad_values_are_refused_with_a_reason(self, value: bytes | None, reason: str) -> None:
        with pytest.raises(BadWorkItem, match="partition 3") as caught:
            decode_work_item(value, where="work item at partition 3")
        assert caught.value.reason == reason

    def test_unknown_version_and_bad_identifiers(self) -> None:
        data = WorkItem(_detector_visit()).to_dict()
        with pytest.raises(BadWorkItem) as caught:
            decode_work_item(json.dumps({**data, "schema_version": 99}))
        assert caught.value.reason == "unknown_version"
        with pytest.raises(BadWorkItem) as caught:
            decode_work_item(json.dumps({**data, "groupId": "../../etc"}))
        assert caught.value.reason == "invalid_group"
        with pytest.raises(BadWorkItem) as caught:
            decode_work_item(json.dumps({**data, "detector": -2}))
        assert caught.value.reason in ("invalid_detector", "malformed")

    def test_a_detector_always_gets_the_same_partition(self) -> None:
        assert [partition_for(d, 4) for d in range(9)] == [0, 1, 2, 3, 0, 1, 2, 3, 0]
        assert partition_for(188, 64) == partition_for(188, 64) == 188 % 64
        with pytest.raises(ValueError):
            partition_for(3, 0)


class TestOffsetTracker:
    """Tests for `stream_shim.offsets.OffsetTracker`."""

    def test_commits_only_the_contiguous_prefix(self) -> None:
        tracker = OffsetTracker()
        tracker.assign([0, 1])
        for offset, target in enumerate(["a", "b", "c", "d"]):
            tracker.take(0, offset, target)
        tracker.take(1, 10, "x")
        ended: set[str] = set()
        tracker.settle(ended.__contains__)
        assert tracker.commit_points() == {} and tracker.in_flight() == 5
        ended |= {"b", "c"}  # out of order: a (offset 0) still runs
        tracker.settle(ended.__contains__)
        assert tracker.commit_points() == {} and tracker.unsettled([0]) == ["a", "d"]
        ended |= {"a", "x"}
        tracker.settle(ended.__contains__)
        points = tracker.commit_points()
        assert points == {0: 3, 1: 11}
        assert tracker.commit_points() == points  # a failed commit is tried again with the same points
        assert tracker.committed_to(points) == 4
        assert tracker.commit_points() == {} and tracker.in_flight() == 1
        ended.add("d")
        tracker.settle(ended.__contains__)
        assert tracker.commit_points() == {0: 4}

    def test_dropped_items_advance_at_once_and_forget_drops_state(self) -> None:
        tracker = OffsetTracker()
        tracker.assign([2])
        tracker.take(2, 5, None)
        tracker.take(2, 6, None)
        assert tracker.commit_points() == {2: 7} and tracker.in_flight() == 0
        tracker.take(2, 7, "t")
        tracker.forget([2])
        assert tracker.partitions() == [] and tracker.in_flight() == 0 and tracker.commit_points() == {}


@pytest.fixture
def handler_parts(tmp_path: Path) -> tuple[WorkItemHandler, ShimStatus, VisitJournal]:
    config = load_config(instrument="LSSTComCamSim")
    status = ShimStatus("LSSTComCamSim", "worker")
    journal = VisitJournal(tmp_path / "journal.jsonl")
    submitter = Submitter(None, status, workdir=tmp_path)
    handler = WorkItemHandler(
        config, submitter=submitter, journal=journal, status=status, workdir=tmp_path, store=submitter.store
    )
    return handler, status, journal


class TestWorkItemHandler:
    """Tests for `stream_shim.worker.WorkItemHandler`: a bad item is counted and dropped, never raised."""

    def test_takes_an_item(self, handler_parts, tmp_path: Path) -> None:
        handler, status, journal = handler_parts
        visit = _detector_visit(5)
        target = handler.take(WorkItem(visit).encode(), kafka={"topic": "w", "partition": 1, "offset": 0})
        assert target == f"results/LSSTComCamSim/{visit.day_obs}/{GROUP}/5/done.json"
        visit_file = tmp_path / "visits" / "LSSTComCamSim" / visit.day_obs / GROUP / "5.json"
        assert DetectorVisit.from_json(visit_file.read_text()) == visit
        assert [(v.group, v.detectors) for v in journal.load()] == [(GROUP, (5,))]
        assert handler.submitter.unfinished() == [target]

    def test_bad_items_are_dropped_and_their_offsets_advance(self, handler_parts) -> None:
        handler, status, journal = handler_parts
        data = WorkItem(_detector_visit()).to_dict()
        bad = [b"{junk", json.dumps({**data, "schema_version": 0}).encode(), json.dumps({**data, "instrument": "HSC"})]
        tracker = OffsetTracker()
        tracker.assign([0])
        for offset, value in enumerate(bad):
            tracker.take(0, offset, handler.take(value, kafka={"partition": 0, "offset": offset}))
        assert status.counts(DROPS) == {"malformed": 1, "unknown_version": 1, "other_instrument": 1}
        assert tracker.commit_points() == {0: 3} and journal.load() == []


class _Producer:
    """Records produce calls; fails the first ``failures`` deliveries."""

    def __init__(self, failures: int = 0) -> None:
        self.failures, self.sent, self._reports = failures, [], []

    def produce(self, topic, value, *, key, partition, on_delivery) -> None:
        self.sent.append((topic, key, partition, value))
        error = None
        if self.failures > 0:
            self.failures -= 1
            error = "broker away"
        self._reports.append((on_delivery, error))

    def poll(self, timeout: float) -> int:
        return 0

    def flush(self, timeout: float) -> int:
        for callback, error in self._reports:
            callback(error, None)
        self._reports.clear()
        return 0


class TestFanOut:
    """Tests for `stream_shim.fanout.FanOutHandler` (the same door as the shim's; items instead of files)."""

    def _handler(self, producer: _Producer, tmp_path: Path, stop: threading.Event) -> FanOutHandler:
        config = load_config(instrument="LSSTComCamSim")
        return FanOutHandler(
            config,
            detectors=range(9),
            status=ShimStatus("LSSTComCamSim", "fanout"),
            workdir=tmp_path,
            producer=producer,
            topic="work",
            partitions=4,
            stop=stop,
        )

    def test_one_item_per_detector_on_its_partition(self, tmp_path: Path) -> None:
        producer = _Producer()
        handler = self._handler(producer, tmp_path, threading.Event())
        visit = make_visit("LSSTComCamSim", GROUP, "r_03", snd_stamp=Time.now().unix_tai, duration=10.0)
        assert handler.handle(visit.to_json().encode()) == "fanned_out"
        assert [(k, p) for _, k, p, _ in producer.sent] == [(str(d).encode(), d % 4) for d in range(9)]
        assert [decode_work_item(v).detector for *_, v in producer.sent] == list(range(9))
        assert not (tmp_path / "visits").exists()  # the workers write visit files, not the fan-out
        assert handler.handle(b"{junk") == "malformed" and len(producer.sent) == 9

    def test_undelivered_items_are_produced_again_or_the_visit_is_not_committed(self, tmp_path: Path) -> None:
        producer = _Producer(failures=2)
        handler = self._handler(producer, tmp_path, threading.Event())
        visit = make_visit("LSSTComCamSim", GROUP, "r_03", snd_stamp=Time.now().unix_tai, duration=10.0)
        assert handler.handle(visit.to_json()) == "fanned_out"
        assert len(producer.sent) == 11 and handler.status.counts("work_items")["delivery_failed"] == 2
        stopped = threading.Event()
        stopped.set()
        handler = self._handler(_Producer(failures=1), tmp_path, stopped)
        with pytest.raises(FanOutInterrupted):
            handler.handle(visit.to_json())


# -- end to end ------------------------------------------------------------------------------

DETECTORS = 9
PARTITIONS = 4
PHASE_VISITS = 2
KILLED, SURVIVOR = "w0", "w1"


@dataclasses.dataclass
class PoolRun:
    """What the pool run left."""

    workdir: Path
    config: dict[str, Any]
    first: list[VisitRecord]
    second: list[VisitRecord]
    first_journals: dict[str, list[tuple[str, int]]]
    killed_pids: set[int]
    killed_in_flight: int
    committed: dict[int, int]
    high: dict[int, int]
    exits: dict[str, int | None]
    statuses: dict[str, dict[str, Any]]

    def targets(self, visits: list[VisitRecord]) -> set[tuple[str, int]]:
        return {(v.group, d) for v in visits for d in v.raws}


def _journal(state_dir: Path) -> list[tuple[str, int]]:
    return [(v.group, d) for v in VisitJournal(state_dir / "journal.jsonl").load() for d in v.detectors]


def _done(workdir: Path) -> list[Path]:
    return sorted(workdir.glob("results/LSSTCam/*/*/*/done.json"))


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.3)


def _committed(config: dict[str, Any], topic: str) -> dict[int, int]:
    """Committed offsets of the worker group per partition."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {"bootstrap.servers": config["kafka"]["bootstrap"], "group.id": config["kafka"]["worker_group"]}
    )
    try:
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        return {tp.partition: tp.offset for tp in consumer.committed(partitions, timeout=10)}
    finally:
        consumer.close()


def _produce_bad_items(config: dict[str, Any], topic: str) -> list[int]:
    """Produce a junk item to partition 1 and one of an unknown version to partition 2; return their partitions."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": config["kafka"]["bootstrap"]})
    stale = {**WorkItem(_detector_visit(1)).to_dict(), "schema_version": WORK_ITEM_VERSION + 1}
    producer.produce(topic, b"{junk", key=b"1", partition=1)
    producer.produce(topic, json.dumps(stale).encode(), key=b"2", partition=2)
    assert producer.flush(10) == 0
    return [1, 2]


def _items_per_partition(visits: list[VisitRecord]) -> dict[int, int]:
    """How many work items the fan-out produced to each partition (one per detector-visit: it was never killed).

    Counted from the visits: Tansu's high watermarks lag the partitions' ends.
    """
    counts = collections.Counter(partition_for(d, PARTITIONS) for v in visits for d in v.raws)
    return {p: counts.get(p, 0) for p in range(PARTITIONS)}


@pytest.fixture(scope="module")
def pool_run(tmp_path_factory: pytest.TempPathFactory) -> PoolRun:
    from stream_shim.testbed.night_pool import PoolStack
    from stream_shim.work_items import work_topic

    workdir = tmp_path_factory.mktemp("pool") / "run"
    workdir.mkdir()
    base = load_config(instrument="LSSTCam")
    chosen = [d.id for d in Instrument.from_config(base).active_detectors()][:DETECTORS]
    cadence = Cadence(visits=PHASE_VISITS, cadence_s=4.0, lead_s=2.0, exptime_s=2.0, readout_s=0.5, raw_spread_s=1.0)
    snakefile = write_standin_snakefile(
        workdir / "night" / "Snakefile",
        COST_MODELS["quick-sleep"],
        paths=base["paths"],
        poll_s=poll_interval(base["ingest"], indexed=True),
        raw_timeout_s=60.0,
    )
    overrides = {
        "active_detectors": {"default": False, "overrides": {str(d): True for d in chosen}},
        "kafka": {"worker_group": f"pool-test-{uuid.uuid4().hex[:8]}"},
        "pool": {"partitions": PARTITIONS, "revoke_wait_s": 2.0, "session_timeout_s": 3.0},
        "submission": {"retry": {"backoff_s": 1.0}},
    }
    stack = PoolStack(
        workdir,
        workers=2,
        repo=workdir / "central_repo",
        instrument="LSSTCam",
        scale=1.0,
        overrides=overrides,
        worker_args=["--snakefile", str(snakefile), "--max-concurrent-targets", "24", "--grace-s", "20"],
        broker_storage="memory",
        health_check=False,
    )
    saved = dict(os.environ)
    with stack:
        os.environ.update({k: v for k, v in stack.env.items() if k.startswith("AWS_")})  # the camera's uploads
        config = stack.config
        topic = work_topic(config)

        stack.wait_assigned()
        bad = _produce_bad_items(config, work_topic(config))
        stop = threading.Event()

        def play() -> list[VisitRecord]:
            return NightCamera(config, chosen, cadence, workdir=workdir, stop=stop).run(time.monotonic() + 60)

        first = play()
        _wait(lambda: len(_done(workdir)) >= PHASE_VISITS * DETECTORS, 60, "phase one's targets")
        first_journals = {w: _journal(stack.worker_state_dir(w)) for w in stack.worker_ids}
        # Phase two: kill w0 while it holds targets of the first visit of this phase.
        second: list[VisitRecord] = []
        camera = threading.Thread(target=lambda: second.extend(play()), name="camera")
        camera.start()
        killed_state = stack.worker_state_dir(KILLED)

        def killed_has_work() -> bool:
            gauges = stack.role_status(killed_state).get("gauges", {})
            return int(gauges.get("work_items", {}).get("in_flight", 0)) > 0

        before = len(_journal(killed_state))
        _wait(
            lambda: len(_journal(killed_state)) > before and killed_has_work(), 30, f"{KILLED} to take phase two work"
        )
        time.sleep(2.0)  # its jobs past prep, polling for raws not landed yet: none is between output and record
        in_flight = int(stack.role_status(killed_state)["gauges"]["work_items"]["in_flight"])
        killed = stack.kill_worker(KILLED)
        camera.join(timeout=60)
        total = 2 * PHASE_VISITS * DETECTORS
        _wait(lambda: len(_done(workdir)) >= total, 90, "every target after the takeover")

        high = _items_per_partition(first + second)
        for partition in bad:
            high[partition] += 1
        _wait(lambda: _committed(config, topic) == high, 30, f"the survivor's commits up to {high}")
        committed = _committed(config, topic)
        statuses = {w: stack.role_status(stack.worker_state_dir(w)) for w in stack.worker_ids}
    os.environ.clear()
    os.environ.update(saved)
    return PoolRun(
        workdir, config, first, second, first_journals, killed, in_flight, committed, high, dict(stack.exits), statuses
    )


class TestPool:
    """The pool end to end: fan-out and two workers, then a worker killed and taken over."""

    def test_every_target_done_exactly_once(self, pool_run: PoolRun) -> None:
        expected = pool_run.targets(pool_run.first) | pool_run.targets(pool_run.second)
        assert len(expected) == 2 * PHASE_VISITS * DETECTORS
        done = _done(pool_run.workdir)
        assert {(p.parent.parent.name, int(p.parent.name)) for p in done} == expected
        assert not list(pool_run.workdir.glob("results/LSSTCam/*/*/*/failed.json"))
        undisturbed = pool_run.targets(pool_run.first)
        for group, detector in expected:
            (runs,) = pool_run.workdir.glob(f"work_area/LSSTCam/*/{group}/{detector}/runs.log")
            stages = collections.Counter(line.split()[0] for line in runs.read_text().splitlines())
            # The APDB store and its alerts (apdb) and the done.json (finish) ran once, taken over or not.
            assert (stages["apdb"], stages["finish"]) == (1, 1), (group, detector, stages)
            if (group, detector) in undisturbed:
                assert stages == collections.Counter(STAGE_NAMES), (group, detector, stages)
            else:  # a job killed with its worker may run again on the next one: at least once
                assert set(stages) == set(STAGE_NAMES), (group, detector, stages)

    def test_no_target_taken_by_two_workers_without_a_kill(self, pool_run: PoolRun) -> None:
        journals = pool_run.first_journals
        assert set(journals[KILLED]).isdisjoint(journals[SURVIVOR])
        assert set(journals[KILLED]) | set(journals[SURVIVOR]) == pool_run.targets(pool_run.first)
        assert journals[KILLED] and journals[SURVIVOR]  # both took work
        # a detector keeps its partition, hence its worker
        for worker, taken in journals.items():
            partitions = {partition_for(d, PARTITIONS) for _, d in taken}
            others = {partition_for(d, PARTITIONS) for w, t in journals.items() if w != worker for _, d in t}
            assert partitions.isdisjoint(others), worker

    def test_bad_items_are_counted_dropped_and_committed(self, pool_run: PoolRun) -> None:
        drops: collections.Counter[str] = collections.Counter()
        for status in pool_run.statuses.values():
            drops.update(status.get("counts", {}).get(DROPS, {}))
        assert drops == {"malformed": 1, "unknown_version": 1}
        assert pool_run.committed[1] >= 1 and pool_run.committed[2] >= 1  # their offsets moved on (checked whole below)

    def test_the_survivor_took_over_and_committed_everything(self, pool_run: PoolRun) -> None:
        assert pool_run.killed_pids and pool_run.killed_in_flight > 0
        assert pool_run.exits[KILLED] == -9
        assert pool_run.exits[SURVIVOR] == 0 and pool_run.exits["fanout"] == 0
        second = pool_run.targets(pool_run.second)
        survivor = set(_journal(pool_run.workdir / "workers" / SURVIVOR))
        done_by_survivor = {t for t in second if t in survivor}
        assert len(done_by_survivor) > len(second) // 2  # it did its own and the killed worker's
        assert pool_run.committed == pool_run.high and sum(pool_run.high.values()) >= 2 * PHASE_VISITS * DETECTORS
        counts = pool_run.statuses[SURVIVOR]["counts"]["work_items"]
        # Every item it took came from the work topic; its commits moved offsets (the whole is checked above:
        # one commit may carry items the killed worker had finished but not committed).
        assert counts["taken"] >= len(done_by_survivor) and counts["committed"] >= 1
