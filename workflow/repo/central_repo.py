"""The central Butler repository: create it, name its collections, register dimensions.

The repository holds what prompt processing reads before a visit (calibs,
templates, reference catalogs, the skymap) and the raws of past visits used
for replay.  Everything here is idempotent: running a step twice adds nothing.

Collections (``<inst>`` is the instrument name)
-----------------------------------------------
``<inst>/calib``
    CALIBRATION collection; ``bias``, ``flat`` and ``defects`` certified with
    validity ranges, stored in RUNs ``<inst>/calib/<type>/<YYYYMMDDTHHMMSS>``
    (validity start).
``refcats``
    CHAINED to the RUN `REFCAT_RUN`: ``refcat`` shards, one per ``htm7`` trixel.
``<inst>/templates``
    CHAINED to the RUN ``<inst>/templates/deep``: ``template_coadd`` per
    (skymap, tract, patch, band).
``<inst>/raw/all``
    RUN of ``raw`` (instrument, exposure, detector).
``<inst>/defaults``
    CHAINED: calib, templates, refcats, raw/all.

Images use the storage class `workflow.repo.formatters.STORAGE_CLASS`
(an `astropy.io.fits.HDUList`), tables ``ArrowAstropy``.  That storage class
and its formatter are written into each new repository's ``butler.yaml``
(from ``config/butler``), so no ``DAF_BUTLER_CONFIG_PATH`` is needed to open
it.  Dimension records: instrument (its ``class_name`` an importable class of
`workflow.repo.butler_instrument`), physical_filter, detector, visit_system
(`register_instrument`); skymap, tract, patch (`register_skymap`); day_obs,
group, exposure, visit and its definition, membership and detector regions
(`register_exposure`, visits 1:1 with exposures).

Storing datasets is `workflow.repo.butler_ingest`, finding them `workflow.repo.queries`;
`workflow.sim.demo_repo` fills a repository from the simulator (CLI:
``scripts/make_central_repo.py``).
"""

from __future__ import annotations

__all__ = [
    "BUTLER_CONFIG_DIR",
    "REFCAT_RUN",
    "REFCATS",
    "DATASET_TYPES",
    "calib_collection",
    "raw_collection",
    "templates_collection",
    "defaults_collection",
    "butler_seed_config",
    "create_central_repo",
    "open_central_repo",
    "register_instrument",
    "register_skymap",
    "register_exposure",
    "register_dataset_types",
    "count_datasets",
]

import hashlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import astropy.time
import yaml
from lsst.daf.butler import Butler, CollectionType, Config, DatasetType, Timespan
from lsst.daf.butler.registry import ConflictingDefinitionError
from lsst.resources import ResourcePath

from workflow.core.config import PROJECT_ROOT
from workflow.core.exceptions import ConfigError, NonRetriableError
from workflow.repo.butler_instrument import class_name_for
from workflow.repo.formatters import FORMATTER_NAME, STORAGE_CLASS

if TYPE_CHECKING:
    from workflow.core.exposure_info import ExposureInfo
    from workflow.core.instrument import Instrument
    from workflow.core.skymap import RingsSkyMap, TractInfo

_log = logging.getLogger(__name__)

BUTLER_CONFIG_DIR = PROJECT_ROOT / "config" / "butler"
"""Butler config directory (storage classes, formatters); usable as DAF_BUTLER_CONFIG_PATH."""
REFCAT_RUN = "refcats/prompt_snake_v1"
REFCATS = "refcats"
_VISIT_SYSTEM = (0, "one-to-one")
_ID_MAX = 2**50
DATASET_TYPES: dict[str, tuple[tuple[str, ...], str, bool]] = {
    "raw": (("instrument", "exposure", "detector"), STORAGE_CLASS, False),
    "bias": (("instrument", "detector"), STORAGE_CLASS, True),
    "flat": (("instrument", "detector", "physical_filter"), STORAGE_CLASS, True),
    "defects": (("instrument", "detector"), "ArrowAstropy", True),
    "refcat": (("htm7",), "ArrowAstropy", False),
    "template_coadd": (("skymap", "tract", "patch", "band"), STORAGE_CLASS, False),
}
"""Dataset type name -> (dimensions, storage class, is calibration)."""


def calib_collection(instrument: str) -> str:
    """Return the CALIBRATION collection of an instrument, ``<inst>/calib``."""
    return f"{instrument}/calib"


