"""Local servers for the camera testers and the shim: a Kafka broker and S3, in the foreground.

    python scripts/services.py [--workdir demo/services] [--instrument LSSTComCamSim]

Starts Tansu (Kafka, in memory) and SeaweedFS (S3, publishing filer events to the
broker) on free ports of 127.0.0.1, creates the instrument's raw bucket and writes
two files into WORKDIR for the other commands:

- ``services.yaml``: the config overrides (``kafka.bootstrap``, ``storage.endpoint_url``)
  to pass as ``--config-file`` (``scripts/upload.py``) or ``--extra-config`` (the shim);
- ``services.env``: the S3 credentials, to ``source`` in the shell that runs them.

Then it prints those commands and waits; Ctrl-C (or SIGTERM) stops both servers.
``make services`` runs it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

from stream_shim.testbed.local_services import KafkaBroker, S3Server
from workflow.core.config import PROJECT_ROOT, instrument_config_path, load_config
from workflow.core.exceptions import ServiceStartError

FILER_TOPIC = "seaweedfs-filer-events"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=str(PROJECT_ROOT / "demo" / "services"), help="server data and files")
    parser.add_argument("--instrument", default="LSSTComCamSim", help="whose raw bucket to create")
    parser.add_argument("--ready-file", default=None, help="write this file once both servers are ready")
    return parser.parse_args(argv)


def write_client_files(workdir: Path, broker: KafkaBroker, s3: S3Server) -> tuple[Path, Path]:
    """Write ``services.yaml`` (config overrides) and ``services.env`` (S3 credentials); return both paths."""
    settings: dict[str, Any] = {
        "kafka": {"bootstrap": broker.bootstrap},
        "storage": {"endpoint_url": s3.endpoint_url},
    }
    config_file = workdir / "services.yaml"
    config_file.write_text(yaml.safe_dump(settings))
    env_file = workdir / "services.env"
    env_file.touch(mode=0o600)
    env_file.write_text(
        f"export AWS_ACCESS_KEY_ID={s3.access_key}\n"
        f"export AWS_SECRET_ACCESS_KEY={s3.secret_key}\n"
        f"export AWS_DEFAULT_REGION={s3.region}\n"
    )
    return config_file, env_file


def main(argv: list[str] | None = None) -> int:
    """Start the servers, write the client files, wait for a signal; return the exit status."""
    args = _parse(argv)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = load_config(instrument_config_path(args.instrument))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    broker = KafkaBroker(workdir / "kafka", storage="memory")
    s3 = S3Server(workdir / "s3", None, None)
    try:
        broker.start()
        s3 = S3Server(workdir / "s3", broker.bootstrap, FILER_TOPIC)
        s3.start()
        bucket = config["buckets"]["raw"]
        client = s3.client()
        if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=bucket)
        config_file, env_file = write_client_files(workdir, broker, s3)
        print(
            f"Kafka {broker.bootstrap}, S3 {s3.endpoint_url} (bucket {bucket}, filer events on {FILER_TOPIC}).\n"
            f"In another shell:\n"
            f"  source {env_file}\n"
            f"  python scripts/upload.py {args.instrument} 2 --config-file {config_file}\n"
            f"Logs: {workdir}/kafka/*.log, {workdir}/s3/*.log.  Ctrl-C stops both servers.",
            flush=True,
        )
        if args.ready_file:
            Path(args.ready_file).write_text(str(config_file) + "\n")
        stop.wait()
    except ServiceStartError as exc:
        print(f"services: {exc}", file=sys.stderr)
        return 1
    finally:
        s3.stop()
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
