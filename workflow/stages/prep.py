"""Prep: stage what a detector-visit needs before its raws arrive.

From the central repo: the bias, flat and defects valid at the visit time, the
refcat shards and template patches overlapping the predicted detector footprint
(plus ``apdb.preload_padding_arcsec``).  Files go through the node cache (a second
detector-visit of the same field fetches nothing) and are linked into the target's
work area; the manifest written here is the next stages' map of them.
"""

from __future__ import annotations

__all__ = ["run", "CalibNotFoundError", "stage_inputs"]

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

    Raises
    ------
    CalibNotFoundError
        If no bias or flat is valid at the visit time.
    """
    instrument = instrument_for_run(config)
    detector = instrument.detector(visit.detector)
    physical_filter = visit.filter_list[0] if visit.filter_list else None
    band = instrument.band(physical_filter) if physical_filter else None
    when = Time(visit.private_sndStamp, format="unix_tai", scale="tai")
    padding = float(config["apdb"]["preload_padding_arcsec"])
    region = instrument.detector_region(detector, visit.ra, visit.dec, visit.cameraAngle)
    butler = open_central_repo(config["central_repo"])
    cache = NodeCache(config["paths"]["cache"], int(config["cache"]["max_bytes"]))
    dest = work_dir / "inputs"
    where = f"{visit.instrument} group {visit.groupId} detector {visit.detector}"

    calibs: dict[str, Any] = {}
    for kind, needs_filter in (("bias", False), ("flat", True), ("defects", False)):
        ref = find_calib(
            butler, visit.instrument, kind, detector.id, when, physical_filter=physical_filter if needs_filter else None
        )
        if ref is None:
            if kind == "defects":
                continue
            raise CalibNotFoundError(
                f"{where}: no {kind}{' for ' + str(physical_filter) if needs_filter else ''} "
                f"certified at {when.isot} TAI in {visit.instrument}/calib"
            )
        calibs[kind] = _stage_ref(butler, cache, ref, dest)
    refcats = [_stage_ref(butler, cache, ref, dest) for ref in refcat_shards_overlapping(butler, region)]
    templates = []
    if band is not None:
        refs = templates_overlapping(
            butler, visit.instrument, config["skymap"]["name"], region, band, padding_arcsec=padding
        )
        templates = [_stage_ref(butler, cache, ref, dest) for ref in refs]
    preload = _preload_apdb(visit, config, instrument, when, padding, dest)
    _log.info(
        "%s: staged %d calibs, %d refcat shards, %d template patches (cache hits %d, misses %d)",
        where,
        len(calibs),
        len(refcats),
        len(templates),
        cache.stats.hits,
        cache.stats.misses,
    )
    return {
        "calibs": calibs,
        "refcats": refcats,
        "templates": templates,
        "physical_filter": physical_filter,
        "band": band,
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
