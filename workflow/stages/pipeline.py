"""Pipeline stage: load a detector-visit's staged inputs, run the pipelines, write products.

Bridges the workflow's files (prep manifest, ingest record) and the science steps
(`workflow.science.pipelines`, plain functions on arrays): it reads the raws, calibs,
refcat shards and template patches into a `ProcessingInputs`, runs the pipelines
chosen for the visit with fallback, and writes each product as a file the export
and APDB stages pick up.
"""

from __future__ import annotations

__all__ = [
    "run",
    "bias_in_electrons",
    "template_patch",
    "build_processing_inputs",
    "load_processing_inputs",
    "process_detector_visit",
]

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from workflow.core.exceptions import NonRetriableError
from workflow.core.instrument import instrument_for_run
from workflow.core.raw_fits import RawImage, read_raw
from workflow.core.visit import DetectorVisit
from workflow.science.errors import BadImageError, CorruptFileError
from workflow.science.exposure import Exposure, write_exposure
from workflow.science.isr import AmpGeometry, Box
from workflow.science.pipelines import PipelineRun, ProcessingInputs, run_pipelines, select_pipelines
from workflow.science.template_warp import TemplatePatch
from workflow.stages.ingest import CorruptRawError
from workflow.stages.records import StageRecord, read_stage_record
from workflow.stages.target import load_target_visit, run_stage, write_json

_log = logging.getLogger(__name__)

_NJY_ZERO_POINT = 31.4
"""AB magnitude of 1 nJy: the zero point of nJy-calibrated template coadds."""

# Pipeline output name -> (product dataset type, file suffix).
_PRODUCTS = {
    "calexp": ("preliminary_visit_image", ".fits"),
    "template": ("template_image", ".fits"),
    "difference": ("difference_image", ".fits"),
    "post_isr": ("post_isr_image", ".fits"),
    "sources": ("single_visit_star", ".parquet"),
    "dia_sources": ("dia_source_unfiltered", ".parquet"),
}


def _read_image(path: str, hdu: int | str = 0) -> tuple[np.ndarray, fits.Header]:
    try:
        with fits.open(path, memmap=False) as hdul:
            return np.asarray(hdul[hdu].data, dtype=np.float32), hdul[hdu].header.copy()
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise CorruptFileError("prep", f"{path}: cannot read staged image: {exc}") from exc


def bias_in_electrons(bias: np.ndarray, unit: str, geometry: Any) -> np.ndarray:
    """Return a master bias in electrons, as ISR subtracts it after applying the gain.

    Parameters
    ----------
    bias : `numpy.ndarray`
        Assembled master bias.
    unit : `str`
        Its unit (header ``BUNIT``): ``"adu"`` or ``"electron(s)"``.
    geometry : `workflow.core.amplifiers.DetectorGeometry`
        Amplifiers (``bbox`` in assembled pixels and ``gain``).

    Returns
    -------
    bias : `numpy.ndarray`
        `float32` bias in electrons (a new array).

    Raises
    ------
    BadImageError
        If the unit is unknown.
    """
    unit = str(unit or "adu").strip().lower()
    electrons = np.array(bias, dtype=np.float32)
    if unit.startswith("electron"):
        return electrons
    if unit != "adu":
        raise BadImageError("isr", f"bias has unknown unit {unit!r} (expected adu or electron)")
    for amp in geometry.amplifiers:
        electrons[amp.bbox.y0 : amp.bbox.y1, amp.bbox.x0 : amp.bbox.x1] *= np.float32(amp.gain)
    return electrons


def template_patch(
    image: np.ndarray, variance: np.ndarray, header: Mapping[str, Any], *, name: str = ""
) -> TemplatePatch:
    """Return a `TemplatePatch` from template pixels and their FITS header.

    Parameters
    ----------
    image, variance : `numpy.ndarray`
        Template pixels and variance (the ``IMAGE`` and ``VARIANCE`` HDUs).
    header : mapping
        Header with the WCS and ``BUNIT`` (or ``ZEROPNT``).
    name : `str`, optional
        Label for logs.

    Returns
    -------
    patch : `workflow.science.template_warp.TemplatePatch`
        Zero point 31.4 (AB mag of 1 nJy) for ``BUNIT = nJy`` coadds, else
        ``ZEROPNT`` from the header, else 31.4 with a warning.
    """
    header = header if isinstance(header, fits.Header) else fits.Header(dict(header))
    unit = str(header.get("BUNIT", "")).strip().lower()
    zero_point = _NJY_ZERO_POINT
    if unit != "njy":
        zero_point = float(header.get("ZEROPNT", _NJY_ZERO_POINT))
        if "ZEROPNT" not in header:
            _log.warning("Template %s has BUNIT %r and no ZEROPNT; assuming nJy", name, unit)
    return TemplatePatch(
        image=np.asarray(image, dtype=np.float32),
        variance=np.asarray(variance, np.float32),
        wcs=WCS(header).celestial,
        zero_point=zero_point,
        name=name,
    )


