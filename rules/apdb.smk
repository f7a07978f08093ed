# apdb_load: association, DiaObject/DiaSource writes (one store), alerts.


rule apdb_load:
    input:
        visit=VISIT_FILE,
        prep=rules.prep.output.manifest,
        pipeline=rules.run_pipeline.output.record,
    output:
        record=WORK + "/apdb.json",
    log:
        "logs/apdb/" + TAIL + ".log",
    benchmark:
        "benchmarks/apdb/" + TAIL + ".tsv"
    group:
        "detector_visit"
    priority:
        PRIORITY["apdb_load"]
    resources:
        mem_mb=1000,
    params:
        config=CONFIG_JSON,
    shell:
        STAGE + " apdb {params.config} {log:q} -- {input.visit:q} {input.prep:q} {input.pipeline:q} {output.record:q}"
