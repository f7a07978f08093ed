"""Tests for ``scripts/services.py`` (``make services``): the README's camera tester runs against it.

``python scripts/upload.py LSSTComCamSim N`` needs a broker and S3; the README says to
start them with ``make services`` and to point the tester at them with the files it
writes.  This runs exactly that, at a small scale.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import boto3
import yaml
from shared_helpers import wait_until

from workflow.core.config import PROJECT_ROOT, instrument_config_path, load_config


def _env_from(path) -> dict[str, str]:
    """The ``export NAME=value`` lines of ``services.env``."""
    pairs = [line.removeprefix("export ").split("=", 1) for line in path.read_text().splitlines() if line]
    return {name: value for name, value in pairs}


def test_upload_runs_against_the_services(tmp_path) -> None:
    ready = tmp_path / "ready"
    workdir = tmp_path / "services"
    services = subprocess.Popen(
        [sys.executable, "scripts/services.py", "--workdir", str(workdir), "--ready-file", str(ready)],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert wait_until(lambda: ready.exists() or services.poll() is not None, 90), "services never ready"
        assert services.poll() is None, services.communicate()[0]
        config_file = workdir / "services.yaml"
        env = {**os.environ, **_env_from(workdir / "services.env")}
        upload = subprocess.run(
            [sys.executable, "scripts/upload.py", "LSSTComCamSim", "1", "--config-file", str(config_file)]
            + ["--scale", "0.1", "--slew-s", "0", "--exposure-s", "0", "--no-progress"],
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert upload.returncode == 0, upload.stderr
        endpoint = yaml.safe_load(config_file.read_text())["storage"]["endpoint_url"]
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
        )
        bucket = load_config(instrument_config_path("LSSTComCamSim"))["buckets"]["raw"]
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert sum(key.endswith(".fits") for key in keys) == 9, keys  # one raw per active detector
    finally:
        services.send_signal(signal.SIGINT)
        output, _ = services.communicate(timeout=60)
    assert services.returncode == 0, output
    assert f"--config-file {workdir / 'services.yaml'}" in output and "source " in output
