"""The warm stage server: imports the stages once, forks a child per request.

Started on demand by `workflow.stage_client` (one per checkout and code version),
it listens on a UNIX socket; for each request it forks a child that takes the
client's working directory and environment, sends its output to the rule's log
file and runs the stage (`workflow.stages`); the exit code goes back to the
client.  The loop is single-threaded (forking a threaded process is unsafe), a
child whose client disconnects is killed, and the server exits after an idle
period, so nothing lingers after a run.
"""

from __future__ import annotations

__all__ = ["STAGES", "limit_threads", "run_request", "serve"]

import json
import logging
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from threadpoolctl import threadpool_limits  # imported once in the server, not in every forked stage

_log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 30.0


def _stages() -> dict[str, Callable[[list[str], dict, str], Any]]:
    from . import stages as s

    return {
        "prep": lambda a, c, log: s.run_prep(a[0], a[1], c, log),
        "ingest": lambda a, c, log: s.run_ingest(a[0], a[1], c, log),
        "pipeline": lambda a, c, log: s.run_pipeline(a[0], a[1], a[2], a[3], c, log),
        "export": lambda a, c, log: s.run_export(a[0], a[1], a[2], a[3], c, log),
        "apdb": lambda a, c, log: s.run_apdb(a[0], a[1], a[2], a[3], c, log),
        "finish": lambda a, c, log: s.run_finish(a[0], a[2:], a[1], c, log),
    }


STAGES = ("prep", "ingest", "pipeline", "export", "apdb", "finish")
"""Stage names a request may name; arguments in each rule's order (see rules/)."""


def limit_threads(env: dict[str, str]) -> int | None:
    """Hold the numeric libraries' thread pools to the job's ``OMP_NUM_THREADS``; return the limit set.

    Snakemake puts a job's ``threads`` into ``OMP_NUM_THREADS``, but a forked
    child's OpenBLAS pool was sized when the server imported numpy (one thread per
    core): two single-threaded jobs on two cores would run four BLAS threads.
    ``0`` (a job holding no core, like ingest waiting for raws) counts as 1.
    """
    threads = env.get("OMP_NUM_THREADS", "")
    if not threads.isdigit():
        return None
    limit = max(1, int(threads))
    threadpool_limits(limit)
    return limit


def run_request(request: dict) -> int:
    """Run one stage request in this process; return 0 or 1 (the error is in the log)."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    limit_threads(request["env"])
    Path(request["log"]).parent.mkdir(parents=True, exist_ok=True)
    with open(request["log"], "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        with open(request["config"]) as stream:
            config = json.load(stream)
        _stages()[request["stage"]](request["args"], config, request["log"])
    except BaseException:  # noqa: BLE001 - the stage recorded it; the exit code tells Snakemake
        logging.getLogger(__name__).exception("stage %s failed", request.get("stage"))
        return 1
    return 0


def _child(request: dict, server: socket.socket) -> None:
    server.close()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    code = 1
    try:
        code = run_request(request)
    finally:
        logging.shutdown()
        os._exit(code)


def _watch_child(selector: selectors.BaseSelector, pid: int) -> int | None:
    """Make ``selector`` wake up when child ``pid`` exits (Linux pidfd); return the fd, if any."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd here: the loop's short timeout polls instead
        return None
    selector.register(pidfd, selectors.EVENT_READ, ("exited", pid))
    return pidfd


def serve(path: str, idle_timeout_s: float = IDLE_TIMEOUT_S) -> None:
    """Listen on ``path`` until idle for ``idle_timeout_s``; fork a child per request.

    A child's exit wakes the loop through its pidfd, so the client hears the exit
    code at once: polling here cost up to 0.1 s per job, about a tenth of a small
    detector-visit's whole run time.
    """
    _stages()  # import the stack once, before any fork
    from . import apdb_load, export, ingest, prep, science_run  # noqa: F401 - warm imports

    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ)
    children: dict[int, tuple[socket.socket, int | None]] = {}  # pid -> (client, pidfd)
    last_active = time.monotonic()
    try:
        while children or time.monotonic() - last_active < idle_timeout_s:
            polling = any(pidfd is None for _, pidfd in children.values())
            for key, _ in selector.select(timeout=0.1 if polling or not children else 1.0):
                if key.fileobj is server:
                    conn, _ = server.accept()
                    line = conn.makefile("rb").readline()
                    pid = os.fork()
                    if pid == 0:
                        _child(json.loads(line), server)
                    children[pid] = (conn, _watch_child(selector, pid))
                    selector.register(conn, selectors.EVENT_READ, ("client", pid))
                elif key.data[0] == "client":  # the client went away (or sent more): stop its child
                    if not key.fileobj.recv(1, socket.MSG_PEEK):
                        os.kill(key.data[1], signal.SIGKILL)
            for pid, (conn, pidfd) in list(children.items()):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    code = os.waitstatus_to_exitcode(status)
                    try:
                        conn.sendall(json.dumps({"returncode": code}).encode() + b"\n")
                    except OSError:
                        pass
                    selector.unregister(conn)
                    conn.close()
                    if pidfd is not None:
                        selector.unregister(pidfd)
                        os.close(pidfd)
                    del children[pid]
                    last_active = time.monotonic()
    finally:
        server.close()
        if os.path.exists(path):
            os.unlink(path)


if __name__ == "__main__":
    serve(sys.argv[1])
