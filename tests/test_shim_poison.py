"""Poison messages and poison targets: one crafted next_visit must not stop processing.

- at the door (`stream_shim.consumer.NextVisitHandler`): group ids, instruments and
  days that would become bad paths, deep nesting, huge fields and stale start times
  are dropped with a counted reason and a bounded log line;
- paths (`stream_shim.target_store.contained_path`): nothing is written outside the
  run directory, and a journal holding a bad visit is not resumed;
- the streaming backend (real `stream_shim.backends.StreamingBackend` with a tiny
  stand-in Snakefile, as in ``test_shim_backends.py``): a target no rule builds is
  quarantined alone while the good ones finish, and a crash loop is detected,
  reported unhealthy and broken by bisecting its culprit.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from astropy.time import Time
from shared_helpers import queue_runner_command, wait_until

from stream_shim.backends import StreamingBackend
from stream_shim.consumer import NextVisitHandler
from stream_shim.journal import AcceptedVisit, VisitJournal
from stream_shim.process_group import ChildRegistry
from stream_shim.quarantine import unbuildable_targets
from stream_shim.service import ShimOptions, StreamShim
from stream_shim.status import ShimStatus
from stream_shim.submission import Submitter
from stream_shim.target_store import LocalStore, PathOutsideRunDirError
from workflow.core.config import load_config
from workflow.core.instrument import instrument_for_run
from workflow.core.visit import CoordSys, Dome, RotSys
from workflow.stages.target import TargetPaths, existing_visit_files, write_json

INSTRUMENT = "LSSTComCamSim"
GROUP = "2026-11-28T01:02:03.456"
POISON_GROUPS = ["../../../etc", "a/b", "", "..", "g\n1", "g\x001"]


def _fields(**changes: Any) -> dict[str, Any]:
    now = Time.now().unix_tai
    fields: dict[str, Any] = dict(
        salIndex=1,
        scriptSalIndex=1,
        instrument=INSTRUMENT,
        groupId=GROUP,
        coordinateSystem=int(CoordSys.ICRS),
        position=[150.1, 2.2],
        startTime=now,
        rotationSystem=int(RotSys.SKY),
        cameraAngle=0.0,
        filters="r_03",
        dome=int(Dome.OPEN),
        duration=10.0,
        nimages=1,
        survey="SURVEY",
        totalCheckpoints=0,
        private_sndStamp=now,
    )
    fields.update(changes)
    return fields


class _Backend:
    """Records batches (the door tests need no Snakemake)."""

    name = "fake"

    def __init__(self) -> None:
        self.batches: list[Any] = []

    def start(self, on_ended, on_job_error) -> None:
        pass

    def submit(self, batch) -> None:
        self.batches.append(batch)

    def drain(self, grace_s: float, term_wait_s: float) -> None:
        pass

    def processes(self) -> int:
        return 0


@pytest.fixture
def door(tmp_path):
    """A next_visit handler of LSSTComCamSim in ``tmp_path/run``, its backend and status."""
    run = tmp_path / "run"
    run.mkdir()
    backend, status = _Backend(), ShimStatus(INSTRUMENT, "fake")
    submitter = Submitter(backend, status, workdir=run, poll_s=0.05)
    submitter.start()
    config = load_config(instrument=INSTRUMENT)

    def make(config_changes: dict[str, Any] | None = None) -> NextVisitHandler:
        merged = copy.deepcopy(dict(config))
        for section, values in (config_changes or {}).items():
            merged[section] = {**merged[section], **values}
        return NextVisitHandler(
            merged,
            detectors=[d.id for d in instrument_for_run(merged).active_detectors()],
            submitter=submitter,
            journal=VisitJournal(run / "shim" / "journal.jsonl"),
            status=status,
            workdir=run,
        )

    yield make, backend, status, run
    submitter.drain(0, 0)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


class TestDoor:
    """What `NextVisitHandler` drops, with what reason, in what log line."""

    def test_poison_group_ids_are_dropped_and_nothing_is_written(self, door, tmp_path, caplog) -> None:
        make, backend, status, run = door
        handler = make()
        caplog.set_level(logging.WARNING, logger="stream_shim.consumer")
        for group in POISON_GROUPS:
            assert handler.handle(json.dumps(_fields(groupId=group)).encode()) == "invalid_group", group
        assert status.counts("next_visit") == {"invalid_group": len(POISON_GROUPS)}
        assert backend.batches == [] and _files(tmp_path) == []
        drops = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dropped (invalid_group)")]
        assert len(drops) == len(POISON_GROUPS)
        assert "field 'groupId': '../../../etc' is not an allowed group" in drops[0]
        # Real forms still pass.
        assert handler.handle(json.dumps(_fields()).encode()) == "accepted"
        assert handler.handle(json.dumps(_fields(groupId="2025011000042")).encode()) == "accepted"
        assert len(backend.batches) == 2

    def test_other_identifiers_are_dropped_with_their_reason(self, door) -> None:
        make, backend, status, _ = door
        handler = make()
        assert handler.handle(json.dumps(_fields(instrument="../LSSTComCamSim")).encode()) == "invalid_instrument"
        assert handler.handle(json.dumps(_fields(private_sndStamp=1e300)).encode()) == "invalid_day_obs"
        assert handler.handle(json.dumps(_fields(groupId=7)).encode()) == "malformed"
        assert status.counts("next_visit") == {"invalid_instrument": 1, "invalid_day_obs": 1, "malformed": 1}
        assert backend.batches == []

    def test_deeply_nested_json_is_malformed_not_a_handler_error(self, door) -> None:
        make, _, status, _ = door
        handler = make()
        deep = ("[" * 100_000 + "]" * 100_000).encode()
        nested = json.dumps(_fields())[:-1].encode() + b', "x": ' + deep + b"}"
        assert handler.handle(deep) == "malformed"  # before: RecursionError, retried 3 times by the poll loop
        assert handler.handle(nested) == "malformed"
        assert status.counts("next_visit") == {"malformed": 2}

    def test_huge_field_gives_a_bounded_log_line(self, door, caplog) -> None:
        make, _, status, _ = door
        handler = make()
        caplog.set_level(logging.WARNING, logger="stream_shim.consumer")
        for field in ("groupId", "instrument"):
            assert handler.handle(json.dumps(_fields(**{field: "x" * 5_000_000})).encode()).startswith("invalid_")
        assert handler.handle(json.dumps(_fields(salIndex="y" * 5_000_000)).encode()) == "malformed"
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dropped")]
        assert len(lines) == 3 and all(len(line) < 1000 for line in lines)
        assert "(5000000 chars)" in lines[0] and "(5000000 chars)" in lines[2]
        assert sum(status.counts("next_visit").values()) == 3

    def test_stale_start_time_is_dropped(self, door) -> None:
        make, backend, status, _ = door
        handler = make({"visit": {"max_start_age_s": 600.0}})
        now = Time.now().unix_tai
        assert handler.handle(json.dumps(_fields(startTime=now - 900.0)).encode()) == "stale_start"
        assert handler.handle(json.dumps(_fields(private_sndStamp=now - 7200.0)).encode()) == "stale"
        assert handler.handle(json.dumps(_fields(startTime=now - 300.0)).encode()) == "accepted"
        assert status.counts("next_visit") == {"stale_start": 1, "stale": 1, "accepted": 1}
        assert len(backend.batches) == 1

    def test_stale_start_limit_is_configured(self) -> None:
        assert load_config(instrument=INSTRUMENT)["visit"]["max_start_age_s"] == 3600.0


class TestContainment:
    """No path is built outside the run directory."""

    def test_visit_files_outside_the_run_directory_are_never_written(self, door, tmp_path) -> None:
        make, backend, status, run = door
        handler = make({"paths": {"visits": "../escaped"}})
        assert handler.handle(json.dumps(_fields()).encode()) == "outside_run_dir"
        assert status.counts("next_visit") == {"outside_run_dir": 1}
        assert not (tmp_path / "escaped").exists() and backend.batches == [] and _files(run) == []

    def test_local_store_refuses_paths_that_leave_its_root(self, tmp_path) -> None:
        store = LocalStore(tmp_path / "run")
        for path in ("../../../etc/x.json", "/etc/x.json", "visits/\x00.json"):
            with pytest.raises(PathOutsideRunDirError, match="x.json|NUL"):
                store.write_json(Path(path), {"a": 1})
        store.write_json(Path("visits/a/../b.json"), {"a": 1})
        assert _files(tmp_path) == [tmp_path / "run" / "visits" / "b.json"]

    def test_batch_targets_skip_visit_files_with_bad_names(self, tmp_path) -> None:
        for group in (GROUP, "..x", "g 1"):
            write_json(tmp_path / "visits" / INSTRUMENT / "2026-11-27" / group / "4.json", {})
        assert existing_visit_files(tmp_path / "visits", INSTRUMENT) == [("2026-11-27", GROUP, 4)]

    def test_a_journaled_bad_visit_is_not_resumed_and_leaves_the_journal(self, tmp_path) -> None:
        config = load_config(instrument=INSTRUMENT)
        shim = StreamShim(ShimOptions(instrument=INSTRUMENT, workdir=tmp_path, health_check=False), config)
        good = TargetPaths(INSTRUMENT, "2026-11-27", GROUP, 4)
        write_json(tmp_path / good.visit_file, {})
        for group in ("../../../etc", GROUP):
            shim.journal.append(
                AcceptedVisit(instrument=INSTRUMENT, day_obs="2026-11-27", group=group, detectors=(4,), accepted=1.0)
            )

        class Recorder:
            def __init__(self) -> None:
                self.batches: list[tuple[str, list[str]]] = []

            def submit(self, targets, *, batch_id):
                self.batches.append((batch_id, [str(t.done_file) for t in targets]))
                return type("R", (), {"submitted": tuple(targets)})()

        recorder = Recorder()
        assert shim._resume(recorder) == 1  # type: ignore[arg-type]
        assert recorder.batches == [(GROUP, [str(good.done_file)])]
        assert [v.group for v in shim.journal.load()] == [GROUP]
        assert shim.status.counts("journal") == {"invalid_visit": 1}


# ---------------------------------------------------------------------------
# The streaming backend, with a stand-in Snakefile.

STAND_IN = """\
# Stand-in for the workflow: the real wildcard patterns, but rules only for
# instrument X, and an input function that fails for detector 66.
from stream_shim.queue_runner import TARGETS, FINISHED
from workflow.core.identifiers import PATTERNS


