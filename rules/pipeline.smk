# pipeline: ISR, calibrate, image differencing, DIA sources, with fallback pipelines.


rule pipeline:
    input:
        visit=VISIT_FILE,
        prep=rules.prep.output.manifest,
        ingest=rules.ingest.output.record,
    output:
        record=f"{WORK}/pipeline.json",
    log:
        f"logs/pipeline/{TAIL}.log",
    benchmark:
        f"benchmarks/pipeline/{TAIL}.tsv"
    priority: PRIORITY["pipeline"]
    group:
        "detector_visit"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=3300,
    params:
        config=CONFIG_JSON,
    shell:
        STAGE
        + " pipeline --config {params.config:q} --log {log:q} --visit {input.visit:q} --prep {input.prep:q} --ingest {input.ingest:q} --record {output.record:q}"
