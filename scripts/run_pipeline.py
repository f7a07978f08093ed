"""Rule run_pipeline: science pipelines with fallback for one detector-visit."""

from workflow.stages import run_pipeline

run_pipeline(  # noqa: F821 (snakemake is injected by Snakemake)
    snakemake.input.visit, snakemake.input.prep, snakemake.input.ingest,
    snakemake.output.record, snakemake.config, snakemake.log[0],
)
