# Shared setup: validate the config, constrain wildcards, list targets.
# Logic lives in the workflow package; these are thin declarations.

from pathlib import Path

from workflow.config import validate_loaded_config

validate_loaded_config(config, [*workflow.configfiles, *workflow.overwrite_configfiles])

INSTRUMENT = config["instrument"]["name"]


wildcard_constraints:
    instrument=r"[A-Za-z][A-Za-z0-9-]*",
    day_obs=r"\d{4}-\d{2}-\d{2}",
    group=r"[^/]+",
    detector=r"\d+",


def all_visit_files():
    """Per-detector visit files present for the configured instrument."""
    root = Path(config["paths"]["visits"]) / INSTRUMENT
    return sorted(str(p) for p in root.glob("*/*/*.json"))
