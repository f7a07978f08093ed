# prep: stage calibs, templates and refcat shards for the visit (before raws exist).


rule prep:
    input:
        visit=VISIT_FILE,
    output:
        manifest=WORK + "/prep.json",
    log:
        "logs/prep/" + TAIL + ".log",
    benchmark:
        "benchmarks/prep/" + TAIL + ".tsv"
    group:
        "detector_visit"
    priority:
        PRIORITY["prep"]
    resources:
        mem_mb=1000,
    params:
        config=CONFIG_JSON,
    shell:
        STAGE + " prep {params.config} {log:q} -- {input.visit:q} {output.manifest:q}"
