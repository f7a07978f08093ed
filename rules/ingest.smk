# ingest: wait for the raw snaps (not Snakemake inputs), download and check them.


rule ingest:
    input:
        visit=VISIT_FILE,
    output:
        record=f"{WORK}/ingest.json",
    log:
        f"logs/ingest/{TAIL}.log",
    benchmark:
        f"benchmarks/ingest/{TAIL}.tsv"
    priority: PRIORITY["ingest"]
    group:
        "detector_visit"
    conda:
        ENV
    resources:
        mem_mb=400,
    params:
        config=CONFIG_JSON,
    shell:
        STAGE
        + " ingest --config {params.config:q} --log {log:q} --visit {input.visit:q} --record {output.record:q}"
