"""The shim's batched-export writer child: turned on by config, kept alive, drained at shutdown.

The real writer committing a live night's requests is covered end to end by
tests/test_shim_e2e.py; here the child runs small stand-in writers so that its own
behaviour (restart with back-off, grace for what is pending, no process left) is seen.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from stream_shim.export_writer_child import ExportWriterChild, live_export_overrides, wants_export_writer
from stream_shim.process_group import ChildRegistry, group_members
from stream_shim.status import ShimStatus
from workflow.core.config import instrument_config_path, load_config
from workflow.stages.export import export_mode, spool_dir

# Moves each pending request to done/ after a second: a writer that commits slowly.
_SLOW_WRITER = """
import pathlib, sys, time
spool = pathlib.Path(sys.argv[1])
(spool / "done").mkdir(parents=True, exist_ok=True)
while True:
    time.sleep(1.0)
    for path in sorted((spool / "pending").glob("*.json")):
        path.rename(spool / "done" / path.name)
"""


class _StandIn(ExportWriterChild):
    """The child with a stand-in writer command (first ``crashes`` starts exit at once)."""

    def __init__(self, *args: object, script: str, crashes: int = 0, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.script, self.crashes, self.commands = script, crashes, 0

    def command(self) -> list[str]:
        self.commands += 1
        if self.commands <= self.crashes:
            return [sys.executable, "-c", "import sys; sys.exit(3)"]
        return [sys.executable, "-c", self.script, str(self.spool)]


def _child(tmp_path: Path, **kwargs: object) -> tuple[_StandIn, ShimStatus]:
    status = ShimStatus("LSSTComCamSim", "streaming")
    child = _StandIn(
        [Path(instrument_config_path("LSSTComCamSim"))],
        workdir=tmp_path,
        spool=tmp_path / "spool",
        log_path=tmp_path / "logs" / "export-writer.log",
        registry=ChildRegistry(tmp_path / "children.json"),
        status=status,
        **kwargs,
    )
    return child, status


def test_the_override_turns_batched_export_on_with_its_own_spool(tmp_path):
    instrument_file = instrument_config_path("LSSTComCamSim")
    plain = load_config(instrument_file)
    assert export_mode(plain) == "direct"  # a replay's plain Snakemake exports directly
    layered = load_config(instrument_file, extra_files=[live_export_overrides(tmp_path)])
    assert export_mode(layered) == "batched" and spool_dir(layered) == spool_dir(plain)
    own = tmp_path / "worker one" / "export-spool"
    worker = load_config(instrument_file, extra_files=[live_export_overrides(tmp_path / "w", own)])
    assert export_mode(worker) == "batched" and spool_dir(worker) == own
    # Rewriting with the same content leaves the file alone; another spool rewrites it.
    path = live_export_overrides(tmp_path / "w", own)
    before = path.stat().st_mtime_ns
    assert live_export_overrides(tmp_path / "w", own).stat().st_mtime_ns == before
    assert "other" in live_export_overrides(tmp_path / "w", tmp_path / "other").read_text()


def test_only_auto_or_batched_on_a_local_spool_wants_the_writer():
    assert wants_export_writer({"export": {}}, local_store=True)  # auto, the default
    assert wants_export_writer({"export": {"mode": "batched"}}, local_store=True)
    assert not wants_export_writer({"export": {"mode": "direct"}}, local_store=True)
    assert not wants_export_writer({"export": {"mode": "auto"}}, local_store=False)  # S3: pods' own disks


def test_a_dying_writer_is_started_again_and_the_pending_requests_get_committed_before_the_stop(tmp_path):
    pending = tmp_path / "spool" / "pending"
    pending.mkdir(parents=True)
    child, status = _child(tmp_path, script=_SLOW_WRITER, crashes=1)
    child.start()
    deadline = time.monotonic() + 20.0
    while status.counts("export_writer").get("started", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status.counts("export_writer") == {"started": 2, "exited": 1}
    for name in ("a", "b", "c"):
        (pending / f"{name}.json").write_text("{}")
    pgid = child._proc.pid if child._proc is not None else -1
    child.stop(grace_s=15.0)
    assert not child.is_alive()
    assert sorted(p.name for p in (tmp_path / "spool" / "done").iterdir()) == ["a.json", "b.json", "c.json"]
    assert status.counts("export_writer")["stopped"] == 1
    assert not group_members(pgid)
    assert child.registry._load() == {}


def test_the_stop_is_bounded_when_the_writer_cannot_commit(tmp_path):
    pending = tmp_path / "spool" / "pending"
    pending.mkdir(parents=True)
    (pending / "stuck.json").write_text("{}")
    child, status = _child(tmp_path, script="import time\nwhile True: time.sleep(1)")
    child.start()
    deadline = time.monotonic() + 20.0
    while child._proc is None and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = child._proc.pid if child._proc is not None else -1
    child.stop(grace_s=1.0, join_s=30.0)
    assert not child.is_alive()  # grace over: stopped although a request is pending
    assert (pending / "stuck.json").exists()  # left for the next start: at least once
    assert status.counts("export_writer")["stopped"] == 1
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        pass
    else:
        raise AssertionError(f"writer {pid} still running")


def test_a_starting_worker_takes_over_the_requests_a_dead_sibling_left_pending(tmp_path):
    from stream_shim.export_writer_child import adopt_orphaned_requests
    from stream_shim.state_lock import take_state_lock

    workers = tmp_path / "workers"
    me, dead, alive = workers / "w-new", workers / "w-dead", workers / "w-alive"
    for sibling, rid in ((dead, "r1"), (alive, "r2")):
        (sibling / "export-spool" / "pending").mkdir(parents=True)
        (sibling / "export-spool" / "files" / rid).mkdir(parents=True)
        (sibling / "export-spool" / "files" / rid / "calexp.fits").write_bytes(b"pixels")
        (sibling / "export-spool" / "pending" / f"{rid}.json").write_text("{}")
    take_state_lock(dead, "worker").close()  # ran once, then died: its lock file exists, nobody holds it
    held = take_state_lock(alive, "worker")
    try:
        own = me / "export-spool"
        assert adopt_orphaned_requests(me, own) == 1
        assert (own / "pending" / "r1.json").exists()
        assert (own / "files" / "r1" / "calexp.fits").read_bytes() == b"pixels"
        assert not list((dead / "export-spool" / "pending").iterdir())
        # The live sibling keeps its own; a second look adopts nothing more.
        assert (alive / "export-spool" / "pending" / "r2.json").exists()
        assert adopt_orphaned_requests(me, own) == 0
    finally:
        held.close()
