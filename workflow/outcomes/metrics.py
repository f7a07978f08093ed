"""Per-night metrics of a run, and Prometheus text rendering of counters.

`night_metrics` combines two sources that exist after any run (live night, replay,
demo) without parsing logs:

- the targets' outcome files (``results/.../done.json`` / ``failed.json``, read by
  `workflow.outcomes.summary.collect_outcomes`): outcome per detector-visit, stage seconds
  measured inside the job, APDB and alert counts;
- Snakemake's benchmark TSVs (``benchmarks/<stage>/<instrument>/<day_obs>/<group>/
  <detector>.tsv``): wall seconds of each job as Snakemake saw it (process start and
  imports included) and its CPU seconds.

`render_prometheus` turns a mapping of counters into the Prometheus text exposition
format (version 0.0.4) through `prometheus_client`; the report writes the night's
counters with it for a node-exporter textfile collector, and `exposition` renders the
stream shim's metric families.
"""

from __future__ import annotations

__all__ = [
    "STAGE_ORDER",
    "BenchmarkRow",
    "read_benchmarks",
    "percentiles",
    "nights",
    "night_metrics",
    "NIGHT_LABEL_NAMES",
    "night_counters",
    "render_prometheus",
    "exposition",
]

import collections
import csv
import dataclasses
import datetime
import logging
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from workflow.outcomes.summary import collect_outcomes, summarize
from workflow.stages import STAGES
from workflow.stages.records import FailedRecord

_log = logging.getLogger(__name__)

STAGE_ORDER = STAGES
"""Stages in chain order: benchmark directory names and ``stage_seconds`` keys."""
_OUTCOMES = ("ok", "fallback", "ignored", "failed")
_USAGE_FIELDS = ("cpu_user_s", "cpu_sys_s", "max_rss_mb")
"""What each forked stage used (`workflow.stages.records.StageResources`), unlike the client-side benchmarks."""
_METRIC_NAME = re.compile(r"[^a-zA-Z0-9_:]")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchmarkRow:
    """One Snakemake benchmark measurement of one job (one row of its TSV)."""

    stage: str
    instrument: str
    day_obs: str
    group: str
    detector: int
    wall_s: float
    cpu_s: float | None
    max_rss_mb: float | None


def _number(text: str | None) -> float | None:
    """Parse a benchmark cell; Snakemake writes ``NA`` or ``-`` when it has no value."""
    try:
        value = float(text) if text not in (None, "", "NA", "-") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def read_benchmarks(
    benchmarks_root: str | Path, *, instrument: str | None = None, day_obs: str | None = None
) -> list[BenchmarkRow]:
    """Read the benchmark TSVs of the detector-visit rules.

    Parameters
    ----------
    benchmarks_root : `str` or `~pathlib.Path`
        The ``benchmarks`` directory of a run.
    instrument, day_obs : `str`, optional
        Keep only this instrument / night.

    Returns
    -------
    rows : `list` [`BenchmarkRow`]
        One per TSV row (a job benchmarked with ``repeat`` gives several); files whose
        path or header does not have the expected shape are skipped with a warning.
    """
    root = Path(benchmarks_root)
    rows: list[BenchmarkRow] = []
    for path in sorted(root.glob("*/*/*/*/*.tsv")):
        stage, inst, night, group = path.relative_to(root).parts[:4]
        if (instrument and inst != instrument) or (day_obs and night != day_obs) or not path.stem.isdigit():
            continue
        with open(path, newline="") as stream:
            reader = csv.DictReader(stream, delimiter="\t")
            if reader.fieldnames is None or "s" not in reader.fieldnames:
                _log.warning("benchmark %s: no 's' column; skipped", path)
                continue
            for row in reader:
                wall = _number(row.get("s"))
                if wall is None:
                    continue
                rss = _number(row.get("max_rss"))
                rows.append(
                    BenchmarkRow(
                        stage=stage,
                        instrument=inst,
                        day_obs=night,
                        group=group,
                        detector=int(path.stem),
                        wall_s=wall,
                        cpu_s=_number(row.get("cpu_time")),
                        max_rss_mb=rss,
                    )
                )
    return rows


