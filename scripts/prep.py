"""Rule prep: stage calibs, templates and refcat shards for one detector-visit."""

from workflow.stages import run_prep

run_prep(snakemake.input.visit, snakemake.output.manifest, snakemake.config, snakemake.log[0])  # noqa: F821
