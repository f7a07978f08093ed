# Shared setup: validate the config, path patterns, wildcard constraints, targets.
# Logic lives in the workflow package; this file only declares.

import os
import shlex
import sys

from workflow.core.config import validate_loaded_config, write_config_snapshot
from workflow.core.identifiers import PATTERNS
from workflow.runtime.snakemake_tuning import disable_job_rate_limiter
from workflow.runtime.stage_client import CLIENT_SCRIPT
from workflow.stages import STAGES
from workflow.stages.target import existing_visit_files

validate_loaded_config(config, [*workflow.configfiles, *workflow.overwrite_configfiles])

# Stages run through the node's warm stage server (workflow.runtime.stage_client): Python
# start-up and imports would otherwise cost more than most stages take.  The client
# is stdlib-only, so it starts without site-packages (-S: 10 ms instead of ~50).
CONFIG_JSON = str(write_config_snapshot(config))
STAGE = f"{sys.executable} -S {shlex.quote(CLIENT_SCRIPT)}"

INSTRUMENT = config["instrument"]["name"]

# Every rule's software: the pinned runtime environment (pyproject.toml, checked by
# tests/test_pins.py).  Used with --software-deployment-method conda; the k8s
# profile runs the same pins in its container image instead.
ENV = "../envs/prompt_snake.yaml"

# Which ready job takes a free core first: a new visit's prep (short; it must be
# done before the raws land), then alerts, then the science; exports last, as no
# one waits for them at night.  Ingest holds no core (--set-threads ingest=0 live).
PRIORITY = {
    "prep": 50,
    "apdb": 40,
    "pipeline": 30,
    "ingest": 20,
    "export": 10,
    "finish": 0,
}


# The default job rate limiter makes the scheduler's rounds grow with every finished
# job (see workflow.runtime.snakemake_tuning); without it, rounds follow job completions.
onstart:
    disable_job_rate_limiter(workflow)


# One detector-visit: {instrument}/{day_obs}/{group}/{detector}
# (each one path component; the patterns, shared with the shim's checks, are in
# workflow.core.identifiers)
TAIL = "{instrument}/{day_obs}/{group}/{detector}"
VISIT_FILE = os.path.join(
    config["paths"]["visits"], "{instrument}/{day_obs}/{group}/{detector}.json"
)
WORK = os.path.join(config["paths"]["work"], TAIL)
RESULT = os.path.join(config["paths"]["results"], TAIL)


wildcard_constraints:
    instrument=PATTERNS["instrument"],
    day_obs=PATTERNS["day_obs"],
    group=PATTERNS["group"],
    detector=PATTERNS["detector"],


def all_targets():
    """done.json of every visit file present for the configured instrument.

    With a remote default storage (profiles/k8s) the visit files are on S3, not in the
    local visits/ directory: name the targets then (listing the local directory would
    offer targets that are not the run's).
    """
    if workflow.storage_settings.default_storage_provider is not None:
        logger.warning(
            "target all lists no visit files (they are on the default storage): "
            "name the targets, e.g. snakemake --profile profiles/k8s -n -- results/.../done.json"
        )
        return []
    return [
        f"{config['paths']['results']}/{INSTRUMENT}/{day_obs}/{group}/{detector}/done.json"
        for day_obs, group, detector in existing_visit_files(
            config["paths"]["visits"], INSTRUMENT
        )
    ]


def get_stage_records(wildcards):
    """Stage records that a target's summary gathers: every stage's but finish's own."""
    work = WORK.format(**wildcards)
    return [f"{work}/{name}.json" for name in STAGES if name != "finish"]
