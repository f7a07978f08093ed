"""Tests for `workflow.outcomes.metrics`, `workflow.outcomes.report`, ``scripts/make_report.py`` and
the workflow's rule ``night_report``: metrics of a fabricated night, the pictures, and the Snakemake
HTML report rendered in headless Chromium with every image loaded."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from prometheus_client.parser import text_string_to_metric_families

from stream_shim.status import ShimStatus
from workflow.core.config import PROJECT_ROOT
from workflow.outcomes.metrics import night_metrics, nights, percentiles, read_benchmarks, render_prometheus
from workflow.outcomes.report import (
    build_report,
    render_rulegraph,
    select_cutout_sources,
)
from workflow.stages.records import StageRecord, write_record

INSTRUMENT = "LSSTComCamSim"
DAY_OBS = "2026-11-27"
GROUPS = ("2026-11-27T03:00:00.000", "2026-11-27T03:01:00.000")
STAGES = {"prep": 1.0, "ingest": 2.0, "pipeline": 10.0, "export": 0.5, "apdb": 0.8, "finish": 0.1}
BENCH_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _image(path: Path, data: np.ndarray) -> None:
    """A product file shaped like `workflow.science.exposure.write_exposure` output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.HDUList(
        [
            fits.PrimaryHDU(),
            fits.ImageHDU(data.astype(np.float32), name="IMAGE"),
            fits.ImageHDU(np.zeros(data.shape, np.int32), name="MASK"),
            fits.ImageHDU(np.ones(data.shape, np.float32), name="VARIANCE"),
        ]
    ).writeto(path)


def _products(work: Path, rng: np.random.Generator, detector: int) -> dict[str, str]:
    """Science, template, difference images with one transient, and its DIA source table."""
    yy, xx = np.mgrid[:64, :64]
    star = 500 * np.exp(-((xx - 20) ** 2 + (yy - 40) ** 2) / 4.0)
    transient = 300 * np.exp(-((xx - 40) ** 2 + (yy - 25) ** 2) / 4.0)
    template = star + rng.normal(0, 5, star.shape)
    science = star + transient + rng.normal(0, 5, star.shape)
    products = work / "products"
    paths = {
        "preliminary_visit_image": products / "preliminary_visit_image.fits",
        "template_image": products / "template_image.fits",
        "difference_image": products / "difference_image.fits",
        "dia_source_unfiltered": products / "dia_source_unfiltered.parquet",
    }
    for name, data in (
        ("preliminary_visit_image", science),
        ("template_image", template),
        ("difference_image", science - template),
    ):
        _image(paths[name], data)
    pd.DataFrame(
        {
            "diaSourceId": [detector * 100 + 1, detector * 100 + 2],
            "x": [40.0, 10.0],
            "y": [25.0, 10.0],
            "ra": [10.0, 10.001],
            "dec": [-5.0, -5.001],
            "snr": [60.0, 5.5],
        }
    ).to_parquet(paths["dia_source_unfiltered"])
    return {k: str(v) for k, v in paths.items()}


def fabricate_run(root: Path, *, with_products: bool = True) -> Path:
    """A run directory: 2 visits x 9 detectors; detector 4 falls back, detector 8 fails in visit 2."""
    rng = np.random.default_rng(1)
    for gi, group in enumerate(GROUPS):
        for det in range(9):
            tail = Path(INSTRUMENT, DAY_OBS, group)
            result = root / "results" / tail / str(det)
            result.mkdir(parents=True)
            failed = gi == 1 and det == 8
            for stage, seconds in STAGES.items():
                if failed and stage != "prep":
                    continue
                bench = root / "benchmarks" / stage / tail / f"{det}.tsv"
                bench.parent.mkdir(parents=True, exist_ok=True)
                wall = seconds * (1 + 0.1 * det)
                bench.write_text(
                    BENCH_HEADER + f"{wall:.4f}\t0:00:01\t120.5\t300\t100\t110\t0\t0\t50\t{wall / 2:.2f}\n"
                )
            if failed:
                (result / "failed.json").write_text(
                    json.dumps(
                        {
                            "error": "RawTimeoutError",
                            "retriable": True,
                            "message": "no raws",
                            "stage": "ingest",
                            "instrument": INSTRUMENT,
                            "group": group,
                            "detector": det,
                            "day_obs": DAY_OBS,
                            "schema_version": 1,
                        }
                    )
                )
                continue
            work = root / "work_area" / tail / str(det)
            if with_products:
                work.mkdir(parents=True)
                write_record(
                    work / "pipeline.json", StageRecord(stage="pipeline", body={"products": _products(work, rng, det)})
                )
            (result / "done.json").write_text(
                json.dumps(
                    {
                        "instrument": INSTRUMENT,
                        "day_obs": DAY_OBS,
                        "group": group,
                        "detector": det,
                        "outcome": "fallback" if det == 4 else "ok",
                        "pipeline": "SingleFrame" if det == 4 else "ApPipe",
                        "stage_seconds": {k: v for k, v in STAGES.items() if k != "finish"},
                        "apdb": {"n_dia_sources": 2, "n_new_objects": 1, "n_alerts": 0 if det == 4 else 2},
                        "schema_version": 1,
                    }
                )
            )
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fabricate_run(tmp_path_factory.mktemp("run"))