def raw_collection(instrument: str) -> str:
    """Return the RUN holding an instrument's raws, ``<inst>/raw/all``."""
    return f"{instrument}/raw/all"


def templates_collection(instrument: str) -> str:
    """Return the CHAINED template collection, ``<inst>/templates``."""
    return f"{instrument}/templates"


def defaults_collection(instrument: str) -> str:
    """Return the CHAINED collection of everything prep needs, ``<inst>/defaults``."""
    return f"{instrument}/defaults"


def butler_seed_config(*, registry_url: str | None = None, registry_namespace: str | None = None) -> Config:
    """Build the seed configuration written into a new repository's ``butler.yaml``.

    Parameters
    ----------
    registry_url : `str`, optional
        SQLAlchemy URL of the registry (``postgresql+psycopg2://...``);
        default: SQLite inside the repository.
    registry_namespace : `str`, optional
        PostgreSQL schema holding this repository's tables.

    Returns
    -------
    config : `lsst.daf.butler.Config`
        Storage classes and formatters from `BUTLER_CONFIG_DIR`, plus registry.
    """
    with open(BUTLER_CONFIG_DIR / "storageClasses.yaml") as stream:
        seed: dict[str, Any] = dict(yaml.safe_load(stream))
    with open(BUTLER_CONFIG_DIR / "datastores" / "formatters.yaml") as stream:
        seed["datastore"] = {"formatters": yaml.safe_load(stream)}
    if STORAGE_CLASS not in seed["storageClasses"] or seed["datastore"]["formatters"][STORAGE_CLASS] != FORMATTER_NAME:
        raise ConfigError(f"{BUTLER_CONFIG_DIR}: expected storage class {STORAGE_CLASS} with {FORMATTER_NAME}")
    if registry_url is not None:
        seed["registry"] = {"db": registry_url}
        if registry_namespace is not None:
            seed["registry"]["namespace"] = registry_namespace
    return Config(seed)


def create_central_repo(
    root: str | Path,
    *,
    registry_url: str | None = None,
    datastore_s3: str | None = None,
    registry_namespace: str | None = None,
) -> Butler:
    """Create the central repository, or open it if it already exists.

    Parameters
    ----------
    root : `str` or `pathlib.Path`
        Directory holding ``butler.yaml`` (and, by default, the SQLite
        registry and the files).
    registry_url : `str`, optional
        PostgreSQL registry URL (``postgresql+psycopg2://user@host:port/db``);
        the database needs ``CREATE EXTENSION btree_gist``.
    datastore_s3 : `str`, optional
        ``s3://bucket/prefix`` datastore root; the endpoint and credentials come
        from ``S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``.
    registry_namespace : `str`, optional
        PostgreSQL schema for this repository (several repos in one database).

    Returns
    -------
    butler : `lsst.daf.butler.Butler`
        Writeable Butler on the repository.

    Raises
    ------
    NonRetriableError
        If the repository cannot be created; the message names ``root``.
    """
    root_uri = ResourcePath(root, forceDirectory=True)
    config_uri = root_uri.join("butler.yaml")
    if not config_uri.exists():
        seed = butler_seed_config(registry_url=registry_url, registry_namespace=registry_namespace)
        if root_uri.isLocal:
            Path(root_uri.ospath).mkdir(parents=True, exist_ok=True)
        try:
            if datastore_s3 is None:
                Butler.makeRepo(root_uri, config=seed)
            else:
                Butler.makeRepo(datastore_s3, config=seed, outfile=config_uri)
        except Exception as exc:
            if config_uri.exists():  # do not leave a half-made repository that would be "opened" next time
                config_uri.remove()
            raise NonRetriableError(f"{root}: cannot create Butler repository: {exc}") from exc
        _log.info(
            "Created Butler repository %s (registry %s, datastore %s)",
            root,
            registry_url or "SQLite",
            datastore_s3 or "local",
        )
    return open_central_repo(root, writeable=True)


def open_central_repo(root: str | Path, *, writeable: bool = False) -> Butler:
    """Open an existing central repository.

    Parameters
    ----------
    root : `str` or `pathlib.Path`
        Repository directory (or URI), or its ``butler.yaml`` itself.
    writeable : `bool`, optional
        Open for writing.

    Returns
    -------
    butler : `lsst.daf.butler.Butler`
        Butler on the repository.

    Raises
    ------
    NonRetriableError
        If ``root`` holds no repository; the message names it.
    """
    is_file = str(root).endswith((".yaml", ".yml"))
    config_uri = ResourcePath(root) if is_file else ResourcePath(root, forceDirectory=True).join("butler.yaml")
    if not config_uri.exists():
        raise NonRetriableError(f"{root}: no Butler repository (no {config_uri}); create it first")
    return Butler.from_config(config_uri, writeable=writeable)


