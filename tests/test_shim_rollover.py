"""Rollover of the streaming Snakemake (`stream_shim.rollover`, `stream_shim.backends.StreamingBackend`).

A real streaming backend under a `stream_shim.submission.Submitter`, with a tiny
stand-in Snakefile whose first job of each target appends a marker line (the
target and its Snakemake's pid) to ``runs.log``: every target must run exactly
once, across rollovers, in the process it was fed to.
"""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import pytest
from shared_helpers import queue_runner_command, wait_until

from stream_shim.backends import StreamingBackend
from stream_shim.process_group import ChildRegistry
from stream_shim.rollover import Generation, RolloverPolicy
from stream_shim.service import ShimOptions, StreamShim
from stream_shim.status import ShimStatus
from stream_shim.submission import Submitter
from workflow.core.config import load_config
from workflow.stages.target import TargetPaths

DAY = "2026-11-27"
STAND_IN = """
from stream_shim.queue_runner import TARGETS, FINISHED
rule stream:
    input: from_queue(TARGETS, finish_sentinel=FINISHED)
    default_target: True
rule work:
    output: "work/{instrument}/{day_obs}/{group}/{detector}/a.json"
    shell:
        "echo {wildcards.group}/{wildcards.detector} $PPID >> runs.log; "
        "sleep $(cat delay-{wildcards.group}-{wildcards.detector} 2>/dev/null || echo 0); echo a > {output}"
rule done:
    input: rules.work.output
    output: "results/{instrument}/{day_obs}/{group}/{detector}/done.json"
    shell: "echo b > {output}"
"""
ROLLOVER = 5


def _batch(group: str) -> list[TargetPaths]:
    return [TargetPaths("X", DAY, group, d) for d in range(1, 10)]


def _runs(tmp_path: Path) -> Counter[str]:
    path = tmp_path / "runs.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return Counter(line.split()[0] for line in lines)


def _done(tmp_path: Path, targets: list[TargetPaths]) -> bool:
    return all((tmp_path / t.done_file).exists() for t in targets)


@pytest.fixture
def rolling(tmp_path):
    """A real streaming backend rolling over every `ROLLOVER` targets, under a `Submitter`."""
    (tmp_path / "Snakefile").write_text(STAND_IN)
    status = ShimStatus("X", "streaming")
    submitter = Submitter(None, status, workdir=tmp_path, poll_s=0.1)
    command = queue_runner_command(tmp_path / "Snakefile", tmp_path, cores=4, extra=["--rerun-incomplete"])
    backend = StreamingBackend(
        command,
        env={"PATH": "/usr/bin:/bin"},
        log_dir=tmp_path / "logs",
        registry=ChildRegistry(tmp_path / "children.json"),
        workdir=tmp_path,
        unfinished=submitter.unfinished,
        status=status,
        rollover_targets=ROLLOVER,
    )
    submitter.backend = backend
    submitter.start()
    yield submitter, backend, status
    submitter.drain(30, 5)


