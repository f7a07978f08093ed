# prompt-snake: Rubin-style Prompt Processing, one target per detector-visit.
#
# Target: results/{instrument}/{day_obs}/{group}/{detector}/done.json
# Input:  visits/{instrument}/{day_obs}/{group}/{detector}.json (the fanned-out
#         next_visit, written by the stream shim live or by scripts/replay.py)
# Chain:  prep, ingest -> pipeline -> export, apdb -> finish (one word per stage, see workflow.stages)
#
# Choose the instrument with: snakemake --configfile config/instruments/<X>.yaml

import os

from snakemake.utils import min_version

min_version("9.0")


# Config paths are relative to this file, so a run may use any --directory.
configfile: os.path.join(workflow.basedir, "config/config.yaml")
configfile: os.path.join(workflow.basedir, "config/pipelines.yaml")


if "instrument" not in config:
    # No --configfile named an instrument: use the default one.
    workflow.configfile(
        os.path.join(workflow.basedir, config["default_instrument_file"])
    )


include: "rules/common.smk"
include: "rules/prep.smk"
include: "rules/ingest.smk"
include: "rules/pipeline.smk"
include: "rules/export.smk"
include: "rules/apdb.smk"
include: "rules/report.smk"


# The night report (make report): snakemake --report report.html all night_report
report: "report/workflow.rst"


rule all:
    input:
        all_targets(),
