"""Tests for the stage server's private socket (`workflow.runtime.stage_socket`) and the client's guards.

The tests run as root: "another user" is uid 65534 (nobody), made with ``os.chown``
or by a forked child that calls ``os.setuid``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from workflow.core.config import load_config, write_config_snapshot
from workflow.runtime import stage_socket
from workflow.runtime.stage_client import SOCKET_ENV, stage_environment
from workflow.runtime.stage_socket import UnsafeSocketError, peer_uid, private_dir, runtime_dir

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


def _private(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _client(tmp_path: Path, env: dict[str, str], stage: str, *args: str) -> subprocess.CompletedProcess:
    config = write_config_snapshot(load_config(), tmp_path / "cfg")
    return subprocess.run(
        [sys.executable, "-m", "workflow.runtime.stage_client", stage, "--config", str(config)]
        + ["--log", str(tmp_path / "logs" / f"{stage}.log"), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _bad_visit(tmp_path: Path) -> list[str]:
    """Arguments of a prep that fails at once (the visit file is not JSON) and writes failed.json."""
    visit = tmp_path / "visits" / "LSSTComCamSim" / "2026-11-27" / "G1" / "3.json"
    visit.parent.mkdir(parents=True)
    visit.write_text("{not json")
    return ["--visit", str(visit.relative_to(tmp_path)), "--manifest", "work_area/prep.json"]


class TestPrivateDirectory:
    """Tests for `workflow.runtime.stage_socket.private_dir` and `runtime_dir`."""

    def test_missing_directory_is_created_0700(self, tmp_path: Path) -> None:
        path = private_dir(tmp_path / "run")
        assert (path.stat().st_mode & 0o777, path.stat().st_uid) == (0o700, os.getuid())

    def test_directory_of_another_user_is_refused(self, tmp_path: Path) -> None:
        path = _private(tmp_path / "run")
        os.chown(path, NOBODY, NOBODY)
        with pytest.raises(UnsafeSocketError, match=f"owner uid {NOBODY}"):
            private_dir(path)

    @pytest.mark.parametrize("mode", [0o755, 0o770, 0o1777])
    def test_directory_open_to_others_is_refused_not_fixed(self, tmp_path: Path, mode: int) -> None:
        path = _private(tmp_path / "run")
        os.chmod(path, mode)
        with pytest.raises(UnsafeSocketError, match="not private"):
            private_dir(path)
        assert path.stat().st_mode & 0o7777 == mode

    def test_symlink_is_refused(self, tmp_path: Path) -> None:
        (tmp_path / "run").symlink_to(_private(tmp_path / "elsewhere"))
        with pytest.raises(UnsafeSocketError, match="a symlink"):
            private_dir(tmp_path / "run")

    def test_shared_tmp_directory_pre_created_by_another_user_is_refused(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(stage_socket, "SHARED_TMP", str(tmp_path))
        squatted = _private(tmp_path / f"prompt-snake-{os.getuid()}")
        os.chown(squatted, NOBODY, NOBODY)
        with pytest.raises(UnsafeSocketError):
            runtime_dir({})

    def test_xdg_runtime_dir_is_used_only_when_it_is_ours(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(stage_socket, "SHARED_TMP", str(tmp_path / "tmp"))
        (tmp_path / "tmp").mkdir()
        xdg = _private(tmp_path / "xdg")
        assert runtime_dir({"XDG_RUNTIME_DIR": str(xdg)}) == xdg / "prompt-snake"
        os.chown(xdg, NOBODY, NOBODY)  # e.g. sudo kept the invoking user's XDG_RUNTIME_DIR
        assert runtime_dir({"XDG_RUNTIME_DIR": str(xdg)}) == tmp_path / "tmp" / f"prompt-snake-{os.getuid()}"

    def test_client_refuses_a_squatted_directory_and_runs_the_stage_itself(self, tmp_path: Path) -> None:
        xdg = _private(tmp_path / "xdg")
        os.chown(_private(xdg / "prompt-snake"), NOBODY, NOBODY)
        args = _bad_visit(tmp_path)
        result = _client(tmp_path, {**os.environ, "XDG_RUNTIME_DIR": str(xdg)}, "prep", *args)
        assert "is not private to uid 0" in result.stderr and "running the prep stage in this process" in result.stderr
        assert result.returncode == 1  # the stage itself ran (here) and failed on the bad visit
        assert (tmp_path / "results/LSSTComCamSim/2026-11-27/G1/3/failed.json").exists()
        assert list((xdg / "prompt-snake").iterdir()) == []  # no socket, lock or log made in it


def _listen_as_nobody(path: Path) -> tuple[int, int]:
    """Fork a child that binds ``path``, becomes uid 65534, listens and reports what a client sends.

    Returns the child's pid and the read end of a pipe that gets the bytes received
    (empty if the client closed without sending).
    """
    read_end, write_end = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(read_end)
            os.close(ready_r)
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(str(path))
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            server.listen(1)  # SO_PEERCRED reports the credentials at listen()
            os.write(ready_w, b"1")
            server.settimeout(60)
            conn, _ = server.accept()
            conn.settimeout(10)
            data = b""
            try:
                while chunk := conn.recv(65536):
                    data += chunk
            except TimeoutError:
                pass
            os.write(write_end, data)
        finally:
            os._exit(0)
    os.close(write_end)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"1"
    os.close(ready_r)
    return pid, read_end


def test_client_sends_nothing_to_a_server_of_another_user(tmp_path: Path) -> None:
    path = _private(tmp_path / "run") / "stage.sock"
    pid, received = _listen_as_nobody(path)
    try:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(str(path))
        assert peer_uid(probe) == NOBODY
        probe.close()
    finally:
        os.waitpid(pid, 0)
    assert os.read(received, 1 << 20) == b""
    os.close(received)

    path.unlink()
    pid, received = _listen_as_nobody(path)
    try:
        args = _bad_visit(tmp_path)
        env = {**os.environ, SOCKET_ENV: str(path), "AWS_SECRET_ACCESS_KEY": "do-not-send", "PGPASSWORD": "nor-this"}
        result = _client(tmp_path, env, "prep", *args)
    finally:
        os.waitpid(pid, 0)
    assert os.read(received, 1 << 20) == b""  # not one byte: no environment, no request
    os.close(received)
    assert f"runs as uid {NOBODY}, not 0: refused, nothing sent" in result.stderr
    assert result.returncode == 1  # the stage ran here instead, and failed on the bad visit
    assert (tmp_path / "results/LSSTComCamSim/2026-11-27/G1/3/failed.json").exists()


class _RecordingServer(threading.Thread):
    """A same-uid fake stage server: acknowledges one request, records it, answers exit code 0."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.sock.settimeout(60)
        self.request: dict = {}

    def run(self) -> None:
        conn, _ = self.sock.accept()
        with conn, conn.makefile("rwb") as stream:
            self.request = json.loads(stream.readline())
            stream.write(json.dumps({"accepted": self.request["id"]}).encode() + b"\n")
            stream.write(b'{"returncode": 0}\n')
            stream.flush()
        self.sock.close()


