"""Snakemake children of the shim: start them in their own process group, stop them for sure.

Snakemake can deadlock when SIGINT or SIGTERM arrives while it selects jobs, so
stopping one is: wait for it (bounded), then SIGTERM to its process group, wait
(bounded), then SIGKILL to the group, and wait until every member is gone.

Each child runs in a new session (its pid is its group id, which its jobs
inherit) and dies with the shim (``PR_SET_PDEATHSIG``).  Its jobs do not: after
a shim crash they may still run.  `ChildRegistry` records every group started
in a file, so the next shim kills such leftovers before submitting anything —
otherwise an old job and its rerun could run one target at the same time.
"""

from __future__ import annotations

__all__ = [
    "ChildRegistry",
    "spawn",
    "stop_group",
    "signal_group",
    "group_members",
    "process_start_time",
    "process_start_ticks",
]

import ctypes
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import psutil

_log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def process_start_time(pid: int) -> float | None:
    """Return when a live process started (seconds since the epoch, `psutil`), or `None` if it is gone.

    A zombie counts as gone: it runs nothing and only waits to be reaped.
    """
    try:
        process = psutil.Process(pid)
        if process.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return None
        return process.create_time()
    except psutil.Error:  # NoSuchProcess, AccessDenied, ZombieProcess
        return None


process_start_ticks = process_start_time
"""Former name of `process_start_time` (kept for callers of the /proc-parsing version)."""


def group_members(pgid: int) -> set[int]:
    """Return the live (non-zombie) processes whose process group is ``pgid``."""
    members = set()
    for process in psutil.process_iter():
        try:
            if process.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD) and os.getpgid(process.pid) == pgid:
                members.add(process.pid)
        except (psutil.Error, ProcessLookupError):
            continue
    return members


def _die_with_parent() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the shim died before prctl took effect
            os._exit(1)

    return preexec


class ChildRegistry:
    """The process groups started by the shim, in a JSON file.

    Parameters
    ----------
    path : `str` or `pathlib.Path`
        The registry file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def _load(self) -> dict[str, float | None]:
        try:
            return {str(k): v for k, v in json.loads(self.path.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def _save(self, groups: dict[str, float | None]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(groups))
        os.replace(tmp, self.path)

    def add(self, pid: int) -> None:
        """Record a new process group (its leader's pid and start time)."""
        with self._lock:
            groups = self._load()
            groups[str(pid)] = process_start_time(pid)
            self._save(groups)

    def remove(self, pid: int) -> None:
        """Forget a process group whose members are all gone."""
        with self._lock:
            groups = self._load()
            groups.pop(str(pid), None)
            self._save(groups)

    def kill_leftovers(self, timeout_s: float = 10.0) -> int:
        """SIGKILL every member of every recorded group; return how many processes were killed.

        A recorded leader that is alive with another start time is a reused pid:
        it is left alone (its group's other members still die: the group id
        cannot be reused while they live).
        """
        with self._lock:
            groups = self._load()
            victims: set[int] = set()
            for text, started in groups.items():
                pid = int(text)
                members = group_members(pid)
                leader_started = process_start_time(pid)
                if pid in members and started is not None and leader_started != started:
                    members.discard(pid)
                victims |= members
            for pid in victims:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _wait_gone(victims, timeout_s)
            self._save({})
        if victims:
            _log.warning("killed %d leftover process(es) of a previous shim run: %s", len(victims), sorted(victims))
        return len(victims)


def _wait_gone(pids: set[int], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while any(process_start_time(p) is not None for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def spawn(
    args: Sequence[str],
    *,
    registry: ChildRegistry | None,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    stdin: int | IO[Any] | None = subprocess.DEVNULL,
    stdout: int | IO[Any] | None = None,
    text: bool = False,
) -> subprocess.Popen[Any]:
    """Start ``args`` in a new session that dies with this process; record its group.

    Call it from a thread that lives as long as the child should: the death
    signal follows the thread that started the child.
    """
    proc = subprocess.Popen(
        list(args),
        cwd=cwd,
        env=env,
        stdin=stdin,
        stdout=stdout,
        stderr=subprocess.STDOUT if stdout is not None else None,
        text=text,
        start_new_session=True,
        preexec_fn=_die_with_parent(),
    )
    if registry is not None:
        registry.add(proc.pid)
    return proc


def stop_group(
    proc: subprocess.Popen[Any], *, wait_s: float, term_wait_s: float = 5.0, registry: ChildRegistry | None = None
) -> str:
    """Stop a child started by `spawn`, escalating; return how it ended.

    Parameters
    ----------
    proc : `subprocess.Popen`
        The child (leader of its process group).
    wait_s : `float`
        How long to let it finish by itself.
    term_wait_s : `float`
        After SIGTERM to the group, how long before SIGKILL.
    registry : `ChildRegistry`, optional
        Forget the group there once every member is gone.

    Returns
    -------
    how : `str`
        ``exited``, ``terminated`` or ``killed``.
    """
    how = "exited"
    try:
        proc.wait(timeout=max(wait_s, 0.0))
    except subprocess.TimeoutExpired:
        how = "terminated"
        signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=term_wait_s)
        except subprocess.TimeoutExpired:
            how = "killed"
    # The leader is gone (or stuck): whatever is left of the group gets SIGKILL.
    leftovers = group_members(proc.pid)
    if leftovers or how == "killed":
        if how == "exited" and leftovers:
            how = "exited (group killed)"
        signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        _wait_gone(leftovers, 10.0)
    if registry is not None:
        registry.remove(proc.pid)
    return how


def signal_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to a process group, if it still exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