class TestRollover:
    """A fresh Snakemake takes the new targets; the old one finishes its own and exits."""

    def test_every_target_once_and_no_gap(self, rolling, tmp_path) -> None:
        submitter, backend, status = rolling
        (tmp_path / "delay-g1-3").write_text("15")  # keeps the first process busy after its rollover
        first = backend._proc
        assert first is not None
        batches = [_batch(g) for g in ("g1", "g2", "g3")]
        submitter.submit(batches[0], batch_id="g1")
        assert wait_until(lambda: "g1/3" in _runs(tmp_path), 30)
        submitter.submit(batches[1], batch_id="g2")  # rollover 1: to a fresh process
        second = backend._proc
        assert second is not None and second.pid != first.pid
        assert first.stdin is not None and first.stdin.closed  # told to finish
        assert wait_until(lambda: _done(tmp_path, batches[1]), 40)
        assert first.poll() is None  # no gap: new targets finished while the old process still ran
        submitter.submit(batches[2], batch_id="g3")  # rollover 2
        third = backend._proc
        assert third is not None and third.pid not in (first.pid, second.pid)
        assert wait_until(lambda: all(_done(tmp_path, b) for b in batches), 60)
        # The old processes exit on their own, cleanly, once their targets are done.
        assert wait_until(lambda: first.poll() is not None and second.poll() is not None, 30)
        assert (first.returncode, second.returncode) == (0, 0)
        assert wait_until(lambda: backend.processes() == 1, 10)
        runs = _runs(tmp_path)
        assert runs == Counter({f"{b[0].group}/{t.detector}": 1 for b in batches for t in b})
        pids = {line.split()[0]: int(line.split()[1]) for line in (tmp_path / "runs.log").read_text().splitlines()}
        assert {pids[f"g1/{d}"] for d in range(1, 10)} == {first.pid}  # each target in the process fed it
        assert {pids[f"g2/{d}"] for d in range(1, 10)} == {second.pid}
        assert backend.rollovers == 2 and status.counts("backend") == {"rollover": 2}
        assert backend.restarts == 0 and "crash_loop" not in status.counts("backend")
        assert wait_until(lambda: submitter.gauges()["done"] == 27, 10)
        assert submitter.gauges()["failed"] == 0

    def test_sigkill_of_the_newest_process_refeeds_only_its_targets(self, rolling, tmp_path) -> None:
        submitter, backend, status = rolling
        (tmp_path / "delay-g1-2").write_text("20")  # the first process outlives the kill
        for d in (4, 5):
            (tmp_path / f"delay-g2-{d}").write_text("6")  # running in the newest process when it is killed
        batches = [_batch(g) for g in ("g1", "g2", "g3")]
        first = backend._proc
        assert first is not None
        submitter.submit(batches[0], batch_id="g1")
        assert wait_until(lambda: "g1/2" in _runs(tmp_path), 30)
        submitter.submit(batches[1], batch_id="g2")  # rollover: g2 to the second process
        second = backend._proc
        assert second is not None and second.pid != first.pid
        assert wait_until(lambda: "g2/4" in _runs(tmp_path) and "g2/5" in _runs(tmp_path), 40)
        second.send_signal(signal.SIGKILL)
        assert wait_until(lambda: backend._proc is not None and backend._proc.pid not in (first.pid, second.pid), 20)
        assert backend.restarts == 1
        assert first.poll() is None  # the rolled-over process was left alone, still on its targets
        submitter.submit(batches[2], batch_id="g3")
        assert wait_until(lambda: all(_done(tmp_path, b) for b in batches), 75)
        runs = _runs(tmp_path)
        assert {k: v for k, v in runs.items() if not k.startswith("g2/")} == Counter(
            {f"{g}/{d}": 1 for g in ("g1", "g3") for d in range(1, 10)}
        )  # the first process's targets were not fed to the restarted one
        assert runs["g2/4"] == 2 and runs["g2/5"] == 2  # killed mid-job: run again by the restarted process
        assert wait_until(lambda: first.poll() is not None, 30) and first.returncode == 0
        assert backend.rollovers >= 1 and status.counts("backend")["rollover"] == backend.rollovers
        assert wait_until(lambda: submitter.gauges()["done"] == 27, 10)


def test_policy_counts_targets_fed() -> None:
    gen = Generation(proc=None, started=0.0, fed={"a", "b"})  # type: ignore[arg-type]
    assert RolloverPolicy(2).due(gen) and not RolloverPolicy(3).due(gen)
    assert not RolloverPolicy(None).due(gen) and not RolloverPolicy(0).due(gen)


def test_service_passes_the_configured_threshold(tmp_path) -> None:
    config = load_config(instrument="LSSTComCamSim")
    shim = StreamShim(ShimOptions(instrument="LSSTComCamSim", workdir=tmp_path, health_check=False), config)
    backend = shim._backend(lambda: [])
    assert isinstance(backend, StreamingBackend)
    assert backend._policy.threshold == config["submission"]["rollover_targets"] == 2000