wildcard_constraints:
    instrument="X",
    day_obs=PATTERNS["day_obs"],
    group=PATTERNS["group"],
    detector=PATTERNS["detector"],


rule shim_stream:
    input:
        from_queue(TARGETS, finish_sentinel=FINISHED),
    default_target: True


def visit_input(wildcards):
    if wildcards.detector == "66":
        raise ValueError("input function fails for detector 66")
    return []


rule work:
    input:
        visit_input,
    output:
        "work_area/{instrument}/{day_obs}/{group}/{detector}/a.json",
    shell:
        "echo a > {output}"


rule done:
    input:
        rules.work.output,
    output:
        "results/{instrument}/{day_obs}/{group}/{detector}/done.json",
    shell:
        "echo b > {output}"
"""
DAY = "2026-11-27"


class RecordingStatus(ShimStatus):
    """A `ShimStatus` that remembers every condition raised and what ``/healthz`` said then."""

    def __init__(self) -> None:
        super().__init__("X", "streaming")
        self.state = "running"
        self.history: list[tuple[str, str | None, bool]] = []

    def set_condition(self, name: str, level: str | None, detail: str = "") -> None:
        super().set_condition(name, level, detail)
        self.history.append((name, level, self.health()[0]))


def _paths(instrument: str, detector: int, group: str = "g1") -> TargetPaths:
    return TargetPaths(instrument, DAY, group, detector)


@pytest.fixture
def streaming(tmp_path):
    """A real streaming backend under a `Submitter`, with the shim's journal wired to quarantines."""
    (tmp_path / "Snakefile").write_text(STAND_IN)
    status = RecordingStatus()
    config = load_config(instrument=INSTRUMENT)
    shim = StreamShim(ShimOptions(instrument=INSTRUMENT, workdir=tmp_path, health_check=False), config)
    submitter = Submitter(None, status, workdir=tmp_path, poll_s=0.1)
    command = queue_runner_command(tmp_path / "Snakefile", tmp_path)
    backend = StreamingBackend(
        command,
        env={"PATH": "/usr/bin:/bin"},
        log_dir=tmp_path / "logs",
        registry=ChildRegistry(tmp_path / "children.json"),
        workdir=tmp_path,
        unfinished=submitter.unfinished,
        status=status,
        on_quarantined=shim._forget_quarantined,
    )
    submitter.backend = backend
    submitter.start()
    yield submitter, backend, status, shim.journal
    submitter.drain(30, 5)