def test_stage_environment_keeps_only_what_stages_read() -> None:
    environ = {
        "PATH": "/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "LC_ALL": "C",
        "TMPDIR": "/tmp",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "SNAKEMAKE_PROFILE": "p",
        "PROMPT_SNAKE_ARRIVALS_DIR": "/a",
        "AWS_ACCESS_KEY_ID": "id",
        "AWS_SECRET_ACCESS_KEY": "s",
        "S3_ENDPOINT_URL": "http://s3",
        "PGPASSWORD": "pw",
        "LSST_DB_AUTH": "/etc/db-auth.yaml",
        "KAFKA_BOOTSTRAP": "b:9092",
    }
    others = {"GITHUB_TOKEN": "t", "SSH_AUTH_SOCK": "/s", "HISTFILE": "/h", "VAULT_TOKEN": "v", "XDG_RUNTIME_DIR": "/r"}
    assert stage_environment({**environ, **others}) == environ


def test_client_sends_the_allowlisted_environment_only(tmp_path: Path) -> None:
    path = _private(tmp_path / "run") / "stage.sock"
    server = _RecordingServer(path)
    server.start()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": "/root",
        "LC_ALL": "C.UTF-8",  # a C locale would make Python add LC_CTYPE (PEP 538)
        "OMP_NUM_THREADS": "1",
        "AWS_SECRET_ACCESS_KEY": "stage-needs-it",
        "PGPASSWORD": "stage-needs-it-too",
        "GITHUB_TOKEN": "not-for-stages",
        "SOME_OTHER_SERVICE_PASSWORD": "never",
        SOCKET_ENV: str(path),
    }
    result = _client(tmp_path, env, "prep", "--visit", "v.json", "--manifest", "m.json")
    server.join(30)
    assert result.returncode == 0, result.stderr
    sent = server.request["env"]
    assert sent == stage_environment(env)
    assert "GITHUB_TOKEN" not in sent and "SOME_OTHER_SERVICE_PASSWORD" not in sent
    assert sent["AWS_SECRET_ACCESS_KEY"] == "stage-needs-it" and sent["PGPASSWORD"] == "stage-needs-it-too"
    assert server.request["args"] == {"visit": ["v.json"], "manifest": ["m.json"]} and server.request["id"]


