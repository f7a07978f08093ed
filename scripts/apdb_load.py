"""Rule apdb_load: associate, store in the APDB, send alerts for one detector-visit."""

from workflow.stages import run_apdb

run_apdb(  # noqa: F821 (snakemake is injected by Snakemake)
    snakemake.input.visit, snakemake.input.prep, snakemake.input.pipeline,
    snakemake.output.record, snakemake.config, snakemake.log[0],
)
