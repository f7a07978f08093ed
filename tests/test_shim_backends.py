"""Tests for `stream_shim.backends`, `stream_shim.queue_runner` and `stream_shim.process_group`.

A toy Snakefile (two shell rules per target, paths shaped like the real ones)
stands in for the workflow: these tests are about starting, feeding, draining
and killing Snakemake, not about what the jobs do.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from shared_helpers import queue_runner_command, wait_until

from stream_shim.backends import Batch, StreamingBackend, SubprocessPoolBackend
from stream_shim.process_group import ChildRegistry, group_members, process_start_ticks, spawn, stop_group
from stream_shim.queue_runner import WRAPPER_RULE, write_wrapper_snakefile

TAIL = "X/2026-11-27/g{i}/{i}"
TOY = """
from stream_shim.queue_runner import TARGETS, FINISHED
rule stream:
    input: from_queue(TARGETS, finish_sentinel=FINISHED)
    default_target: True
rule a:
    output: "work/{inst}/{day}/{group}/{det}/a.json"
    shell: "sleep $(cat delay-{wildcards.det} 2>/dev/null || echo 0); test {wildcards.det} != 13 && echo a > {output}"
rule b:
    input: "work/{inst}/{day}/{group}/{det}/a.json"
    output: "results/{inst}/{day}/{group}/{det}/done.json"
    shell: "echo b > {output}"
"""


def _target(i: int) -> str:
    return f"results/{TAIL.format(i=i)}/done.json"


def _toy(tmp_path: Path) -> Path:
    (tmp_path / "Snakefile").write_text(TOY)
    return tmp_path / "Snakefile"


def _wait(predicate, timeout: float = 60.0) -> bool:
    return wait_until(predicate, timeout)


class Recorder:
    """Collects the backend's callbacks."""

    def __init__(self) -> None:
        self.ended: list[tuple[tuple[str, ...], str]] = []
        self.errors: list[tuple[str, str, str, int]] = []

    def on_ended(self, targets, reason) -> None:
        self.ended.append((tuple(targets), reason))

    def on_job_error(self, key) -> None:
        self.errors.append(key)


class TestStreamingBackend:
    """Tests for `stream_shim.backends.StreamingBackend` with `stream_shim.queue_runner`."""

    def _backend(self, tmp_path: Path, unfinished=lambda: []) -> StreamingBackend:
        command = queue_runner_command(_toy(tmp_path), tmp_path)
        return StreamingBackend(
            command,
            env={"PATH": "/usr/bin:/bin"},
            log_dir=tmp_path / "logs",
            registry=ChildRegistry(tmp_path / "children.json"),
            workdir=tmp_path,
            unfinished=unfinished,
        )

    def test_feeds_targets_reports_failed_jobs_and_drains(self, tmp_path: Path) -> None:
        backend, seen = self._backend(tmp_path), Recorder()
        backend.start(seen.on_ended, seen.on_job_error)
        backend.submit(Batch("g1", (_target(1), _target(2))))
        assert _wait(lambda: all((tmp_path / _target(i)).exists() for i in (1, 2)))
        started = time.monotonic()
        backend.submit(Batch("g3", (_target(3), _target(13))))  # 13 fails in rule a
        assert _wait(lambda: (tmp_path / _target(3)).exists() and seen.errors)
        assert time.monotonic() - started < 20
        assert seen.errors == [("X", "2026-11-27", "g13", 13)]
        backend.drain(grace_s=30, term_wait_s=5)
        assert backend.processes() == 0
        log = (tmp_path / "logs" / "snakemake-stream.log").read_text()
        assert "Waiting for queue input" not in log and "Error in rule a" in log
        assert seen.ended == []  # the process ended because it was drained, not on its own

    def test_drain_stops_a_long_job_within_bounds(self, tmp_path: Path) -> None:
        (tmp_path / "delay-5").write_text("600")
        backend, seen = self._backend(tmp_path), Recorder()
        backend.start(seen.on_ended, seen.on_job_error)
        backend.submit(Batch("g5", (_target(5),)))
        assert _wait(
            lambda: (
                (tmp_path / "work" / "X" / "2026-11-27" / "g5").exists()
                or (tmp_path / ".snakemake" / "incomplete").exists()
            ),
            30,
        )
        time.sleep(2.0)
        pid = backend._proc.pid
        started = time.monotonic()
        backend.drain(grace_s=1, term_wait_s=2)
        assert time.monotonic() - started < 20
        assert group_members(pid) == set() and not (tmp_path / _target(5)).exists()

    def test_restarts_a_dead_process_and_feeds_unfinished_targets(self, tmp_path: Path) -> None:
        backend, seen = self._backend(tmp_path, unfinished=lambda: [_target(7)]), Recorder()
        backend.start(seen.on_ended, seen.on_job_error)
        first = backend._proc.pid
        assert _wait(lambda: (tmp_path / _target(7)).exists())
        (tmp_path / _target(7)).unlink()
        backend._proc.kill()
        assert _wait(lambda: backend._proc.pid != first and (tmp_path / _target(7)).exists())
        assert backend.restarts == 1
        backend.drain(grace_s=30, term_wait_s=5)

    def test_wrapper_snakefile_includes_the_project(self, tmp_path: Path) -> None:
        project = tmp_path / "project"
        (project / "config").mkdir(parents=True)
        (project / "Snakefile").write_text("# main\n")
        path = write_wrapper_snakefile(tmp_path / "stream", project / "Snakefile")
        text = path.read_text()
        assert f"include: {str(project / 'Snakefile')!r}" in text and f"rule {WRAPPER_RULE}:" in text
        assert (tmp_path / "stream" / "config").resolve() == (project / "config").resolve()
        assert write_wrapper_snakefile(tmp_path / "stream", project / "Snakefile") == path


