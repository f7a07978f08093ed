"""Start and stop a real single-node SLURM cluster on 127.0.0.1 (Debian's ``slurm-wlm`` and ``munge``).

Used by the SLURM tests (tests/test_slurm.py) and ``make slurm``.  Everything lives in one
directory: a fresh MUNGE key and ``munged`` on its own socket, a ``slurm.conf`` for this
host (the CPUs, sockets, cores and memory ``slurmd -C`` reports, the controller on
127.0.0.1 on free ports, its own state, spool and log files), ``slurmctld`` and ``slurmd``.
Each daemon is one `LocalServer` child process (foreground, own session, log file,
bounded waits, stopped by PID); clients (``sbatch``, ``squeue``, Snakemake's SLURM
executor) find the cluster through ``SLURM_CONF`` (`SlurmCluster.env`).

Choices that make it work in this container (no systemd, cgroup v1 read-only):
``ProctrackType=proctrack/linuxproc`` (tracks a job's processes by parentage, no
cgroups) and ``TaskPlugin=task/none``.  No accounting (``accounting_storage/none``, no
slurmdbd): ``sacct`` then fails, so the executor must query ``squeue`` (profiles/slurm
sets ``slurm-status-command: squeue``), which lists finished jobs for ``MinJobAge``
seconds.

Job steps run in ``slurmstepd`` processes that detach from ``slurmd``; `SlurmCluster.stop`
cancels every job first, waits for the steps to end, and kills any step daemon still
holding a socket in this cluster's spool directory, so nothing is left running.
"""

from __future__ import annotations

__all__ = ["MungeServer", "SlurmCluster", "SlurmctldServer", "SlurmdServer", "node_hardware"]

import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from stream_shim.testbed.local_services import (
    DEFAULT_TIMEOUT,
    HOST,
    LocalServer,
    free_port,
    process_alive,
)
from workflow.core.exceptions import ServiceStartError

_log = logging.getLogger(__name__)

PARTITION = "prompt"
"""The cluster's one partition (the default)."""
MIN_JOB_AGE_S = 300
"""Seconds slurmctld keeps a finished job, so ``squeue --states=all`` still reports it."""
_CLIENTS = ("sbatch", "srun", "squeue", "scancel", "scontrol", "sinfo", "sacct", "sacctmgr", "sshare")
"""Client commands `SlurmCluster.bin_dir` wraps (each sets ``SLURM_CONF``, then runs the real one)."""
_PACKAGES = "apt-get install slurm-wlm munge (or: bash scripts/install_test_packages.sh)"


