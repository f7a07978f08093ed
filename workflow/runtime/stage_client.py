"""Run one stage of a detector-visit target through the node's warm stage server.

Rules call ``python -S workflow/runtime/stage_client.py STAGE --config C --log L --NAME VALUE...``
(``python -m workflow.runtime.stage_client`` works too): every input and output goes by
the rule's own name for it, and the stage's ``run`` takes it as a keyword argument.
Starting Python and importing the Butler, the APDB and the science stack costs
seconds per job, more than most stages take (see scripts/bench_workflow.py), so
the stages run in a child forked from a server that has imported them once
(`workflow.runtime.stage_server`).  This client imports only the standard library: it
starts the server if none is listening (one per checkout, Python and code
version), sends the request with its working directory and the part of its
environment a stage reads (`stage_environment`), and exits with the stage's exit
code.  If no server can be reached it runs the stage itself.

The socket is in a directory private to this user and the client talks only to a
server of its own uid (`workflow.runtime.stage_socket`); if either check fails it
sends nothing and runs the stage itself.  A stage never runs twice for one
request: the server acknowledges a request (by its ``id``) before it forks the
stage, and the client tries another server only when no acknowledgement came; an
acknowledged request whose exit code never arrives is reported as failed.
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
from collections.abc import Mapping
from pathlib import Path

CLIENT_SCRIPT = str(Path(__file__).resolve())
"""This file, as rules run it (``python -S CLIENT_SCRIPT ...``: no site-packages needed)."""
PACKAGE_DIR = Path(CLIENT_SCRIPT).parents[1]
"""The ``workflow`` package; every module of every wing counts for the code version."""

if str(PACKAGE_DIR.parent) not in sys.path:  # run as a script: make the package importable
    sys.path.insert(1, str(PACKAGE_DIR.parent))

from workflow.runtime.stage_socket import (  # noqa: E402 - after the path
    UnsafeSocketError,
    check_peer,
    private_dir,
    runtime_dir,
)

_START_TIMEOUT_S = 60.0
SOCKET_ENV = "PROMPT_SNAKE_STAGE_SOCKET"
"""Names the server's socket instead of the derived one (its directory must be private too)."""

