"""Rule export_outputs: put the selected products into the central repo."""

from workflow.stages import run_export

run_export(  # noqa: F821 (snakemake is injected by Snakemake)
    snakemake.input.visit, snakemake.input.ingest, snakemake.input.pipeline,
    snakemake.output.record, snakemake.config, snakemake.log[0],
)
