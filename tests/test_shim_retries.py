"""Tests for the automatic retries of `stream_shim.submission.Submitter` (`stream_shim.retry_policy`).

Two levels: a fake backend (the test writes the outcome files and ends the runs),
for the bookkeeping; and the real backends on a stand-in Snakefile (paths shaped
like the real ones) whose job follows a per-detector plan, one step per attempt:
``ok``, ``retriable`` / ``fatal`` (write a ``failed.json`` as the stage would, and
exit 1) or ``kill`` (SIGKILL itself: no outcome file).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from shared_helpers import queue_runner_command, wait_until

from stream_shim.backends import Batch, StreamingBackend, SubprocessPoolBackend
from stream_shim.process_group import ChildRegistry
from stream_shim.retry_policy import RetryPolicy
from stream_shim.service import ShimOptions, StreamShim
from stream_shim.status import ShimStatus
from stream_shim.submission import Submitter
from workflow.core.config import load_config
from workflow.stages.records import FailedRecord, write_record
from workflow.stages.target import TargetPaths, write_json

GROUP = "2026-11-28T01:02:03.456"
FAST = RetryPolicy(max_attempts=3, backoff_s=0.2, backoff_max_s=0.4)


class FakeBackend:
    """Records batches; lets a test end runs."""

    name = "fake"

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.on_ended = self.on_job_error = None

    def start(self, on_ended, on_job_error) -> None:
        self.on_ended, self.on_job_error = on_ended, on_job_error

    def submit(self, batch: Batch) -> None:
        self.batches.append(batch)

    def drain(self, grace_s: float, term_wait_s: float) -> None:
        pass

    def processes(self) -> int:
        return 0


def _failure(target: TargetPaths, error: str, retriable: bool | None) -> FailedRecord:
    return FailedRecord(
        error=error,
        retriable=retriable,
        message=f"{error} for detector {target.detector}",
        stage="apdb",
        instrument=target.instrument,
        day_obs=target.day_obs,
        group=target.group,
        detector=target.detector,
    )


def _wait(predicate, timeout: float = 10.0) -> bool:
    return wait_until(predicate, timeout)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    monkeypatch.setattr("stream_shim.submission._NO_OUTCOME_DELAY_S", 0.1)
    backend, status = FakeBackend(), ShimStatus("LSSTComCamSim", "fake")
    sub = Submitter(backend, status, workdir=tmp_path, poll_s=0.05, retry=FAST)
    sub.start()
    yield sub, backend, status
    sub.drain(0, 0)


class TestRetryPolicy:
    """Tests for `stream_shim.retry_policy.RetryPolicy`."""

    def test_config_back_off_and_what_is_retried(self) -> None:
        policy = RetryPolicy.from_config(load_config(instrument="LSSTComCamSim"))
        assert (policy.max_attempts, policy.backoff_s, policy.backoff_max_s) == (4, 5.0, 60.0)
        assert [RetryPolicy(backoff_s=5.0, backoff_max_s=12.0).delay_s(a) for a in (1, 2, 3)] == [5.0, 10.0, 12.0]
        target = TargetPaths("LSSTComCamSim", "2026-11-27", GROUP, 1)
        assert policy.should_retry(_failure(target, "AlertDeliveryError", True), 1)
        assert policy.should_retry(_failure(target, "NoOutcome", None), 2)
        assert not policy.should_retry(_failure(target, "AlertDeliveryError", True), 4)
        assert not policy.should_retry(_failure(target, "CorruptRawError", False), 1)
        assert not policy.should_retry(_failure(target, "KeyError", None), 1)  # unexpected: a bug, not retried
        with pytest.raises(ValueError, match="max_attempts must be >= 1"):
            RetryPolicy(max_attempts=0)

    def test_shim_wires_retries_and_a_retry_lane_for_streaming(self, tmp_path) -> None:
        config = load_config(instrument="LSSTComCamSim")
        streaming = StreamShim(ShimOptions(instrument="LSSTComCamSim", workdir=tmp_path), config)
        assert isinstance(streaming._retry_lane(), SubprocessPoolBackend)
        pool = StreamShim(ShimOptions(instrument="LSSTComCamSim", workdir=tmp_path, design="subprocess"), config)
        assert pool._retry_lane() is None


class TestSubmitterRetries:
    """Tests for the retry bookkeeping of `stream_shim.submission.Submitter`."""

    def test_retriable_failure_is_retried_then_done(self, fake, tmp_path) -> None:
        sub, backend, status = fake
        (target,) = [TargetPaths("LSSTComCamSim", "2026-11-27", GROUP, 1)]
        sub.submit([target], batch_id=GROUP)
        write_record(tmp_path / target.failed_file, _failure(target, "ApdbUnavailableError", True))
        assert _wait(lambda: len(backend.batches) == 2)
        assert backend.batches[1].targets == (str(target.done_file),)
        assert not (tmp_path / target.failed_file).exists()  # the stale one: removed before resubmitting
        assert sub.unfinished() == [str(target.done_file)]
        write_json(tmp_path / target.done_file, {"outcome": "ok"})
        assert _wait(lambda: not sub.unfinished())
        assert status.counts("retries") == {"ApdbUnavailableError": 1}
        assert status.counts("targets") == {"submitted": 1, "done": 1}
        assert "failures" not in status.snapshot()["counts"]
        assert sub.gauges()["retried"] == 1 and sub.gauges()["done"] == 1

    def test_non_retriable_failure_is_not_retried(self, fake, tmp_path) -> None:
        sub, backend, status = fake
        target = TargetPaths("LSSTComCamSim", "2026-11-27", GROUP, 2)
        sub.submit([target], batch_id=GROUP)
        write_record(tmp_path / target.failed_file, _failure(target, "CorruptRawError", False))
        assert _wait(lambda: not sub.unfinished())
        assert len(backend.batches) == 1 and (tmp_path / target.failed_file).exists()
        assert status.counts("failures") == {"CorruptRawError": 1} and status.counts("retries") == {}

    def test_attempts_are_bounded_and_the_last_failure_stands(self, fake, tmp_path) -> None:
        sub, backend, status = fake
        target = TargetPaths("LSSTComCamSim", "2026-11-27", GROUP, 3)
        sub.submit([target], batch_id=GROUP)
        for attempt in (1, 2, 3):
            assert _wait(lambda a=attempt: len(backend.batches) == a and not (tmp_path / target.failed_file).exists())
            write_record(tmp_path / target.failed_file, _failure(target, "AlertDeliveryError", True))
        assert _wait(lambda: not sub.unfinished())
        assert len(backend.batches) == 3 and (tmp_path / target.failed_file).exists()
        assert status.counts("retries") == {"AlertDeliveryError": 2}
        assert status.counts("failures") == {"AlertDeliveryError": 1}

    def test_no_outcome_is_retried(self, fake, tmp_path) -> None:
        sub, backend, status = fake
        target = TargetPaths("LSSTComCamSim", "2026-11-27", GROUP, 4)
        sub.submit([target], batch_id=GROUP)
        backend.on_ended([str(target.done_file)], "snakemake exit 1")  # killed: no outcome file
        assert _wait(lambda: len(backend.batches) == 2)
        assert status.counts("retries") == {"NoOutcome": 1}
        write_json(tmp_path / target.done_file, {})
        assert _wait(lambda: not sub.unfinished())
        assert status.counts("targets")["done"] == 1 and "failures" not in status.snapshot()["counts"]

    def test_the_end_of_an_earlier_attempts_run_does_not_end_the_retry(self, fake, tmp_path) -> None:
        sub, backend, status = fake
        target, other = (TargetPaths("LSSTComCamSim", "2026-11-27", GROUP, d) for d in (4, 5))
        sub.submit([target, other], batch_id=GROUP)
        write_record(tmp_path / target.failed_file, _failure(target, "AlertDeliveryError", True))
        assert _wait(lambda: len(backend.batches) == 2)
        # The first batch (both targets) ends only now, while the retry runs: not the retry's end.
        write_json(tmp_path / other.done_file, {})
        backend.on_ended([str(target.done_file), str(other.done_file)], "snakemake exit 1")
        assert _wait(lambda: sub.unfinished() == [str(target.done_file)])
        assert not _wait(lambda: not sub.unfinished(), 1.0)
        write_json(tmp_path / target.done_file, {})
        assert _wait(lambda: not sub.unfinished())
        assert status.counts("targets")["done"] == 2 and "failures" not in status.snapshot()["counts"]

    def test_drain_while_backing_off_keeps_the_failure(self, tmp_path) -> None:
        backend, status = FakeBackend(), ShimStatus("LSSTComCamSim", "fake")
        slow = RetryPolicy(max_attempts=3, backoff_s=60.0)
        sub = Submitter(backend, status, workdir=tmp_path, poll_s=0.05, retry=slow)
        sub.start()
        target = TargetPaths("LSSTComCamSim", "2026-11-27", GROUP, 6)
        sub.submit([target], batch_id=GROUP)
        write_record(tmp_path / target.failed_file, _failure(target, "RawTimeoutError", True))
        assert _wait(lambda: sub.gauges()["backing_off"] == 1)
        sub.drain(0, 0)
        assert sub.unfinished() == [] and len(backend.batches) == 1
        assert (tmp_path / target.failed_file).exists() and status.counts("failures") == {"RawTimeoutError": 1}


# -- the real backends on a stand-in workflow ----------------------------------------------

JOB = """\
import json, os, signal, sys
inst, day, group, det, output = sys.argv[1:]
plan = open(f"plan-{det}").read().split()
tried = len(open(f"attempts-{det}").read().split()) if os.path.exists(f"attempts-{det}") else 0
step = plan[min(tried, len(plan) - 1)]
with open(f"attempts-{det}", "a") as stream:
    stream.write(step + "\\n")
