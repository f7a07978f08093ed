"""Run the stream shim: Kafka next_visit and raw notifications -> Snakemake targets.

    python -m stream_shim [--role shim|fanout|worker] [--worker-id ID] --instrument LSSTComCamSim
        [--profile profiles/local|profiles/k8s]
        [--config-file extra.yaml ...] [--workdir DIR] [--state-dir DIR]
        [--design streaming|subprocess] [--filer-topic TOPIC] [--status-port PORT] [--status-host HOST]
        [--max-concurrent-targets N] [--grace-s 60] [--term-wait-s 10] [--no-health-check]
        [--snakefile PATH] [--storage-prefix s3://bucket/prefix] [--storage-endpoint-url URL]
        [--snakemake-arg=--flag=value ...]

Roles: ``shim`` (default) is the all-in-one service (`stream_shim.service`); the worker
pool splits it in a ``fanout`` (`stream_shim.fanout`: next_visit -> one work item per
detector on the work topic) and any number of ``worker`` s (`stream_shim.worker`: work
items -> their own long-lived Snakemake), each named by ``--worker-id`` (default: the
host name, in Kubernetes the pod's) with its own ``--state-dir``.

Logs are JSON lines on stderr (instrument, group, detector as fields).  SIGTERM or
SIGINT drains: no more next_visits, running targets get ``--grace-s`` seconds,
then Snakemake is stopped.  Exit status: 0 stopped on request, 1 a consumer
failed, 69 a service is unavailable at start-up, 75 another shim holds the state
directory, 78 bad configuration or options, 76 the central repo, APDB or alert
schema is of a version this release does not support.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from stream_shim.health import HealthCheckError
from stream_shim.service import DESIGNS, ShimOptions, StreamShim
from stream_shim.state_lock import ShimAlreadyRunningError
from workflow.apdb.store import ApdbVersionError
from workflow.core.config import load_config
from workflow.core.exceptions import ConfigError
from workflow.core.log_setup import configure_logging
from workflow.core.redact import redact_text
from workflow.runtime.versions import AlertSchemaVersionError, RepoVersionError

_log = logging.getLogger("stream_shim")

ROLES = ("shim", "fanout", "worker")
"""Values of ``--role``."""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stream_shim", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--role",
        choices=ROLES,
        default="shim",
        help="shim: all in one (default); fanout: next_visit -> work topic; worker: work topic -> Snakemake",
    )
    parser.add_argument(
        "--worker-id", default=None, help="worker: its name (default: the host name; in Kubernetes the pod name)"
    )
    parser.add_argument("--instrument", required=True, help="instrument served, e.g. LSSTComCamSim")
    parser.add_argument("--profile", default="profiles/local", help="Snakemake profile (default profiles/local)")
    parser.add_argument(
        "--config-file",
        action="append",
        default=[],
        metavar="FILE",
        help="extra config file merged over the instrument's (repeatable)",
    )
    parser.add_argument("--workdir", default=".", help="run directory (default: the current directory)")
    parser.add_argument("--state-dir", default=None, help="journal, status, logs (default: WORKDIR/shim)")
    parser.add_argument(
        "--design",
        choices=DESIGNS,
        default="streaming",
        help="one long-lived Snakemake fed targets (default) or one Snakemake per visit",
    )
    parser.add_argument(
        "--filer-topic", default=None, help="bridge SeaweedFS filer events from this topic into S3 notifications"
    )
    parser.add_argument("--status-port", type=int, default=None, help="serve /status, /metrics, /healthz")
    parser.add_argument(
        "--status-host", default="127.0.0.1", help="address of the status server (default 127.0.0.1; in a pod 0.0.0.0)"
    )
    parser.add_argument(
        "--max-concurrent-targets", type=int, default=None, help="override submission.max_concurrent_targets"
    )
    parser.add_argument("--grace-s", type=float, default=60.0, help="shutdown: time for running targets")
    parser.add_argument("--term-wait-s", type=float, default=10.0, help="shutdown: SIGTERM to SIGKILL wait")
    parser.add_argument("--no-health-check", action="store_true", help="skip the start-up health checks")
    parser.add_argument("--snakefile", default=None, help="Snakefile (default: the checkout's)")
    parser.add_argument(
        "--storage-prefix", default=None, help="k8s: override the profile's default-storage-prefix (s3://bucket/prefix)"
    )
    parser.add_argument(
        "--storage-endpoint-url", default=None, help="k8s: override the profile's storage-s3-endpoint-url"
    )
    parser.add_argument(
        "--snakemake-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="pass this flag on to Snakemake (repeatable; write --snakemake-arg=--x=1)",
    )
    return parser.parse_args(argv)


def _service(args: argparse.Namespace, options: ShimOptions, config: dict[str, Any]) -> Any:
    """The role's service object (each has ``run(stop) -> int``)."""
    if args.role == "fanout":
        from stream_shim.fanout import FanOutService

        return FanOutService(
            config,
            workdir=options.workdir,
            state_dir=options.state_dir,
            status_port=options.status_port,
            status_host=options.status_host,
            health_check=options.health_check,
            filer_topic=options.filer_topic,
        )
    if args.role == "worker":
        from stream_shim.worker import PoolWorker

        return PoolWorker(options, config, worker_id=args.worker_id or socket.gethostname())
    return StreamShim(options, config)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parse(argv)
    try:
        extra = tuple(Path(f).resolve() for f in args.config_file)
        config = load_config(instrument=args.instrument, extra_files=extra)
        configure_logging(config["log_levels"], json_lines=True, stream=sys.stderr)
    except ConfigError as exc:
        print(f"stream_shim: error: {redact_text(str(exc))}", file=sys.stderr)
        return 78
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)  # the config's relative paths (repo, buckets, APDB) are relative to the run directory
    options = ShimOptions(
        instrument=args.instrument,
        workdir=workdir,
        profile=args.profile,
        config_files=extra,
        state_dir=Path(args.state_dir).resolve() if args.state_dir else None,
        design=args.design,
        filer_topic=args.filer_topic,
        status_port=args.status_port,
        status_host=args.status_host,
        grace_s=args.grace_s,
        term_wait_s=args.term_wait_s,
        health_check=not args.no_health_check,
        max_concurrent_targets=args.max_concurrent_targets,
        snakefile=Path(args.snakefile).resolve() if args.snakefile else None,
        storage_prefix=args.storage_prefix,
        storage_endpoint_url=args.storage_endpoint_url,
        snakemake_args=tuple(args.snakemake_arg),
    )
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        stop.set()  # only this: the service loop notices and drains

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        return _service(args, options, config).run(stop)
    except HealthCheckError as exc:
        _log.error("%s", exc)
        print(f"stream_shim: {redact_text(str(exc))}", file=sys.stderr)
        return 69
    except ShimAlreadyRunningError as exc:
        _log.error("%s", exc)
        return 75
    except (RepoVersionError, AlertSchemaVersionError, ApdbVersionError) as exc:
        _log.error("%s", exc)
        print(f"stream_shim: {redact_text(str(exc))}", file=sys.stderr)
        return 76
    except (ConfigError, ValueError) as exc:
        _log.error("%s", exc)
        return 78


if __name__ == "__main__":
    sys.exit(main())
