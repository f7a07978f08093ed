"""Store datasets in the central repository: calibs, refcat shards, templates, raws.

Every function stores only what is missing (a rerun adds nothing) into the
collections named by `workflow.repo.central_repo`, registering dataset types and
exposure records as needed.  A dataset is given as a `Source`: an object, a
file, or a callable made only when the dataset is missing.  Images are
written to temporary FITS files and ingested in batches; raws are ingested
from their files after their exposures are registered from the headers
(`exposure_info_from_header`).
"""

from __future__ import annotations

__all__ = [
    "Source",
    "CalibInput",
    "ingest_calibs",
    "ingest_refcat_shards",
    "ingest_templates",
    "define_defaults_chain",
    "exposure_info_from_header",
    "ingest_raws",
    "ingest_exposure_raws",
]

import dataclasses
import logging
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import astropy.time
from astropy.io import fits
from lsst.daf.butler import Butler, CollectionType, DataCoordinate, DatasetRef, DatasetType, FileDataset, Timespan
from lsst.daf.butler.registry import ConflictingDefinitionError

from workflow.core.exceptions import NonRetriableError
from workflow.core.exposure_info import ExposureInfo
from workflow.repo.central_repo import (
    DATASET_TYPES,
    REFCAT_RUN,
    REFCATS,
    calib_collection,
    defaults_collection,
    raw_collection,
    register_dataset_types,
    register_exposure,
    templates_collection,
)
from workflow.repo.formatters import FORMATTER_NAME

if TYPE_CHECKING:
    from workflow.core.instrument import Instrument

_log = logging.getLogger(__name__)

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
    butler: Butler,
    dataset_type: DatasetType,
    run: str,
    items: Iterable[tuple[Mapping[str, Any], Source]],
    *,
    transfer: str = "copy",
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
                ref = DatasetRef(
                    dataset_type, DataCoordinate.standardize(data_id, dimensions=dataset_type.dimensions), run=run
                )
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
            raise NonRetriableError(
                f"{instrument}: cannot certify {name} from run {run} into {collection} for [{begin}, {end}): {exc}"
            ) from exc
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


def _day_obs(start: astropy.time.Time) -> int:
    return int((start.tai - astropy.time.TimeDelta(0.5, format="jd")).strftime("%Y%m%d"))


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
    info : `workflow.sim.exposures.ExposureInfo`
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
        start = (
            astropy.time.Time(str(header["DATE-OBS"]), scale=scale)
            if "DATE-OBS" in header
            else astropy.time.Time(float(header["MJD-OBS"]), format="mjd", scale=scale)
        ).tai
        exposure_id = int(header["EXPID"])
        info = ExposureInfo(
            instrument=str(header["INSTRUME"]),
            exposure_id=exposure_id,
            obs_id=str(header["OBSID"]),
            group_id=str(header["GROUPID"]),
            day_obs=_day_obs(start),
            seq_num=int(header.get("SEQNUM", exposure_id % 100000)),
            snap=int(header.get("SNAP", 0)),
            n_snaps=int(header.get("NSNAPS", 1)),
            start=start,
            exptime=float(header["EXPTIME"]),
            ra=float(header[ra_key]),
            dec=float(header[dec_key]),
            rotation_deg=float(header["ROTPA"]),
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
    instrument : `workflow.core.instrument.Instrument`
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


def ingest_exposure_raws(
    butler: Butler,
    instrument: Instrument,
    exposures: Iterable[ExposureInfo],
    make_raw: Callable[[ExposureInfo, int], Source],
    *,
    detectors: Iterable[int] | None = None,
    transfer: str = "copy",
) -> int:
    """Register exposures and store the raws of their detectors (made only if missing).

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        Writeable Butler.
    instrument : `workflow.core.instrument.Instrument`
        The camera.
    exposures : iterable of `workflow.sim.exposures.ExposureInfo`
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
        items += [
            (
                {"instrument": instrument.name, "exposure": info.exposure_id, "detector": det},
                lambda info=info, det=det: make_raw(info, det),
            )
            for det in ids
        ]
    return _store(butler, types["raw"], raw_collection(instrument.name), items, transfer=transfer)[1]
