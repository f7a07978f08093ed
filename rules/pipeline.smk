# pipeline: ISR, calibrate, image differencing, DIA sources, with fallback pipelines.


rule run_pipeline:
    input:
        visit=VISIT_FILE,
        prep=rules.prep.output.manifest,
        ingest=rules.ingest.output.record,
    output:
        record=WORK + "/pipeline.json",
    log:
        "logs/pipeline/" + TAIL + ".log",
    benchmark:
        "benchmarks/pipeline/" + TAIL + ".tsv"
    group:
        "detector_visit"
    priority:
        PRIORITY["run_pipeline"]
    threads: 1
    resources:
        mem_mb=4000,
    params:
        config=CONFIG_JSON,
    shell:
        STAGE + " pipeline {params.config} {log:q} -- {input.visit:q} {input.prep:q} {input.ingest:q} {output.record:q}"
