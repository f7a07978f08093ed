"""The central Butler repository: create, register dimensions, ingest, query.

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

Images use the storage class `workflow.butler_formatters.STORAGE_CLASS`
(an `astropy.io.fits.HDUList`), tables ``ArrowAstropy``.  That storage class
and its formatter are written into each new repository's ``butler.yaml``
(from ``config/butler``), so no ``DAF_BUTLER_CONFIG_PATH`` is needed to open
it.  Dimension records: instrument, physical_filter, detector, visit_system
(`register_instrument`); skymap, tract, patch (`register_skymap`); day_obs,
group, exposure, visit and its definition, membership and detector regions
(`register_exposure`, visits 1:1 with exposures).

`build_demo_repo` fills a repository from the simulator (`plan_demo`,
`DemoSources`); the CLI is ``scripts/make_central_repo.py``.
"""

from __future__ import annotations

__all__ = [
    "BUTLER_CONFIG_DIR", "REFCAT_RUN", "REFCATS", "DATASET_TYPES", "Source",
    "calib_collection", "raw_collection", "templates_collection", "defaults_collection",
    "butler_seed_config", "create_central_repo", "open_central_repo",
    "register_instrument", "register_skymap", "register_exposure", "register_dataset_types",
    "count_datasets", "CalibInput", "ingest_calibs", "ingest_refcat_shards", "ingest_templates",
    "exposure_info_from_header", "ingest_raws", "ingest_exposure_raws", "define_defaults_chain",
    "find_calib", "shard_ids_for", "refcat_shards_overlapping", "templates_overlapping",
    "PastExposure", "past_exposures",
    "DEMO_FIELD", "DEMO_START", "DemoPlan", "plan_demo", "DemoSources", "simulated_calibs",
    "simulated_refcat_shard", "simulated_template", "simulated_raw", "build_demo_repo",
]

import dataclasses
import hashlib
import logging
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import astropy.time
import lsst.sphgeom as sphgeom
import numpy as np
import yaml
from astropy.io import fits
from lsst.daf.butler import (
    Butler, CollectionType, Config, DataCoordinate, DatasetRef, DatasetType, FileDataset, Timespan,
)
from lsst.daf.butler.registry import ConflictingDefinitionError
from lsst.resources import ResourcePath

from .butler_formatters import FORMATTER_NAME, STORAGE_CLASS
from .config import PROJECT_ROOT
from .exceptions import ConfigError, NonRetriableError
from .exposures import ExposureInfo

