"""Run one stage of a detector-visit target through the node's warm stage server.

Rules call ``python -S workflow/stage_client.py STAGE CONFIG_JSON LOG -- ARGS...``
(``python -m workflow.stage_client`` works too).
Starting Python and importing the Butler, the APDB and the science stack costs
seconds per job, more than most stages take (see scripts/bench_workflow.py), so
the stages run in a child forked from a server that has imported them once
(`workflow.stage_server`).  This client imports only the standard library: it
starts the server if none is listening (one per checkout, Python and code
version), sends the request with its working directory and environment, and exits
with the stage's exit code.  If no server can be reached it runs the stage itself.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

_START_TIMEOUT_S = 60.0
CLIENT_SCRIPT = str(Path(__file__).resolve())
"""This file, as rules run it (``python -S CLIENT_SCRIPT ...``: no site-packages needed)."""
PACKAGE_DIR = Path(CLIENT_SCRIPT).parent


def socket_path() -> Path:
    """Return the socket of the server for this Python and this version of the code."""
    newest = max(p.stat().st_mtime_ns for p in PACKAGE_DIR.glob("*.py"))
    key = f"{sys.executable}|{PACKAGE_DIR}|{newest}".encode()
    return Path("/tmp") / f"prompt-snake-{os.getuid()}-{hashlib.sha256(key).hexdigest()[:12]}.sock"


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def _connect_or_start(path: Path) -> socket.socket | None:
    sock = _connect(path)
    if sock is not None:
        return sock
    with open(f"{path}.lock", "a") as lock:  # one starter at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        sock = _connect(path)
        if sock is not None:
            return sock
        with open(f"{path}.log", "a") as log:
            subprocess.Popen([sys.executable, "-m", "workflow.stage_server", str(path)], stdin=subprocess.DEVNULL,
                             stdout=log, stderr=log, start_new_session=True, close_fds=True)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            sock = _connect(path)
            if sock is not None:
                return sock
            time.sleep(0.05)
    return None


def _run_locally(request: dict) -> int:
    if str(PACKAGE_DIR.parent) not in sys.path:  # started as a script, maybe without site-packages
        sys.path.insert(0, str(PACKAGE_DIR.parent))
        import site

        site.main()
    from workflow.stage_server import run_request

    return run_request(request)


def main(argv: list[str]) -> int:
    """Send one stage request; return the stage's exit code."""
    if len(argv) < 4 or argv[3] != "--":
        print("usage: python -m workflow.stage_client STAGE CONFIG_JSON LOG -- ARGS...", file=sys.stderr)
        return 2
    request = {"stage": argv[0], "config": os.path.abspath(argv[1]), "log": os.path.abspath(argv[2]),
               "args": argv[4:], "cwd": os.getcwd(), "env": dict(os.environ)}
    for _ in range(3):
        sock = _connect_or_start(socket_path())
        if sock is None:
            return _run_locally(request)
        with sock, sock.makefile("rwb") as stream:
            stream.write(json.dumps(request).encode() + b"\n")
            stream.flush()
            reply = stream.readline()
        if reply:
            return int(json.loads(reply)["returncode"])
        # No reply: the server was shutting down (idle) and never read the request,
        # or it died; a server that forked a stage always answers.  Try a new one.
        time.sleep(0.1)
    print(f"stage server {socket_path()} did not answer the {argv[0]} request", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
