"""Pictures and metrics of a run for the Snakemake HTML report.

`build_report` reads a run directory after the fact (outcome files, benchmark TSVs,
the work area's pipeline products) and writes into one output directory::

    latency.png            per-stage latency histograms (p50/p95 marked)
    alerts_per_visit.png   alerts and DIA sources per visit
    focal_plane.png        per-detector outcome at each detector's focal-plane position
    rulegraph.png          the workflow's rule graph (graphviz ``dot``, else matplotlib)
    rulegraph.dot          its source, ``snakemake --rulegraph``
    cutouts/*.png          science / template / difference cutouts of a sample of DIA sources
    metrics/<instrument>_<day_obs>.json   per-night metrics (`workflow.outcomes.metrics.night_metrics`)
    metrics/<instrument>_<day_obs>.prom   the night's counters, Prometheus text format
    overview.rst           nights table + figures (inlined), included by ``report/workflow.rst``

The workflow's rule ``night_report`` (``rules/report.smk``) marks these files for the
report, so ``snakemake --report report.html all night_report`` packs them into one
self-contained HTML page.
Figures use matplotlib's object API (no pyplot, no global backend state).
"""

from __future__ import annotations

__all__ = [
    "CutoutSource",
    "build_report",
    "plot_latency",
    "plot_alerts_per_visit",
    "plot_focal_plane",
    "select_cutout_sources",
    "write_cutout",
    "rulegraph_dot",
    "render_rulegraph",
]

import base64
import collections
import concurrent.futures
import dataclasses
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workflow.core.config import PROJECT_ROOT, instrument_config_path, load_config
from workflow.outcomes.metrics import (
    NIGHT_LABEL_NAMES,
    STAGE_ORDER,
    BenchmarkRow,
    night_counters,
    night_metrics,
    nights,
    read_benchmarks,
    render_prometheus,
)
from workflow.outcomes.summary import collect_outcomes
from workflow.stages.records import FailedRecord, Outcome, read_stage_record

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from workflow.core.instrument import Instrument

_log = logging.getLogger(__name__)

_COLORS = {
    "ok": "#2ca02c",
    "fallback": "#ff7f0e",
    "failed": "#d62728",
    "ignored": "#9467bd",
    "no result": "#e0e0e0",
    "inactive": "#7f7f7f",
}
_SECTIONS = {
    "focal_plane": "Outcome per detector",
    "latency": "Latency per stage",
    "alerts_per_visit": "Alerts per visit",
    "rulegraph": "Rule graph of one detector-visit",
}
_ABBREVIATIONS = {"ok": "ok", "fallback": "fb", "failed": "F", "ignored": "ig"}
_SEVERITY = ("failed", "fallback", "ignored", "ok")
"""A detector's colour over several visits: its worst outcome."""
_IMAGES = (("science", "preliminary_visit_image"), ("template", "template_image"), ("difference", "difference_image"))


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _no_data(path: Path, title: str, message: str) -> Path:
    fig = _figure(6, 2.5)
    ax = fig.subplots()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    return _save(fig, path)


