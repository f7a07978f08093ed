"""prompt-snake: the library that the Snakemake rules and the stream shim call."""
