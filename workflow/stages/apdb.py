"""APDB load: associate a detector-visit's DIA sources, store them once, send alerts.

Reads what the pipeline stage wrote (DIA source table, calibrated, template and
difference images for cutouts) and the APDB preload staged by prep.
"""

from __future__ import annotations

__all__ = ["run", "load_detector_visit"]

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from astropy.time import Time

from workflow.apdb.alerts import CutoutMaker, make_alert_sink
from workflow.apdb.load import associate_store_alert
from workflow.apdb.outbox import AlertOutbox
from workflow.apdb.store import load_preload, open_apdb
from workflow.core.visit import DetectorVisit
from workflow.science.exposure import read_exposure
from workflow.stages.records import StageRecord, read_stage_record
from workflow.stages.target import load_target_visit, run_stage

_log = logging.getLogger(__name__)

# Cutout name -> product holding the image.
_CUTOUT_SOURCES = {"science": "preliminary_visit_image", "template": "template_image", "difference": "difference_image"}


def _cutout_makers(products: Mapping[str, str]) -> dict[str, CutoutMaker]:
    makers = {}
    for name, product in _CUTOUT_SOURCES.items():
        if product in products:
            exposure = read_exposure(products[product])
            makers[name] = CutoutMaker(exposure.image, exposure.wcs)
    return makers


def load_detector_visit(
    visit: DetectorVisit,
    prep: Mapping[str, Any],
    pipeline: Mapping[str, Any],
    config: Mapping[str, Any],
    alert_file: Path,
    outbox_file: Path | None = None,
) -> dict[str, Any]:
    """Associate, store and alert for one detector-visit.

    Parameters
    ----------
    visit : `workflow.core.visit.DetectorVisit`
        The detector-visit.
    prep, pipeline : `~collections.abc.Mapping`
        The prep manifest and the pipeline record.
    config : `~collections.abc.Mapping`
        Merged configuration (``apdb``, ``kafka``, ``kafka_topics``).
    alert_file : `pathlib.Path`
        Avro file for the alerts when no broker is configured.
    outbox_file : `pathlib.Path`, optional
        The detector-visit's alert outbox (`workflow.apdb.outbox`): alerts are
        written there before the store, so a retry after a kill still sends them.

    Returns
    -------
    record : `dict`
        DIA sources, matched and new DiaObjects, whether the store wrote (or why
        not), alerts sent and their bytes.
    """
    products = pipeline.get("products", {})
    if "dia_source_unfiltered" not in products:
        reason = f"pipeline {pipeline.get('pipeline')} produced no DIA sources"
        _log.info(
            "%s group %s detector %s: APDB load skipped: %s", visit.instrument, visit.groupId, visit.detector, reason
        )
        return {"stored": False, "reason": reason, "n_dia_sources": 0, "n_new_objects": 0, "n_alerts": 0}
    dia_sources = pd.read_parquet(products["dia_source_unfiltered"])
    apdb = open_apdb(config["apdb"], create=True)
    preloaded = load_preload(prep["preload"]["objects"], prep["preload"]["sources"])
    visit_id = int(dia_sources["visit"].iloc[0]) if len(dia_sources) else int(pipeline["visit_id"])
    result = associate_store_alert(
        apdb,
        dia_sources,
        preloaded,
        visit=visit_id,
        detector=visit.detector,
        visit_time=Time(pipeline["midpoint_mjd_tai"], format="mjd", scale="tai"),
        radius_arcsec=float(config["apdb"]["association_radius_arcsec"]),
        sink=make_alert_sink(config, alert_file),
        cutouts=_cutout_makers(products),
        outbox=AlertOutbox(outbox_file) if outbox_file is not None else None,
    )
    alerts = result.alerts
    return {
        "stored": result.store.stored,
        "reason": result.store.reason,
        "n_dia_sources": len(dia_sources),
        "n_matched": result.association.n_matched,
        "n_new_objects": result.association.n_new,
        "n_alerts": alerts.n_alerts if alerts else 0,
        "alert_bytes": alerts.n_bytes if alerts else 0,
        "alert_destination": alerts.destination if alerts else None,
    }


def run(
    *, visit: str, prep: str, pipeline: str, record: str, config: Mapping[str, Any], log: str | None = None
) -> StageRecord:
    """Associate, store once and send alerts; write the APDB record (rule ``apdb``)."""
    return run_stage(
        "apdb",
        visit=visit,
        record=record,
        config=config,
        log=log,
        body=lambda target: load_detector_visit(
            load_target_visit(visit, config),
            read_stage_record(prep, "prep").body,
            read_stage_record(pipeline, "pipeline").body,
            config,
            target.work_dir / "alerts.avro",
            outbox_file=target.work_dir / "alert_outbox.avro",
        ),
    )
