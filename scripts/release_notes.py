"""Print what a prompt-snake release must state, or run the start-up version checks.

Usage:
    python scripts/release_notes.py [--json]
    python scripts/release_notes.py --check [--instrument LSSTComCamSim | --config-file X.yaml]
                                    [--extra-config Y.yaml] [--base-dir DIR]

The facts: our version (and the service image the k8s profile runs), APDB schema and
ApdbSql/ApdbCassandra versions, the dimensions config (namespace + version), the alert
schema, Snakemake and Python.  --check opens the configured APDB and central repo and
exits 2 with the reason if one of them (or the alert schema) is not supported.
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from workflow.core.config import PROJECT_ROOT, instrument_config_path, load_config
from workflow.core.exceptions import PromptSnakeError
from workflow.runtime.versions import check_startup, release_facts


def _profile_image() -> str:
    with open(PROJECT_ROOT / "profiles" / "k8s" / "config.yaml") as stream:
        return str(yaml.safe_load(stream).get("container-image", "not set"))


def format_facts(facts: dict) -> str:
    """Render the release facts as the lines a release note carries."""
    apdb, dims, alerts = facts["apdb"], facts["dimensions"], facts["alert_schema"]
    image = facts["container_image"]
    lines = [
        f"prompt-snake {facts['prompt_snake']}",
        f"  container image (profiles/k8s): {image}"
        + ("" if image.endswith(":" + facts["prompt_snake"]) else "  <- tag differs from the version"),
        f"  APDB schema {apdb['schema']}, ApdbSql {apdb['ApdbSql']}, ApdbCassandra {apdb['ApdbCassandra']} "
        f"(lsst-dax-apdb {apdb['lsst-dax-apdb']}, lsst-sdm-schemas {apdb['lsst-sdm-schemas']}); accepts "
        + ", ".join(f"{k} {v}" for k, v in apdb["accepts"].items()),
        f"  dimensions config: namespace {dims['namespace']} version {dims['version']} "
        f"(lsst-daf-butler {dims['lsst-daf-butler']}); accepts "
        + ", ".join(f"{ns} version {'/'.join(map(str, v))}" for ns, v in dims["accepts"].items()),
        f"  alert schema {alerts['version']} (lsst-alert-packet {alerts['lsst-alert-packet']}); "
        f"accepts major {alerts['accepts_major']}",
        f"  Snakemake {facts['snakemake']}",
        f"  Python {facts['python']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--check", action="store_true", help="run the start-up checks on a configuration")
    parser.add_argument("--instrument", default=None, help="instrument name (its shipped config file)")
    parser.add_argument("--config-file", default=None, help="instrument config file (instead of --instrument)")
    parser.add_argument("--extra-config", action="append", default=[], help="further config files merged last")
    parser.add_argument("--base-dir", default=None, help="directory relative config paths are relative to")
    args = parser.parse_args(argv)
    if args.check:
        try:
            config = load_config(
                args.config_file or instrument_config_path(args.instrument or "LSSTComCamSim"),
                extra_files=args.extra_config,
            )
            found = check_startup(config, base_dir=args.base_dir)
        except PromptSnakeError as exc:
            print(f"release_notes: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(found, indent=1) if args.json else f"start-up checks passed: {found}")
        return 0
    facts = {**release_facts(), "container_image": _profile_image()}
    print(json.dumps(facts, indent=1) if args.json else format_facts(facts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