_SLEEPER = """
import os, sys, time
if sys.orig_argv[-2:-1] == ["workflow.runtime.stage_server"]:
    import types
    import workflow.stages

    def run(*, marker: str, config: dict, log: str) -> None:
        with open(marker, "a") as stream:
            stream.write(f"{os.getpid()}\\n")
        time.sleep(float(os.environ["PROMPT_SNAKE_TEST_SLEEP_S"]))  # the stage environment: allowlisted names only

    module = types.ModuleType("workflow.stages.sleeper")
    module.run = run
    sys.modules["workflow.stages.sleeper"] = module
    workflow.stages.STAGES = (*workflow.stages.STAGES, "sleeper")
"""


@pytest.fixture
def sleeper_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment whose stage servers know a ``sleeper`` stage (a sitecustomize on PYTHONPATH); stopped after."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "sitecustomize.py").write_text(_SLEEPER)
    path = _private(tmp_path / "run") / "stage.sock"
    pythonpath = os.pathsep.join(p for p in (str(site_dir), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath, SOCKET_ENV: str(path), "PROMPT_SNAKE_TEST_SLEEP_S": "3"}
    yield env
    for pid in _server_pids(path):
        os.kill(pid, signal.SIGKILL)


def _server_pids(path: Path) -> list[int]:
    """Pids of the stage servers on ``path`` and of the stages they forked (same command line)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(path).encode() in argv and b"workflow.runtime.stage_server" in argv:
            pids.append(int(proc.name))
    return pids


def _wait_for_lines(path: Path, n: int, timeout_s: float = 60.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = path.read_text().split() if path.exists() else []
        if len(lines) >= n:
            return lines
        time.sleep(0.05)
    raise AssertionError(f"{path}: fewer than {n} lines after {timeout_s} s")


@pytest.mark.parametrize("kill", ["server", "server-and-stage"])
def test_killed_server_never_runs_a_stage_twice(tmp_path: Path, sleeper_env: dict[str, str], kill: str) -> None:
    """The request was acknowledged: whatever dies, the client does not send it again."""
    marker = tmp_path / "runs.txt"
    config = write_config_snapshot(load_config(), tmp_path / "cfg")
    client = subprocess.Popen(
        [sys.executable, "-m", "workflow.runtime.stage_client", "sleeper", "--config", str(config)]
        + ["--log", str(tmp_path / "logs" / "sleeper.log"), "--marker", str(marker)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=sleeper_env,
    )
    try:
        (stage_pid,) = map(int, _wait_for_lines(marker, 1))
        server_pid = int(Path(f"/proc/{stage_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # its parent
        assert server_pid in _server_pids(Path(sleeper_env[SOCKET_ENV]))
        os.kill(server_pid, signal.SIGKILL)
        if kill == "server-and-stage":
            os.kill(stage_pid, signal.SIGKILL)
        _, stderr = client.communicate(timeout=60)
    finally:
        client.kill()
    time.sleep(0.5)  # a retry would have reached a new server and its stage by now
    assert marker.read_text().split() == [str(stage_pid)]  # one run
    if kill == "server":  # the orphaned stage finished and reported itself
        assert client.returncode == 0, stderr
    else:
        assert client.returncode == 1
        assert "accepted the sleeper request" in stderr and "not running it again" in stderr


def _connect_as_nobody(path: Path, payload: bytes) -> int:
    """Fork a child that becomes uid 65534, connects to ``path`` and sends ``payload``; return its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(path))
                sock.sendall(payload)
                sock.settimeout(10)
                sock.recv(1)  # until the server closes
        finally:
            os._exit(0)
    return pid


def test_server_serves_only_clients_of_its_own_uid(tmp_path: Path) -> None:
    import tempfile

    from workflow.runtime.stage_server import _read_request

    request = {"id": "abc", "stage": "prep"}
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(json.dumps(request).encode() + b"\n")
        assert _read_request(ours) == request

    open_dir = Path(tempfile.mkdtemp(prefix="prompt-snake-test-"))  # reachable by uid 65534, unlike tmp_path
    try:
        os.chmod(open_dir, 0o711)
        path = open_dir / "stage.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(str(path))
            os.chmod(path, 0o777)
            server.listen(1)
            server.settimeout(30)
            pid = _connect_as_nobody(path, json.dumps(request).encode() + b"\n")
            conn, _ = server.accept()
            assert peer_uid(conn) == NOBODY
            assert _read_request(conn) is None  # refused: no acknowledgement, connection closed
            assert conn.fileno() == -1
            os.waitpid(pid, 0)
    finally:
        path.unlink(missing_ok=True)
        open_dir.rmdir()