ENV_NAMES = frozenset(
    {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TMP", "TEMP"}
    | {"SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"}
)
"""Environment variables a stage gets by name (`stage_environment`)."""
ENV_PREFIXES = (
    "LC_",  # locale
    "OMP_",  # threads: OMP_NUM_THREADS (Snakemake's job threads), the BLAS pools
    "OPENBLAS_",
    "MKL_",
    "NUMEXPR_",
    "NUMBA_",
    "SNAKEMAKE_",
    "PROMPT_SNAKE_",  # e.g. PROMPT_SNAKE_ARRIVALS_DIR (workflow.core.arrivals)
    "AWS_",  # S3 credentials, region, endpoint (boto3, lsst.resources)
    "S3_",  # S3_ENDPOINT_URL (lsst.resources)
    "PG",  # libpq: PGPASSWORD, PGHOST, PGPASSFILE, ...
    "LSST_",  # LSST_DB_AUTH(_CREDENTIALS) for db-auth.yaml, LSST_RESOURCES_*, LSST_HTTP_*
    "DAF_BUTLER_",  # the Butler's cache and plugins
    "DAX_APDB_",
    "KAFKA_",
)
"""Environment variable prefixes a stage gets (`stage_environment`)."""


def stage_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """Return the variables of ``environ`` that a stage reads: `ENV_NAMES` and `ENV_PREFIXES`.

    Parameters
    ----------
    environ : `~collections.abc.Mapping`
        The job's environment.

    Returns
    -------
    env : `dict`
        What the stage runs with; anything else (other services' tokens, the
        shell's history settings, ...) never leaves this process.
    """
    return {k: v for k, v in environ.items() if k in ENV_NAMES or k.startswith(ENV_PREFIXES)}


def socket_path() -> Path:
    """Return the socket of the server for this Python and this version of the code (or `SOCKET_ENV`).

    Raises
    ------
    workflow.runtime.stage_socket.UnsafeSocketError
        If the socket's directory is not private (`workflow.runtime.stage_socket.runtime_dir`).
    """
    if override := os.environ.get(SOCKET_ENV):
        path = Path(override).absolute()
        private_dir(path.parent)
        return path
    newest = max(p.stat().st_mtime_ns for p in PACKAGE_DIR.rglob("*.py"))
    key = f"{sys.executable}|{PACKAGE_DIR}|{newest}".encode()
    return runtime_dir() / f"{hashlib.sha256(key).hexdigest()[:12]}.sock"


def _connect(path: Path) -> socket.socket | None:
    """Connect to the server at ``path``; `None` if nobody listens.

    Raises
    ------
    workflow.runtime.stage_socket.UnsafeSocketError
        If the listening process is not of this uid (the socket is closed, nothing sent).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    try:
        check_peer(sock, f"stage server {path}")
    except UnsafeSocketError:
        sock.close()
        raise
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
            subprocess.Popen(
                [sys.executable, "-m", "workflow.runtime.stage_server", str(path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
            )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            sock = _connect(path)
            if sock is not None:
                return sock
            time.sleep(0.05)
    return None


def _run_locally(request: dict) -> int:
    if sys.flags.no_site:  # started as ``python -S``: the stages need site-packages
        import site

        site.main()
    from workflow.runtime.stage_server import run_request

    return run_request(request)


USAGE = "usage: python -m workflow.runtime.stage_client STAGE --config C --log L [--NAME VALUE...]..."


def parse_arguments(argv: list[str]) -> tuple[str, dict[str, list[str]]]:
    """Split ``STAGE --name v [v...] --other w`` into the stage and its named values.

    Raises
    ------
    ValueError
        No stage, a value before any name, or no ``--config`` / ``--log``.
    """
    if not argv or argv[0].startswith("--"):
        raise ValueError("no stage named")
    named: dict[str, list[str]] = {}
    current: list[str] | None = None
    for word in argv[1:]:
        if word.startswith("--") and len(word) > 2:
            current = named.setdefault(word[2:], [])
        elif current is None:
            raise ValueError(f"value {word!r} before any --name")
        else:
            current.append(word)
    for required in ("config", "log"):
        if len(named.get(required, [])) != 1:
            raise ValueError(f"--{required} needs exactly one value")
    return argv[0], named


def _exchange(sock: socket.socket, request: dict) -> tuple[bool, dict | None]:
    """Send ``request``; return whether the server acknowledged it, and its reply (`None` if none came)."""
    with sock, sock.makefile("rwb") as stream:
        try:
            stream.write(json.dumps(request).encode() + b"\n")
            stream.flush()
            ack = stream.readline()
        except OSError:  # reset: a server closing (idle) dropped its queued connections
            return False, None
        if not ack or json.loads(ack).get("accepted") != request["id"]:
            return False, None
        try:
            reply = stream.readline()
        except OSError:
            reply = b""
    return True, (json.loads(reply) if reply else None)


def main(argv: list[str]) -> int:
    """Send one stage request; return the stage's exit code."""
    try:
        stage, named = parse_arguments(argv)
    except ValueError as exc:
        print(f"stage client: {exc}\n{USAGE}", file=sys.stderr)
        return 2
    config, log = named.pop("config")[0], named.pop("log")[0]
    request = {
        "id": os.urandom(8).hex(),
        "stage": stage,
        "config": os.path.abspath(config),
        "log": os.path.abspath(log),
        "args": named,
        "cwd": os.getcwd(),
        "env": stage_environment(os.environ),
    }
    try:
        path = socket_path()
        for _ in range(3):
            sock = _connect_or_start(path)
            if sock is None:
                return _run_locally(request)
            accepted, reply = _exchange(sock, request)
            if reply is not None:
                return int(reply["returncode"])
            if accepted:  # the stage may have run, or be running: never send it again
                print(
                    f"stage client: stage server {path} accepted the {stage} request {request['id']} "
                    "but no exit code came back (server and stage gone); not running it again",
                    file=sys.stderr,
                )
                return 1
            # Not acknowledged: the server was shutting down (idle) or died before it
            # read the request, so no stage was forked for it.  Try a new one.
            time.sleep(0.1)
    except UnsafeSocketError as exc:
        print(f"stage client: {exc}; running the {stage} stage in this process", file=sys.stderr)
        return _run_locally(request)
    print(f"stage server {path} did not accept the {stage} request", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
