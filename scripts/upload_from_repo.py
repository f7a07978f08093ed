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
from workflow.testers import add_upload_arguments, exit_status, upload_options_from_args
from workflow.testers_replay import load_repo_query, upload_from_repo

_log = logging.getLogger("upload_from_repo")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML file: instrument, central_repo, collections, where, bind, ...")
    parser.add_argument("n_groups", type=int, help="number of visits to replay")
    parser.add_argument("--ordered", action="store_true", help="replay in exposure order, not at random")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random choice (default: CONFIG's, 0)")
    add_upload_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parse(argv)
    configure_logging(f"root={'DEBUG' if args.debug else 'INFO' if args.verbose else 'WARNING'}", stream=sys.stderr)
    options = upload_options_from_args(args, progress=sys.stderr.isatty())
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
