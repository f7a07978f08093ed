"""Rule ingest: find, wait for and check the raws of one detector-visit."""

from workflow.stages import run_ingest

run_ingest(snakemake.input.visit, snakemake.output.record, snakemake.config, snakemake.log[0])  # noqa: F821
