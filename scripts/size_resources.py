"""Print per-rule resource requests measured from a run's outcome records (JSON).

    python scripts/size_resources.py [--results results] [--headroom 1.25]

Reads every ``done.json`` under the results directory: the p95 peak RSS, CPU and wall
of each forked stage (recorded by the stage itself, not Snakemake's client-side
benchmark) and the ``mem_mb`` a profile should request (`workflow.outcomes.sizing`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from workflow.outcomes.sizing import set_resources_lines, size_resources
from workflow.outcomes.summary import collect_outcomes


def main(argv: list[str] | None = None) -> int:
    """Print the sizes as JSON; return 1 when no record carries stage resources."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default="results", help="results directory of a run")
    parser.add_argument("--headroom", type=float, default=1.25, help="factor on the p95 peak RSS")
    args = parser.parse_args(argv)
    sizes = size_resources(collect_outcomes(args.results), headroom=args.headroom)
    report = {
        "results": str(Path(args.results).resolve()),
        "load_average": os.getloadavg(),
        "rules": [dataclasses.asdict(s) for s in sizes],
        "set-resources": set_resources_lines(sizes),
    }
    print(json.dumps(report, indent=1))
    return 0 if sizes else 1


if __name__ == "__main__":
    sys.exit(main())
