"""Replay past visits from the central repo through the workflow, in batches.

Usage: python scripts/replay.py [--instrument LSSTComCamSim | --config-file X.yaml]
                                [--ordered] [--limit N] [--batch-visits K] [--profile profiles/local]
                                [--visits-only]

The summary at the end counts this run's targets only (not every outcome under results/).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from workflow.core.config import instrument_config_path, load_config
from workflow.core.exceptions import PromptSnakeError
from workflow.core.log_setup import configure_logging
from workflow.outcomes.summary import format_summary, summarize
from workflow.runtime.replay import replay
from workflow.stages.records import Outcome, read_done, read_failed


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
    parser.add_argument(
        "--visits-only", action="store_true", help="only write the visit files (then: snakemake -n --configfile ...)"
    )
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
            run=not args.visits_only,
        )
    except PromptSnakeError as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 2
    done_files = [path for batch in batches for path in batch["done_files"]]
    records, missing = run_outcomes(done_files)
    log = logging.getLogger("replay")
    if args.visits_only:
        log.info("wrote the visit files of %d target(s) under %s/", len(done_files), config["paths"]["visits"])
        return 0
    if not done_files:
        log.info("nothing replayed: no past visit of %s in the central repo", config["instrument"]["name"])
    else:
        log.info(
            "%d batch(es), %d target(s)%s\n%s",
            len(batches),
            len(done_files),
            f", {len(missing)} without an outcome file (see logs/replay/)" if missing else "",
            format_summary(summarize(records)),
        )
    return 0 if all(b["returncode"] == 0 for b in batches) and not missing else 1


def run_outcomes(done_files: Sequence[str | Path]) -> tuple[list[Outcome], list[Path]]:
    """Return the outcome records of this run's targets, and the targets that have none.

    Only the targets this run asked for count: ``results/`` may hold other runs' outcomes.
    A target's record is its ``done.json``, else the ``failed.json`` beside it.
    """
    records: list[Outcome] = []
    missing = []
    for done in map(Path, done_files):
        failed = done.with_name("failed.json")
        if done.exists():
            records.append(read_done(done))
        elif failed.exists():
            records.append(read_failed(failed))
        else:
            missing.append(done)
    return records, missing


if __name__ == "__main__":
    sys.exit(main())
