# export: selected outputs to the central repo; finish: the target's summary.


rule export:
    input:
        visit=VISIT_FILE,
        ingest=rules.ingest.output.record,
        pipeline=rules.pipeline.output.record,
    output:
        record=f"{WORK}/export.json",
    log:
        f"logs/export/{TAIL}.log",
    benchmark:
        f"benchmarks/export/{TAIL}.tsv"
    priority: PRIORITY["export"]
    group:
        "detector_visit"
    conda:
        ENV
    resources:
        mem_mb=800,
    params:
        config=CONFIG_JSON,
    shell:
        STAGE
        + " export --config {params.config:q} --log {log:q} --visit {input.visit:q} --ingest {input.ingest:q} --pipeline {input.pipeline:q} --record {output.record:q}"


rule finish:
    input:
        visit=VISIT_FILE,
        records=get_stage_records,
    output:
        done=f"{RESULT}/done.json",
    log:
        f"logs/finish/{TAIL}.log",
    benchmark:
        f"benchmarks/finish/{TAIL}.tsv"
    priority: PRIORITY["finish"]
    group:
        "detector_visit"
    conda:
        ENV
    params:
        config=CONFIG_JSON,
    shell:
        STAGE
        + " finish --config {params.config:q} --log {log:q} --visit {input.visit:q} --records {input.records:q} --done {output.done:q}"
