# export: selected outputs to the central repo; finish: the target's summary.


rule export_outputs:
    input:
        visit=VISIT_FILE,
        ingest=rules.ingest.output.record,
        pipeline=rules.run_pipeline.output.record,
    output:
        record=WORK + "/export.json",
    log:
        "logs/export/" + TAIL + ".log",
    benchmark:
        "benchmarks/export/" + TAIL + ".tsv"
    group:
        "detector_visit"
    priority:
        PRIORITY["export_outputs"]
    resources:
        mem_mb=1000,
    params:
        config=CONFIG_JSON,
    shell:
        STAGE + " export {params.config} {log:q} -- {input.visit:q} {input.ingest:q} {input.pipeline:q} {output.record:q}"


rule finish_target:
    input:
        visit=VISIT_FILE,
        records=get_stage_records,
    output:
        done=RESULT + "/done.json",
    log:
        "logs/finish/" + TAIL + ".log",
    benchmark:
        "benchmarks/finish/" + TAIL + ".tsv"
    group:
        "detector_visit"
    priority:
        PRIORITY["finish_target"]
    params:
        config=CONFIG_JSON,
    shell:
        STAGE + " finish {params.config} {log:q} -- {input.visit:q} {output.done:q} {input.records:q}"
