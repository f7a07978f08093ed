"""Prep: stage what a detector-visit needs before its raws arrive.

From the central repo: the bias, flat and defects valid at the visit time, the
refcat shards and template patches overlapping the predicted detector footprint
(plus ``apdb.preload_padding_arcsec``).  Files go through the node cache (a second
detector-visit of the same field fetches nothing) and are linked into the target's
work area; the manifest written here is the next stages' map of them.

The flat and the templates depend on the filter.  A next_visit names it in
``filters``, but blank means any filter (the summit schema), and a list of several
leaves the choice to the camera; then only the raw's header says which one was
used.  So prep stages them only when the visit names exactly one filter
(`prep_filter`); otherwise the manifest says ``physical_filter: null`` and ingest,
which reads the raw's header, stages them with `stage_filter_inputs` (the pipeline
stage merges both records).  Everything else prep does is filter-independent.
"""

from __future__ import annotations

__all__ = ["run", "CalibNotFoundError", "prep_filter", "stage_filter_inputs", "stage_inputs"]

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from astropy.time import Time

from workflow.core.exceptions import NonRetriableError
from workflow.core.instrument import Instrument, instrument_for_run
from workflow.core.visit import DetectorVisit
from workflow.repo.central_repo import open_central_repo
from workflow.repo.queries import (
    find_calib,
    refcat_shards_overlapping,
    templates_overlapping,
)
from workflow.stages.node_cache import NodeCache
from workflow.stages.records import StageRecord
from workflow.stages.target import load_target_visit, run_stage

_log = logging.getLogger(__name__)


class CalibNotFoundError(NonRetriableError, LookupError):
    """No calib of a required type is certified at the visit time."""


def _suffix(ref: Any) -> str:
    return ".fits" if ref.datasetType.storageClass_name == "FitsHDUList" else ".parquet"


def _stage_ref(butler: Any, cache: NodeCache, ref: Any, dest_dir: Path) -> dict[str, Any]:
    uri = butler.getURI(ref)

    def fetch(path: Path) -> None:
        from lsst.resources import ResourcePath

        ResourcePath(path).transfer_from(uri, transfer="copy")

    suffix = Path(uri.path).suffix or _suffix(ref)
    dest = dest_dir / ref.datasetType.name / f"{ref.id}{suffix}"
    cache.link_into(str(ref.id), fetch, dest, suffix=suffix)
    return {
        "path": str(dest),
        "dataset_type": ref.datasetType.name,
        "id": str(ref.id),
        "data_id": {k: v for k, v in ref.dataId.required.items()},
    }


def _preload_apdb(
    visit: DetectorVisit, config: Mapping[str, Any], instrument: Instrument, when: Time, padding: float, dest: Path
) -> dict[str, Any]:
    """Preload DiaObjects and their recent DiaSources in the padded footprint."""
    from workflow.apdb.store import open_apdb, preload, save_preload

    region = instrument.detector_region(visit.detector, visit.ra, visit.dec, visit.cameraAngle, padding_arcsec=padding)
    apdb = open_apdb(config["apdb"], create=True)
    loaded = preload(apdb, region, when)
    paths = {"objects": str(dest / "preload_objects.parquet"), "sources": str(dest / "preload_sources.parquet")}
    dest.mkdir(parents=True, exist_ok=True)
    save_preload(loaded, paths["objects"], paths["sources"])
    return {**paths, "n_objects": len(loaded.objects), "n_sources": len(loaded.sources)}


def prep_filter(visit: DetectorVisit) -> str | None:
    """Return the physical filter prep stages for: the visit's only filter, else None.

    None (a blank ``filters``, or several) means the raw's header decides, at ingest.
    """
    return visit.filter_list[0] if len(visit.filter_list) == 1 else None


def _where(visit: DetectorVisit) -> str:
    return f"{visit.instrument} group {visit.groupId} detector {visit.detector}"


