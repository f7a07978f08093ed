"""Make the night report's pictures and metrics, and optionally the HTML report.

Usage (from the run directory, e.g. the checkout after `make demo`):

    python scripts/make_report.py [--results results] [--out-dir build/report]
        [--instrument X] [--day-obs YYYY-MM-DD] [--cutouts 6] [--html report.html]

Writes the files of `workflow.outcomes.report.build_report` into --out-dir; with --html also
runs `snakemake --report <html> all night_report` on the workflow itself (rules/report.smk
marks the files) to pack them into one self-contained page (what `make report` does).
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

from workflow.core.config import PROJECT_ROOT, instrument_config_path
from workflow.core.log_setup import configure_logging
from workflow.outcomes.report import build_report

_log = logging.getLogger("make_report")
REPORT_DIR = "build/report"
"""Where the workflow's rule ``night_report`` (rules/report.smk) has the report files, from the run directory."""


def html_report(html: str | Path, *, out_dir: str | Path = REPORT_DIR, instrument: str | None = None) -> int:
    """Pack the report files into one HTML page with ``snakemake --report`` on the real workflow.

    The targets are ``all`` (the detector-visit chain of the visit files present) and
    ``night_report`` (whose outputs are these files), so the report's Workflow and
    Statistics panels describe the run; nothing is run.  Returns Snakemake's exit status.
    """
    if Path(out_dir).resolve() != Path(REPORT_DIR).resolve():
        _log.error("--html: the workflow's rule night_report reads %s; got --out-dir %s", REPORT_DIR, out_dir)
        return 2
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(PROJECT_ROOT / "Snakefile"),
        "--directory",
        str(Path.cwd()),
        *(["--configfile", str(instrument_config_path(instrument))] if instrument else []),
        "--report",
        str(html),
        "all",
        "night_report",
    ]
    return subprocess.run(command).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results", help="the run's results directory")
    parser.add_argument("--benchmarks", default=None, help="benchmarks directory (default: next to results)")
    parser.add_argument("--work-area", default=None, help="work_area directory (default: next to results)")
    parser.add_argument("--out-dir", default=REPORT_DIR, help="where pictures and metrics go")
    parser.add_argument("--instrument", default=None)
    parser.add_argument("--day-obs", default=None, help="one night, YYYY-MM-DD")
    parser.add_argument("--cutouts", type=int, default=6, help="DIA sources to show")
    parser.add_argument("--no-rulegraph", action="store_true", help="skip the rule graph (~3 s)")
    parser.add_argument("--html", default=None, help="also write the Snakemake HTML report here")
    args = parser.parse_args(argv)
    configure_logging("workflow=INFO", stream=sys.stderr)
    written = build_report(
        args.results,
        args.out_dir,
        benchmarks_root=args.benchmarks,
        work_root=args.work_area,
        instrument=args.instrument,
        day_obs=args.day_obs,
        n_cutouts=args.cutouts,
        rulegraph=not args.no_rulegraph,
    )
    _log.info("nights %s; %d cutout(s); files in %s", written["nights"], len(written["cutouts"]), args.out_dir)
    if args.html:
        return html_report(args.html, out_dir=args.out_dir, instrument=args.instrument)
    return 0


if __name__ == "__main__":
    sys.exit(main())