def register_instrument(butler: Butler, instrument: Instrument) -> None:
    """Register instrument, physical_filter (+band) and detector records.

    Uses ``syncDimensionData``, so a rerun adds nothing.

    Raises
    ------
    NonRetriableError
        If the records exist with other values (the config changed); the
        message names the instrument.
    """
    name = instrument.name
    records = [
        (
            "instrument",
            {
                "name": name,
                "class_name": class_name_for(name),
                "detector_max": max(d.id for d in instrument.detectors) + 1,
                "visit_max": _ID_MAX,
                "exposure_max": _ID_MAX,
                "visit_system": _VISIT_SYSTEM[0],
            },
        )
    ]
    records += [
        ("physical_filter", {"instrument": name, "name": pf, "band": band}) for pf, band in instrument.filters.items()
    ]
    records += [
        (
            "detector",
            {
                "instrument": name,
                "id": d.id,
                "full_name": d.name,
                "raft": d.raft,
                "name_in_raft": d.sensor,
                "purpose": d.purpose,
            },
        )
        for d in instrument.detectors
    ]
    records.append(("visit_system", {"instrument": name, "id": _VISIT_SYSTEM[0], "name": _VISIT_SYSTEM[1]}))
    try:
        for element, record in records:
            butler.registry.syncDimensionData(element, record)
    except ConflictingDefinitionError as exc:
        raise NonRetriableError(f"{name}: registered {element} records differ from the config: {exc}") from exc


def register_skymap(butler: Butler, skymap: RingsSkyMap, tracts: Iterable[TractInfo]) -> None:
    """Register the skymap record and some tracts with all their patches.

    Regions are the tract polygons and the patches' outer (bordered) boxes,
    as Rubin registers them.  Idempotent; tracts may be added in later calls.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        Writeable Butler.
    skymap : `workflow.core.skymap.RingsSkyMap`
        The sky map.
    tracts : iterable of `workflow.core.skymap.TractInfo`
        Tracts to register (e.g. ``skymap.tracts_overlapping(region)``).
    """
    registry = butler.registry
    geometry = (
        skymap.name,
        skymap.num_rings,
        skymap.patch_inner,
        skymap.patch_border,
        skymap.pixel_scale_arcsec,
        skymap.tract_overlap_deg,
    )
    registry.syncDimensionData(
        "skymap",
        {
            "name": skymap.name,
            "hash": hashlib.sha1(repr(geometry).encode()).digest(),
            "tract_max": skymap.num_tracts,
            "patch_nx_max": None,
            "patch_ny_max": None,
        },
    )
    tracts = list(tracts)
    registry.insertDimensionData(
        "tract", *[{"skymap": skymap.name, "id": t.id, "region": t.polygon()} for t in tracts], skip_existing=True
    )
    patches = [
        {
            "skymap": skymap.name,
            "tract": t.id,
            "id": p.id,
            "cell_x": p.index[0],
            "cell_y": p.index[1],
            "region": p.polygon(outer=True),
        }
        for t in tracts
        for p in skymap.patches(t)
    ]
    registry.insertDimensionData("patch", *patches, skip_existing=True)


def _day_obs_timespan(day_obs: int) -> Timespan:
    noon = astropy.time.Time(f"{str(day_obs)[:4]}-{str(day_obs)[4:6]}-{str(day_obs)[6:]}T12:00:00", scale="tai")
    return Timespan(noon, noon + astropy.time.TimeDelta(1.0, format="jd"))


_SYNCED = frozenset({"day_obs", "group", "exposure", "visit"})
"""Exposure elements synced (compared with any existing record); the others are inserted if missing."""


