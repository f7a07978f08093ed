"""Everything a live run needs on this machine: broker, S3, the shim, the camera.

Used by ``scripts/live_demo.py`` and ``scripts/bench_latency.py``.  `LiveStack`
starts a Tansu broker and a SeaweedFS S3 server (publishing filer events), writes
an extra config file pointing the instrument at them, creates the raw bucket,
starts ``python -m stream_shim`` with the filer bridge, and waits until it runs;
on exit it stops the shim with SIGTERM (graceful) and then the servers.

The S3 data stays in ``<workdir>/services/s3``: a later run in the same directory
finds its raws, so the camera's sequence numbers (hence exposure ids) continue
instead of colliding with exposures an earlier run exported to the central repo.
Keep the central repo with the run directory for the same reason.
"""

from __future__ import annotations

__all__ = ["FILER_TOPIC", "LiveStack", "ensure_central_repo"]

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml

from stream_shim.testbed.local_services import KafkaBroker, S3Server
from workflow.core.config import PROJECT_ROOT, load_config, merge_configs

FILER_TOPIC = "seaweedfs-filer-events"
"""Topic of the SeaweedFS filer events (the bridge's input)."""


def ensure_central_repo(repo: Path, instrument: str, scale: float) -> bool:
    """Build the demo central repo at ``repo`` unless it exists; return whether it was built."""
    if (repo / "butler.yaml").exists():
        return False
    subprocess.run(
        [
            sys.executable,
            str(PROJECT_ROOT / "scripts" / "make_central_repo.py"),
            "--instruments",
            instrument,
            "--repo",
            str(repo),
            "--scale",
            str(scale),
            "--visits",
            "1",
            "--no-progress",
        ],
        check=True,
    )
    return True