def stage_filter_inputs(
    visit: DetectorVisit,
    config: Mapping[str, Any],
    work_dir: Path,
    physical_filter: str,
    *,
    butler: Any = None,
    cache: NodeCache | None = None,
) -> dict[str, Any]:
    """Stage what depends on the filter: the flat and the template patches.

    Parameters
    ----------
    visit : `workflow.core.visit.DetectorVisit`
        The detector-visit.
    config : `~collections.abc.Mapping`
        Merged configuration.
    work_dir : `pathlib.Path`
        The target's work area; files land under ``work_dir/inputs``.
    physical_filter : `str`
        The filter (the visit's, or the raw header's ``FILTER``).
    butler, cache : optional
        An open central-repo Butler and node cache to reuse.

    Returns
    -------
    inputs : `dict`
        ``physical_filter``, ``band``, ``calibs`` (``flat``) and ``templates``.

    Raises
    ------
    CalibNotFoundError
        If no flat for the filter is valid at the visit time, or the instrument
        has no such filter.
    """
    instrument = instrument_for_run(config)
    try:
        band = instrument.band(physical_filter)
    except KeyError as exc:
        raise CalibNotFoundError(f"{_where(visit)}: {exc.args[0]}") from None
    butler = butler if butler is not None else open_central_repo(config["central_repo"])
    cache = cache if cache is not None else NodeCache(config["paths"]["cache"], int(config["cache"]["max_bytes"]))
    when = Time(visit.private_sndStamp, format="unix_tai", scale="tai")
    dest = work_dir / "inputs"
    ref = find_calib(butler, visit.instrument, "flat", visit.detector, when, physical_filter=physical_filter)
    if ref is None:
        raise CalibNotFoundError(
            f"{_where(visit)}: no flat for {physical_filter} certified at {when.isot} TAI in {visit.instrument}/calib"
        )
    region = instrument.detector_region(visit.detector, visit.ra, visit.dec, visit.cameraAngle)
    padding = float(config["apdb"]["preload_padding_arcsec"])
    refs = templates_overlapping(
        butler, visit.instrument, config["skymap"]["name"], region, band, padding_arcsec=padding
    )
    return {
        "physical_filter": physical_filter,
        "band": band,
        "calibs": {"flat": _stage_ref(butler, cache, ref, dest)},
        "templates": [_stage_ref(butler, cache, t, dest) for t in refs],
    }


def stage_inputs(visit: DetectorVisit, config: Mapping[str, Any], work_dir: Path) -> dict[str, Any]:
    """Stage calibs, refcat shards and templates for one detector-visit.

    Parameters
    ----------
    visit : `workflow.core.visit.DetectorVisit`
        The detector-visit.
    config : `~collections.abc.Mapping`
        Merged configuration.
    work_dir : `pathlib.Path`
        The target's work area; files land under ``work_dir/inputs``.

    Returns
    -------
    manifest : `dict`
        ``calibs`` (bias, flat, defects), ``refcats`` and ``templates`` entries
        with local paths, plus the predicted footprint and cache statistics.
        Without a single filter in the visit (`prep_filter`) there is no flat and
        no template, and ``physical_filter`` and ``band`` are None: ingest stages
        them for the raw's filter.

    Raises
    ------
    CalibNotFoundError
        If no bias, or no flat for the visit's filter, is valid at the visit time.
    """
    instrument = instrument_for_run(config)
    detector = instrument.detector(visit.detector)
    when = Time(visit.private_sndStamp, format="unix_tai", scale="tai")
    padding = float(config["apdb"]["preload_padding_arcsec"])
    region = instrument.detector_region(detector, visit.ra, visit.dec, visit.cameraAngle)
    butler = open_central_repo(config["central_repo"])
    cache = NodeCache(config["paths"]["cache"], int(config["cache"]["max_bytes"]))
    dest = work_dir / "inputs"

    calibs: dict[str, Any] = {}
    for kind in ("bias", "defects"):
        ref = find_calib(butler, visit.instrument, kind, detector.id, when)
        if ref is None:
            if kind == "defects":
                continue
            raise CalibNotFoundError(
                f"{_where(visit)}: no {kind} certified at {when.isot} TAI in {visit.instrument}/calib"
            )
        calibs[kind] = _stage_ref(butler, cache, ref, dest)
    refcats = [_stage_ref(butler, cache, ref, dest) for ref in refcat_shards_overlapping(butler, region)]
    physical_filter = prep_filter(visit)
    by_filter: dict[str, Any] = {"physical_filter": None, "band": None, "calibs": {}, "templates": []}
    if physical_filter is not None:
        by_filter = stage_filter_inputs(visit, config, work_dir, physical_filter, butler=butler, cache=cache)
    else:
        _log.info(
            "%s: filters %r name no single filter; flat and templates follow the raw", _where(visit), visit.filters
        )
    calibs.update(by_filter["calibs"])
    preload = _preload_apdb(visit, config, instrument, when, padding, dest)
    _log.info(
        "%s: staged %d calibs, %d refcat shards, %d template patches (cache hits %d, misses %d)",
        _where(visit),
        len(calibs),
        len(refcats),
        len(by_filter["templates"]),
        cache.stats.hits,
        cache.stats.misses,
    )
    return {
        "calibs": calibs,
        "refcats": refcats,
        "templates": by_filter["templates"],
        "physical_filter": by_filter["physical_filter"],
        "band": by_filter["band"],
        "preload": preload,
        "cache": {"hits": cache.stats.hits, "misses": cache.stats.misses, "evicted": cache.stats.evicted},
    }


def run(*, visit: str, manifest: str, config: Mapping[str, Any], log: str | None = None) -> StageRecord:
    """Stage calibs, refcat shards and templates; write the prep manifest (rule ``prep``)."""
    return run_stage(
        "prep",
        visit=visit,
        record=manifest,
        config=config,
        log=log,
        body=lambda target: stage_inputs(load_target_visit(visit, config), config, target.work_dir),
    )
