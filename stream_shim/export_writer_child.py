"""The node's batched-export writer, run and kept alive by the shim (``export.mode: auto``).

With ``export.mode: auto`` (the default) the workflow exports directly when run by a
plain Snakemake (a replay), and the shim, which is long-lived, turns batched export on
for its own Snakemakes (`live_export_overrides`) and runs the node's writer
(``scripts/export_writer.py``) as a child: its export stages then only queue a request
in the spool, and the writer commits many detector-visits per registry transaction
(`workflow.repo.export_batch`), so 189 concurrent exports cost two connections rather
than 189 and never hold back an alert.

`ExportWriterChild` starts the writer, starts it again (with back-off) when it dies,
and at shutdown gives it time to commit what is pending before stopping it.  What it
did not commit stays in the spool for the next start (at least once; the writer is
idempotent).
"""

from __future__ import annotations

__all__ = ["ExportWriterChild", "adopt_orphaned_requests", "live_export_overrides", "wants_export_writer"]

import fcntl
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stream_shim.process_group import ChildRegistry, spawn, stop_group
from stream_shim.status import ShimStatus
from workflow.core.config import PROJECT_ROOT
from workflow.repo.export_batch import pending_requests
from workflow.stages.export import configured_export_mode

_log = logging.getLogger(__name__)

_OVERRIDE_FILE = "live-export.yaml"
_OVERRIDE_HEAD = "# Written by the stream shim: its Snakemakes queue exports.\nexport:\n  mode: batched\n"


def wants_export_writer(config: Mapping[str, Any], *, local_store: bool) -> bool:
    """Return whether the shim runs the writer: ``export.mode`` auto or batched, and a shared local spool.

    With S3 default storage (``profiles/k8s``) each Job's spool would be its own pod's
    disk, which no writer sees: those exports stay direct.
    """
    return local_store and configured_export_mode(config) in ("auto", "batched")


