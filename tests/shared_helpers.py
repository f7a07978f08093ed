"""Small helpers several test modules share (imported as a top-level module, like `fake_k8s`)."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from workflow.core.config import PROJECT_ROOT


def copy_workflow(dest: Path) -> Path:
    """Copy the real workflow sources (Snakefile, rules/, scripts/, config/, envs/: what Snakemake ships to pods)."""
    dest.mkdir(parents=True)
    shutil.copy2(PROJECT_ROOT / "Snakefile", dest / "Snakefile")
    for name in ("rules", "scripts", "config", "envs"):
        shutil.copytree(PROJECT_ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll ``predicate`` every 0.05 s; return whether it became true within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def queue_runner_command(snakefile: Path, directory: Path, *, cores: int = 2, extra: Sequence[str] = ()) -> list[str]:
    """The streaming backend's command for a stand-in Snakefile: `stream_shim.queue_runner` with the shim's flags."""
    return [
        sys.executable,
        "-m",
        "stream_shim.queue_runner",
        "--snakefile",
        str(snakefile),
        "--cores",
        str(cores),
        "--queue-input-wait-time",
        "1",
        "--nolock",
        *extra,
        "--keep-going",
        "--directory",
        str(directory),
    ]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def filer_create_event(name: str, parent: str, size: int = 10, mtime: int = 1) -> bytes:
    """A SeaweedFS filer ``EventNotification`` (protobuf) of a new file ``parent/name``, no old entry."""
    attributes = _varint(1 << 3) + _varint(size) + _varint(2 << 3) + _varint(mtime)
    entry = _len_field(1, name.encode()) + _len_field(4, attributes)
    return _len_field(2, entry) + _len_field(4, parent.encode())
