"""Camera tester: replay raws of the central repo as new visits (new group ids, headers rewritten).

    python scripts/upload_from_repo.py CONFIG N_GROUPS [--ordered] [--seed N] [--config-file extra.yaml]
        [--avro] [--slew-s 2] [--exposure-s S] [--workers N]

A thin adapter over `workflow.testers_replay.upload_from_repo`.  CONFIG is a YAML file
naming the instrument, the central repo and a Butler query for raws; see
``config/testers/upload_from_repo.example.yaml``.  Groups are chosen at random
(seeded) unless ``--ordered``.  Prints one line per group; errors are one line on
stderr and the exit status says what kind (`workflow.testers.exit_status`).
"""

from __future__ import annotations

import argparse
import logging
import sys

from workflow.log_setup import configure_logging
from workflow.testers import UploadOptions, exit_status
from workflow.testers_replay import load_repo_query, upload_from_repo

_log = logging.getLogger("upload_from_repo")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML file: instrument, central_repo, collections, where, bind, ...")
    parser.add_argument("n_groups", type=int, help="number of visits to replay")
    parser.add_argument("--ordered", action="store_true", help="replay in exposure order, not at random")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random choice (default: CONFIG's, 0)")
    parser.add_argument("--config-file", action="append", default=[], metavar="FILE",
                        help="extra config file merged over the instrument's (repeatable)")
    parser.add_argument("--avro", action="store_true", help="publish the summit's Avro form instead of JSON")
    parser.add_argument("--schema-id", type=int, default=1, help="schema-registry id in the Avro framing")
    parser.add_argument("--slew-s", type=float, default=2.0, help="wait after each next_visit (default 2)")
    parser.add_argument("--exposure-s", type=float, default=None, help="wait per snap (default: its exptime)")
    parser.add_argument("--skip-detector", action="append", default=[], metavar="ID", help="never upload this one")
    parser.add_argument("--late-detector", action="append", default=[], metavar="ID", help="upload this one late")
    parser.add_argument("--late-delay-s", type=float, default=5.0, help="delay of late detectors (default 5)")
    parser.add_argument("--workers", type=int, default=2, help="upload processes (default 2)")
    parser.add_argument("--survey", default=None, help="survey of the next_visits (default: science program)")
    parser.add_argument("--kafka-timeout-s", type=float, default=10.0, help="bound on broker contact (default 10)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    parser.add_argument("--debug", action="store_true", help="log at DEBUG and show tracebacks")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parse(argv)
    configure_logging(f"root={'DEBUG' if args.debug else 'INFO' if args.verbose else 'WARNING'}", stream=sys.stderr)
    options = UploadOptions(
        slew_s=args.slew_s, exposure_s=args.exposure_s, late_delay_s=args.late_delay_s, workers=args.workers,
        avro=args.avro, schema_id=args.schema_id, kafka_timeout_s=args.kafka_timeout_s,
        progress=not args.no_progress and sys.stderr.isatty(), skip_detectors=tuple(args.skip_detector),
        late_detectors=tuple(args.late_detector), survey=args.survey)
    try:
        query = load_repo_query(args.config)
        if args.seed is not None:
            query["seed"] = args.seed
        reports = upload_from_repo(query, args.n_groups, ordered=args.ordered, options=options,
                                   extra_config_files=args.config_file)
    except Exception as exc:  # noqa: BLE001 - the CLI reports any failure as one line.
        if args.debug:
            _log.exception("upload_from_repo failed")
        print(f"upload_from_repo: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exit_status(exc)
    for report in reports:
        print(f"{report.visit.groupId}: {len(report.raws)} raws, {len(report.keys)} objects "
              f"in {report.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