class TestSubprocessPoolBackend:
    """Tests for `stream_shim.backends.SubprocessPoolBackend`."""

    def test_batches_wait_for_free_cores(self, tmp_path: Path) -> None:
        snakefile, calls = _toy(tmp_path), []

        def command(targets, cores):
            calls.append((tuple(targets), cores))
            return [
                sys.executable,
                "-m",
                "snakemake",
                "--snakefile",
                str(snakefile),
                "--cores",
                str(cores),
                "--nolock",
                "--directory",
                str(tmp_path),
                "--",
                *targets,
            ]

        backend = SubprocessPoolBackend(
            command,
            max_cores=2,
            env={"PATH": "/usr/bin:/bin"},
            log_dir=tmp_path / "logs",
            registry=ChildRegistry(tmp_path / "c.json"),
            workdir=tmp_path,
        )
        seen = Recorder()
        backend.start(seen.on_ended, seen.on_job_error)
        backend.submit(Batch("g1", (_target(1), _target(2))))
        backend.submit(Batch("g3", (_target(3),)))
        assert _wait(lambda: len(seen.ended) == 2)
        # The first batch took both cores: the second started only after it ended.
        assert calls == [((_target(1), _target(2)), 2), ((_target(3),), 1)]
        assert seen.ended[0] == ((_target(1), _target(2)), "snakemake exit 0")
        assert all((tmp_path / _target(i)).exists() for i in (1, 2, 3))
        backend.drain(grace_s=5, term_wait_s=2)
        assert len(list((tmp_path / "logs").glob("snakemake-*.log"))) == 2

    def test_waiting_batches_share_one_process_at_the_limit(self, tmp_path: Path) -> None:
        """With ``max_processes``, batches queued behind a running one start as one process (one start-up)."""
        gate, calls = tmp_path / "gate", []

        def command(targets, cores):
            calls.append(tuple(targets))
            # Each "run" waits for the gate, then makes its targets' outputs.
            make = " && ".join(f"mkdir -p $(dirname {t}) && touch {t}" for t in targets)
            return ["bash", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done; {make}"]

        backend = SubprocessPoolBackend(
            command,
            max_cores=100,
            env={"PATH": "/usr/bin:/bin"},
            log_dir=tmp_path / "logs",
            registry=ChildRegistry(tmp_path / "c.json"),
            workdir=tmp_path,
            max_processes=1,
        )
        seen = Recorder()
        backend.start(seen.on_ended, seen.on_job_error)
        backend.submit(Batch("r1", (_target(1),)))
        assert _wait(lambda: backend.processes() == 1)
        for i in (2, 3, 4):
            backend.submit(Batch(f"r{i}", (_target(i),)))
        gate.touch()
        assert _wait(lambda: len(seen.ended) == 2)
        assert calls == [(_target(1),), (_target(2), _target(3), _target(4))]
        assert seen.ended[1] == ((_target(2), _target(3), _target(4)), "snakemake exit 0")
        assert all((tmp_path / _target(i)).exists() for i in (1, 2, 3, 4))
        backend.drain(grace_s=5, term_wait_s=2)


class TestProcessGroup:
    """Tests for `stream_shim.process_group`."""

    def test_stop_group_escalates_to_sigkill(self, tmp_path: Path) -> None:
        registry = ChildRegistry(tmp_path / "children.json")
        script = "trap '' TERM; sleep 600 & sleep 600"
        proc = spawn(["bash", "-c", script], registry=registry)
        assert _wait(lambda: len(group_members(proc.pid)) == 3, 10)
        started = time.monotonic()
        assert stop_group(proc, wait_s=0.2, term_wait_s=0.5, registry=registry) == "killed"
        assert time.monotonic() - started < 10 and group_members(proc.pid) == set()
        assert registry._load() == {}

    def test_kill_leftovers_of_a_previous_run(self, tmp_path: Path) -> None:
        registry = ChildRegistry(tmp_path / "children.json")
        # A leader that exits at once, leaving a child in its process group (like a crashed shim's job).
        proc = spawn(["bash", "-c", "sleep 600 & exit 0"], registry=registry)
        proc.wait()
        assert _wait(lambda: len(group_members(proc.pid)) == 1, 10)
        (orphan,) = group_members(proc.pid)
        assert ChildRegistry(tmp_path / "children.json").kill_leftovers() == 1
        assert process_start_ticks(orphan) is None

    def test_reused_pid_of_a_leader_is_spared(self, tmp_path: Path) -> None:
        registry = ChildRegistry(tmp_path / "children.json")
        proc = subprocess.Popen(["sleep", "600"], start_new_session=True)
        try:
            registry._save({str(proc.pid): 1})  # recorded with another start time: not ours
            assert registry.kill_leftovers() == 0 and proc.poll() is None
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
