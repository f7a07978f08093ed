# Shared setup: validate the config, path patterns, wildcard constraints, targets.
# Logic lives in the workflow package; this file only declares.

import shlex
import sys

from workflow.config import validate_loaded_config, write_config_snapshot
from workflow.snakemake_tuning import disable_job_rate_limiter
from workflow.stage_client import CLIENT_SCRIPT
from workflow.target import existing_visit_files

validate_loaded_config(config, [*workflow.configfiles, *workflow.overwrite_configfiles])

# Stages run through the node's warm stage server (workflow.stage_client): Python
# start-up and imports would otherwise cost more than most stages take.  The client
# is stdlib-only, so it starts without site-packages (-S: 10 ms instead of ~50).
CONFIG_JSON = str(write_config_snapshot(config))
STAGE = f"{sys.executable} -S {shlex.quote(CLIENT_SCRIPT)}"

INSTRUMENT = config["instrument"]["name"]

# Which ready job takes a free core first: a new visit's prep (short; it must be
# done before the raws land), then alerts, then the science; exports last, as no
# one waits for them at night.  Ingest holds no core (--set-threads ingest=0 live).
PRIORITY = {"prep": 50, "apdb_load": 40, "run_pipeline": 30, "ingest": 20, "export_outputs": 10, "finish_target": 0}


# The default job rate limiter makes the scheduler's rounds grow with every finished
# job (see workflow.snakemake_tuning); without it, rounds follow job completions.
onstart:
    disable_job_rate_limiter(workflow)


# One detector-visit: {instrument}/{day_obs}/{group}/{detector}
TAIL = "{instrument}/{day_obs}/{group}/{detector}"
VISIT_FILE = config["paths"]["visits"] + "/{instrument}/{day_obs}/{group}/{detector}.json"
WORK = config["paths"]["work"] + "/" + TAIL
RESULT = config["paths"]["results"] + "/" + TAIL


wildcard_constraints:
    instrument=r"[A-Za-z][A-Za-z0-9-]*",
    day_obs=r"\d{4}-\d{2}-\d{2}",
    group=r"[^/]+",
    detector=r"\d+",


def all_targets():
    """done.json of every visit file present for the configured instrument."""
    return [
        f"{config['paths']['results']}/{INSTRUMENT}/{day_obs}/{group}/{detector}/done.json"
        for day_obs, group, detector in existing_visit_files(config["paths"]["visits"], INSTRUMENT)
    ]


def get_stage_records(wildcards):
    """Stage records that a target's summary gathers (the chain's last outputs)."""
    work = WORK.format(**wildcards)
    return [f"{work}/{name}.json" for name in ("prep", "ingest", "pipeline", "export", "apdb")]
