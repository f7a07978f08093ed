"""The warm stage server: imports the stages once, forks a child per request.

Started on demand by `workflow.runtime.stage_client` (one per checkout and code version),
it listens on a UNIX socket in a directory private to its user
(`workflow.runtime.stage_socket`) and serves only clients of its own uid.  For each
request it sends an acknowledgement naming the request's ``id`` and then forks a
child that takes the client's working directory and environment, sends its output
to the rule's log file and runs the stage (`workflow.stages.finish`).  The child
itself writes the exit code back to the client, so a stage whose server is killed
still reports (and the client, having had the acknowledgement, never sends the
request again); the server also writes it when the child is reaped, for a child
that died before it could.  The loop is single-threaded (forking a threaded
process is unsafe), a child whose client disconnects is killed, and the server
exits after an idle period, so nothing lingers after a run.
"""

from __future__ import annotations

__all__ = ["StageArgumentError", "limit_threads", "run_request", "serve", "stage_function", "stage_kwargs"]

import importlib
import inspect
import json
import logging
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from threadpoolctl import threadpool_limits  # imported once in the server, not in every forked stage

from workflow.runtime.stage_socket import UnsafeSocketError, check_peer, private_dir

_log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 30.0


class StageArgumentError(TypeError):
    """A stage request names a stage, or arguments, that the stage table does not have."""


def stage_function(stage: str) -> Callable[..., Any]:
    """Return ``workflow.stages.<stage>.run`` for a stage of the table `workflow.stages.STAGES`."""
    from workflow.stages import STAGES

    if stage not in STAGES:
        raise StageArgumentError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    return importlib.import_module(f"workflow.stages.{stage}").run


def stage_kwargs(stage: str, args: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Match a request's named arguments to the stage's ``run`` parameters.

    A parameter annotated as a sequence takes every value given for it; any other
    takes exactly one.  A missing, unknown or repeated name raises
    `StageArgumentError` naming the stage and what it expects, so a rule whose
    input was renamed fails at once instead of handing a stage the wrong file.
    """
    params = {
        name: p
        for name, p in inspect.signature(stage_function(stage)).parameters.items()
        if name not in ("config", "log")
    }
    expected = ", ".join(f"--{name}" for name in params)
    unknown = sorted(set(args) - set(params))
    if unknown:
        raise StageArgumentError(
            f"stage {stage}: unknown argument(s) {', '.join('--' + u for u in unknown)}; it takes {expected}"
        )
    kwargs: dict[str, Any] = {}
    for name, param in params.items():
        values = list(args.get(name, []))
        many = "Sequence" in str(param.annotation) or "list" in str(param.annotation)
        if name not in args:
            if param.default is inspect.Parameter.empty:
                raise StageArgumentError(f"stage {stage}: missing argument --{name}; it takes {expected}")
            continue
        if not many and len(values) != 1:
            raise StageArgumentError(f"stage {stage}: --{name} takes one value, got {len(values)}")
        kwargs[name] = values if many else values[0]
    return kwargs


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
        run = stage_function(request["stage"])
        run(**stage_kwargs(request["stage"], request["args"]), config=config, log=request["log"])
    except BaseException:  # noqa: BLE001 - the stage recorded it; the exit code tells Snakemake
        logging.getLogger(__name__).exception("stage %s failed", request.get("stage"))
        return 1
    return 0


def _send(conn: socket.socket, message: Mapping[str, Any]) -> None:
    """Write one JSON line to a client; a client that has gone is no error."""
    try:
        conn.sendall(json.dumps(message).encode() + b"\n")
    except OSError:
        pass


def _child(request: dict, conn: socket.socket, inherited: Sequence[Any]) -> None:
    """Run ``request`` in this forked child, write its exit code to ``conn`` and exit."""
    for resource in inherited:  # the server's socket and selector, the other requests' connections and pidfds
        if isinstance(resource, int):
            os.close(resource)
        else:
            resource.close()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    code = 1
    try:
        code = run_request(request)
    finally:
        logging.shutdown()
        _send(conn, {"returncode": code})
        os._exit(code)


def _read_request(conn: socket.socket) -> dict | None:
    """Read one request from a just-accepted client of this uid; `None` (connection closed) if there is none.

    A connection that only probes (connects and closes), sends no valid request
    line within 10 s, or comes from another uid gets no acknowledgement.
    """
    try:
        check_peer(conn, "stage client")
        conn.settimeout(10.0)
        with conn.makefile("rb") as stream:
            line = stream.readline()
        conn.settimeout(None)
        request = json.loads(line) if line else None
    except (UnsafeSocketError, OSError, ValueError) as exc:
        _log.warning("stage server: request refused: %s", exc)
        request = None
    if not isinstance(request, dict) or "id" not in request:
        conn.close()
        return None
    return request


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
    from workflow.stages import STAGES

    for name in STAGES:  # import the whole stack once, before any fork
        stage_function(name)

    private_dir(Path(path).parent)  # refuses a directory that another user could reach
    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, 0o600)
    inode = os.stat(path).st_ino
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
                    request = _read_request(conn)
                    if request is None:
                        continue
                    _send(conn, {"accepted": request["id"]})  # before the fork: from here on, never resent
                    inherited = [
                        server,
                        selector,
                        *(r for c, fd in children.values() for r in (c, fd) if r is not None),
                    ]
                    pid = os.fork()
                    if pid == 0:
                        _child(request, conn, inherited)
                    children[pid] = (conn, _watch_child(selector, pid))
                    selector.register(conn, selectors.EVENT_READ, ("client", pid))
                elif key.data[0] == "client":  # the client went away (or sent more): stop its child
                    client = key.fileobj
                    assert isinstance(client, socket.socket)  # registered above with its ("client", pid)
                    if not client.recv(1, socket.MSG_PEEK):
                        os.kill(key.data[1], signal.SIGKILL)
            for pid, (conn, pidfd) in list(children.items()):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    # The child wrote its code already, unless it died first (then this is the only one).
                    _send(conn, {"returncode": os.waitstatus_to_exitcode(status)})
                    selector.unregister(conn)
                    conn.close()
                    if pidfd is not None:
                        selector.unregister(pidfd)
                        os.close(pidfd)
                    del children[pid]
                    last_active = time.monotonic()
    finally:
        server.close()
        try:
            if os.stat(path).st_ino == inode:  # not the socket of a server started since
                os.unlink(path)
        except FileNotFoundError:
            pass


if __name__ == "__main__":
    serve(sys.argv[1])
