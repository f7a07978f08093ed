"""Replay past visits from the central repo through the workflow, in batches.

Usage: python scripts/replay.py [--instrument LSSTComCamSim | --config-file X.yaml]
                                [--ordered] [--limit N] [--batch-visits K] [--profile profiles/local]
"""

from __future__ import annotations

import argparse
import logging
import sys

from workflow.core.config import instrument_config_path, load_config
from workflow.core.exceptions import PromptSnakeError
from workflow.core.log_setup import configure_logging
from workflow.outcomes.summary import collect_outcomes, format_summary, summarize
from workflow.runtime.replay import replay


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instrument", default=None, help="instrument name (its shipped config file)")
    parser.add_argument("--config-file", default=None, help="instrument config file (instead of --instrument)")
    parser.add_argument("--extra-config", action="append", default=[], help="further config files merged last")
    parser.add_argument("--ordered", action="store_true", help="exposure order (default: random)")
    parser.add_argument("--limit", type=int, default=None, help="at most N visits")
    parser.add_argument("--batch-visits", type=int, default=1, help="visits per Snakemake run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random order")
    parser.add_argument("--profile", default="profiles/local")
    args = parser.parse_args(argv)
    try:
        instrument_file = args.config_file or instrument_config_path(args.instrument or "LSSTComCamSim")
        config = load_config(instrument_file, extra_files=args.extra_config)
        configure_logging(config["log_levels"], stream=sys.stderr)
        batches = replay(
            config,
            instrument_file=instrument_file,
            order="exposure" if args.ordered else "random",
            limit=args.limit,
            batch_visits=args.batch_visits,
            seed=args.seed,
            extra_configfiles=args.extra_config,
            profile=args.profile,
            progress=True,
        )
    except PromptSnakeError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    summary = summarize(collect_outcomes(config["paths"]["results"], config["instrument"]["name"]))
    logging.getLogger("replay").info("%d batch(es)\n%s", len(batches), format_summary(summary))
    return 0 if all(b["returncode"] == 0 for b in batches) else 1


if __name__ == "__main__":
    sys.exit(main())
