"""Build (or complete) the demo central Butler repository.

    python scripts/make_central_repo.py --instruments LSSTComCamSim HSC --repo demo/central_repo \
        [--registry-url postgresql+psycopg2://...] [--s3-root s3://bucket/repo] [--visits N]
        [--scale 0.125] [--detectors 9] [--bench]

A thin adapter over `workflow.sim.demo_repo.build_demo_repo`; it also creates each
instrument's configured APDB (``apdb.db_url``) if missing and writes its ``apdb-cli``
config, ``demo/apdb/<instrument>.yaml`` by default (``--apdb-config-dir``), so
``apdb-cli metadata show demo/apdb/LSSTComCamSim.yaml`` works.  With
``--s3-root`` the endpoint and credentials come from ``S3_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY``.  ``--bench`` prints the
build report (seconds per stage, datasets added, counts) as JSON on stdout.
Errors are reported as one line on stderr, exit status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from workflow.apdb.config_file import default_config_path, write_apdb_config
from workflow.core.config import PROJECT_ROOT, load_config
from workflow.sim.demo_repo import build_demo_repo

_log = logging.getLogger("make_central_repo")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instruments", nargs="+", default=["LSSTComCamSim", "HSC"], metavar="NAME")
    parser.add_argument("--repo", default=None, help="repository directory (default: central_repo of the config)")
    parser.add_argument("--registry-url", default=None, help="PostgreSQL registry URL (default: SQLite in --repo)")
    parser.add_argument("--registry-namespace", default=None, help="PostgreSQL schema of the registry")
    parser.add_argument("--s3-root", default=None, help="s3://bucket/prefix datastore (default: files in --repo)")
    parser.add_argument("--visits", type=int, default=3, help="past visits per instrument (default 3)")
    parser.add_argument(
        "--scale",
        type=float,
        default=None,
        help="detector shrink factor, e.g. 0.125 (default: simulation.scale of the config; "
        "processing must use the same value)",
    )
    parser.add_argument(
        "--detectors",
        type=int,
        default=9,
        help="detectors nearest the boresight with raws and templates (0: all; default 9)",
    )
    parser.add_argument("--seed", type=int, default=None, help="universe seed (default: simulation.seed)")
    parser.add_argument(
        "--apdb-config-dir",
        default=None,
        help="where each instrument's apdb-cli config goes (default: beside its SQLite APDB)",
    )
    parser.add_argument("--no-apdb", action="store_true", help="write no APDB and no APDB config")
    parser.add_argument("--bench", action="store_true", help="print the build report as JSON on stdout")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="log at DEBUG and show tracebacks")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parse(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        repo = args.repo or str(PROJECT_ROOT / load_config()["central_repo"])
        report = build_demo_repo(
            repo,
            args.instruments,
            registry_url=args.registry_url,
            s3_root=args.s3_root,
            registry_namespace=args.registry_namespace,
            n_visits=args.visits,
            scale=args.scale,
            n_detectors=args.detectors,
            seed=args.seed,
            progress=not args.no_progress,
        )
        apdb_files = (
            [] if args.no_apdb else [str(_write_apdb_config(name, args.apdb_config_dir)) for name in args.instruments]
        )
    except Exception as exc:  # noqa: BLE001 - the CLI reports any failure as one line.
        if args.debug:
            _log.exception("build failed")
        print(f"make_central_repo: error: {exc}", file=sys.stderr)
        return 1
    if args.bench:
        print(json.dumps({**report, "apdb_configs": apdb_files}, indent=2))
    else:
        print(f"{repo}: built in {report['seconds']:.1f} s; datasets {report['datasets']}")
        for path in apdb_files:
            print(f"APDB config: {path} (apdb-cli metadata show {path})")
    return 0


def _write_apdb_config(instrument: str, directory: str | None) -> Path:
    """Create the instrument's configured APDB if needed and write its apdb-cli config."""
    apdb = load_config(instrument=instrument)["apdb"]
    path = Path(directory) / f"{instrument}.yaml" if directory else default_config_path(apdb, instrument)
    return write_apdb_config(apdb, path)


if __name__ == "__main__":
    sys.exit(main())