class TestMetrics:
    """Tests for `workflow.outcomes.metrics`."""

    def test_night_metrics(self, run_dir):
        assert nights(run_dir / "results") == [(INSTRUMENT, DAY_OBS)]
        m = night_metrics(run_dir / "results", run_dir / "benchmarks", instrument=INSTRUMENT, day_obs=DAY_OBS)
        assert m["targets"] == 18
        assert m["outcomes"] == {"ok": 15, "fallback": 2, "ignored": 0, "failed": 1}
        assert m["failures"] == {"ingest:RawTimeoutError": 1} and m["retriable_failures"] == 1
        assert m["outcomes_per_detector"]["4"] == {"ok": 0, "fallback": 2, "ignored": 0, "failed": 0}
        assert m["outcomes_per_detector"]["8"] == {"ok": 1, "fallback": 0, "ignored": 0, "failed": 1}
        assert list(m["stages"]) == ["prep", "ingest", "pipeline", "export", "apdb", "finish"]
        prep = m["stages"]["prep"]["wall_s"]
        assert prep["n"] == 18 and prep["p50"] == pytest.approx(1.4) and prep["max"] == pytest.approx(1.8)
        assert m["stages"]["pipeline"]["cpu_s"]["n"] == 17
        assert m["stages"]["pipeline"]["in_job_wall_s"]["p95"] == pytest.approx(10.0)
        assert m["alerts_per_visit"] == {GROUPS[0]: 16, GROUPS[1]: 14}
        assert m["totals"] == {"dia_sources": 34, "new_dia_objects": 17, "alerts": 30}
        json.dumps(m)  # JSON-ready

    def test_benchmarks_tolerate_missing_values(self, tmp_path):
        path = tmp_path / "pipeline" / INSTRUMENT / DAY_OBS / "g1" / "3.tsv"
        path.parent.mkdir(parents=True)
        path.write_text(
            BENCH_HEADER
            + "2.5\t0:00:02\tNA\tNA\tNA\tNA\tNA\tNA\tNA\tNA\n"
            + "3.5\t0:00:03\t-\t-\t-\t-\t-\t-\t-\t1.25\n"
        )
        (tmp_path / "pipeline" / INSTRUMENT / DAY_OBS / "g1" / "notes.tsv").write_text("x\n1\n")
        rows = read_benchmarks(tmp_path)
        assert [(r.stage, r.detector, r.wall_s, r.cpu_s) for r in rows] == [
            ("pipeline", 3, 2.5, None),
            ("pipeline", 3, 3.5, 1.25),
        ]
        assert percentiles([]) == {"n": 0, "p50": None, "p95": None, "max": None}
        assert percentiles([1, 2, 3, None]) == {"n": 3, "p50": 2.0, "p95": 2.9, "max": 3.0}


def _parsed(text: str) -> dict[str, tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]]:
    """The exposition as prometheus_client's own parser reads it: family -> (type, samples)."""
    return {
        family.name: (family.type, {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples})
        for family in text_string_to_metric_families(text)
    }