class LiveStack:
    """Servers and shim for one live run.

    Parameters
    ----------
    workdir : `pathlib.Path`
        Run directory (shim state, results, server files, ``shim.log``).
    repo : `pathlib.Path`
        Central repository.
    instrument : `str`
        Instrument.
    scale : `float`
        Detector shrink factor (must be the repo's).
    design : `str`
        Shim submission design.
    overrides : `~collections.abc.Mapping`, optional
        Extra config values (merged last).
    shim_args : sequence of `str`, optional
        Extra shim options.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        repo: Path,
        instrument: str = "LSSTComCamSim",
        scale: float = 0.25,
        design: str = "streaming",
        overrides: Mapping[str, Any] | None = None,
        shim_args: Sequence[str] = (),
        broker_storage: str = "s3",
    ) -> None:
        self.workdir, self.repo = Path(workdir).resolve(), Path(repo).resolve()
        self.broker_storage = broker_storage
        self.instrument, self.scale, self.design = instrument, scale, design
        self.overrides, self.shim_args = dict(overrides or {}), list(shim_args)
        self.broker: KafkaBroker | None = None
        self.s3: S3Server | None = None
        self.shim: subprocess.Popen[bytes] | None = None
        self.config: dict[str, Any] = {}
        self.config_file = self.workdir / "live.yaml"
        self.env: dict[str, str] = {}
        self.shim_exit: int | None = None

    @property
    def state_dir(self) -> Path:
        """The shim's state directory."""
        return self.workdir / "shim"

    def status(self) -> dict[str, Any]:
        """Return the shim's status file (empty if not written yet)."""
        try:
            return json.loads((self.state_dir / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def __enter__(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        self.broker = KafkaBroker(self.workdir / "services" / "kafka", storage=self.broker_storage)
        self.broker.start()
        self.s3 = S3Server(self.workdir / "services" / "s3", self.broker.bootstrap, FILER_TOPIC)
        self.s3.start()
        self.env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": self.s3.access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3.secret_key,
            "AWS_DEFAULT_REGION": self.s3.region,
        }
        token = uuid.uuid4().hex[:8]
        settings = merge_configs(
            {
                "central_repo": str(self.repo),
                "kafka": {"bootstrap": self.broker.bootstrap, "consumer_group": f"live-{token}"},
                "storage": {"endpoint_url": self.s3.endpoint_url, "local_root": str(self.workdir / "buckets")},
                "simulation": {"scale": self.scale, "seed": 0},
                "apdb": {"db_url": f"sqlite:///{self.workdir / 'apdb.sqlite3'}"},
            },
            self.overrides,
        )
        self.config_file.write_text(yaml.safe_dump(settings))
        self.config = load_config(instrument=self.instrument, extra_files=[self.config_file])
        client = self.s3.client()
        if self.config["buckets"]["raw"] not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=self.config["buckets"]["raw"])
        self._start_shim()

    def _start_shim(self) -> None:
        """Start the shim (``python -m stream_shim``) and wait until it runs (the night pool starts its roles)."""
        with open(self.workdir / "shim.log", "ab") as log:
            self.shim = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "stream_shim",
                    "--instrument",
                    self.instrument,
                    "--config-file",
                    str(self.config_file),
                    "--workdir",
                    str(self.workdir),
                    "--design",
                    self.design,
                    "--filer-topic",
                    FILER_TOPIC,
                    *self.shim_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=PROJECT_ROOT,
                env=self.env,
            )
        deadline = time.monotonic() + 180
        while self.status().get("state") != "running":
            if self.shim.poll() is not None:
                raise RuntimeError(f"the shim exited with {self.shim.returncode}; see {self.workdir / 'shim.log'}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the shim did not start in 180 s; see {self.workdir / 'shim.log'}")
            time.sleep(0.5)

    def upload(self, groups: int, *args: str) -> subprocess.CompletedProcess[str]:
        """Run the camera (``scripts/upload.py``) for ``groups`` visits at the demo field."""
        command = [
            sys.executable,
            str(PROJECT_ROOT / "scripts" / "upload.py"),
            self.instrument,
            str(groups),
            "--config-file",
            str(self.config_file),
            "--scale",
            str(self.scale),
            "--ra",
            "150.1",
            "--dec",
            "2.2",
            "--rotation",
            "0",
            "--no-progress",
            *args,
        ]
        return subprocess.run(command, env=self.env, capture_output=True, text=True, check=True)

    def upload_from_repo(self, groups: int, *args: str) -> subprocess.CompletedProcess[str]:
        """Replay the central repo's raws as ``groups`` new visits (``scripts/upload_from_repo.py``).

        The camera then only rewrites headers and uploads: unlike `upload`, it does not
        simulate, so it takes almost no CPU from the processing it feeds (on the summit
        the camera is another machine).
        """
        query = self.workdir / "replay_query.yaml"
        query.write_text(
            yaml.safe_dump(
                {"instrument": self.instrument, "central_repo": str(self.repo), "config_files": [str(self.config_file)]}
            )
        )
        command = [
            sys.executable,
            str(PROJECT_ROOT / "scripts" / "upload_from_repo.py"),
            str(query),
            str(groups),
            "--ordered",
            "--no-progress",
            *args,
        ]
        return subprocess.run(command, env=self.env, capture_output=True, text=True, check=True)

    def wait_targets(self, expected: int, timeout_s: float) -> bool:
        """Wait until ``expected`` targets have ended (done or failed); return whether they did."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            totals = self.status().get("gauges", {}).get("targets", {})
            if totals.get("done", 0) + totals.get("failed", 0) >= expected:
                return True
            if self.shim is not None and self.shim.poll() is not None:
                return False
            time.sleep(1.0)
        return False

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.shim is not None and self.shim.poll() is None:
            self.shim.send_signal(signal.SIGTERM)
            try:
                self.shim.wait(timeout=180)
            except subprocess.TimeoutExpired:
                self.shim.kill()
                self.shim.wait()
        if self.shim is not None:
            self.shim_exit = self.shim.returncode
        for server in (self.s3, self.broker):
            if server is not None:
                server.stop()