def plot_latency(path: Path, rows: Sequence[BenchmarkRow], records: Sequence[Outcome]) -> Path:
    """Draw one wall-time histogram per stage, p50 and p95 marked.

    Uses the Snakemake benchmarks (whole job: process start, imports, the stage);
    without them, the in-job stage seconds of the outcome records.
    """
    values: dict[str, list[float]] = collections.defaultdict(list)
    source = "Snakemake benchmarks: job wall time"
    for row in rows:
        values[row.stage].append(row.wall_s)
    if not values:
        source = "stage records: in-job wall time"
        for record in records:
            for name, seconds in record.stage_seconds.items():
                if seconds is not None:
                    values[name].append(float(seconds))
    if not values:
        return _no_data(path, "Latency per stage", "no benchmarks and no stage timings found")
    names = sorted(values, key=lambda n: (STAGE_ORDER.index(n) if n in STAGE_ORDER else 99, n))
    fig = _figure(3.2 * min(len(names), 3), 2.6 * ((len(names) + 2) // 3))
    axes = np.atleast_1d(fig.subplots((len(names) + 2) // 3, min(len(names), 3), squeeze=False)).ravel()
    for ax, name in zip(axes, names, strict=False):
        data = np.asarray(values[name])
        ax.hist(data, bins=min(30, max(5, data.size // 2)), color="#4c72b0")
        for q, style in ((50, "-"), (95, "--")):
            ax.axvline(float(np.percentile(data, q)), color="k", linestyle=style, label=f"p{q}")
        ax.set_title(f"{name} (n={data.size})")
        ax.set_xlabel("seconds")
        ax.legend(fontsize="small")
    for ax in axes[len(names) :]:
        ax.set_axis_off()
    fig.suptitle(f"Latency per stage ({source})")
    return _save(fig, path)


def plot_alerts_per_visit(path: Path, per_visit: Mapping[str, Mapping[str, int]]) -> Path:
    """Draw alerts and DIA sources per visit (group), in group order."""
    if not per_visit:
        return _no_data(path, "Alerts per visit", "no outcome files found")
    groups = sorted(per_visit)
    x = np.arange(len(groups))
    fig = _figure(min(14.0, 3 + 0.5 * len(groups)), 3.5)
    ax = fig.subplots()
    ax.bar(x - 0.2, [per_visit[g].get("alerts", 0) for g in groups], 0.4, label="alerts", color="#4c72b0")
    ax.bar(x + 0.2, [per_visit[g].get("dia_sources", 0) for g in groups], 0.4, label="DIA sources", color="#dd8452")
    step = max(1, len(groups) // 20)
    ax.set_xticks(x[::step], [g[-12:] for g in groups[::step]], rotation=45, ha="right", fontsize="small")
    ax.set_xlabel("visit (group id)")
    ax.set_ylabel("count")
    ax.legend(loc="lower right", fontsize="small")
    ax.set_title(
        f"Alerts per visit ({len(groups)} visits, {sum(per_visit[g].get('alerts', 0) for g in groups)} alerts)"
    )
    return _save(fig, path)


def _load_instrument(name: str) -> Instrument | None:
    from workflow.core.instrument import Instrument

    try:
        return Instrument.from_config(load_config(instrument_config_path(name)))
    except Exception as exc:  # noqa: BLE001 - a report must not fail on one unknown instrument
        _log.warning("focal-plane map: cannot load instrument %s: %s", name, exc)
        return None


def _focal_plane_panel(
    ax: Any, instrument: Instrument, outcomes: Mapping[int, collections.Counter], title: str
) -> None:
    from matplotlib.patches import Rectangle

    geom = instrument.geometry
    width, height = geom.nx * geom.pixel_size_um / 1000.0, geom.ny * geom.pixel_size_um / 1000.0
    for det in instrument.detectors:
        counts = outcomes.get(det.id, collections.Counter())
        if counts:
            status = next(k for k in _SEVERITY if counts[k])
            label = (
                " ".join(f"{abbr}{counts[k]}" for k, abbr in _ABBREVIATIONS.items() if counts[k])
                if len(counts) > 1
                else ""
            )
        else:
            status, label = ("no result" if det.active else "inactive"), ""
        cx, cy = det.center_mm
        ax.add_patch(
            Rectangle(
                (cx - width / 2, cy - height / 2),
                width,
                height,
                facecolor=_COLORS[status],
                edgecolor="k",
                linewidth=0.5,
            )
        )
        ax.text(
            cx,
            cy,
            f"{det.id}\n{label}" if label else str(det.id),
            ha="center",
            va="center",
            fontsize=6 if len(instrument.detectors) > 20 else 8,
        )
    xs = [d.center_mm[0] for d in instrument.detectors]
    ys = [d.center_mm[1] for d in instrument.detectors]
    ax.set_xlim(min(xs) - width, max(xs) + width)
    ax.set_ylim(min(ys) - height, max(ys) + height)
    ax.set_aspect("equal")
    ax.set_xlabel("focal plane x (mm)")
    ax.set_ylabel("focal plane y (mm)")
    ax.set_title(title, fontsize="medium")


def plot_focal_plane(path: Path, records: Sequence[Outcome], *, max_visits: int = 3) -> Path:
    """Map per-detector outcomes onto the focal plane.

    One panel per visit for the latest ``max_visits`` visits, plus one panel over all
    visits (each detector coloured by its worst outcome, labelled with its outcome
    counts when they differ), for every instrument present.
    """
    from matplotlib.patches import Patch

    by_instrument: dict[str, list[Outcome]] = collections.defaultdict(list)
    for record in records:
        by_instrument[record.instrument].append(record)
    panels: list[tuple[Instrument, dict[int, collections.Counter], str]] = []
    for name in sorted(by_instrument):
        instrument = _load_instrument(name)
        if instrument is None:
            continue
        visits: dict[str, dict[int, collections.Counter]] = collections.defaultdict(
            lambda: collections.defaultdict(collections.Counter)
        )
        total: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
        for record in by_instrument[name]:
            visits[record.group][record.detector][record.outcome] += 1
            total[record.detector][record.outcome] += 1
        for group in sorted(visits)[-max_visits:]:
            panels.append((instrument, visits[group], f"{name} visit {group}"))
        if len(visits) > 1:
            panels.append((instrument, total, f"{name}: all {len(visits)} visits"))
    if not panels:
        return _no_data(path, "Outcome per detector", "no outcome files of a known instrument found")
    columns = min(len(panels), 2)
    rows = (len(panels) + columns - 1) // columns
    fig = _figure(5.0 * columns, 4.6 * rows)
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    for ax, (instrument, outcomes, title) in zip(axes, panels, strict=False):
        _focal_plane_panel(ax, instrument, outcomes, title)
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    fig.legend(
        handles=[Patch(facecolor=c, edgecolor="k", label=k) for k, c in _COLORS.items()],
        loc="outside lower center",
        ncols=len(_COLORS),
        fontsize="small",
    )
    fig.suptitle("Outcome per detector")
    return _save(fig, path)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CutoutSource:
    """One DIA source to show: its target, its row of the DIA source table, the images."""

    instrument: str
    day_obs: str
    group: str
    detector: int
    source: Mapping[str, Any]
    images: Mapping[str, Path]

    @property
    def name(self) -> str:
        ident = self.source.get("diaSourceId")
        ident = int(ident) if ident is not None and np.isfinite(ident) else int(self.source.get("index", 0))
        return f"{self.instrument}_{self.group}_{self.detector}_{ident}"


def _products(work_dir: Path, run_dir: Path) -> dict[str, Path]:
    """Product files of a target: from its pipeline record, else the default names."""
    record_file = work_dir / "pipeline.json"
    products: dict[str, Path] = {}
    if record_file.is_file():
        for name, value in (read_stage_record(record_file, "pipeline").body.get("products") or {}).items():
            path = Path(value)
            products[name] = path if path.is_absolute() else run_dir / path
    for name in ("dia_source_unfiltered", *(dataset for _, dataset in _IMAGES)):
        default = work_dir / "products" / (name + (".parquet" if name.startswith("dia_") else ".fits"))
        if (name not in products or not products[name].is_file()) and default.is_file():
            products[name] = default
    return products


def select_cutout_sources(
    records: Sequence[Outcome], work_root: str | Path, *, n: int = 6, run_dir: str | Path = "."
) -> list[CutoutSource]:
    """Pick up to ``n`` DIA sources with science, template and difference images.

    Up to ``n`` targets with products are sampled evenly over the records sorted by
    instrument, group and detector; each contributes its ``ceil(n / targets)``
    highest-|SNR| DIA sources.
    """
    import pandas as pd

    candidates = []
    for record in sorted(records, key=lambda r: (r.instrument, r.group, r.detector)):
        if isinstance(record, FailedRecord):
            continue
        work_dir = Path(work_root) / record.instrument / record.day_obs / record.group / str(record.detector)
        products = _products(work_dir, Path(run_dir))
        found = {label: products.get(dataset) for label, dataset in _IMAGES}
        table = products.get("dia_source_unfiltered")
        if table is not None and table.is_file() and all(p is not None and p.is_file() for p in found.values()):
            candidates.append((record, table, {label: p for label, p in found.items() if p is not None}))
    if not candidates or n <= 0:
        return []
    picks = [candidates[int(i)] for i in np.unique(np.linspace(0, len(candidates) - 1, min(n, len(candidates))))]
    per_target = -(-n // len(picks))
    chosen: list[CutoutSource] = []
    for record, table, images in picks:
        frame = pd.read_parquet(table).reset_index(drop=True)
        if frame.empty or not {"x", "y"} <= set(frame.columns):
            continue
        order = np.argsort(-np.abs(frame["snr"].to_numpy(float))) if "snr" in frame else np.arange(len(frame))
        for index in order[:per_target]:
            row = {str(k): (v.item() if hasattr(v, "item") else v) for k, v in frame.iloc[int(index)].items()}
            chosen.append(
                CutoutSource(
                    instrument=record.instrument,
                    day_obs=record.day_obs,
                    group=record.group,
                    detector=record.detector,
                    source={**row, "index": int(index)},
                    images=images,
                )
            )
    return chosen[:n]


def _stamp(path: Path, source: Mapping[str, Any], half: int, science_shape: tuple[int, int] | None) -> np.ndarray:
    """Cut ``(2 half + 1)^2`` pixels of the IMAGE extension around the source (NaN off the edge).

    Images with the science image's shape share its pixel grid (x, y of the table);
    others are located through their WCS and the source's ra, dec.
    """
    from astropy.io import fits
    from astropy.wcs import WCS

    with fits.open(path, memmap=True) as hdul:
        hdu = hdul["IMAGE"]
        shape = tuple(hdu.shape)
        x, y = float(source["x"]), float(source["y"])
        if science_shape is not None and shape != science_shape and hdu.header.get("CTYPE1"):
            x, y = (float(v) for v in WCS(hdu.header).celestial.world_to_pixel_values(source["ra"], source["dec"]))
        xc, yc = int(round(x)), int(round(y))
        stamp = np.full((2 * half + 1, 2 * half + 1), np.nan, dtype=np.float32)
        y0, y1, x0, x1 = (
            max(yc - half, 0),
            min(yc + half + 1, shape[0]),
            max(xc - half, 0),
            min(xc + half + 1, shape[1]),
        )
        if y0 < y1 and x0 < x1:
            stamp[y0 - (yc - half) : y1 - (yc - half), x0 - (xc - half) : x1 - (xc - half)] = hdu.section[y0:y1, x0:x1]
    return stamp


def write_cutout(path: Path, source: CutoutSource, *, half: int = 15) -> Path:
    """Draw the science, template and difference cutouts of one DIA source side by side."""
    from astropy.io import fits

    with fits.open(source.images["science"], memmap=True) as hdul:
        science_shape = tuple(hdul["IMAGE"].shape)
    fig = _figure(9, 3.4)
    axes = fig.subplots(1, 3)
    for ax, (label, _) in zip(axes, _IMAGES, strict=False):
        stamp = _stamp(source.images[label], source.source, half, science_shape)
        finite = stamp[np.isfinite(stamp)]
        if label == "difference":
            limit = float(np.percentile(np.abs(finite), 99.5)) if finite.size else 1.0
            vmin, vmax, cmap = -limit or -1.0, limit or 1.0, "RdBu_r"
        else:
            vmin, vmax = np.percentile(finite, [1, 99.5]) if finite.size else (0.0, 1.0)
            cmap = "gray"
        ax.imshow(stamp, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(label)
        ax.set_xticks([])
        ax.set_yticks([])
    snr = source.source.get("snr")
    fig.suptitle(
        f"{source.instrument} {source.group} detector {source.detector}: DIA source at "
        f"x={float(source.source['x']):.1f} y={float(source.source['y']):.1f}"
        + (f", SNR {float(snr):.1f}" if snr is not None else ""),
        fontsize="medium",
    )
    return _save(fig, path)


def rulegraph_dot(
    snakefile: str | Path = PROJECT_ROOT / "Snakefile", *, instrument: str = "LSSTComCamSim", timeout: float = 120.0
) -> str:
    """Return ``snakemake --rulegraph`` of the workflow, for one placeholder target.

    Runs in a temporary directory holding one (empty) visit file, so the graph shows
    every rule whatever the current run directory holds.

    Raises
    ------
    RuntimeError
        If Snakemake fails; the message holds the end of its stderr.
    """
    with tempfile.TemporaryDirectory(prefix="rulegraph-") as tmp:
        visit = Path(tmp, "visits", instrument, "2000-01-01", "rulegraph", "0.json")
        visit.parent.mkdir(parents=True)
        visit.write_text("{}")
        command = [
            sys.executable,
            "-m",
            "snakemake",
            "--snakefile",
            str(snakefile),
            "--directory",
            tmp,
            "--nolock",
            "--rulegraph",
            "--configfile",
            str(instrument_config_path(instrument)),
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=tmp)
    if result.returncode != 0 or "digraph" not in result.stdout:
        raise RuntimeError(f"snakemake --rulegraph failed ({result.returncode}): {result.stderr[-1500:]}")
    return result.stdout[result.stdout.index("digraph") :]


def _parse_dot(text: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    nodes = dict(re.findall(r'^\s*(\w+)\s*\[\s*label\s*=\s*"([^"]*)"', text, re.M))
    edges = re.findall(r"^\s*(\w+)\s*->\s*(\w+)", text, re.M)
    return nodes, edges


def _draw_graph(text: str, path: Path) -> Path:
    """Draw a dot graph with matplotlib: layers by longest path from the sources."""
    nodes, edges = _parse_dot(text)
    layer = {node: 0 for node in nodes}
    for _ in nodes:  # relax: a DAG settles within len(nodes) rounds
        for a, b in edges:
            layer[b] = max(layer.get(b, 0), layer.get(a, 0) + 1)
    by_layer: dict[int, list[str]] = collections.defaultdict(list)
    for node in sorted(nodes, key=lambda n: (layer[n], nodes[n])):
        by_layer[layer[node]].append(node)
    depth, breadth = max(by_layer, default=0) + 1, max((len(v) for v in by_layer.values()), default=1)
    pos = {
        node: ((i + 1) / (len(members) + 1), 1 - (lay + 0.5) / depth)
        for lay, members in by_layer.items()
        for i, node in enumerate(members)
    }
    fig = _figure(max(4.0, 2.4 * breadth), max(3.0, 1.1 * depth))
    ax = fig.subplots()
    ax.set_axis_off()
    for a, b in edges:
        ax.annotate(
            "",
            xy=pos[b],
            xytext=pos[a],
            arrowprops={"arrowstyle": "->", "color": "#555555", "shrinkA": 12, "shrinkB": 12},
        )
    for node, (x, y) in pos.items():
        ax.text(
            x,
            y,
            nodes[node],
            ha="center",
            va="center",
            fontsize=10,
            bbox={"boxstyle": "round", "facecolor": "#dbe9f6", "edgecolor": "#4c72b0"},
        )
    ax.set_title("Rule graph")
    return _save(fig, path)


def render_rulegraph(text: str, path: Path, *, use_dot: bool | None = None) -> Path:
    """Render a dot graph to PNG with graphviz ``dot``, or with matplotlib without it.

    Parameters
    ----------
    text : `str`
        The graph (``snakemake --rulegraph`` output).
    path : `~pathlib.Path`
        PNG to write.
    use_dot : `bool`, optional
        Force (`True`) or avoid (`False`) graphviz; default: use it if on ``PATH``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    dot = shutil.which("dot")
    if use_dot or (use_dot is None and dot):
        if not dot:
            raise FileNotFoundError("graphviz `dot` is not on PATH (Debian package graphviz)")
        # 150 dpi: one-word rule names make a narrow graph that is hard to read at dot's default 96.
        subprocess.run([dot, "-Tpng", "-Gdpi=150", "-o", str(path)], input=text, text=True, check=True, timeout=60)
        return path
    return _draw_graph(text, path)


def _clean(out_dir: Path) -> None:
    """Remove the files an earlier build left in the per-item directories."""
    for sub, patterns in (("cutouts", ("*.png",)), ("metrics", ("*.json", "*.prom"))):
        for pattern in patterns:
            for stale in (out_dir / sub).glob(pattern):
                stale.unlink()


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _overview_rst(metrics: Sequence[Mapping[str, Any]], figures: Mapping[str, Path]) -> str:
    """The report's landing text: a table of the nights, then the figures.

    Figures are inlined as data URIs: Snakemake 9.27's ``embeddedimage`` directive
    leaves the file path in ``src`` (its mixin's ``run`` is shadowed), which a browser
    cannot resolve from the report.
    """
    lines = []
    if not metrics:
        lines += ["No outcome files (``done.json`` / ``failed.json``) were found in the results directory.", ""]
    else:
        header = [
            "instrument",
            "night",
            "targets",
            "ok",
            "fallback",
            "ignored",
            "failed",
            "alerts",
            "pipeline p50/p95 s",
            "sum of stage p95 s",
        ]
        lines += [
            ".. list-table:: Nights",
            "   :header-rows: 1",
            "",
            "   * - " + header[0],
            *(f"     - {h}" for h in header[1:]),
        ]
        for m in metrics:
            pipe = m["stages"].get("pipeline", {}).get("wall_s", {})
            p95 = [s["wall_s"]["p95"] for s in m["stages"].values() if s["wall_s"]["p95"] is not None]
            row = [
                m["instrument"],
                m["day_obs"],
                m["targets"],
                *(m["outcomes"][k] for k in ("ok", "fallback", "ignored", "failed")),
                m["totals"]["alerts"],
                f"{pipe.get('p50')}/{pipe.get('p95')}",
                round(sum(p95), 3) if p95 else "-",
            ]
            lines += [f"   * - {row[0]}", *(f"     - {v}" for v in row[1:])]
        lines.append("")
    for name, title in _SECTIONS.items():
        if name in figures:
            uri = _data_uri(figures[name])  # wrapped: docutils limits lines to 10000 characters
            lines += [
                title,
                "-" * len(title),
                "",
                f".. image:: {uri[:76]}",
                *(f"   {uri[i : i + 76]}" for i in range(76, len(uri), 76)),
                f"   :alt: {name}",
                "   :width: 100%",
                "",
            ]
    return "\n".join(lines)


def _write_metrics(base: Path, metrics: Mapping[str, Any]) -> Path:
    """Write one night's metrics JSON and its Prometheus counters next to it."""
    base.with_suffix(".json").write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    base.with_suffix(".prom").write_text(
        render_prometheus(
            night_counters(metrics),
            prefix="prompt_snake_night_",
            label_names=NIGHT_LABEL_NAMES,
            help_texts={
                "targets": "Detector-visit targets by outcome",
                "alerts": "Alerts sent",
                "dia_sources": "DIA sources stored",
                "new_dia_objects": "New DiaObjects",
            },
        )
    )
    return base.with_suffix(".json")


def _rulegraph_figure(pending: concurrent.futures.Future[str], out: Path, use_dot: bool | None) -> Path:
    """Draw the rule graph once ``snakemake --rulegraph`` is done (a placeholder if it failed)."""
    try:
        dot = pending.result()
        (out / "rulegraph.dot").write_text(dot)
        return render_rulegraph(dot, out / "rulegraph.png", use_dot=use_dot)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        _log.warning("rule graph not drawn: %s", exc)
        return _no_data(out / "rulegraph.png", "Rule graph", f"not drawn: {exc}"[:300])


def build_report(
    results_root: str | Path,
    out_dir: str | Path,
    *,
    benchmarks_root: str | Path | None = None,
    work_root: str | Path | None = None,
    run_dir: str | Path = ".",
    instrument: str | None = None,
    day_obs: str | None = None,
    n_cutouts: int = 6,
    rulegraph: bool = True,
    use_dot: bool | None = None,
) -> dict[str, Any]:
    """Write the report's pictures, per-night metrics and summary for a run.

    Parameters
    ----------
    results_root, benchmarks_root, work_root : `str` or `~pathlib.Path`
        The run's ``results``, ``benchmarks`` and ``work_area`` directories
        (the last two default to siblings of ``results_root``).
    out_dir : `str` or `~pathlib.Path`
        Where to write (see the module docstring).
    run_dir : `str` or `~pathlib.Path`, optional
        Directory that relative product paths in ``pipeline.json`` are relative to.
    instrument, day_obs : `str`, optional
        Restrict to one instrument and/or night.
    n_cutouts : `int`, optional
        DIA sources to show.
    rulegraph : `bool`, optional
        Draw the workflow's rule graph (runs ``snakemake --rulegraph``, ~3 s).
    use_dot : `bool`, optional
        See `render_rulegraph`.

    Returns
    -------
    written : `dict`
        ``figures`` (name -> path), ``cutouts`` and ``metrics`` (lists of paths),
        ``nights`` (``[instrument, day_obs]`` pairs).
    """
    results_root, out = Path(results_root), Path(out_dir)
    benchmarks_root = Path(benchmarks_root) if benchmarks_root else results_root.parent / "benchmarks"
    work_root = Path(work_root) if work_root else results_root.parent / "work_area"
    for sub in ("cutouts", "metrics"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    _clean(out)
    selected = [(i, d) for i, d in nights(results_root) if instrument in (None, i) and day_obs in (None, d)]
    # `snakemake --rulegraph` is a separate process: let it run while the figures are drawn.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(rulegraph_dot) if rulegraph else None
        records, rows, all_metrics, metric_files = [], [], [], []
        for inst, night in selected:
            records += collect_outcomes(results_root / inst / night)
            rows += read_benchmarks(benchmarks_root, instrument=inst, day_obs=night)
            all_metrics.append(night_metrics(results_root, benchmarks_root, instrument=inst, day_obs=night))
            metric_files.append(_write_metrics(out / "metrics" / f"{inst}_{night}", all_metrics[-1]))
        per_visit = {group: counts for m in all_metrics for group, counts in m["per_visit"].items()}
        figures = {
            "latency": plot_latency(out / "latency.png", rows, records),
            "alerts_per_visit": plot_alerts_per_visit(out / "alerts_per_visit.png", per_visit),
            "focal_plane": plot_focal_plane(out / "focal_plane.png", records),
        }
        cutouts = [
            write_cutout(out / "cutouts" / f"{s.name}.png", s)
            for s in select_cutout_sources(records, work_root, n=n_cutouts, run_dir=run_dir)
        ]
        if pending is not None:
            figures["rulegraph"] = _rulegraph_figure(pending, out, use_dot)
    (out / "overview.rst").write_text(_overview_rst(all_metrics, figures))
    _log.info(
        "report inputs in %s: %d night(s), %d target(s), %d cutout(s)", out, len(selected), len(records), len(cutouts)
    )
    return {"figures": figures, "cutouts": cutouts, "metrics": metric_files, "nights": [list(n) for n in selected]}