class TestPrometheus:
    """Tests for `workflow.outcomes.metrics.render_prometheus` (rendered by prometheus_client)."""

    def test_counters_and_labels(self):
        text = render_prometheus(
            {"visits_received": 3, "targets": {"ok": 5, 'we"ird': 1}, "alerts_total": 2.5},
            label_names={"targets": "outcome"},
            help_texts={"visits_received": "next_visit seen"},
        )
        assert text.endswith("\n")
        assert "# HELP prompt_snake_visits_received_total next_visit seen" in text
        assert text.count("# TYPE ") == 3
        assert _parsed(text) == {
            "prompt_snake_alerts": ("counter", {("prompt_snake_alerts_total", ()): 2.5}),
            "prompt_snake_targets": (
                "counter",
                {
                    ("prompt_snake_targets_total", (("outcome", "ok"),)): 5.0,
                    ("prompt_snake_targets_total", (("outcome", 'we"ird'),)): 1.0,
                },
            ),
            "prompt_snake_visits_received": ("counter", {("prompt_snake_visits_received_total", ()): 3.0}),
        }

    def test_nested_labels_like_the_shim_counts(self):
        counts = {"shim_events": {"next_visit": {"stale": 2, "ok": 3}, "raw": {"late": 1}}}
        text = render_prometheus(counts, label_names={"shim_events": ("category", "reason")})
        assert _parsed(text)["prompt_snake_shim_events"][1] == {
            ("prompt_snake_shim_events_total", (("category", "next_visit"), ("reason", "ok"))): 3.0,
            ("prompt_snake_shim_events_total", (("category", "next_visit"), ("reason", "stale"))): 2.0,
            ("prompt_snake_shim_events_total", (("category", "raw"), ("reason", "late"))): 1.0,
        }
        assert 'x_total{kind="a",kind_2="b"} 1.0' in render_prometheus({"x": {"a": {"b": 1}}})
        with pytest.raises(ValueError, match="x: mixed nesting depths"):
            render_prometheus({"x": {"a": {"b": 1}, "c": 2}})

    def test_gauges_names_and_errors(self):
        text = render_prometheus({"queue-depth": 4, "lag": float("nan")}, kind="gauge", prefix="")
        assert "# TYPE queue_depth gauge\nqueue_depth 4.0\n" in text and "lag NaN" in text
        assert render_prometheus({}) == ""
        with pytest.raises(ValueError, match=r"targets\{kind=\"ok\"\}: value 'many' is not a number"):
            render_prometheus({"targets": {"ok": "many"}})
        with pytest.raises(ValueError, match="kind 'histogram'"):
            render_prometheus({"a": 1}, kind="histogram")

    def test_shim_exposition_parses_with_type_lines_and_summary_sum(self):
        """Every shim family has a TYPE line; the latency summary has _count and _sum over all samples."""
        status = ShimStatus("LSSTComCamSim", "streaming")
        status.count("raw", "late", 2)
        status.gauge("targets", lambda: {"running": 3})
        for seconds in (1.0, 2.0, 4.0):
            status.observe("submit_to_outcome", seconds)
        text = status.prometheus()
        families = _parsed(text)
        typed = {line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE ")}
        assert typed == {
            "prompt_snake_shim_events_total": "counter",
            "prompt_snake_shim_gauge": "gauge",
            "prompt_snake_shim_latency_seconds": "summary",
            "prompt_snake_shim_uptime_seconds": "gauge",
        }
        kind, latency = families["prompt_snake_shim_latency_seconds"]
        name = (("name", "submit_to_outcome"),)
        assert kind == "summary"
        assert latency[("prompt_snake_shim_latency_seconds_count", name)] == 3
        assert latency[("prompt_snake_shim_latency_seconds_sum", name)] == 7.0
        assert latency[("prompt_snake_shim_latency_seconds", (*name, ("quantile", "0.5")))] == 2.0
        assert families["prompt_snake_shim_events"][1] == {
            ("prompt_snake_shim_events_total", (("category", "raw"), ("reason", "late"))): 2.0
        }


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


class TestReportFigures:
    """Tests for `workflow.outcomes.report`."""

    def test_cutout_selection(self, run_dir):
        from workflow.outcomes.summary import collect_outcomes

        records = collect_outcomes(run_dir / "results")
        picked = select_cutout_sources(records, run_dir / "work_area", n=4)
        assert len(picked) == 4 and len({(s.group, s.detector) for s in picked}) == 4
        assert all(s.source["snr"] == 60.0 for s in picked)
        assert picked[0].name == f"{INSTRUMENT}_{GROUPS[0]}_0_1"
        assert select_cutout_sources(records, run_dir / "nowhere", n=4) == []

    def test_stamp_uses_wcs_for_images_on_another_grid(self, tmp_path):
        from astropy.wcs import WCS

        from workflow.outcomes.report import _stamp

        wcs = WCS(naxis=2)
        wcs.wcs.ctype, wcs.wcs.crval, wcs.wcs.crpix = ["RA---TAN", "DEC--TAN"], [10.0, -5.0], [40.0, 40.0]
        wcs.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
        data = np.arange(80 * 90, dtype=np.float32).reshape(80, 90)
        path = tmp_path / "template.fits"
        fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data, header=wcs.to_header(), name="IMAGE")]).writeto(path)
        ra, dec = wcs.pixel_to_world_values(50.0, 30.0)
        source = {"x": 1.0, "y": 1.0, "ra": float(ra), "dec": float(dec)}
        stamp = _stamp(path, source, 3, science_shape=(64, 64))
        assert stamp[3, 3] == data[30, 50]
        same_grid = _stamp(path, source, 3, science_shape=(80, 90))  # same shape: the table's x, y
        assert same_grid[3, 3] == data[1, 1] and np.isnan(same_grid[0, 0])  # off the edge: NaN

    def test_empty_results_still_give_every_file(self, tmp_path):
        written = build_report(tmp_path / "results", tmp_path / "out", rulegraph=False)
        assert written["nights"] == [] and written["cutouts"] == []
        for name in ("latency", "alerts_per_visit", "focal_plane"):
            assert _png_size(written["figures"][name])[0] > 100
        assert "No outcome files" in (tmp_path / "out" / "overview.rst").read_text()


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail("headless Chromium is needed to check the report: install the Debian package `chromium`")