def _refcat_frame(tables: Sequence[Table | pd.DataFrame], band: str) -> pd.DataFrame | None:
    """Concatenate refcat shards, keeping positions and the band's flux (finite, positive)."""
    wanted = ["ra", "dec", f"{band}_flux", f"{band}_fluxErr"]
    frames = []
    for table in tables:
        frame = table if isinstance(table, pd.DataFrame) else table.to_pandas()
        frames.append(frame[[c for c in wanted if c in frame.columns]])
    if not frames:
        return None
    refcat = pd.concat(frames, ignore_index=True)
    if f"{band}_flux" in refcat:
        refcat = refcat[np.isfinite(refcat[f"{band}_flux"]) & (refcat[f"{band}_flux"] > 0)]
    return refcat.reset_index(drop=True)


def _defect_boxes(defects: Table | pd.DataFrame | None) -> list[Box]:
    if defects is None or len(defects) == 0:
        return []
    columns = [np.maximum(np.asarray(defects[k], dtype=int), 0) for k in ("x0", "y0", "x1", "y1")]
    return [Box(*(int(v) for v in row)) for row in zip(*columns, strict=False)]


def build_processing_inputs(
    raws: Sequence[RawImage],
    geometry: Any,
    *,
    detector: int,
    band: str,
    bias: np.ndarray | None = None,
    bias_unit: str = "adu",
    flat: np.ndarray | None = None,
    defects: Table | pd.DataFrame | None = None,
    refcat: Sequence[Table | pd.DataFrame] = (),
    templates: Sequence[TemplatePatch] = (),
) -> ProcessingInputs:
    """Build the science steps' inputs from in-memory raws, calibs, refcat and templates.

    Parameters
    ----------
    raws : sequence of `workflow.core.raw_fits.RawImage`
        The snaps of one detector-visit (segments by amplifier name, header with
        ``EXPID``, ``MJD-OBS``, ``EXPTIME`` and the commanded WCS).
    geometry : `workflow.core.amplifiers.DetectorGeometry`
        Amplifier layout of the (possibly scaled) detector.
    detector : `int`
        Detector id.
    band : `str`
        Band name (selects the refcat flux column).
    bias : `numpy.ndarray`, optional
        Master bias, assembled shape, in ``bias_unit`` (converted to electrons).
    bias_unit : `str`
        ``"adu"`` or ``"electron"`` (the calib's ``BUNIT``).
    flat : `numpy.ndarray`, optional
        Master flat, assembled shape.
    defects : table, optional
        Defect boxes ``x0``, ``y0``, ``x1``, ``y1`` (assembled pixels, exclusive upper bounds).
    refcat : sequence of table
        Reference-catalogue shards (``ra``, ``dec``, ``<band>_flux``).
    templates : sequence of `workflow.science.template_warp.TemplatePatch`
        Template patches overlapping the detector.

    Returns
    -------
    inputs : `workflow.science.pipelines.ProcessingInputs`
        With ``bias`` in electrons.

    Raises
    ------
    BadImageError
        If there is no raw, an amplifier segment is missing, or the bias unit is unknown.
    """
    if not raws:
        raise BadImageError("isr", "no raw snap to process")
    header = raws[0].header
    missing = [amp.name for amp in geometry.amplifiers if amp.name not in raws[0].segments]
    if missing:
        raise BadImageError("isr", f"raw lacks amplifier segment(s) {', '.join(missing)}")
    exposure_time = float(sum(float(r.header.get("EXPTIME", 0.0)) for r in raws))
    start = float(header["MJD-OBS"])
    end = float(raws[-1].header.get("MJD-END", start + exposure_time / 86400.0))
    return ProcessingInputs(
        raws=[[raw.segments[amp.name] for amp in geometry.amplifiers] for raw in raws],
        amps=[AmpGeometry.from_amplifier(amp) for amp in geometry.amplifiers],
        visit=int(header["EXPID"]),
        detector=int(detector),
        band=band,
        midpoint_mjd_tai=0.5 * (start + end),
        wcs_guess=WCS(header).celestial,
        exposure_time=exposure_time,
        bias=None if bias is None else bias_in_electrons(bias, bias_unit, geometry),
        flat=None if flat is None else np.asarray(flat, dtype=np.float32),
        defects=_defect_boxes(defects),
        refcat=_refcat_frame(list(refcat), band),
        templates=list(templates),
    )


def _read_raws(paths: Sequence[str], geometry: Any, visit: DetectorVisit) -> list[RawImage]:
    """Read the staged raws; an unreadable or wrong-shape one is a `CorruptRawError` naming file and visit."""
    raws = []
    for path in paths:
        try:
            raws.append(read_raw(path, geometry))
        except NonRetriableError as exc:
            raise CorruptRawError(
                f"{path}: corrupt raw for {visit.instrument} group {visit.groupId} detector {visit.detector}: {exc}"
            ) from exc
    return raws