def live_export_overrides(state_dir: str | Path, spool: str | Path | None = None) -> Path:
    """Write (idempotently) and return the config file that turns batched export on.

    Parameters
    ----------
    state_dir : `str` or `pathlib.Path`
        Where the file goes (the shim's state directory).
    spool : `str` or `pathlib.Path`, optional
        A spool of this process's own (a pool worker's: each worker runs a writer, and
        two writers must not share a spool); default: ``export.spool_dir``.
    """
    text = _OVERRIDE_HEAD + (f"  spool_dir: {json.dumps(str(spool))}\n" if spool is not None else "")
    path = Path(state_dir) / _OVERRIDE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def adopt_orphaned_requests(state_dir: Path, spool: Path, spool_name: str = "export-spool") -> int:
    """Move the pending export requests of dead siblings' spools into ``spool``; return how many.

    Pool workers keep their spools under their own state directories
    (``<run>/workers/<pod>/export-spool``).  A worker killed with requests pending
    (their targets already done, their work items committed) would leave them to
    nobody: a starting worker takes them over.  A sibling is dead when its state
    directory's lock (`stream_shim.state_lock`) is free; the lock is held while its
    requests move, so it cannot start meanwhile.  Each request's files move before
    its request file, so an interrupted move is finished by the next adoption.

    Parameters
    ----------
    state_dir : `pathlib.Path`
        This process's state directory; its siblings are the other directories beside it.
    spool : `pathlib.Path`
        This process's spool.
    spool_name : `str`, optional
        The spool's directory name inside a sibling's state directory.
    """
    adopted = 0
    for sibling in sorted(p for p in state_dir.parent.iterdir() if p.is_dir() and p != state_dir):
        pending = sibling / spool_name / "pending"
        lock_path = sibling / "lock"
        if not pending.is_dir() or not lock_path.exists() or not any(pending.glob("*.json")):
            continue
        with open(lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # alive: its own writer drains it
            moved = 0
            for request in sorted(pending.glob("*.json")):
                files = sibling / spool_name / "files" / request.stem
                (spool / "files").mkdir(parents=True, exist_ok=True)
                (spool / "pending").mkdir(parents=True, exist_ok=True)
                if files.exists():
                    os.replace(files, spool / "files" / request.stem)
                os.replace(request, spool / "pending" / request.name)
                moved += 1
        adopted += moved
        _log.warning("took over %d pending export request(s) of the stopped %s", moved, sibling)
    return adopted


class ExportWriterChild(threading.Thread):
    """Run ``scripts/export_writer.py`` and keep it running until `stop`.

    Parameters
    ----------
    configfiles : `~collections.abc.Sequence` [`pathlib.Path`]
        The instrument's config file, then the extra files (the same list as the
        shim's Snakemakes get, batched override included).
    workdir : `pathlib.Path`
        Run directory (the spool path in the config is relative to it).
    spool : `pathlib.Path`
        The spool, absolute, to see what is still pending at shutdown.
    log_path : `pathlib.Path`
        The writer's log (appended).
    registry : `stream_shim.process_group.ChildRegistry`
        Records the writer's process group, so a restarted shim kills a leftover one.
    status : `stream_shim.status.ShimStatus`
        Counts ``export_writer`` ``started``/``exited``/``stopped``.
    env : `dict`, optional
        The writer's environment.
    """

    def __init__(
        self,
        configfiles: Sequence[Path],
        *,
        workdir: Path,
        spool: Path,
        log_path: Path,
        registry: ChildRegistry,
        status: ShimStatus,
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(name="export-writer", daemon=True)
        self.configfiles = list(configfiles)
        self.workdir, self.spool, self.log_path = workdir, spool, log_path
        self.registry, self.status, self.env = registry, status, env
        self._stop_requested = threading.Event()
        self._grace_s = 0.0
        self._proc: subprocess.Popen[Any] | None = None

    def command(self) -> list[str]:
        """Return the writer's command line."""
        first, *extra = self.configfiles
        args = [sys.executable, str(PROJECT_ROOT / "scripts" / "export_writer.py"), "--config-file", str(first)]
        for path in extra:
            args += ["--extra-config", str(path)]
        return args

    def run(self) -> None:  # noqa: D102 - threading.Thread's
        backoff = 1.0
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        while not self._stop_requested.is_set():
            started = time.monotonic()
            with open(self.log_path, "a") as log:
                # Started from this thread: the death signal follows it (see `spawn`).
                self._proc = proc = spawn(
                    self.command(), registry=self.registry, cwd=self.workdir, env=self.env, stdout=log
                )
            self.status.count("export_writer", "started")
            _log.info("export writer started (pid %d), log %s", proc.pid, self.log_path)
            while proc.poll() is None and not self._stop_requested.wait(0.5):
                pass
            if self._stop_requested.is_set():
                self._wait_for_spool(self._grace_s)
                how = stop_group(proc, wait_s=0.0, term_wait_s=15.0, registry=self.registry)
                self.status.count("export_writer", "stopped")
                _log.info("export writer stopped (%s); %d request(s) left pending", how, self.pending())
                return
            self.registry.remove(proc.pid)
            self.status.count("export_writer", "exited")
            backoff = 1.0 if time.monotonic() - started > 60.0 else min(30.0, backoff * 2)
            _log.error(
                "export writer exited with status %s (log %s); starting it again in %.0f s",
                proc.returncode,
                self.log_path,
                backoff,
            )
            self._stop_requested.wait(backoff)

    def pending(self) -> int:
        """Return how many export requests wait in the spool."""
        return len(pending_requests(self.spool))

    def _wait_for_spool(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        while self.pending() and time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                return
            time.sleep(0.25)

    def stop(self, grace_s: float = 30.0, join_s: float = 60.0) -> None:
        """Let the writer commit what is pending (at most ``grace_s``), then stop it."""
        self._grace_s = grace_s
        self._stop_requested.set()
        self.join(timeout=grace_s + join_s)