def _journal(journal: VisitJournal, paths: list[TargetPaths]) -> None:
    for p in paths:
        journal.append(
            AcceptedVisit(
                instrument=p.instrument, day_obs=p.day_obs, group=p.group, detectors=(p.detector,), accepted=1
            )
        )


class TestStreamingQuarantine:
    """A target the workflow cannot build is failed alone; the long-lived Snakemake goes on."""

    def test_unbuildable_target_is_quarantined_alone(self, streaming, tmp_path) -> None:
        submitter, backend, status, journal = streaming
        good, bad = [_paths("X", 1), _paths("X", 2)], _paths("Y", 3)  # no rule builds instrument Y
        crooked = TargetPaths("X", DAY, "a/b", 5)  # not one path component: never fed
        _journal(journal, [*good, bad])
        submitter.submit([*good, bad, crooked], batch_id="g1")
        assert wait_until(lambda: all((tmp_path / p.done_file).exists() for p in good), 90)
        later = [_paths("X", 4, "g2")]
        submitter.submit(later, batch_id="g2")
        assert wait_until(lambda: (tmp_path / later[0].done_file).exists(), 60)
        failed = json.loads((tmp_path / bad.failed_file).read_text())
        assert (failed["error"], failed["retriable"], failed["stage"]) == ("UnbuildableTarget", False, "snakemake")
        assert (failed["instrument"], failed["group"], failed["detector"]) == ("Y", "g1", 3)
        assert not (tmp_path / bad.done_file).exists()
        assert not (tmp_path / "results" / "X" / DAY / "a").exists()
        assert backend.quarantined == {str(bad.done_file), str(crooked.done_file)}
        assert [(v.instrument, v.detectors) for v in journal.load()] == [("X", (1,)), ("X", (2,))]
        assert wait_until(lambda: status.counts("failures").get("UnbuildableTarget") == 1, 10)
        assert backend.restarts == 1 and "crash_loop" not in status.counts("backend")
        assert status.counts("backend") == {"quarantined": 2}
        log = (tmp_path / "logs" / "snakemake-stream.log").read_text()
        assert "MissingInputException in rule shim_stream" in log

    def test_crash_loop_is_reported_and_broken_by_isolating_its_culprit(self, streaming, tmp_path) -> None:
        submitter, backend, status, journal = streaming
        good, culprit = [_paths("X", 1), _paths("X", 2)], _paths("X", 66)  # its input function raises
        submitter.submit([good[0], culprit, good[1]], batch_id="g1")
        assert wait_until(lambda: all((tmp_path / p.done_file).exists() for p in good), 180)
        assert status.counts("backend") == {"crash_loop": 1, "quarantined": 1}
        failed = json.loads((tmp_path / culprit.failed_file).read_text())
        assert (failed["error"], failed["retriable"], failed["detector"]) == ("UnbuildableTarget", False, 66)
        assert "crash loop" in failed["message"]
        assert backend.quarantined == {str(culprit.done_file)}
        # /healthz: unhealthy during the loop, degraded (still 200) once the culprit is out.
        assert status.history[0] == ("backend", "unhealthy", False)
        assert status.history[-1] == ("backend", "degraded", True)
        healthy, text = status.health()
        assert healthy and "backend=degraded: crash loop broken: 1 target(s) quarantined" in text
        assert backend.restarts >= 3
        log = (tmp_path / "logs" / "snakemake-stream.log").read_text()
        assert "InputFunctionException" in log and "crash-loop probe" in log

    def test_a_broken_workflow_quarantines_nothing_and_stays_unhealthy(self, streaming, tmp_path) -> None:
        submitter, backend, status, _ = streaming
        (tmp_path / "Snakefile").write_text(STAND_IN + "\nrule broken\n")  # a syntax error: no target is to blame
        targets = [_paths("X", 1), _paths("X", 2)]
        submitter.submit(targets, batch_id="g1")
        assert wait_until(lambda: status.counts("backend").get("crash_loop") == 1 and len(status.history) >= 2, 120)
        assert status.history[-1] == ("backend", "unhealthy", False)
        assert "no culprit found (the workflow fails with no target at all)" in status.health()[1]
        assert backend.quarantined == set() and _files(tmp_path / "results") == []
        assert sorted(submitter.unfinished()) == sorted(str(t.done_file) for t in targets)


class TestUnbuildableParsing:
    """`stream_shim.quarantine.unbuildable_targets` on Snakemake's error output."""

    def test_names_targets_and_targets_of_missing_inputs(self) -> None:
        targets = [f"results/X/{DAY}/g1/{d}/done.json" for d in (1, 2, 3)]
        lines = [
            'MissingInputException in rule shim_stream in file "Snakefile", line 6:\n',
            "Missing input files for rule shim_stream:\n",
            "    affected files:\n",
            f"        results/X/{DAY}/g1/2/done.json\n",
            "\n",
            'MissingInputException in rule prep in file "rules/prep.smk", line 1:\n',
            "    affected files:\n",
            f"        visits/X/{DAY}/g1/3.json\n",
            "Shutting down\n",
        ]
        assert unbuildable_targets(lines, targets) == targets[1:]
        assert unbuildable_targets(["Error in rule a:\n", "    output: x\n"], targets) == []
