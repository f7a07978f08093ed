"""Camera tester: announce new visits on Kafka and upload simulated raws for them.

    python scripts/upload.py INSTRUMENT N_GROUPS [--config-file extra.yaml] [--avro] [--slew-s 2]
        [--exposure-s S] [--scale 1.0] [--ra RA --dec DEC --filter F] [--detectors ID ...]
        [--skip-detector ID ...] [--late-detector ID ...] [--workers N]

A thin adapter over `workflow.sim.testers.upload_simulated`.  The broker, topic, bucket
and S3 endpoint come from the instrument's config plus any ``--config-file``; S3
credentials from ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``.  Prints one line
per group (group id, objects, seconds).  Errors are one line on stderr; the exit
status says what kind (`workflow.sim.testers.exit_status`: 78 config, 75 retry later, ...).
"""

from __future__ import annotations

import argparse
import sys

from workflow.core.config import load_config
from workflow.sim.testers import GroupReport, UploadOptions, add_upload_arguments, run_upload_cli, upload_simulated


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("instrument", help="instrument name, e.g. LSSTComCamSim")
    parser.add_argument("n_groups", type=int, help="number of visits to announce and upload")
    parser.add_argument("--exptime", type=float, default=None, help="exposure time per snap in the raws")
    parser.add_argument("--scale", type=float, default=1.0, help="detector shrink factor (default 1)")
    parser.add_argument("--ra", type=float, default=None, help="pointing RA, deg (default: the demo field)")
    parser.add_argument("--dec", type=float, default=None, help="pointing Dec, deg (default: the demo field)")
    parser.add_argument("--rotation", type=float, default=0.0, help="camera angle, deg (default 0)")
    parser.add_argument("--filter", default=None, help="physical filter (default: the first r-band one)")
    parser.add_argument("--detectors", nargs="+", default=None, metavar="ID", help="ids or names (default: active)")
    parser.add_argument("--seed", type=int, default=0, help="universe seed of the simulation")
    add_upload_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parse(argv)

    def upload(options: UploadOptions) -> list[GroupReport]:
        config = load_config(instrument=args.instrument, extra_files=args.config_file)
        return upload_simulated(
            config,
            args.n_groups,
            options=options,
            scale=args.scale,
            ra=args.ra,
            dec=args.dec,
            rotation_deg=args.rotation,
            physical_filter=args.filter,
            exptime=args.exptime,
            detectors=args.detectors,
            seed=args.seed,
        )

    return run_upload_cli("upload", args, upload)


if __name__ == "__main__":
    sys.exit(main())