def _binary(name: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        raise ServiceStartError(f"{name} not found; install the Debian packages: {_PACKAGES}")
    return path


def node_hardware() -> dict[str, int]:
    """Return this machine's node line fields as ``slurmd -C`` reports them.

    Returns
    -------
    hardware : `dict` [`str`, `int`]
        ``CPUs``, ``Boards``, ``SocketsPerBoard``, ``CoresPerSocket``, ``ThreadsPerCore``,
        ``RealMemory`` (MB).

    Raises
    ------
    ServiceStartError
        Raised if ``slurmd`` is missing or its output lacks a field.
    """
    out = subprocess.run([_binary("slurmd"), "-C"], capture_output=True, text=True, timeout=30, check=False).stdout
    fields = dict(re.findall(r"(\w+)=(\d+)", out))
    wanted = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    missing = [k for k in wanted if k not in fields]
    if missing:
        raise ServiceStartError(f"slurmd -C did not report {missing}: {out.strip()!r}")
    return {k: int(fields[k]) for k in wanted}


class MungeServer(LocalServer):
    """``munged`` with a fresh key and its own socket under ``base_dir``."""

    name = "munged"

    def __init__(self, base_dir: str | Path, **kwargs: Any) -> None:
        super().__init__(base_dir, **kwargs)
        self.socket_path = self.base_dir / "munge.socket"
        self.key_path = self.base_dir / "munge.key"

    def _launch(self) -> None:
        os.chmod(self.base_dir, 0o700)  # munged refuses a key or socket others could reach
        if not self.key_path.exists():
            self.key_path.write_bytes(os.urandom(1024))
            os.chmod(self.key_path, 0o400)
        self._spawn(
            [
                _binary("munged"),
                "--foreground",
                "--force",  # as root, in a directory below the sticky /tmp
                f"--socket={self.socket_path}",
                f"--key-file={self.key_path}",
                f"--pid-file={self.base_dir / 'munged.pid'}",
                f"--log-file={self.base_dir / 'munged-file.log'}",
                f"--seed-file={self.base_dir / 'munged.seed'}",
            ],
            cwd=self.base_dir,
        )

    def _is_ready(self) -> bool:
        probe = subprocess.run(
            [_binary("munge"), "--no-input", f"--socket={self.socket_path}"],
            capture_output=True,
            timeout=5,
            check=False,
        )
        return probe.returncode == 0


class _SlurmDaemon(LocalServer):
    """A SLURM daemon in the foreground (``-D``) reading ``conf``."""

    def __init__(self, base_dir: str | Path, conf: Path, env: dict[str, str], **kwargs: Any) -> None:
        super().__init__(base_dir, **kwargs)
        self.conf = conf
        self.env = env

    def _scontrol(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [_binary("scontrol"), *args], capture_output=True, text=True, env=self.env, timeout=10, check=False
        )


class SlurmctldServer(_SlurmDaemon):
    """``slurmctld``: ready when ``scontrol ping`` says it is up."""

    name = "slurmctld"

    def _launch(self) -> None:
        self._spawn([_binary("slurmctld"), "-D", "-f", str(self.conf)], cwd=self.base_dir, env=self.env)

    def _is_ready(self) -> bool:
        return "is UP" in self._scontrol("ping").stdout


class SlurmdServer(_SlurmDaemon):
    """``slurmd`` of the one node: ready when the controller sees the node idle."""

    name = "slurmd"

    def __init__(self, base_dir: str | Path, conf: Path, env: dict[str, str], node: str, **kwargs: Any) -> None:
        super().__init__(base_dir, conf, env, **kwargs)
        self.node = node

    def _launch(self) -> None:
        self._spawn([_binary("slurmd"), "-D", "-N", self.node, "-f", str(self.conf)], cwd=self.base_dir, env=self.env)

    def _is_ready(self) -> bool:
        state = self._scontrol("show", "node", self.node).stdout
        return re.search(r"State=IDLE\b", state) is not None


class SlurmCluster:
    """A single-node SLURM cluster (``munged``, ``slurmctld``, ``slurmd``) under ``base_dir``.

    Parameters
    ----------
    base_dir : `str` or `~pathlib.Path`
        Directory for the key, ``slurm.conf``, state, spool and every log.  Keep it short:
        unix socket paths below it must fit in 108 bytes.
    timeout : `float`, optional
        Seconds each daemon may take to come up, and to stop.
    die_with_parent : `bool`, optional
        Passed to each daemon (`LocalServer`): kill it when the starting thread dies.

    Attributes
    ----------
    conf : `~pathlib.Path`
        The ``slurm.conf``.
    env : `dict` [`str`, `str`]
        What a client needs in its environment: ``SLURM_CONF``, and `bin_dir` first on
        ``PATH``.
    bin_dir : `~pathlib.Path`
        Wrappers of the client commands that set ``SLURM_CONF`` themselves: the SLURM
        executor's job step (``snakemake --executor slurm-jobstep``) drops every
        ``SLURM_*`` variable but a few before it calls ``srun``, and a real site finds
        its ``slurm.conf`` in /etc/slurm (or configless), where this one must not go.
    node : `str`
        The node's name (this host's short name).
    partition : `str`
        The default partition.
    hardware : `dict` [`str`, `int`]
        The node's CPUs and memory (`node_hardware`), once started.
    """

    def __init__(self, base_dir: str | Path, *, timeout: float = DEFAULT_TIMEOUT, die_with_parent: bool = True) -> None:
        self.base_dir = Path(base_dir).absolute()
        self.timeout = timeout
        self.conf = self.base_dir / "slurm.conf"
        self.bin_dir = self.base_dir / "bin"
        path = os.pathsep.join([str(self.bin_dir), os.environ.get("PATH", os.defpath)])
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), "PATH": path}
        self.node = socket.gethostname().split(".")[0]
        self.partition = PARTITION
        self.hardware: dict[str, int] = {}
        self.ctld_port = free_port()
        self.slurmd_port = free_port()
        options = {"timeout": timeout, "die_with_parent": die_with_parent}
        self.munge = MungeServer(self.base_dir / "munge", **options)
        self.slurmctld = SlurmctldServer(self.base_dir, self.conf, self.env, **options)
        self.slurmd = SlurmdServer(self.base_dir, self.conf, self.env, self.node, **options)

    @property
    def spool_dir(self) -> Path:
        """slurmd's spool: job scripts and the step daemons' sockets."""
        return self.base_dir / "spool"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Write the configuration and start munged, slurmctld and slurmd; wait until the node is idle.

        Raises
        ------
        ServiceStartError
            Raised if a binary is missing or a daemon does not come up in time; the
            message holds the tail of its log.  Whatever was started is stopped.
        """
        try:
            self.hardware = node_hardware()
            for sub in ("state", "spool"):
                (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
            self._write_client_wrappers()
            self.munge.start()
            self.conf.write_text(self._slurm_conf())
            self.slurmctld.start()
            self.slurmd.start()
        except BaseException:
            self.stop()
            raise
        _log.info("SLURM cluster up: %s (node %s, %s)", self.conf, self.node, self.hardware)

    def _write_client_wrappers(self) -> None:
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        for name in _CLIENTS:
            real = shutil.which(name, path=os.environ.get("PATH", os.defpath)) or f"/usr/bin/{name}"
            wrapper = self.bin_dir / name
            wrapper.write_text(f'#!/bin/sh\nSLURM_CONF={self.conf}\nexport SLURM_CONF\nexec {real} "$@"\n')
            wrapper.chmod(0o755)

    def _slurm_conf(self) -> str:
        hw, base = self.hardware, self.base_dir
        return "\n".join(
            [
                "# Written by stream_shim.testbed.slurm_cluster: a throw-away single-node cluster.",
                "ClusterName=promptsnake",
                f"SlurmctldHost={self.node}({HOST})",
                f"SlurmctldPort={self.ctld_port}",
                f"SlurmdPort={self.slurmd_port}",
                f"SlurmUser={pwd.getpwuid(os.geteuid()).pw_name}",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                f"AuthInfo=socket={self.munge.socket_path}",
                f"StateSaveLocation={base / 'state'}",
                f"SlurmdSpoolDir={self.spool_dir}",
                f"SlurmctldPidFile={base / 'slurmctld.pid'}",
                f"SlurmdPidFile={base / 'slurmd.pid'}",
                f"SlurmctldLogFile={base / 'slurmctld-file.log'}",
                f"SlurmdLogFile={base / 'slurmd-file.log'}",
                # No cgroups here: track job processes by parentage, bind nothing.
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "MpiDefault=none",
                "SchedulerType=sched/backfill",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core_Memory",
                "ReturnToService=2",
                # No slurmdbd: sacct fails, squeue reports finished jobs for MinJobAge s.
                "AccountingStorageType=accounting_storage/none",
                "JobAcctGatherType=jobacct_gather/none",
                "JobCompType=jobcomp/none",
                f"MinJobAge={MIN_JOB_AGE_S}",
                "SlurmctldTimeout=30",
                "SlurmdTimeout=30",
                "KillWait=5",
                "SlurmctldDebug=info",
                "SlurmdDebug=info",
                f"NodeName={self.node} NodeAddr={HOST} CPUs={hw['CPUs']} Boards={hw['Boards']} "
                f"SocketsPerBoard={hw['SocketsPerBoard']} CoresPerSocket={hw['CoresPerSocket']} "
                f"ThreadsPerCore={hw['ThreadsPerCore']} RealMemory={hw['RealMemory']} State=UNKNOWN",
                f"PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )

    def command(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run a SLURM client command (``squeue``, ``scancel``, ...) against this cluster.

        Parameters
        ----------
        *args : `str`
            The command and its arguments.
        timeout : `float`, optional
            Seconds before the command is abandoned.

        Returns
        -------
        result : `subprocess.CompletedProcess`
            Return code and text output; never raises on a non-zero exit.
        """
        return subprocess.run(list(args), capture_output=True, text=True, env=self.env, timeout=timeout, check=False)

    def active_jobs(self) -> list[str]:
        """Return the ids of jobs pending, running or completing (``squeue``)."""
        out = self.command("squeue", "--noheader", "--format=%i", "--states=PENDING,RUNNING,COMPLETING,CONFIGURING")
        return out.stdout.split() if out.returncode == 0 else []

    def running(self) -> bool:
        """Tell whether munged, slurmctld and slurmd are all alive."""
        daemons = (self.munge, self.slurmctld, self.slurmd)
        return all(d.pid is not None and process_alive(d.pid) for d in daemons)

    def logs(self) -> str:
        """Return the tails of the daemons' logs (for a failure message)."""
        return "\n".join(
            f"--- {server.name} ({server.log_path}):\n{server.log_tail()}"
            for server in (self.munge, self.slurmctld, self.slurmd)
        )

    def _step_daemons(self) -> set[int]:
        """Pids of ``slurmstepd`` processes holding a socket in this cluster's spool directory."""
        spool = str(self.spool_dir)
        inodes = set()
        try:
            for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
                parts = line.split()
                if len(parts) >= 8 and parts[7].startswith(spool):
                    inodes.add(f"socket:[{parts[6]}]")
        except OSError:
            return set()
        pids = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if (entry / "comm").read_text().strip() != "slurmstepd":
                    continue
                if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                    pids.add(int(entry.name))
            except OSError:
                continue
        return pids

    def stop(self) -> None:
        """Cancel every job, stop slurmd, slurmctld and munged, and kill leftover step daemons; safe to call twice."""
        steps = self._step_daemons()
        if self.slurmctld.pid is not None:
            self.command("scancel", "--full", f"--partition={self.partition}")
            # A cancelled job's step daemons close their sockets before they exit: keep
            # the pids seen, and wait for those too.
            deadline = time.monotonic() + self.timeout
            while time.monotonic() < deadline:
                steps |= self._step_daemons()
                if not self.active_jobs() and not any(process_alive(pid) for pid in steps):
                    break
                time.sleep(0.1)
        for server in (self.slurmd, self.slurmctld):
            server.stop()
        steps |= self._step_daemons()
        for pid in steps:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self.timeout
        while any(process_alive(pid) for pid in steps) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.munge.stop()


def main() -> None:
    """``make slurm``: start a cluster in a temp dir, print how to use it, stop it on Ctrl-C."""
    import tempfile

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    base = Path(tempfile.mkdtemp(prefix="prompt-snake-slurm-"))
    with SlurmCluster(base, timeout=60.0) as cluster:
        print(
            f"SLURM cluster up: node {cluster.node} ({cluster.hardware['CPUs']} CPUs, "
            f"{cluster.hardware['RealMemory']} MB), partition {cluster.partition}, files in {base}\n"
            "In another shell:\n"
            f"  export SLURM_CONF={cluster.conf} PATH={cluster.bin_dir}:$PATH\n"
            "  sinfo; squeue\n"
            "  python scripts/replay.py --instrument LSSTComCamSim --ordered --limit 1 --profile profiles/slurm\n"
            "Ctrl-C here stops it (jobs are cancelled; nothing is left running).",
            flush=True,
        )
        try:
            while cluster.running():
                time.sleep(1.0)
            print("a daemon exited:\n" + cluster.logs(), flush=True)
        except KeyboardInterrupt:
            pass
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