def percentiles(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """Return ``n``, ``p50``, ``p95`` and ``max`` of the non-missing values.

    Percentiles interpolate linearly between order statistics (numpy's default);
    with no values every statistic but ``n`` is `None`.
    """
    data = np.array([v for v in values if v is not None], dtype=float)
    if data.size == 0:
        return {"n": 0, "p50": None, "p95": None, "max": None}
    p50, p95 = np.percentile(data, [50, 95])
    return {
        "n": int(data.size),
        "p50": round(float(p50), 3),
        "p95": round(float(p95), 3),
        "max": round(float(data.max()), 3),
    }


def _stage_key(name: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(name) if name in STAGE_ORDER else len(STAGE_ORDER), name)


def nights(results_root: str | Path) -> list[tuple[str, str]]:
    """Return the ``(instrument, day_obs)`` pairs that have outcome files, sorted."""
    root = Path(results_root)
    found = {
        (p.relative_to(root).parts[0], p.relative_to(root).parts[1])
        for pattern in ("*/*/*/*/done.json", "*/*/*/*/failed.json")
        for p in root.glob(pattern)
    }
    return sorted(found)


def night_metrics(
    results_root: str | Path, benchmarks_root: str | Path | None, *, instrument: str, day_obs: str
) -> dict[str, Any]:
    """Summarize one night of one instrument.

    Parameters
    ----------
    results_root : `str` or `~pathlib.Path`
        The ``results`` directory of a run.
    benchmarks_root : `str` or `~pathlib.Path`, optional
        The ``benchmarks`` directory (missing or `None`: no benchmark section).
    instrument, day_obs : `str`
        The night.

    Returns
    -------
    metrics : `dict`
        JSON-ready: ``targets``, ``outcomes``, ``failures`` (``stage:error`` counts),
        ``retriable_failures``, ``pipelines``, ``outcomes_per_detector``
        (detector -> outcome -> count), ``stages`` (per stage: ``wall_s`` and
        ``cpu_s`` percentiles from Snakemake's benchmarks, which measure the stage
        client; ``in_job_wall_s`` and ``stage_cpu_user_s``, ``stage_cpu_sys_s``,
        ``stage_max_rss_mb`` from the stage records: what the forked stage used),
        ``alerts_per_visit`` (group -> alerts), ``per_visit`` and ``totals``.
    """
    records = collect_outcomes(Path(results_root) / instrument / day_obs)
    summary = summarize(records)
    per_detector: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    in_job: dict[str, list[float]] = collections.defaultdict(list)
    used: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for record in records:
        per_detector[record.detector][record.outcome] += 1
        for name, seconds in record.stage_seconds.items():
            if seconds is not None:
                in_job[name].append(seconds)
        for name, usage in record.stage_resources.items():
            for field in _USAGE_FIELDS:
                used[name][field].append(getattr(usage, field))
    bench = read_benchmarks(benchmarks_root, instrument=instrument, day_obs=day_obs) if benchmarks_root else []
    wall: dict[str, list[float]] = collections.defaultdict(list)
    cpu: dict[str, list[float | None]] = collections.defaultdict(list)
    for row in bench:
        wall[row.stage].append(row.wall_s)
        cpu[row.stage].append(row.cpu_s)
    stages = {
        name: {
            "wall_s": percentiles(wall.get(name, [])),
            "cpu_s": percentiles(cpu.get(name, [])),
            "in_job_wall_s": percentiles(in_job.get(name, [])),
            **{f"stage_{field}": percentiles(used[name][field]) for field in _USAGE_FIELDS},
        }
        for name in sorted(set(wall) | set(in_job), key=_stage_key)
    }
    per_visit = summary["per_visit"]
    return {
        "instrument": instrument,
        "day_obs": day_obs,
        "generated_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "targets": summary["targets"],
        "outcomes": {name: summary["outcomes"].get(name, 0) for name in _OUTCOMES},
        "failures": summary["failures"],
        "retriable_failures": sum(1 for r in records if isinstance(r, FailedRecord) and r.retriable),
        "pipelines": summary["pipelines"],
        "outcomes_per_detector": {
            str(det): {name: counts.get(name, 0) for name in _OUTCOMES} for det, counts in sorted(per_detector.items())
        },
        "stages": stages,
        "benchmark_rows": len(bench),
        "alerts_per_visit": {group: counts.get("alerts", 0) for group, counts in per_visit.items()},
        "per_visit": per_visit,
        "totals": {
            key: sum(counts.get(key, 0) for counts in per_visit.values())
            for key in ("dia_sources", "new_dia_objects", "alerts")
        },
    }


NIGHT_LABEL_NAMES: Mapping[str, tuple[str, ...]] = {
    "targets": ("instrument", "day_obs", "outcome"),
    "dia_sources": ("instrument", "day_obs"),
    "new_dia_objects": ("instrument", "day_obs"),
    "alerts": ("instrument", "day_obs"),
}
"""Label names of `night_counters` for `render_prometheus`."""


def night_counters(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Return a night's counters, labelled by instrument and night, for `render_prometheus`.

    Render them with ``label_names=NIGHT_LABEL_NAMES``: every series carries
    ``instrument`` and ``day_obs``, so files of several nights can be collected together.
    """

    def labelled(value: Any) -> dict[str, Any]:
        return {metrics["instrument"]: {metrics["day_obs"]: value}}

    return {
        "targets": labelled(dict(metrics["outcomes"])),
        **{key: labelled(metrics["totals"][key]) for key in ("dia_sources", "new_dia_objects", "alerts")},
    }


def _metric_name(name: str) -> str:
    name = _METRIC_NAME.sub("_", name)
    return "_" + name if name[:1].isdigit() else name


def _flatten(value: Any, depth: int = 0) -> list[tuple[tuple[str, ...], Any]]:
    """``(label values, number)`` of a number or of nested mappings of numbers."""
    if isinstance(value, Mapping):
        return [
            ((str(k), *labels), v)
            for k, sub in sorted(value.items(), key=lambda kv: str(kv[0]))
            for labels, v in _flatten(sub, depth + 1)
        ]
    return [((), value)]


class _Families:
    """A `prometheus_client` collector yielding fixed metric families (one render's worth)."""

    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def exposition(families: Sequence[Metric]) -> str:
    """Render metric families with `prometheus_client` (text exposition format 0.0.4).

    Each call uses its own `~prometheus_client.CollectorRegistry`, so nothing of the
    process's default registry (or an earlier render) leaks in.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry).decode()


def render_prometheus(
    counts: Mapping[str, Any],
    *,
    prefix: str = "prompt_snake_",
    kind: str = "counter",
    label_names: Mapping[str, str | Sequence[str]] | None = None,
    help_texts: Mapping[str, str] | None = None,
) -> str:
    """Render counters in the Prometheus text exposition format, through `prometheus_client`.

    Parameters
    ----------
    counts : `~collections.abc.Mapping`
        Metric name -> number, or -> mapping of label value -> number (one labelled
        series each), possibly nested for several labels, e.g. ``{"visits_received":
        3, "targets": {"ok": 5, "failed": 1}, "events": {"next_visit": {"stale": 2}}}``.
    prefix : `str`, optional
        Prepended to every metric name.
    kind : `str`, optional
        ``"counter"`` (names get the ``_total`` suffix) or ``"gauge"``.
    label_names : `~collections.abc.Mapping`, optional
        Label name (or names, outermost first, for nested mappings) of each labelled
        metric; default ``kind``, then ``kind_2``, ``kind_3``...
    help_texts : `~collections.abc.Mapping` [`str`, `str`], optional
        ``# HELP`` text per metric (default: the metric name).

    Returns
    -------
    text : `str`
        ``# HELP``/``# TYPE`` lines and samples, sorted by name, ending in a newline
        (empty for no counts).

    Raises
    ------
    ValueError
        If ``kind`` is unknown, a value is not a number, or nesting depths differ
        within one metric.
    """
    if kind not in ("counter", "gauge"):
        raise ValueError(f"render_prometheus: kind {kind!r}: expected 'counter' or 'gauge'")
    label_names, help_texts = label_names or {}, help_texts or {}
    families: list[Metric] = []
    for key in sorted(counts):
        name = _metric_name(prefix + key)
        samples = _flatten(counts[key])
        depth = len(samples[0][0]) if samples else 0
        given = label_names.get(key, ())
        given = (given,) if isinstance(given, str) else tuple(given)
        names = [_metric_name(n) for n in given] + [f"kind_{i + 1}" if i else "kind" for i in range(len(given), depth)]
        family_type = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        family = family_type(name, help_texts.get(key, key), labels=names[:depth])
        for labels, number in samples:
            where = "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, labels, strict=False)) + "}" if labels else ""
            if len(labels) != depth:
                raise ValueError(f"render_prometheus: {key}: mixed nesting depths ({len(labels)} and {depth})")
            if not isinstance(number, (int, float)):  # bool is an int: rendered 0 or 1
                raise ValueError(f"render_prometheus: {key}{where}: value {number!r} is not a number")
            family.add_metric(list(labels), float(number))
        families.append(family)
    return exposition(families) if families else ""