# Runs after the report's own scripts: shows every image result through the report
# app (app.setView, as its eye buttons do), waits for each <img> to load, and writes
# naturalWidth of every image (landing page + results) into <pre id="img-check">.
_CHECK_SCRIPT = """
<script>
window.addEventListener("load", async () => {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const loaded = (img) => new Promise((r) => {
    if (img.complete) { r(); } else { img.addEventListener("load", r); img.addEventListener("error", r); }
  });
  const out = {landing: [], results: {}};
  await sleep(200);
  for (const img of document.querySelectorAll("#app img")) {
    await loaded(img);
    out.landing.push(img.naturalWidth);
  }
  for (const [path, entry] of Object.entries(results)) {
    if (!entry.mime_type.startsWith("image/")) { out.results[path] = "not an image"; continue; }
    app.setView({content: "img", contentPath: entry.data_uri, resultPath: path});
    let img = null;
    for (let i = 0; i < 50 && !img; i++) {
      await sleep(20);
      img = Array.from(document.querySelectorAll("#app img")).find((x) => x.src === entry.data_uri);
    }
    if (img) { await loaded(img); }
    out.results[path] = img ? img.naturalWidth : -1;
  }
  const pre = document.createElement("pre");
  pre.id = "img-check";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


REPORT_COMMANDS = (
    ["--cores", "1", "--nolock", "--forcerun", "night_report", "--quiet", "rules", "--", "night_report"],
    ["--report", "report.html", "--", "all", "night_report"],
)
"""``make report``'s two Snakemake runs (the Makefile's recipe, checked below): the rule, then the report."""


@pytest.fixture(scope="module")
def made_report(run_dir: Path) -> tuple[Path, Path, str]:
    """Run ``make report``'s commands once in the fabricated run: (report dir, HTML file, their output).

    The run gets visit files, so ``all`` brings the detector-visit chain into the report.
    """
    for group in GROUPS:
        for det in range(9):
            visit = run_dir / "visits" / INSTRUMENT / DAY_OBS / group / f"{det}.json"
            visit.parent.mkdir(parents=True, exist_ok=True)
            visit.write_text("{}")
    output = ""
    for args in REPORT_COMMANDS:
        result = subprocess.run(
            [sys.executable, "-m", "snakemake", "--snakefile", str(PROJECT_ROOT / "Snakefile"), *args],
            cwd=run_dir,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        output += result.stdout + result.stderr
    return run_dir / "build" / "report", run_dir / "report.html", output


def test_make_report_runs_these_commands():
    recipe = subprocess.run(["make", "-n", "report"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    for args in REPORT_COMMANDS:
        assert f"-m snakemake {' '.join(args)}" in recipe.stdout, recipe.stdout


class TestHtmlReport:
    """Tests for rule ``night_report`` (``scripts/make_report.py``) and ``snakemake --report`` on the workflow."""

    def test_make_report_files(self, made_report):
        out, _, _ = made_report
        assert sorted(p.name for p in (out / "cutouts").glob("*.png")) == [  # the default 6
            f"{INSTRUMENT}_{GROUPS[0]}_0_1.png",
            f"{INSTRUMENT}_{GROUPS[0]}_3_301.png",
            f"{INSTRUMENT}_{GROUPS[0]}_6_601.png",
            f"{INSTRUMENT}_{GROUPS[1]}_0_1.png",
            f"{INSTRUMENT}_{GROUPS[1]}_3_301.png",
            f"{INSTRUMENT}_{GROUPS[1]}_7_701.png",
        ]
        for name in ("latency", "alerts_per_visit", "focal_plane", "rulegraph"):
            assert _png_size(out / f"{name}.png")[0] > 300
        metrics = json.loads((out / "metrics" / f"{INSTRUMENT}_{DAY_OBS}.json").read_text())
        assert metrics["outcomes"]["failed"] == 1
        prom = _parsed((out / "metrics" / f"{INSTRUMENT}_{DAY_OBS}.prom").read_text())
        labels = (("day_obs", DAY_OBS), ("instrument", INSTRUMENT))
        targets = prom["prompt_snake_night_targets"]
        assert targets[0] == "counter"
        assert targets[1][("prompt_snake_night_targets_total", (*labels, ("outcome", "fallback")))] == 2
        assert prom["prompt_snake_night_alerts"][1][("prompt_snake_night_alerts_total", labels)] == 30

    def test_no_warnings(self, made_report):
        """The report files have Snakemake metadata (made by the rule) and no flag is misplaced."""
        output = made_report[2]
        assert "is only valid for outputs" not in output
        # The fabricated detector-visit files were not made by Snakemake: only they may lack metadata.
        missing = re.findall(r"Missing metadata for file (\S+)\.", output)
        assert not [path for path in missing if not path.startswith(("results/", "work_area/"))], missing

    def test_rulegraph_with_and_without_dot(self, made_report, tmp_path):
        dot = (made_report[0] / "rulegraph.dot").read_text()
        for rule in ("prep", "ingest", "pipeline", "export", "apdb", "finish"):
            assert f'label = "{rule}"' in dot
        assert _png_size(render_rulegraph(dot, tmp_path / "mpl.png", use_dot=False))[0] > 200
        if shutil.which("dot") is None:
            pytest.skip("graphviz dot not installed: only the matplotlib drawing was checked")
        assert _png_size(render_rulegraph(dot, tmp_path / "dot.png", use_dot=True))[0] > 100

    def test_html_images_load_in_chromium(self, made_report, tmp_path):
        html = made_report[1]
        page = html.read_text()
        rulegraph = re.search(r"var rulegraph_spec = (\{.*?\});\n", page, re.S).group(1)
        for rule in ("prep", "ingest", "pipeline", "export", "apdb", "finish", "all", "night_report"):
            assert f'"rule": "{rule}"' in rulegraph, rule  # the real workflow, not a one-rule Snakefile
        results = json.loads(re.search(r"var results = (\{.*?\});\n", page, re.S).group(1))
        names = sorted(entry["name"] for entry in results.values())
        assert {
            "latency.png",
            "alerts_per_visit.png",
            "focal_plane.png",
            "rulegraph.png",
            f"{INSTRUMENT}_{DAY_OBS}.json",
        } <= set(names)
        assert sum(n.endswith(".png") for n in names) == 4 + 6

        checked = tmp_path / "checked.html"
        head, body_end, tail = page.rpartition("</body>")  # the page's scripts contain "</body>" too
        checked.write_text(head + _CHECK_SCRIPT + body_end + tail)
        profile = tmp_path / "chromium-profile"
        dom = subprocess.run(
            [
                _chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=20000",
                "--dump-dom",
                checked.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        found = re.search(r'<pre id="img-check">(.*?)</pre>', dom.stdout, re.S)
        assert found, f"check script did not finish; stderr: {dom.stderr[-2000:]}"
        check = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
        assert all(w > 0 for w in check["landing"]) and sum(w > 300 for w in check["landing"]) == 4, check
        images = {p: w for p, w in check["results"].items() if w != "not an image"}
        assert len(images) == 10 and all(w > 100 for w in images.values()), check