def load_processing_inputs(
    visit: DetectorVisit, prep: Mapping[str, Any], ingest: Mapping[str, Any], config: Mapping[str, Any]
) -> ProcessingInputs:
    """Read everything the science steps need from the staged files.

    Raises
    ------
    workflow.stages.ingest.CorruptRawError
        If a raw is unreadable or of the wrong shape (names the file, group and detector).
    NonRetriableError
        If a calib file is unreadable or of the wrong shape (names the file).
    """
    geometry = instrument_for_run(config).geometry
    raws = _read_raws(ingest["raws"], geometry, visit)
    # A visit without a single filter: ingest staged the flat and templates for the raw's filter.
    by_filter = ingest.get("filter_inputs") or {}
    calibs = {**prep["calibs"], **by_filter.get("calibs", {})}
    band = prep["band"] or by_filter.get("band")
    if band is None:
        raise NonRetriableError(
            f"{visit.instrument} group {visit.groupId} detector {visit.detector}: no filter in the prep "
            "manifest nor the ingest record"
        )
    bias = bias_header = flat = defects = None
    if "bias" in calibs:
        bias, bias_header = _read_image(calibs["bias"]["path"])
    if "flat" in calibs:
        flat, _ = _read_image(calibs["flat"]["path"])
    if "defects" in calibs:
        defects = Table.read(calibs["defects"]["path"])
    templates = []
    for entry in [*prep.get("templates", []), *by_filter.get("templates", [])]:
        image, header = _read_image(entry["path"], "IMAGE")
        variance, _ = _read_image(entry["path"], "VARIANCE")
        data_id = entry.get("data_id", {})
        name = f"tract {data_id.get('tract')} patch {data_id.get('patch')}"
        templates.append(template_patch(image, variance, header, name=name))
    refcat = [Table.read(entry["path"]) for entry in prep.get("refcats", [])]
    return build_processing_inputs(
        raws,
        geometry,
        detector=visit.detector,
        band=band,
        bias=bias,
        bias_unit=str(bias_header.get("BUNIT", "adu")) if bias_header is not None else "adu",
        flat=flat,
        defects=defects,
        refcat=refcat,
        templates=templates,
    )


def _write_products(run: PipelineRun, products_dir: Path) -> dict[str, str]:
    products_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, value in run.outputs.items():
        if name not in _PRODUCTS or value is None:
            continue
        dataset_type, suffix = _PRODUCTS[name]
        path = products_dir / f"{dataset_type}{suffix}"
        if isinstance(value, Exposure):
            write_exposure(value, path)
        elif isinstance(value, pd.DataFrame):
            value.to_parquet(path)
        else:
            continue
        written[dataset_type] = str(path)
    metadata = {**run.to_dict(), "outputs": sorted(written)}
    written["pipeline_metadata"] = str(write_json(products_dir / "pipeline_metadata.json", metadata))
    return written


def process_detector_visit(
    visit: DetectorVisit,
    prep: Mapping[str, Any],
    ingest: Mapping[str, Any],
    config: Mapping[str, Any],
    products_dir: Path,
) -> dict[str, Any]:
    """Run the configured pipelines with fallback and write their products.

    Returns
    -------
    record : `dict`
        ``pipeline`` that ran (None: visit ignored by config), ``candidates``,
        ``attempts`` with reasons, ``products`` (dataset type -> file), step
        timings, counts, ``visit_id`` and ``midpoint_mjd_tai``.

    Raises
    ------
    NoPipelineRanError
        If every candidate pipeline failed for a data reason.
    """
    candidates = select_pipelines(config["pipelines"], survey=visit.survey, ra=visit.ra, dec=visit.dec)
    inputs = load_processing_inputs(visit, prep, ingest, config)
    run = run_pipelines(candidates, config["pipeline_definitions"], inputs)
    products = _write_products(run, products_dir) if run.pipeline else {}
    counts = {
        "dia_sources": len(run.outputs["dia_sources"]) if "dia_sources" in run.outputs else None,
        "sources": len(run.outputs["sources"]) if "sources" in run.outputs else None,
    }
    _log.info(
        "%s group %s detector %s: pipeline %s (candidates %s), %s",
        visit.instrument,
        visit.groupId,
        visit.detector,
        run.pipeline,
        candidates,
        counts,
    )
    return {
        "pipeline": run.pipeline,
        "candidates": candidates,
        "attempts": [dataclasses.asdict(a) for a in run.attempts],
        "timings": [dataclasses.asdict(t) for t in run.timings],
        "products": products,
        "counts": counts,
        "visit_id": inputs.visit,
        "midpoint_mjd_tai": inputs.midpoint_mjd_tai,
    }


def run(
    *, visit: str, prep: str, ingest: str, record: str, config: Mapping[str, Any], log: str | None = None
) -> StageRecord:
    """Run the configured pipelines with fallback; write products and the record (rule ``pipeline``)."""
    return run_stage(
        "pipeline",
        visit=visit,
        record=record,
        config=config,
        log=log,
        body=lambda target: process_detector_visit(
            load_target_visit(visit, config),
            read_stage_record(prep, "prep").body,
            read_stage_record(ingest, "ingest").body,
            config,
            target.work_dir / "products",
        ),
    )
