# prep: stage calibs, templates and refcat shards for the visit (before raws exist).


rule prep:
    input:
        visit=VISIT_FILE,
    output:
        manifest=f"{WORK}/prep.json",
    log:
        f"logs/prep/{TAIL}.log",
    benchmark:
        f"benchmarks/prep/{TAIL}.tsv"
    priority: PRIORITY["prep"]
    group:
        "detector_visit"
    conda:
        ENV
    resources:
        mem_mb=300,
    params:
        config=CONFIG_JSON,
    shell:
        STAGE
        + " prep --config {params.config:q} --log {log:q} --visit {input.visit:q} --manifest {output.manifest:q}"
