# ingest: wait for the raw snaps (not Snakemake inputs), download and check them.


rule ingest:
    input:
        visit=VISIT_FILE,
    output:
        record=WORK + "/ingest.json",
    log:
        "logs/ingest/" + TAIL + ".log",
    benchmark:
        "benchmarks/ingest/" + TAIL + ".tsv"
    group:
        "detector_visit"
    priority:
        PRIORITY["ingest"]
    resources:
        mem_mb=1000,
    params:
        config=CONFIG_JSON,
    shell:
        STAGE + " ingest {params.config} {log:q} -- {input.visit:q} {output.record:q}"
