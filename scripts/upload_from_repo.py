"""Camera tester: replay raws of the central repo as new visits (new group ids, headers rewritten).

    python scripts/upload_from_repo.py CONFIG N_GROUPS [--ordered] [--seed N] [--config-file extra.yaml]
        [--avro] [--slew-s 2] [--exposure-s S] [--workers N]

A thin adapter over `workflow.sim.testers_replay.upload_from_repo`.  CONFIG is a YAML file
naming the instrument, the central repo and a Butler query for raws; see
``config/testers/upload_from_repo.example.yaml``.  Groups are chosen at random
(seeded) unless ``--ordered``.  Prints one line per group; errors are one line on
stderr and the exit status says what kind (`workflow.sim.testers.exit_status`).
"""

from __future__ import annotations

import argparse
import sys

from workflow.sim.testers import GroupReport, UploadOptions, add_upload_arguments, run_upload_cli
from workflow.sim.testers_replay import load_repo_query, upload_from_repo


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

    def upload(options: UploadOptions) -> list[GroupReport]:
        query = load_repo_query(args.config)
        if args.seed is not None:
            query["seed"] = args.seed
        return upload_from_repo(
            query, args.n_groups, ordered=args.ordered, options=options, extra_config_files=args.config_file
        )

    return run_upload_cli("upload_from_repo", args, upload)


if __name__ == "__main__":
    sys.exit(main())
