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
    threads: 1
    resources:
        mem_mb=4000,
    script:
        "../scripts/run_pipeline.py"