if TYPE_CHECKING:
    from astropy.table import Table

    from .instrument import Detector, Instrument
    from .skymap import PatchInfo, RingsSkyMap, TractInfo

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
        _log.info("Created Butler repository %s (registry %s, datastore %s)", root,
                  registry_url or "SQLite", datastore_s3 or "local")
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
    records = [("instrument", {
        "name": name, "class_name": f"prompt_snake.{name}", "detector_max": max(d.id for d in instrument.detectors) + 1,
        "visit_max": _ID_MAX, "exposure_max": _ID_MAX, "visit_system": _VISIT_SYSTEM[0],
    })]
    records += [("physical_filter", {"instrument": name, "name": pf, "band": band})
                for pf, band in instrument.filters.items()]
    records += [("detector", {"instrument": name, "id": d.id, "full_name": d.name, "raft": d.raft,
                              "name_in_raft": d.sensor, "purpose": "SCIENCE"}) for d in instrument.detectors]
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
    skymap : `workflow.skymap.RingsSkyMap`
        The sky map.
    tracts : iterable of `workflow.skymap.TractInfo`
        Tracts to register (e.g. ``skymap.tracts_overlapping(region)``).
    """
    registry = butler.registry
    geometry = (skymap.name, skymap.num_rings, skymap.patch_inner, skymap.patch_border,
                skymap.pixel_scale_arcsec, skymap.tract_overlap_deg)
    registry.syncDimensionData("skymap", {
        "name": skymap.name, "hash": hashlib.sha1(repr(geometry).encode()).digest(),
        "tract_max": skymap.num_tracts, "patch_nx_max": None, "patch_ny_max": None,
    })
    tracts = list(tracts)
    registry.insertDimensionData(
        "tract", *[{"skymap": skymap.name, "id": t.id, "region": t.polygon()} for t in tracts], skip_existing=True
    )
    patches = [
        {"skymap": skymap.name, "tract": t.id, "id": p.id, "cell_x": p.index[0], "cell_y": p.index[1],
         "region": p.polygon(outer=True)}
        for t in tracts for p in skymap.patches(t)
    ]
    registry.insertDimensionData("patch", *patches, skip_existing=True)


def _day_obs(start: astropy.time.Time) -> int:
    return int((start.tai - astropy.time.TimeDelta(0.5, format="jd")).strftime("%Y%m%d"))


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
    common = {"instrument": inst, "id": info.exposure_id, "day_obs": info.day_obs,
              "timespan": timespan, "physical_filter": info.physical_filter,
              "seq_num": info.seq_num, "exposure_time": info.exptime, "observation_reason": "science",
              "science_program": "prompt-snake"}
    ids = {"instrument": inst, "visit": info.exposure_id}
    return [
        ("day_obs", [{"instrument": inst, "id": info.day_obs, "timespan": _day_obs_timespan(info.day_obs)}]),
        ("group", [{"instrument": inst, "name": info.group_id}]),
        ("exposure", [{
            **common, "group": info.group_id, "obs_id": info.obs_id, "dark_time": info.exptime,
            "observation_type": "science", "seq_start": info.seq_num - info.snap,
            "seq_end": info.seq_num - info.snap + info.n_snaps - 1, "tracking_ra": info.ra,
            "tracking_dec": info.dec, "sky_angle": info.rotation_deg, "has_simulated": True, "can_see_sky": True,
        }]),
        ("visit", [{**common, "name": info.obs_id,
                    "region": instrument.visit_region(*pointing, detectors=instrument.detectors)}]),
        ("visit_definition", [{**ids, "exposure": info.exposure_id}]),
        ("visit_system_membership", [{**ids, "visit_system": _VISIT_SYSTEM[0]}]),
        ("visit_detector_region", [{**ids, "detector": det.id, "region": instrument.detector_region(det, *pointing)}
                                   for det in instrument.detectors]),
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
    info : `workflow.exposures.ExposureInfo`
        The exposure (its id is also the visit id).
    instrument : `workflow.instrument.Instrument`
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
        out[name] = DatasetType(name, dimensions, storage_class, universe=butler.dimensions,
                                isCalibration=is_calibration)
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


Source = Any
"""A dataset to store: an in-memory object (`astropy.io.fits.HDUList`, `astropy.table.Table`),
a FITS file path (ingested by copy), or a zero-argument callable returning either (called only
when the dataset is missing, so reruns do not regenerate data)."""


def _existing(butler: Butler, dataset_type: DatasetType, run: str) -> dict[tuple, DatasetRef]:
    refs = butler.query_datasets(dataset_type, collections=run, find_first=False, limit=None, explain=False)
    dims = DATASET_TYPES[dataset_type.name][0]
    return {tuple(ref.dataId[d] for d in dims): ref for ref in refs}


_BATCH = 64
"""Files ingested per ``Butler.ingest`` call (bounds temporary disk use)."""


def _flush(butler: Butler, pending: list[tuple[FileDataset, str]]) -> None:
    """Ingest pending files, grouped by transfer mode, and empty the list."""
    for transfer in dict.fromkeys(t for _, t in pending):
        butler.ingest(*[f for f, t in pending if t == transfer], transfer=transfer)
    pending.clear()


def _store(
    butler: Butler, dataset_type: DatasetType, run: str, items: Iterable[tuple[Mapping[str, Any], Source]],
    *, transfer: str = "copy",
) -> tuple[list[DatasetRef], int]:
    """Store missing datasets of one type in one RUN; return (all refs, number added).

    HDULists are written to temporary FITS files and ingested in batches of
    `_BATCH` (much faster than one ``put`` each); other objects are ``put``;
    paths are ingested with ``transfer``.
    """
    butler.registry.registerRun(run)
    existing = _existing(butler, dataset_type, run)
    dims = DATASET_TYPES[dataset_type.name][0]
    refs, pending, added = [], [], 0
    with tempfile.TemporaryDirectory(prefix="central-repo-") as tmp:
        for data_id, source in items:
            key = tuple(data_id[d] for d in dims)
            if key not in existing:
                obj = source() if callable(source) else source
                ref = DatasetRef(dataset_type, DataCoordinate.standardize(data_id, dimensions=dataset_type.dimensions),
                                 run=run)
                if isinstance(obj, fits.HDUList):
                    path = Path(tmp) / f"{ref.id}.fits"
                    obj.writeto(path)
                    pending.append((FileDataset(path=str(path), refs=[ref], formatter=FORMATTER_NAME), "move"))
                elif isinstance(obj, str | Path):
                    pending.append((FileDataset(path=str(obj), refs=[ref], formatter=FORMATTER_NAME), transfer))
                else:
                    ref = butler.put(obj, dataset_type, data_id, run=run)
                existing[key] = ref
                added += 1
                if len(pending) >= _BATCH:
                    _flush(butler, pending)
            refs.append(existing[key])
        _flush(butler, pending)
    return refs, added


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibInput:
    """One calibration dataset and its validity range.

    Attributes
    ----------
    dataset_type : `str`
        ``"bias"``, ``"flat"`` or ``"defects"``.
    detector : `int`
        Detector id.
    begin, end : `astropy.time.Time` or `None`
        Validity range (half-open); `None` is unbounded.
    source : `Source`
        The image (see `Source`).
    physical_filter : `str` or `None`
        Filter of a flat.
    """

    dataset_type: str
    detector: int
    begin: astropy.time.Time | None
    end: astropy.time.Time | None
    source: Source
    physical_filter: str | None = None

    def run(self, instrument: str) -> str:
        """RUN collection of this calib, ``<inst>/calib/<type>/<begin YYYYMMDDTHHMMSS>``."""
        stamp = "unbounded" if self.begin is None else self.begin.tai.strftime("%Y%m%dT%H%M%S")
        return f"{calib_collection(instrument)}/{self.dataset_type}/{stamp}"


def _calib_data_id(instrument: str, calib: CalibInput) -> dict[str, Any]:
    data_id = {"instrument": instrument, "detector": calib.detector}
    if calib.physical_filter is not None:
        data_id["physical_filter"] = calib.physical_filter
    return data_id


def ingest_calibs(butler: Butler, instrument: str, calibs: Iterable[CalibInput]) -> int:
    """Store calibs and certify them into ``<inst>/calib`` (idempotent).

    Returns
    -------
    added : `int`
        Number of datasets stored (0 on a rerun).

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        Writeable Butler.
    instrument : `str`
        Instrument name.
    calibs : iterable of `CalibInput`
        Calibs; each is stored in its `CalibInput.run` and certified for
        its validity range.

    Raises
    ------
    NonRetriableError
        If a validity range overlaps another certified calib of the same
        data ID; the message names the instrument, type and run.
    """
    types = register_dataset_types(butler)
    collection = calib_collection(instrument)
    butler.registry.registerCollection(collection, CollectionType.CALIBRATION)
    groups: dict[tuple[str, str, Any, Any], list[CalibInput]] = {}
    for calib in calibs:
        groups.setdefault((calib.dataset_type, calib.run(instrument), calib.begin, calib.end), []).append(calib)
    added = 0
    for (name, run, begin, end), members in groups.items():
        items = [(_calib_data_id(instrument, c), c.source) for c in members]
        refs, n = _store(butler, types[name], run, items)
        certified = {a.ref.id for a in butler.registry.queryDatasetAssociations(types[name], collections=collection)}
        todo = [ref for ref in refs if ref.id not in certified]
        try:
            if todo:
                butler.registry.certify(collection, todo, Timespan(begin, end))
        except ConflictingDefinitionError as exc:
            raise NonRetriableError(f"{instrument}: cannot certify {name} from run {run} into {collection} for "
                                    f"[{begin}, {end}): {exc}") from exc
        added += n
    _log.info("%s: %d calib datasets added", instrument, added)
    return added


def ingest_refcat_shards(butler: Butler, shards: Mapping[int, Source]) -> int:
    """Store ``refcat`` shards (``htm7`` -> table) into `REFCAT_RUN` (idempotent).

    Returns
    -------
    added : `int`
        Number of shards stored.
    """
    types = register_dataset_types(butler)
    _, added = _store(butler, types["refcat"], REFCAT_RUN, [({"htm7": k}, v) for k, v in shards.items()])
    _chain(butler, REFCATS, [REFCAT_RUN])
    return added


def ingest_templates(
    butler: Butler, instrument: str, skymap: str, templates: Iterable[tuple[int, int, str, Source]]
) -> int:
    """Store ``template_coadd`` datasets given as (tract, patch, band, source).

    Returns
    -------
    added : `int`
        Number of templates stored.
    """
    types = register_dataset_types(butler)
    run = f"{templates_collection(instrument)}/deep"
    items = [({"skymap": skymap, "tract": t, "patch": p, "band": b}, s) for t, p, b, s in templates]
    _, added = _store(butler, types["template_coadd"], run, items)
    _chain(butler, templates_collection(instrument), [run])
    return added


def _chain(butler: Butler, name: str, children: Sequence[str]) -> None:
    butler.registry.registerCollection(name, CollectionType.CHAINED)
    if list(butler.registry.getCollectionChain(name)) != list(children):
        butler.registry.setCollectionChain(name, children)


def define_defaults_chain(butler: Butler, instrument: str) -> str:
    """Create ``<inst>/defaults`` = calib, templates, refcats, raw/all (idempotent).

    Returns
    -------
    name : `str`
        The chain's name.
    """
    registry = butler.registry
    registry.registerCollection(calib_collection(instrument), CollectionType.CALIBRATION)
    registry.registerRun(raw_collection(instrument))
    for chain in (templates_collection(instrument), REFCATS):
        registry.registerCollection(chain, CollectionType.CHAINED)
    children = [calib_collection(instrument), templates_collection(instrument), REFCATS, raw_collection(instrument)]
    _chain(butler, defaults_collection(instrument), children)
    return defaults_collection(instrument)


def find_calib(
    butler: Butler, instrument: str, dataset_type: str, detector: int, when: astropy.time.Time,
    *, physical_filter: str | None = None, collections: str | Sequence[str] | None = None,
) -> DatasetRef | None:
    """Find the calib (bias, flat, defects) valid at a given time.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        Butler on the central repository.
    instrument, dataset_type : `str`
        Instrument name; ``"bias"``, ``"flat"`` or ``"defects"``.
    detector : `int`
        Detector id.
    when : `astropy.time.Time`
        Time the calib must be valid at (e.g. the next_visit send time).
    physical_filter : `str`, optional
        Required for flats.
    collections : `str` or sequence of `str`, optional
        Default ``<inst>/calib``.

    Returns
    -------
    ref : `lsst.daf.butler.DatasetRef` or `None`
        The certified calib, or `None` if none is valid at ``when``.
    """
    data_id: dict[str, Any] = {"instrument": instrument, "detector": detector}
    if physical_filter is not None:
        data_id["physical_filter"] = physical_filter
    return butler.find_dataset(dataset_type, data_id, collections=collections or calib_collection(instrument),
                               timespan=Timespan.fromInstant(when))


def refcat_shards_overlapping(
    butler: Butler, region: sphgeom.Region, *, collections: str | Sequence[str] = REFCATS
) -> list[DatasetRef]:
    """Return the ``refcat`` shards whose ``htm7`` trixel may overlap a region.

    Trixels come from the HTM level-7 envelope of the region, so the list is
    a (tight) superset of the overlapping shards.
    """
    return butler.query_datasets("refcat", collections=collections, where="htm7 IN (ids)",
                                 bind={"ids": shard_ids_for(region)},
                                 limit=None, explain=False)


def templates_overlapping(
    butler: Butler, instrument: str, skymap: str, region: sphgeom.Region, band: str,
    *, padding_arcsec: float = 0.0, collections: str | Sequence[str] | None = None,
) -> list[DatasetRef]:
    """Return the ``template_coadd`` patches overlapping a (padded) region.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        Butler on the central repository.
    instrument, skymap, band : `str`
        Instrument (for the default collection), skymap name and band.
    region : `lsst.sphgeom.Region`
        Predicted detector footprint (`Instrument.detector_region`).
    padding_arcsec : `float`, optional
        If positive, search the region's bounding circle grown by this much.
    collections : `str` or sequence of `str`, optional
        Default ``<inst>/templates``.

    Returns
    -------
    refs : `list` [`lsst.daf.butler.DatasetRef`]
        One per overlapping patch that has a template in ``band``.
    """
    from .instrument import bounding_circle

    if padding_arcsec > 0:
        region = bounding_circle(region, padding_arcsec)
    return butler.query_datasets(
        "template_coadd", collections=collections or templates_collection(instrument),
        where="patch.region OVERLAPS region AND skymap = sk AND band = bd",
        bind={"region": region, "sk": skymap, "bd": band}, limit=None, explain=False,
    )


@dataclasses.dataclass(frozen=True)
class PastExposure:
    """An exposure with raws in the central repository (for replay).

    Attributes
    ----------
    record : `lsst.daf.butler.DimensionRecord`
        The exposure record (group, physical_filter, tracking_ra/dec,
        sky_angle, timespan, ...).
    raws : `list` [`lsst.daf.butler.DatasetRef`]
        Its ``raw`` datasets, ordered by detector.
    """

    record: Any
    raws: list[DatasetRef]


def past_exposures(
    butler: Butler, instrument: str, *, order: str = "exposure", limit: int | None = None,
    seed: int | None = None, collections: str | Sequence[str] | None = None,
) -> list[PastExposure]:
    """List exposures that have raws, for replay.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        Butler on the central repository.
    instrument : `str`
        Instrument name.
    order : `str`, optional
        ``"exposure"`` (ascending id, i.e. time order) or ``"random"``.
    limit : `int`, optional
        Keep at most this many exposures.
    seed : `int`, optional
        Random seed for ``order="random"``.
    collections : `str` or sequence of `str`, optional
        Default ``<inst>/raw/all``.

    Returns
    -------
    exposures : `list` [`PastExposure`]

    Raises
    ------
    ValueError
        If ``order`` is unknown.
    """
    if order not in ("exposure", "random"):
        raise ValueError(f"{instrument}: unknown replay order {order!r}; expected 'exposure' or 'random'")
    refs = butler.query_datasets("raw", collections=collections or raw_collection(instrument),
                                 instrument=instrument, with_dimension_records=True, limit=None, explain=False)
    by_exposure: dict[int, list[DatasetRef]] = {}
    for ref in refs:
        by_exposure.setdefault(ref.dataId["exposure"], []).append(ref)
    ids = sorted(by_exposure)
    if order == "random":
        random.Random(seed).shuffle(ids)
    return [PastExposure(by_exposure[i][0].dataId.records["exposure"],
                         sorted(by_exposure[i], key=lambda r: r.dataId["detector"]))
            for i in ids[:limit]]


_BORESIGHT_KEYS = (("RA", "DEC"), ("BORE-RA", "BORE-DEC"), ("RA_BORE", "DEC_BORE"), ("TELRA", "TELDEC"))


def exposure_info_from_header(header: Mapping[str, Any], *, path: str | Path = "<header>") -> tuple[ExposureInfo, int]:
    """Read exposure metadata and the detector id from a raw's primary header.

    Parameters
    ----------
    header : `~collections.abc.Mapping`
        Cards INSTRUME, DETECTOR, EXPID, GROUPID, OBSID, DATE-OBS or MJD-OBS
        (scale from TIMESYS, default TAI), EXPTIME, FILTER, boresight (`_BORESIGHT_KEYS`),
        ROTPA; optional SEQNUM, SNAP, NSNAPS.
    path : `str` or `pathlib.Path`, optional
        File name used in error messages.

    Returns
    -------
    info : `workflow.exposures.ExposureInfo`
        The exposure.
    detector : `int`
        The raw's detector id.

    Raises
    ------
    NonRetriableError
        If a card is missing or malformed; the message names the file and card.
    """
    try:
        ra_key, dec_key = next(keys for keys in _BORESIGHT_KEYS if keys[0] in header)
        scale = str(header.get("TIMESYS", "TAI")).lower()
        start = (astropy.time.Time(str(header["DATE-OBS"]), scale=scale) if "DATE-OBS" in header
                 else astropy.time.Time(float(header["MJD-OBS"]), format="mjd", scale=scale)).tai
        exposure_id = int(header["EXPID"])
        info = ExposureInfo(
            instrument=str(header["INSTRUME"]), exposure_id=exposure_id, obs_id=str(header["OBSID"]),
            group_id=str(header["GROUPID"]), day_obs=_day_obs(start),
            seq_num=int(header.get("SEQNUM", exposure_id % 100000)), snap=int(header.get("SNAP", 0)),
            n_snaps=int(header.get("NSNAPS", 1)), start=start, exptime=float(header["EXPTIME"]),
            ra=float(header[ra_key]), dec=float(header[dec_key]), rotation_deg=float(header["ROTPA"]),
            physical_filter=str(header["FILTER"]),
        )
        return info, int(header["DETECTOR"])
    except StopIteration:
        raise NonRetriableError(f"{path}: raw header has no boresight card (RA/DEC)") from None
    except (KeyError, ValueError, TypeError) as exc:
        raise NonRetriableError(f"{path}: bad or missing raw header card: {exc}") from exc


def _read_raw_header(path: str | Path) -> fits.Header:
    try:
        return fits.getheader(path, 0)
    except OSError as exc:
        raise NonRetriableError(f"{path}: not a readable FITS raw: {exc}") from exc


def ingest_raws(butler: Butler, instrument: Instrument, paths: Iterable[str | Path], *, transfer: str = "copy") -> int:
    """Register the exposures of raw files and ingest them into ``<inst>/raw/all``.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        Writeable Butler.
    instrument : `workflow.instrument.Instrument`
        The camera (for visit and detector regions).
    paths : iterable of `str` or `pathlib.Path`
        Raw FITS files (any detector, any exposure of this instrument).
    transfer : `str`, optional
        Butler ingest transfer mode.

    Returns
    -------
    added : `int`
        Number of raws ingested (0 on a rerun).

    Raises
    ------
    NonRetriableError
        If a file is unreadable or belongs to another instrument.
    """
    types = register_dataset_types(butler)
    items, registered = [], set()
    for path in paths:
        info, detector = exposure_info_from_header(_read_raw_header(path), path=path)
        if info.instrument != instrument.name:
            raise NonRetriableError(f"{path}: raw of instrument {info.instrument}, expected {instrument.name}")
        if info.exposure_id not in registered:
            register_exposure(butler, info, instrument)
            registered.add(info.exposure_id)
        items.append(({"instrument": info.instrument, "exposure": info.exposure_id, "detector": detector}, path))
    _, added = _store(butler, types["raw"], raw_collection(instrument.name), items, transfer=transfer)
    _log.info("%s: %d raws ingested from %d files", instrument.name, added, len(items))
    return added


# -- the demo repository -------------------------------------------------------

DEMO_FIELD = (150.1, 2.2)
"""Centre (ICRS degrees) of the simulated demo field (COSMOS-like)."""
DEMO_START = "2025-01-10T03:00:00"
"""TAI start of the first past visit of the demo."""
_DEMO_DITHER_ARCSEC = 10.0
_DEMO_CADENCE_S = 40.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoPlan:
    """What the demo repository holds for one instrument.

    Attributes
    ----------
    config : `dict`
        Merged instrument config.
    scale, seed : `float`, `int`
        Detector shrink factor and universe seed of the simulation.
    instrument : `workflow.instrument.Instrument`
        The (scaled) camera.
    skymap : `workflow.skymap.RingsSkyMap`
        Its sky map.
    detectors : `list` [`workflow.instrument.Detector`]
        Detectors that get raws and templates.
    exposures : `list` [`workflow.exposures.ExposureInfo`]
        Past visits (one snap each) to simulate raws for.
    region : `lsst.sphgeom.ConvexPolygon`
        Sky the refcat shards cover: the focal plane at the field centre, at
        any rotation, plus dithers and the preload padding.
    footprints : `list` [`lsst.sphgeom.ConvexPolygon`]
        Every planned detector-visit footprint grown by the preload padding:
        the sky templates cover (scaled detectors leave gaps between them).
    shards : `list` [`int`]
        Refcat shards (htm7) over ``region``.
    templates : `list` [`tuple`]
        ``(patch, band, footprints on the patch)`` for every patch that a
        footprint overlaps, in each band of the visits.
    """

    config: dict[str, Any]
    scale: float
    seed: int
    instrument: Instrument
    skymap: RingsSkyMap
    detectors: list[Detector]
    exposures: list[ExposureInfo]
    region: sphgeom.ConvexPolygon
    footprints: list[sphgeom.ConvexPolygon]
    shards: list[int]
    templates: list[tuple[PatchInfo, str, list[sphgeom.ConvexPolygon]]]


def _demo_filters(instrument: Instrument) -> list[str]:
    """Return one physical filter per band among r, i, g (in that order), else the first filters."""
    chosen = [next(pf for pf, b in instrument.filters.items() if b == band)
              for band in ("r", "i", "g") if band in instrument.filters.values()]
    return chosen or list(instrument.filters)[:3]


def _circle_polygon(ra: float, dec: float, radius_deg: float, n: int = 24) -> sphgeom.ConvexPolygon:
    """Return a polygon circumscribing a circle (Circle.isDisjointFrom(ConvexPolygon) is unsupported)."""
    from .instrument import polygon_from_sky

    angles = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    radius = math.radians(radius_deg / math.cos(math.pi / n))
    ras = ra + np.degrees(np.arctan2(radius * np.cos(angles), math.cos(math.radians(dec))))
    return polygon_from_sky(ras, dec + np.degrees(radius * np.sin(angles)))


def plan_demo(name: str, *, n_visits: int = 3, scale: float | None = None, seed: int | None = None,
              n_detectors: int = 9, field: tuple[float, float] = DEMO_FIELD, start: str = DEMO_START) -> DemoPlan:
    """Plan the demo content of one instrument: dithered visits over one field.

    Visits step ``_DEMO_DITHER_ARCSEC`` around ``field`` on a 3x3 pattern at
    rotation 0 and cycle through the r, i and g filters.  Raws and templates
    are made for the ``n_detectors`` detectors nearest the boresight (0: all);
    calibs for every detector, refcats for the whole focal plane, so other
    detectors can still run the template-free fallback pipelines.  Padding
    is ``apdb.preload_padding_arcsec`` of the instrument config; ``scale``
    and ``seed`` default to its ``simulation`` section, which the processing
    of these raws uses too.

    Raises
    ------
    ConfigError
        If the instrument is unknown.
    """
    from .config import load_config
    from .exposures import make_exposures
    from .instrument import Instrument
    from .skymap import RingsSkyMap

    config = load_config(instrument=name)
    simulation = config.get("simulation", {})
    scale = float(simulation.get("scale", 1.0) if scale is None else scale)
    seed = int(simulation.get("seed", 0) if seed is None else seed)
    instrument = Instrument.from_config(config, scale=scale)
    detectors = sorted(instrument.detectors, key=lambda d: (math.hypot(*d.center_mm), d.id))
    detectors = sorted(detectors[:n_detectors] if n_detectors > 0 else detectors, key=lambda d: d.id)
    filters = _demo_filters(instrument)
    padding = float(config.get("apdb", {}).get("preload_padding_arcsec", 50.0))
    exposures: list[ExposureInfo] = []
    t0 = astropy.time.Time(start, scale="tai")
    for i in range(n_visits):
        dx, dy = (((i % 3) - 1) * _DEMO_DITHER_ARCSEC / 3600.0, ((i // 3) % 3 - 1) * _DEMO_DITHER_ARCSEC / 3600.0)
        exposures += make_exposures(
            instrument, start=t0 + astropy.time.TimeDelta(i * _DEMO_CADENCE_S, format="sec"), seq_num=i + 1,
            ra=field[0] + dx / max(math.cos(math.radians(field[1])), 1e-6), dec=field[1] + dy, rotation_deg=0.0,
            physical_filter=filters[i % len(filters)], n_snaps=1)
    focal_plane = instrument.visit_region(*field, 0.0, detectors=instrument.detectors).getBoundingCircle()
    radius = focal_plane.getOpeningAngle().asDegrees() + (1.5 * _DEMO_DITHER_ARCSEC + padding) / 3600.0
    footprints = [instrument.detector_region(det, e.ra, e.dec, e.rotation_deg, padding_arcsec=padding)
                  for e in exposures for det in detectors]
    region, skymap = _circle_polygon(*field, radius), RingsSkyMap.from_config(config)
    bands = list(dict.fromkeys(instrument.band(e.physical_filter) for e in exposures))
    return DemoPlan(config=config, scale=scale, seed=seed, instrument=instrument, skymap=skymap,
                    detectors=detectors, exposures=exposures,
                    region=region, footprints=footprints, shards=shard_ids_for(region),
                    templates=_template_keys(skymap, region, footprints, bands))


def simulated_calibs(instrument: Instrument, seed: int = 0) -> list[CalibInput]:
    """Return lazy bias, defects and per-filter flat calibs of every detector (`workflow.calibs`)."""
    from .calibs import DEFAULT_VALID_END, DEFAULT_VALID_START, make_bias, make_defects, make_flat

    begin, end = (astropy.time.Time(t, scale="tai") for t in (DEFAULT_VALID_START, DEFAULT_VALID_END))
    span = {"begin": begin, "end": end}
    out = []
    for det in instrument.detectors:
        out.append(CalibInput(dataset_type="bias", detector=det.id, **span,
                              source=lambda d=det: make_bias(instrument, d, seed=seed).to_hdulist()))
        out.append(CalibInput(dataset_type="defects", detector=det.id, **span,
                              source=lambda d=det: make_defects(instrument, d, seed=seed)))
        out += [CalibInput(dataset_type="flat", detector=det.id, physical_filter=f, **span,
                           source=lambda d=det, f=f: make_flat(instrument, d, f, seed=seed).to_hdulist())
                for f in instrument.filters]
    return out


def simulated_template(skymap: RingsSkyMap, patch: PatchInfo, band: str, footprints: Sequence[sphgeom.ConvexPolygon],
                       seed: int = 0) -> fits.HDUList:
    """Render a patch's template over the bounding box of some footprints (`workflow.templates`).

    Parameters
    ----------
    skymap : `workflow.skymap.RingsSkyMap`
        The sky map.
    patch : `workflow.skymap.PatchInfo`
        The patch.
    band : `str`
        Band.
    footprints : sequence of `lsst.sphgeom.ConvexPolygon`
        Padded detector footprints overlapping the patch; the image covers
        their bounding box within the patch's outer box.
    seed : `int`, optional
        Universe seed.

    Returns
    -------
    template : `astropy.io.fits.HDUList`
        Primary header (with ``BBOX_X0``/``BBOX_Y0``), IMAGE and VARIANCE.
    """
    from .amplifiers import Box
    from .templates import make_template

    points = [sphgeom.LonLat(v) for poly in footprints for v in poly.getVertices()]
    ra = np.array([p.getLon().asDegrees() for p in points])
    dec = np.array([p.getLat().asDegrees() for p in points])
    x, y = patch.wcs.all_world2pix(ra, dec, 0)
    outer = patch.outer_bbox
    bbox = Box(max(outer.x0, outer.x0 + int(np.floor(x.min()))), max(outer.y0, outer.y0 + int(np.floor(y.min()))),
               min(outer.x1, outer.x0 + int(np.ceil(x.max())) + 1), min(outer.y1, outer.y0 + int(np.ceil(y.max())) + 1))
    return make_template(skymap, patch, band, seed=seed, bbox=None if bbox.is_empty() else bbox).to_hdulist()


def simulated_raw(instrument: Instrument, detector: int, exposure: ExposureInfo, path: Path, seed: int = 0) -> Path:
    """Simulate one raw (`workflow.simulate`) and write it to ``path`` (``.fz``: compressed)."""
    from .simulate import simulate_raw

    return simulate_raw(instrument, detector, exposure, seed=seed).write(path)


def simulated_refcat_shard(shard: int, seed: int = 0) -> Table:
    """Generate one refcat shard of the synthetic sky (`workflow.refcat`)."""
    from .refcat import RefcatModel, make_shard

    return make_shard(shard, RefcatModel(seed=seed))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoSources:
    """Where the demo repository's data come from; replace any to use other data.

    Attributes
    ----------
    calibs : callable
        ``(instrument, seed) -> list[CalibInput]``.
    refcat_shard : callable
        ``(htm7, seed) -> astropy.table.Table``.
    template : callable
        ``(skymap, patch, band, footprints, seed) -> astropy.io.fits.HDUList``.
    raw : callable
        ``(instrument, detector, exposure, path, seed) -> path`` of the written raw.
    """

    calibs: Callable[[Instrument, int], list[CalibInput]] = simulated_calibs
    refcat_shard: Callable[[int, int], Table] = simulated_refcat_shard
    template: Callable[..., fits.HDUList] = simulated_template
    raw: Callable[[Instrument, int, ExposureInfo, Path, int], Path] = simulated_raw


def ingest_exposure_raws(butler: Butler, instrument: Instrument, exposures: Iterable[ExposureInfo],
                         make_raw: Callable[[ExposureInfo, int], Source], *, detectors: Iterable[int] | None = None,
                         transfer: str = "copy") -> int:
    """Register exposures and store the raws of their detectors (made only if missing).

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        Writeable Butler.
    instrument : `workflow.instrument.Instrument`
        The camera.
    exposures : iterable of `workflow.exposures.ExposureInfo`
        Exposures to register.
    make_raw : callable
        ``(exposure, detector id) -> Source`` (e.g. a path to a raw file).
    detectors : iterable of `int`, optional
        Detector ids with raws; default all.
    transfer : `str`, optional
        Ingest transfer mode for file sources.

    Returns
    -------
    added : `int`
        Number of raws stored.
    """
    types = register_dataset_types(butler)
    ids = [d.id for d in instrument.detectors] if detectors is None else list(detectors)
    items = []
    for info in exposures:
        register_exposure(butler, info, instrument)
        items += [({"instrument": instrument.name, "exposure": info.exposure_id, "detector": det},
                   lambda info=info, det=det: make_raw(info, det)) for det in ids]
    return _store(butler, types["raw"], raw_collection(instrument.name), items, transfer=transfer)[1]


def _counting(items: list[Any], bar: Any) -> tuple[list[Any], Callable[[], None]]:
    """Wrap lazy sources so the progress bar moves when each is made; return (items, finish)."""
    made = [0]

    def wrap(source: Source) -> Source:
        if not callable(source):
            return source

        def call() -> Any:
            made[0] += 1
            bar.update(1)
            return source()
        return call

    def finish() -> None:
        bar.update(len(items) - made[0])

    return [wrap(item) for item in items], finish


def _build_instrument(butler: Butler, plan: DemoPlan, calibs: list[CalibInput], sources: DemoSources, work: Path,
                      bar: Any) -> dict[str, Any]:
    """Fill the repository for one instrument; return added counts and seconds per stage."""
    inst, skymap, name, seed = plan.instrument, plan.skymap, plan.instrument.name, plan.seed
    stats: dict[str, Any] = {}
    clock = time.perf_counter()

    def stage(label: str, added: int) -> None:
        nonlocal clock
        now = time.perf_counter()
        stats[label] = {"added": added, "seconds": round(now - clock, 3)}
        clock = now

    bar.set_description(f"{name}: dimensions")
    register_instrument(butler, inst)
    register_skymap(butler, skymap, skymap.tracts_overlapping(plan.region))
    stage("dimensions", 0)
    bar.set_description(f"{name}: calibs")
    wrapped, finish = _counting([c.source for c in calibs], bar)
    stage("calibs", ingest_calibs(butler, name, [dataclasses.replace(c, source=w) for c, w in zip(calibs, wrapped)]))
    finish()
    bar.set_description(f"{name}: refcats")
    wrapped, finish = _counting([lambda i=i: sources.refcat_shard(i, seed) for i in plan.shards], bar)
    stage("refcats", ingest_refcat_shards(butler, dict(zip(plan.shards, wrapped))))
    finish()
    bar.set_description(f"{name}: templates")
    wrapped, finish = _counting([lambda p=p, b=b, f=f: sources.template(skymap, p, b, f, seed)
                                 for p, b, f in plan.templates], bar)
    stage("templates", ingest_templates(butler, name, skymap.name,
                                        [(p.tract, p.id, b, w) for (p, b, _), w in zip(plan.templates, wrapped)]))
    finish()
    bar.set_description(f"{name}: raws")
    suffix = ".fz" if str(plan.config.get("raw", {}).get("key_template", "")).endswith(".fz") else ".fits"

    def make_raw(info: ExposureInfo, det: int) -> Path:
        bar.update(1)
        return sources.raw(inst, det, info, work / name / f"{info.exposure_id}_{det:03d}{suffix}", seed)

    added = ingest_exposure_raws(butler, inst, plan.exposures, make_raw, detectors=[d.id for d in plan.detectors],
                                 transfer="move")
    bar.update(len(plan.exposures) * len(plan.detectors) - added)
    stage("raws", added)
    define_defaults_chain(butler, name)
    return stats


def shard_ids_for(region: sphgeom.Region) -> list[int]:
    """Return the htm7 ids whose trixels may overlap a region."""
    return [i for begin, end in sphgeom.HtmPixelization(7).envelope(region) for i in range(begin, end)]


def _template_keys(skymap: RingsSkyMap, region: sphgeom.Region, footprints: list[sphgeom.ConvexPolygon],
                   bands: list[str]) -> list[tuple[PatchInfo, str, list[sphgeom.ConvexPolygon]]]:
    """Return (patch, band, footprints on the patch) for every patch some footprint overlaps."""
    keys = []
    for patch in skymap.patches_overlapping(region, outer=True):
        outer = patch.polygon(outer=True)
        on_patch = [f for f in footprints if not outer.isDisjointFrom(f)]
        keys += [(patch, band, on_patch) for band in bands if on_patch]
    return keys


def build_demo_repo(
    root: str | Path, instruments: Sequence[str], *, registry_url: str | None = None, s3_root: str | None = None,
    registry_namespace: str | None = None, n_visits: int = 3, scale: float | None = None, n_detectors: int = 9,
    seed: int | None = None, sources: DemoSources | None = None, progress: bool = True,
) -> dict[str, Any]:
    """Create (or complete) the demo central repository.

    For each instrument (see `plan_demo`): dimension records, the skymap
    tracts over the demo field, simulated calibs of every detector (bias,
    defects, flats of every filter), refcat shards over the focal plane, and
    for the ``n_detectors`` central detectors the templates and the raws of
    ``n_visits`` past visits.  A rerun adds nothing.

    Parameters
    ----------
    root : `str` or `pathlib.Path`
        Repository directory (``butler.yaml``; SQLite and files by default).
    instruments : sequence of `str`
        Instrument names with a config file.
    registry_url, s3_root, registry_namespace : `str`, optional
        PostgreSQL registry and S3 datastore (see `create_central_repo`).
    n_visits : `int`, optional
        Past visits per instrument.
    scale : `float`, optional
        Detector shrink factor (`workflow.instrument.Instrument.from_config`);
        default ``simulation.scale`` of each instrument's config.
    n_detectors : `int`, optional
        Detectors nearest the boresight with raws and templates (0: all).
    seed : `int`, optional
        Universe seed of the simulated sky, calibs and raws; default
        ``simulation.seed``.
    sources : `DemoSources`, optional
        Data sources (default: the simulator).
    progress : `bool`, optional
        Show a tqdm progress bar on stderr.

    Returns
    -------
    report : `dict`
        ``seconds`` (total), ``stages`` (per instrument: added and seconds),
        ``datasets`` (counts per dataset type after the build).

    Raises
    ------
    ConfigError
        If an instrument is unknown.
    NonRetriableError
        If the repository cannot be created.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    sources = sources or DemoSources()
    plans = [plan_demo(name, n_visits=n_visits, scale=scale, seed=seed, n_detectors=n_detectors)
             for name in instruments]
    butler = create_central_repo(root, registry_url=registry_url, datastore_s3=s3_root,
                                 registry_namespace=registry_namespace)
    calibs = [sources.calibs(plan.instrument, plan.seed) for plan in plans]
    total = sum(len(c) + len(p.shards) + len(p.templates) + len(p.exposures) * len(p.detectors)
                for p, c in zip(plans, calibs))
    stages = {}
    with tempfile.TemporaryDirectory(prefix="central-repo-") as work, \
            tqdm(total=total, disable=not progress, unit="dataset", dynamic_ncols=True) as bar:
        for plan, plan_calibs in zip(plans, calibs):
            stages[plan.instrument.name] = _build_instrument(butler, plan, plan_calibs, sources, Path(work), bar)
    report = {"repo": str(root), "instruments": list(instruments), "n_visits": n_visits,
              "scale": {p.instrument.name: p.scale for p in plans}, "seed": {p.instrument.name: p.seed for p in plans},
              "n_detectors": n_detectors, "seconds": round(time.perf_counter() - start, 3), "stages": stages,
              "datasets": count_datasets(butler)}
    _log.info("central repo %s built in %.1f s: %s", root, report["seconds"], report["datasets"])
    return report
