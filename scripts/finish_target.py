"""Rule finish_target: gather the stage records into done.json."""

from workflow.stages import run_finish

run_finish(  # noqa: F821 (snakemake is injected by Snakemake)
    snakemake.input.visit, list(snakemake.input.records), snakemake.output.done,
    snakemake.config, snakemake.log[0],
)
