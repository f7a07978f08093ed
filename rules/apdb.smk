# apdb: association, DiaObject/DiaSource writes (one store), alerts.


rule apdb:
    input:
        visit=VISIT_FILE,
        prep=rules.prep.output.manifest,
        pipeline=rules.pipeline.output.record,
    output:
        record=f"{WORK}/apdb.json",
    log:
        f"logs/apdb/{TAIL}.log",
    benchmark:
        f"benchmarks/apdb/{TAIL}.tsv"
    priority: PRIORITY["apdb"]
    group:
        "detector_visit"
    conda:
        ENV
    resources:
        mem_mb=1100,
    params:
        config=CONFIG_JSON,
    shell:
        STAGE
        + " apdb --config {params.config:q} --log {log:q} --visit {input.visit:q} --prep {input.prep:q} --pipeline {input.pipeline:q} --record {output.record:q}"
