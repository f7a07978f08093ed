# prompt-snake: Rubin-style Prompt Processing, one target per detector-visit.
#
# Target: results/{instrument}/{day_obs}/{group}/{detector}/done.json
# Input of a target: its fanned-out visit file visits/{instrument}/{day_obs}/{group}/{detector}.json
# (written by the stream shim live, or by scripts/replay.py).
#
# Choose the instrument with: snakemake --configfile config/instruments/<X>.yaml

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"
configfile: "config/pipelines.yaml"


if "instrument" not in config:
    # No --configfile named an instrument: use the default one.
    workflow.configfile(config["default_instrument_file"])


include: "rules/common.smk"


rule all:
    input:
        all_visit_files(),
