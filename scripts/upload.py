"""Camera tester: announce new visits on Kafka and upload simulated raws for them.

    python scripts/upload.py INSTRUMENT N_GROUPS [--config-file extra.yaml] [--avro] [--slew-s 2]
        [--exposure-s S] [--scale 1.0] [--ra RA --dec DEC --filter F] [--detectors ID ...]
        [--skip-detector ID ...] [--late-detector ID ...] [--workers N]

A thin adapter over `workflow.testers.upload_simulated`.  The broker, topic, bucket
and S3 endpoint come from the instrument's config plus any ``--config-file``; S3
credentials from ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``.  Prints one line
per group (group id, objects, seconds).  Errors are one line on stderr; the exit
status says what kind (`workflow.testers.exit_status`: 78 config, 75 retry later, ...).
"""

from __future__ import annotations

import argparse
import logging
import sys

from workflow.config import load_config
from workflow.log_setup import configure_logging
from workflow.testers import UploadOptions, exit_status, upload_simulated

_log = logging.getLogger("upload")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("instrument", help="instrument name, e.g. LSSTComCamSim")
    parser.add_argument("n_groups", type=int, help="number of visits to announce and upload")
    parser.add_argument("--config-file", action="append", default=[], metavar="FILE",
                        help="extra config file merged over the instrument's (repeatable)")
    parser.add_argument("--avro", action="store_true", help="publish the summit's Avro form instead of JSON")
    parser.add_argument("--schema-id", type=int, default=1, help="schema-registry id in the Avro framing")
    parser.add_argument("--slew-s", type=float, default=2.0, help="wait after each next_visit (default 2)")
    parser.add_argument("--exposure-s", type=float, default=None, help="wait per snap (default: its exptime)")
    parser.add_argument("--exptime", type=float, default=None, help="exposure time per snap in the raws")
    parser.add_argument("--scale", type=float, default=1.0, help="detector shrink factor (default 1)")
    parser.add_argument("--ra", type=float, default=None, help="pointing RA, deg (default: the demo field)")
    parser.add_argument("--dec", type=float, default=None, help="pointing Dec, deg (default: the demo field)")
    parser.add_argument("--rotation", type=float, default=0.0, help="camera angle, deg (default 0)")
    parser.add_argument("--filter", default=None, help="physical filter (default: the first r-band one)")
    parser.add_argument("--detectors", nargs="+", default=None, metavar="ID", help="ids or names (default: active)")
    parser.add_argument("--skip-detector", action="append", default=[], metavar="ID", help="never upload this one")
    parser.add_argument("--late-detector", action="append", default=[], metavar="ID", help="upload this one late")
    parser.add_argument("--late-delay-s", type=float, default=5.0, help="delay of late detectors (default 5)")
    parser.add_argument("--workers", type=int, default=2, help="upload processes (default 2)")
    parser.add_argument("--survey", default=None, help="survey of the next_visits (default SURVEY)")
    parser.add_argument("--seed", type=int, default=0, help="universe seed of the simulation")
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
        config = load_config(instrument=args.instrument, extra_files=args.config_file)
        reports = upload_simulated(
            config, args.n_groups, options=options, scale=args.scale, ra=args.ra, dec=args.dec,
            rotation_deg=args.rotation, physical_filter=args.filter, exptime=args.exptime,
            detectors=args.detectors, seed=args.seed)
    except Exception as exc:  # noqa: BLE001 - the CLI reports any failure as one line.
        if args.debug:
            _log.exception("upload failed")
        print(f"upload: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exit_status(exc)
    for report in reports:
        print(f"{report.visit.groupId}: {len(report.raws)} raws, {len(report.keys)} objects "
              f"in {report.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
