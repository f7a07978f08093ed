"""Run a node's batched-export writer: ingest the export requests in ``export.spool_dir`` in batches.

Used with ``export.mode: batched``: the export stage of each detector-visit only queues
a request, and this long-lived process (one per node, beside the workflow) commits many
detector-visits per transaction (`workflow.repo.export_batch`).  SIGTERM or SIGINT stops it
between batches; a request that was not committed stays pending for the next start.

Usage: ``.venv/bin/python scripts/export_writer.py --instrument LSSTCam --extra-config site.yaml``
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from workflow.core.config import load_config
from workflow.core.exceptions import PromptSnakeError
from workflow.stages.export import run_writer


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run the writer until stopped (or idle); return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instrument", default=None, help="instrument name (its shipped config file)")
    parser.add_argument("--config-file", default=None, help="instrument config file (instead of --instrument)")
    parser.add_argument("--extra-config", action="append", default=[], help="further config files merged last")
    parser.add_argument("--max-batch", type=int, default=1000, help="most requests per transaction")
    parser.add_argument("--transfer", default="copy", help="ingest transfer mode from the spool (copy, hardlink)")
    parser.add_argument("--idle-exit-s", type=float, default=None, help="exit after this long with nothing pending")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        config = load_config(args.config_file, instrument=args.instrument, extra_files=args.extra_config)
        committed = run_writer(
            config,
            idle_exit_s=args.idle_exit_s,
            max_batch=args.max_batch,
            transfer=args.transfer,
            should_stop=stop.is_set,
        )
    except PromptSnakeError as exc:
        print(f"export_writer: error: {exc}", file=sys.stderr)
        return 1
    logging.getLogger("export_writer").info("stopped after committing %d requests", committed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
