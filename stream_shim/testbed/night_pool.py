"""The worker pool on this machine: the live stack with a fan-out and N workers instead of one shim.

`PoolStack` is `stream_shim.testbed.live_stack.LiveStack` (Tansu broker, SeaweedFS S3
publishing filer events, the extra config file, the raw bucket) whose shim is
replaced by ``python -m stream_shim --role fanout`` (with the filer bridge: one for
the pool) and ``--role worker`` processes, each with its own ``--worker-id`` and
``--state-dir`` (``workers/<id>``) in the shared run directory, as pods sharing a
volume.  Each role runs in a session of its own; `PoolStack.kill_worker` emulates a
pod's death: SIGKILL to the worker's process group and to every process group its
registry (``children.json``) recorded (its Snakemake and their jobs), and to its
stage server.

Used by ``scripts/bench_night.py --design pool`` and ``tests/test_pool.py``.
"""

from __future__ import annotations

__all__ = ["PoolStack", "merge_roles", "merge_ticks", "pool_roles"]

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from stream_shim.testbed.live_stack import FILER_TOPIC, LiveStack
from stream_shim.testbed.night_sampler import shim_roles
from workflow.core.config import PROJECT_ROOT

_START_TIMEOUT_S = 180.0
_PR_SET_PDEATHSIG = 1
_TARGET_KEYS = ("submitted", "done", "failed", "in_flight", "retried")


def pool_roles(fanout_pid: int | None, worker_pids: Mapping[str, int]) -> dict[str, set[int]]:
    """Return the pool's processes by role, for `stream_shim.testbed.night_sampler.ProcessSampler`.

    The roles are disjoint (the sampler gives each process one role): ``fanout``,
    and per worker ``worker:<id>`` (its service process), ``submitter:<id>`` (its
    Snakemake processes) and ``jobs:<id>``; `merge_roles` and `merge_ticks` add
    the shim design's roles (``shim``, ``submitter``, ``jobs``) summed over them.
    """
    roles: dict[str, set[int]] = {"fanout": set() if fanout_pid is None else {fanout_pid}}
    for worker_id, pid in worker_pids.items():
        tree = shim_roles(pid)
        roles[f"worker:{worker_id}"] = tree["shim"]
        roles[f"submitter:{worker_id}"] = tree["submitter"]
        roles[f"jobs:{worker_id}"] = tree["jobs"]
    return roles


def _merged_role(role: str) -> str | None:
    """The shim design's role a pool role counts in: the fan-out and the workers are the ``shim``."""
    if role == "fanout" or role.startswith("worker:"):
        return "shim"
    if role.startswith("submitter:"):
        return "submitter"
    if role.startswith("jobs:"):
        return "jobs"
    return None