def _exposure_records(info: ExposureInfo, instrument: Instrument) -> list[tuple[str, list[dict[str, Any]]]]:
    """Return (element, records) of one exposure and its 1:1 visit, in insertion order."""
    inst, pointing = info.instrument, (info.ra, info.dec, info.rotation_deg)
    start = astropy.time.Time(info.start.tai.isot, scale="tai")  # whole ms: header and simulator agree
    timespan = Timespan(start, start + astropy.time.TimeDelta(info.exptime, format="sec"))
    common = {
        "instrument": inst,
        "id": info.exposure_id,
        "day_obs": info.day_obs,
        "timespan": timespan,
        "physical_filter": info.physical_filter,
        "seq_num": info.seq_num,
        "exposure_time": info.exptime,
        "observation_reason": "science",
        "science_program": "prompt-snake",
    }
    ids = {"instrument": inst, "visit": info.exposure_id}
    return [
        ("day_obs", [{"instrument": inst, "id": info.day_obs, "timespan": _day_obs_timespan(info.day_obs)}]),
        ("group", [{"instrument": inst, "name": info.group_id}]),
        (
            "exposure",
            [
                {
                    **common,
                    "group": info.group_id,
                    "obs_id": info.obs_id,
                    "dark_time": info.exptime,
                    "observation_type": "science",
                    "seq_start": info.seq_num - info.snap,
                    "seq_end": info.seq_num - info.snap + info.n_snaps - 1,
                    "tracking_ra": info.ra,
                    "tracking_dec": info.dec,
                    "sky_angle": info.rotation_deg,
                    "has_simulated": True,
                    "can_see_sky": True,
                }
            ],
        ),
        (
            "visit",
            [
                {
                    **common,
                    "name": info.obs_id,
                    "region": instrument.visit_region(*pointing, detectors=instrument.detectors),
                }
            ],
        ),
        ("visit_definition", [{**ids, "exposure": info.exposure_id}]),
        ("visit_system_membership", [{**ids, "visit_system": _VISIT_SYSTEM[0]}]),
        (
            "visit_detector_region",
            [
                {**ids, "detector": det.id, "region": instrument.detector_region(det, *pointing)}
                for det in instrument.detectors
            ],
        ),
    ]


def register_exposure(butler: Butler, info: ExposureInfo, instrument: Instrument) -> None:
    """Register the records of one exposure and its 1:1 visit, idempotently.

    Registers day_obs, group, exposure, visit (region of all detectors),
    visit_definition, visit_system_membership and one visit_detector_region
    per detector, regions predicted by `Instrument.detector_region` from the
    boresight and rotation.  Single records are synced (compared if present);
    the per-detector regions are inserted with ``skip_existing``.  Times are
    rounded to whole milliseconds (the precision of ``DATE-OBS``), so records
    made from a raw header and from the simulator's exposure agree.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        Writeable Butler.
    info : `workflow.sim.exposures.ExposureInfo`
        The exposure (its id is also the visit id).
    instrument : `workflow.core.instrument.Instrument`
        The camera.

    Raises
    ------
    NonRetriableError
        If the exposure is already registered with different values; the
        message names the instrument and exposure.
    """
    try:
        for element, records in _exposure_records(info, instrument):
            if element in _SYNCED:
                butler.registry.syncDimensionData(element, records[0])
            else:
                butler.registry.insertDimensionData(element, *records, skip_existing=True)
    except ConflictingDefinitionError as exc:
        raise NonRetriableError(
            f"{info.instrument} exposure {info.exposure_id}: already registered with other values ({exc}); "
            "was the repository built with another scale or seed?"
        ) from exc


def register_dataset_types(butler: Butler) -> dict[str, DatasetType]:
    """Register every dataset type of `DATASET_TYPES` (idempotent).

    Returns
    -------
    dataset_types : `dict` [`str`, `lsst.daf.butler.DatasetType`]
        By name.
    """
    out = {}
    for name, (dimensions, storage_class, is_calibration) in DATASET_TYPES.items():
        out[name] = DatasetType(
            name, dimensions, storage_class, universe=butler.dimensions, isCalibration=is_calibration
        )
        butler.registry.registerDatasetType(out[name])
    return out


def count_datasets(butler: Butler, collections: str | Sequence[str] | None = None) -> dict[str, int]:
    """Count the datasets of each `DATASET_TYPES` type in some collections.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        Butler to query.
    collections : `str` or sequence of `str`, optional
        Collections to count in; default: every RUN collection.

    Returns
    -------
    counts : `dict` [`str`, `int`]
        Dataset type name to number of datasets (0 if not registered).
    """
    registered = {dt.name for dt in butler.registry.queryDatasetTypes()}
    if collections is None:
        collections = list(butler.collections.query("*", collection_types={CollectionType.RUN}))
    counts = {}
    for name in DATASET_TYPES:
        if name not in registered:
            counts[name] = 0
            continue
        with butler.query() as query:
            counts[name] = query.datasets(name, collections, find_first=False).count()
    return counts