if step == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
if step in ("retriable", "fatal"):
    failed = f"results/{inst}/{day}/{group}/{det}/failed.json"
    os.makedirs(os.path.dirname(failed), exist_ok=True)
    record = dict(error="ApdbUnavailableError" if step == "retriable" else "CorruptRawError",
                  retriable=step == "retriable", message="stand-in", stage="a", instrument=inst,
                  day_obs=day, group=group, detector=int(det), seconds=None, schema_version=1)
    json.dump(record, open(failed, "w"))
    sys.exit(1)
open(output, "w").write("a")
"""

TOY = """
from stream_shim.queue_runner import TARGETS, FINISHED
rule stream:
    input: from_queue(TARGETS, finish_sentinel=FINISHED)
    default_target: True
rule a:
    output: "work/{{inst}}/{{day}}/{{group}}/{{det}}/a.json"
    shell: "{python} job.py {{wildcards.inst}} {{wildcards.day}} {{wildcards.group}} {{wildcards.det}} {{output}}"
rule b:
    input: "work/{{inst}}/{{day}}/{{group}}/{{det}}/a.json"
    output: "results/{{inst}}/{{day}}/{{group}}/{{det}}/done.json"
    shell: "echo b > {{output}}"
"""

ENV = {"PATH": "/usr/bin:/bin"}


def _stand_in(tmp_path: Path, plans: dict[int, str]) -> Path:
    (tmp_path / "job.py").write_text(JOB)
    (tmp_path / "Snakefile").write_text(TOY.format(python=sys.executable))
    for detector, plan in plans.items():
        (tmp_path / f"plan-{detector}").write_text(plan)
    return tmp_path / "Snakefile"


def _pool(tmp_path: Path, name: str = "pool") -> SubprocessPoolBackend:
    snakefile = tmp_path / "Snakefile"

    def command(targets, cores):
        return [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--cores", str(cores)] + [
            "--nolock",
            "--keep-going",
            "--directory",
            str(tmp_path),
            "--",
            *targets,
        ]

    return SubprocessPoolBackend(
        command,
        max_cores=2,
        env=ENV,
        log_dir=tmp_path / "logs" / name,
        registry=ChildRegistry(tmp_path / f"{name}.json"),
        workdir=tmp_path,
    )


def _streaming(tmp_path: Path, unfinished) -> StreamingBackend:
    command = queue_runner_command(tmp_path / "Snakefile", tmp_path)
    return StreamingBackend(
        command,
        env=ENV,
        log_dir=tmp_path / "logs" / "stream",
        registry=ChildRegistry(tmp_path / "stream.json"),
        workdir=tmp_path,
        unfinished=unfinished,
    )


def _attempts(tmp_path: Path, detector: int) -> list[str]:
    return (tmp_path / f"attempts-{detector}").read_text().split()


def _targets(detectors) -> list[TargetPaths]:
    return [TargetPaths("X", "2026-11-27", f"g{d}", d) for d in detectors]


@pytest.fixture(params=["subprocess", "streaming"])
def real(request, tmp_path, monkeypatch):
    """A submitter on a real backend (streaming: with a subprocess retry lane), started lazily."""
    monkeypatch.setattr("stream_shim.submission._NO_OUTCOME_DELAY_S", 1.0)
    status = ShimStatus("X", request.param)
    started: list[Submitter] = []

    def start(plans: dict[int, str]) -> tuple[Submitter, ShimStatus]:
        _stand_in(tmp_path, plans)
        sub = Submitter(None, status, workdir=tmp_path, poll_s=0.1, retry=FAST)
        if request.param == "subprocess":
            sub.backend = _pool(tmp_path)
        else:
            sub.retry_backend = _pool(tmp_path, "retries")
            sub.backend = _streaming(tmp_path, lambda: sub.unfinished(first_attempts_only=True))
        sub.start()
        started.append(sub)
        return sub, status

    yield start
    for sub in started:
        sub.drain(30, 5)


class TestRetriesOnRealBackends:
    """Retries through `SubprocessPoolBackend` and `StreamingBackend` (+ retry lane) on a stand-in Snakefile."""

    def test_retriable_failure_then_done_and_fatal_not_retried(self, real, tmp_path) -> None:
        sub, status = real({1: "retriable ok", 2: "fatal ok"})
        ok, fatal = _targets([1, 2])
        sub.submit([ok], batch_id="g1")
        sub.submit([fatal], batch_id="g2")
        assert _wait(lambda: not sub.unfinished(), 120), (sub.unfinished(), status.snapshot()["counts"])
        assert (tmp_path / ok.done_file).exists() and not (tmp_path / ok.failed_file).exists()
        assert _attempts(tmp_path, 1) == ["retriable", "ok"]
        assert _attempts(tmp_path, 2) == ["fatal"]
        assert json.loads((tmp_path / fatal.failed_file).read_text())["error"] == "CorruptRawError"
        assert status.counts("retries") == {"ApdbUnavailableError": 1}
        assert status.counts("failures") == {"CorruptRawError": 1}

    def test_killed_job_is_retried_and_attempts_are_bounded(self, real, tmp_path) -> None:
        sub, status = real({3: "kill ok", 4: "retriable"})
        killed, hopeless = _targets([3, 4])
        sub.submit([killed, hopeless], batch_id="g3")
        assert _wait(lambda: not sub.unfinished(), 180), (sub.unfinished(), status.snapshot()["counts"])
        assert _attempts(tmp_path, 3) == ["kill", "ok"] and (tmp_path / killed.done_file).exists()
        assert _attempts(tmp_path, 4) == ["retriable"] * 3 and (tmp_path / hopeless.failed_file).exists()
        assert status.counts("retries") == {"NoOutcome": 1, "ApdbUnavailableError": 2}
        assert status.counts("failures") == {"ApdbUnavailableError": 1}