def merge_roles(cpu: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Return `ProcessSampler.cpu_by_role` with ``shim``, ``submitter``, ``jobs`` summed over the pool's roles."""
    merged: dict[str, dict[str, float]] = {role: dict(values) for role, values in cpu.items()}
    for role, values in cpu.items():
        target = _merged_role(role)
        if target is None:
            continue
        entry = merged.setdefault(target, {})
        for name, value in values.items():
            entry[name] = entry.get(name, 0.0) + value
    return merged


def merge_ticks(ticks: list[dict[str, Any]]) -> None:
    """Add the summed ``shim``, ``submitter`` and ``jobs`` RSS and process counts to every tick, in place."""
    for tick in ticks:
        for key in ("rss_mb", "processes"):
            values = tick.get(key, {})
            sums: dict[str, float] = {}
            for role, value in values.items():
                target = _merged_role(role)
                if target is not None:
                    sums[target] = sums.get(target, 0) + value
            values.update({k: round(v, 1) if key == "rss_mb" else v for k, v in sums.items()})


class PoolStack(LiveStack):
    """Servers, a fan-out and ``workers`` workers for one live run.

    Parameters
    ----------
    workdir : `pathlib.Path`
        The shared run directory.
    workers : `int`
        Number of workers (``w0``, ``w1``, ...).
    worker_args : sequence of `str`, optional
        Extra options of every worker (``--snakefile``, ``--max-concurrent-targets``, ...).
    health_check : `bool`, optional
        Run the roles' start-up health checks (they need the central repo); without
        them the stack creates the topics itself.
    **kwargs
        As `stream_shim.testbed.live_stack.LiveStack` (``shim_args`` is not used).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        workers: int,
        worker_args: Sequence[str] = (),
        health_check: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(workdir, **kwargs)
        if workers < 1:
            raise ValueError(f"workers {workers}: at least one")
        self.worker_ids = [f"w{i}" for i in range(workers)]
        self.worker_args, self.health_check = list(worker_args), health_check
        self.fanout: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.exits: dict[str, int | None] = {}

    # -- where things are -------------------------------------------------------------

    def worker_state_dir(self, worker_id: str) -> Path:
        """The state directory of a worker (``workers/<id>``)."""
        return self.workdir / "workers" / worker_id

    @property
    def fanout_state_dir(self) -> Path:
        """The fan-out's state directory."""
        return self.workdir / "fanout"

    def role_status(self, state_dir: Path) -> dict[str, Any]:
        """Return one role's status file (empty if not written yet)."""
        try:
            return json.loads((state_dir / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def status(self) -> dict[str, Any]:
        """Return the workers' target gauges summed, their counts summed, in the shim's status shape."""
        targets = dict.fromkeys(_TARGET_KEYS, 0)
        counts: dict[str, dict[str, int]] = {}
        states = []
        for worker_id in self.worker_ids:
            status = self.role_status(self.worker_state_dir(worker_id))
            states.append(status.get("state"))
            for key in _TARGET_KEYS:
                targets[key] += int(status.get("gauges", {}).get("targets", {}).get(key, 0) or 0)
            for category, reasons in status.get("counts", {}).items():
                for reason, value in reasons.items():
                    counts.setdefault(category, {})
                    counts[category][reason] = counts[category].get(reason, 0) + int(value)
        fanout = self.role_status(self.fanout_state_dir)
        for reason, value in fanout.get("counts", {}).get("next_visit", {}).items():
            counts.setdefault("next_visit", {})[reason] = int(value)
        return {"gauges": {"targets": targets}, "counts": counts, "worker_states": states}

    def roles(self) -> dict[str, set[int]]:
        """Return the pool's processes by role now (`pool_roles`)."""
        pids = {w: p.pid for w, p in self.workers.items() if p.poll() is None}
        return pool_roles(self.fanout.pid if self.fanout is not None else None, pids)

    # -- start and stop ---------------------------------------------------------------

    def _role_command(self, role: str, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "stream_shim",
            "--role",
            role,
            "--instrument",
            self.instrument,
            "--config-file",
            str(self.config_file),
            "--workdir",
            str(self.workdir),
            *([] if self.health_check else ["--no-health-check"]),
            *extra,
        ]

    def _spawn(self, command: list[str], log_name: str) -> subprocess.Popen[bytes]:
        with open(self.workdir / log_name, "ab") as log:
            return subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=PROJECT_ROOT,
                env=self.env,
                start_new_session=True,  # a "pod": its own process group
                preexec_fn=_die_with_parent,  # and gone if the bench or test dies
            )

    def _start_shim(self) -> None:
        if not self.health_check:
            from stream_shim.health import check_kafka

            topics = self.config["kafka_topics"]
            check_kafka(
                self.config["kafka"]["bootstrap"],
                [topics["next_visit"], topics["raw_notification"], topics["alerts"], FILER_TOPIC],
            )
        self.fanout = self._spawn(self._role_command("fanout", "--filer-topic", FILER_TOPIC), "fanout.log")
        self._wait_running("fan-out", self.fanout, self.fanout_state_dir, self.workdir / "fanout.log")
        for worker_id in self.worker_ids:
            self.start_worker(worker_id, wait=False)
        for worker_id in self.worker_ids:
            self._wait_running(
                f"worker {worker_id}",
                self.workers[worker_id],
                self.worker_state_dir(worker_id),
                self.workdir / f"worker-{worker_id}.log",
            )

    def start_worker(self, worker_id: str, *, wait: bool = True) -> None:
        """Start (or start again) worker ``worker_id``."""
        state_dir = self.worker_state_dir(worker_id)
        (state_dir / "status.json").unlink(missing_ok=True)
        command = self._role_command(
            "worker", "--worker-id", worker_id, "--state-dir", str(state_dir), "--grace-s", "30", *self.worker_args
        )
        self.workers[worker_id] = self._spawn(command, f"worker-{worker_id}.log")
        if wait:
            self._wait_running(
                f"worker {worker_id}", self.workers[worker_id], state_dir, self.workdir / f"worker-{worker_id}.log"
            )

    def _wait_running(self, what: str, proc: subprocess.Popen[bytes], state_dir: Path, log: Path) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while self.role_status(state_dir).get("state") != "running":
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}; see {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start in {_START_TIMEOUT_S:g} s; see {log}")
            time.sleep(0.3)

    def wait_assigned(self, timeout_s: float = 60.0) -> None:
        """Wait until every running worker holds partitions (the group's first rebalances are over).

        Raises
        ------
        RuntimeError
            If some worker has none after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            waiting = [
                w
                for w, proc in self.workers.items()
                if proc.poll() is None
                and not self.role_status(self.worker_state_dir(w))
                .get("gauges", {})
                .get("work_items", {})
                .get("assigned_partitions")
            ]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker(s) {waiting} hold no partition after {timeout_s:g} s")
            time.sleep(0.3)

    def kill_worker(self, worker_id: str) -> set[int]:
        """Kill a worker as its pod would die: every process of it at once, SIGKILL; return the pids killed."""
        proc = self.workers[worker_id]
        state_dir = self.worker_state_dir(worker_id)
        victims = _group(proc.pid)
        try:
            recorded = json.loads((state_dir / "children.json").read_text())
        except (OSError, ValueError):
            recorded = {}
        for leader in recorded:
            victims |= _group(int(leader))
        from stream_shim.worker import stage_socket_for

        socket = str(stage_socket_for(state_dir))
        for each in psutil.process_iter(["cmdline"]):
            if socket in (each.info.get("cmdline") or []):
                victims.add(each.pid)
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
        self.exits[worker_id] = proc.returncode
        return victims

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        running = [(w, p) for w, p in self.workers.items() if p.poll() is None]
        for _, proc in running:
            proc.send_signal(signal.SIGTERM)
        for worker_id, proc in self.workers.items():
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            self.exits.setdefault(worker_id, proc.returncode)
        if self.fanout is not None:
            if self.fanout.poll() is None:
                self.fanout.send_signal(signal.SIGTERM)
            try:
                self.fanout.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.fanout.pid, signal.SIGKILL)
                self.fanout.wait()
            self.exits["fanout"] = self.fanout.returncode
        codes = [c for c in self.exits.values() if c is not None]
        self.shim_exit = max(codes, key=abs) if codes else None
        super().__exit__(exc_type, exc, tb)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent (thread) that started it dies."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _group(pgid: int) -> set[int]:
    """The live processes of process group ``pgid``."""
    from stream_shim.process_group import group_members

    return group_members(pgid)
