# night_report: the night report's pictures and metrics, marked for Snakemake's own
# HTML report.  Not a step of a detector-visit (nothing depends on it): `make report`
# writes the files with scripts/make_report.py (outside Snakemake, so it never takes
# the locks of a live run here) and then packs them with
#   snakemake --report report.html all night_report
# which puts this rule next to the detector-visit chain in the report's Workflow and
# Statistics panels.  Running the rule (`snakemake -c1 night_report`) makes the same files.

REPORT_DIR = "build/report"


rule night_report:
    output:
        rulegraph=report(
            f"{REPORT_DIR}/rulegraph.png",
            caption="../report/captions/rulegraph.rst",
            category="1. Workflow",
        ),
        latency=report(
            f"{REPORT_DIR}/latency.png",
            caption="../report/captions/latency.rst",
            category="2. Latency",
        ),
        alerts=report(
            f"{REPORT_DIR}/alerts_per_visit.png",
            caption="../report/captions/alerts_per_visit.rst",
            category="3. Alerts",
        ),
        focal_plane=report(
            f"{REPORT_DIR}/focal_plane.png",
            caption="../report/captions/focal_plane.rst",
            category="4. Outcomes",
        ),
        cutouts=report(
            directory(f"{REPORT_DIR}/cutouts"),
            patterns=["{cutout}.png"],
            caption="../report/captions/cutouts.rst",
            category="5. DIA source cutouts",
        ),
        metrics=report(
            directory(f"{REPORT_DIR}/metrics"),
            patterns=["{night}.json"],
            caption="../report/captions/metrics.rst",
            category="6. Metrics",
        ),
    log:
        "logs/night_report.log",
    localrule: True
    conda:
        ENV
    params:
        python=sys.executable,
        script=os.path.join(workflow.basedir, "scripts", "make_report.py"),
        results=config["paths"]["results"],
        out_dir=lambda wildcards, output: os.path.dirname(output.latency),
    shell:
        "{params.python:q} {params.script:q} --results {params.results:q} --out-dir {params.out_dir:q} 2> {log:q}"
