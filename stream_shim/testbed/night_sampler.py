"""Per-process CPU and memory of a live run, sampled with psutil, plus a probe per tick.

`ProcessSampler` wakes every ``interval_s``, asks ``discover`` which processes play
which role (e.g. ``shim``, ``submitter``, ``broker``), and records each process's CPU
times and RSS; it also records the load average and whatever ``probe`` returns (the
shim's backlog).  CPU is counted from the sampler's start: a process alive then
counts from its first sample, a later one from zero.  A process that exits between
two samples loses at most one interval of CPU; what its children used after being
reaped (``children_user``/``children_system`` of the parent: for Snakemake, its
jobs) is kept separately per role as ``reaped``.

`shim_roles` classifies a shim's process tree: the shim itself, its Snakemake
processes (``submitter``) and everything else below it (``jobs``, live ones only).
"""

from __future__ import annotations

__all__ = ["ProcessSampler", "shim_roles"]

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import psutil

_log = logging.getLogger(__name__)

_MB = 1024.0 * 1024.0
_CPU_FIELDS = ("user_s", "sys_s", "reaped_user_s", "reaped_sys_s", "alive_user_s", "alive_sys_s", "processes")


def _is_snakemake(proc: psutil.Process) -> bool:
    try:
        words = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    if not words or "python" not in os.path.basename(words[0]):
        return False
    return any(w in ("snakemake", "stream_shim.queue_runner", "workflow.runtime.k8s_executor") for w in words[1:3])


def shim_roles(shim_pid: int) -> dict[str, set[int]]:
    """Return ``{"shim": {pid}, "submitter": {...}, "jobs": {...}}`` of a shim's process tree now.

    ``submitter`` holds the Python processes running Snakemake (``-m snakemake``,
    ``-m stream_shim.queue_runner``); ``jobs`` every other descendant.
    """
    roles: dict[str, set[int]] = {"shim": {shim_pid}, "submitter": set(), "jobs": set()}
    try:
        children = psutil.Process(shim_pid).children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return roles
    for child in children:
        roles["submitter" if _is_snakemake(child) else "jobs"].add(child.pid)
    return roles


@dataclasses.dataclass
class _Proc:
    role: str
    base: tuple[float, float, float, float]
    last: tuple[float, float, float, float]
    rss: float = 0.0
    alive: bool = True


class ProcessSampler(threading.Thread):
    """Sample processes by role until stopped.

    Parameters
    ----------
    discover : callable
        Returns ``{role: pids}`` now; called every tick.
    interval_s : `float`, optional
        Seconds between samples.
    probe : callable, optional
        Returns a JSON-able mapping recorded with each tick (e.g. the shim's backlog).
    """

    def __init__(
        self,
        discover: Callable[[], Mapping[str, Iterable[int]]],
        *,
        interval_s: float = 1.0,
        probe: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__(name="night-sampler", daemon=True)
        self.discover, self.interval_s, self.probe = discover, interval_s, probe
        self._stop_event = threading.Event()
        self._procs: dict[tuple[int, float], _Proc] = {}
        self._handles: dict[tuple[int, float], psutil.Process] = {}
        self.started = time.time()
        self.ticks: list[dict[str, Any]] = []
        self._first = True
        self._lock = threading.Lock()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Take one last sample and stop."""
        self._stop_event.set()
        self.join(timeout=timeout_s)

    def run(self) -> None:
        self.started = time.time()
        while True:
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - a sampler must never end the run
                _log.exception("sampling failed")
            if self._stop_event.wait(self.interval_s):
                self._tick()
                return

    def _tick(self) -> None:
        now = time.time()
        roles = self.discover()
        seen: set[tuple[int, float]] = set()
        rss: dict[str, float] = {}
        counts: dict[str, int] = {}
        for role, pids in roles.items():
            rss.setdefault(role, 0.0)
            counts.setdefault(role, 0)
            for pid in pids:
                sample = self._sample(pid)
                if sample is None:
                    continue
                key, cpu, rss_bytes = sample
                seen.add(key)
                with self._lock:
                    proc = self._procs.get(key)
                    if proc is None:
                        base = cpu if self._first else (0.0, 0.0, 0.0, 0.0)
                        proc = self._procs[key] = _Proc(role, base, cpu)
                    proc.last, proc.rss, proc.alive = cpu, rss_bytes / _MB, True
                rss[role] += rss_bytes / _MB
                counts[role] += 1
        with self._lock:
            for key, proc in self._procs.items():
                if key not in seen:
                    proc.alive = False
        self._first = False
        tick: dict[str, Any] = {
            "t": round(now - self.started, 2),
            "load1": round(os.getloadavg()[0], 2),
            "rss_mb": {role: round(value, 1) for role, value in rss.items()},
            "processes": counts,
        }
        if self.probe is not None:
            try:
                tick.update(self.probe())
            except Exception as exc:  # noqa: BLE001 - recorded, the sampling goes on
                tick["probe_error"] = str(exc)
        with self._lock:
            self.ticks.append(tick)

    def _sample(self, pid: int) -> tuple[tuple[int, float], tuple[float, float, float, float], float] | None:
        try:
            handle = psutil.Process(pid)
            with handle.oneshot():
                key = (pid, handle.create_time())
                times = handle.cpu_times()
                rss = float(handle.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return None
        cpu = (times.user, times.system, times.children_user, times.children_system)
        return key, cpu, rss

    def cpu_by_role(self) -> dict[str, dict[str, float]]:
        """Return CPU seconds per role since the start.

        Per role: ``user_s``, ``sys_s`` (own), ``reaped_user_s``, ``reaped_sys_s`` (children
        reaped by the role's processes), ``alive_user_s``, ``alive_sys_s`` (own, of the
        processes alive at the last sample: those no parent has reaped yet) and ``processes``.
        """
        totals: dict[str, dict[str, float]] = {}
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            entry = totals.setdefault(proc.role, dict.fromkeys(_CPU_FIELDS, 0.0))
            delta = [max(b - a, 0.0) for a, b in zip(proc.base, proc.last, strict=True)]
            for name, value in zip(("user_s", "sys_s", "reaped_user_s", "reaped_sys_s"), delta, strict=True):
                entry[name] += value
            if proc.alive:
                entry["alive_user_s"] += delta[0]
                entry["alive_sys_s"] += delta[1]
            entry["processes"] += 1
        return totals

    def rss_series(self, max_points: int = 120) -> dict[str, Any]:
        """Return RSS (MB, summed over a role's processes) over time per role, thinned to ``max_points``."""
        with self._lock:
            ticks = list(self.ticks)
        step = max(1, -(-len(ticks) // max_points))
        roles = sorted({role for tick in ticks for role in tick["rss_mb"]})
        series: dict[str, Any] = {}
        for role in roles:
            values = [(tick["t"], tick["rss_mb"].get(role, 0.0)) for tick in ticks]
            series[role] = {
                "max_mb": max((v for _, v in values), default=0.0),
                "last_mb": values[-1][1] if values else 0.0,
                "t_mb": [[t, v] for t, v in values[::step]],
            }
        return series
