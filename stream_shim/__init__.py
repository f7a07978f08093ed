"""The stream shim: Kafka next_visit and raw-arrival events to Snakemake targets."""
