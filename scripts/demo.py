"""Run the main job on embedded defaults: no server, everything in local files.

1. Build (or complete) the demo central Butler repo: SQLite registry, local
   datastore, simulated calibs, refcat, templates and the raws of past visits.
2. Replay those visits through the Snakemake workflow on profiles/local:
   prep -> ingest -> pipeline -> export -> APDB load (SQLite APDB, alerts to Avro files).
   The APDB is created first and its ``apdb-cli`` config written to
   ``demo/apdb/<instrument>.yaml`` (``apdb-cli metadata show demo/apdb/LSSTComCamSim.yaml``).
3. Print the run summary, read back from the targets' outcome files.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from workflow.apdb.config_file import default_config_path, write_apdb_config
from workflow.core.config import PROJECT_ROOT, instrument_config_path, load_config
from workflow.core.log_setup import configure_logging
from workflow.outcomes.summary import collect_outcomes, format_summary, summarize
from workflow.runtime.replay import replay
from workflow.sim.demo_repo import build_demo_repo

_log = logging.getLogger("demo")
DEMO_CONFIG = PROJECT_ROOT / "config" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instrument", default="LSSTComCamSim")
    parser.add_argument("--visits", type=int, default=3, help="past visits to build and replay")
    args = parser.parse_args(argv)
    instrument_file = instrument_config_path(args.instrument)
    config = load_config(instrument_file, extra_files=[DEMO_CONFIG])
    configure_logging(config["log_levels"], stream=sys.stderr)
    started = time.monotonic()
    report = build_demo_repo(
        config["central_repo"],
        [args.instrument],
        n_visits=args.visits,
        scale=config["simulation"]["scale"],
        seed=config["simulation"]["seed"],
    )
    _log.info("central repo %s ready in %.1f s: %s", config["central_repo"], report["seconds"], report["datasets"])
    apdb_file = write_apdb_config(config["apdb"], default_config_path(config["apdb"], args.instrument))
    _log.info("APDB config for apdb-cli: %s", apdb_file)
    batches = replay(
        config,
        instrument_file=instrument_file,
        order="exposure",
        limit=args.visits,
        extra_configfiles=[DEMO_CONFIG],
        progress=True,
    )
    summary = summarize(collect_outcomes(config["paths"]["results"], args.instrument))
    _log.info(
        "replayed %d visit(s) in %.1f s\n%s",
        sum(len(b["groups"]) for b in batches),
        time.monotonic() - started,
        format_summary(summary),
    )
    return 0 if summary["outcomes"].get("failed", 0) == 0 and summary["targets"] else 1


if __name__ == "__main__":
    sys.exit(main())
