"""Find datasets in the central repository: calibs, refcat shards, templates, past raws.

Prompt processing asks for what one detector-visit needs (`find_calib`,
`refcat_shards_overlapping`, `templates_overlapping`); replay asks for the
exposures that have raws (`past_exposures`).  The default collections are
those of `workflow.repo.central_repo`.
"""

from __future__ import annotations

__all__ = [
    "find_calib",
    "shard_ids_for",
    "refcat_shards_overlapping",
    "templates_overlapping",
    "PastExposure",
    "past_exposures",
]

import dataclasses
import logging
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import lsst.sphgeom as sphgeom
from lsst.daf.butler import Butler, DatasetRef, Timespan

from workflow.repo.central_repo import REFCATS, calib_collection, raw_collection, templates_collection

if TYPE_CHECKING:
    import astropy.time

_log = logging.getLogger(__name__)


def find_calib(
    butler: Butler,
    instrument: str,
    dataset_type: str,
    detector: int,
    when: astropy.time.Time,
    *,
    physical_filter: str | None = None,
    collections: str | Sequence[str] | None = None,
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
    return butler.find_dataset(
        dataset_type,
        data_id,
        collections=collections or calib_collection(instrument),
        timespan=Timespan.fromInstant(when),
    )


def shard_ids_for(region: sphgeom.Region) -> list[int]:
    """Return the htm7 ids whose trixels may overlap a region."""
    return [i for begin, end in sphgeom.HtmPixelization(7).envelope(region) for i in range(begin, end)]


def refcat_shards_overlapping(
    butler: Butler, region: sphgeom.Region, *, collections: str | Sequence[str] = REFCATS
) -> list[DatasetRef]:
    """Return the ``refcat`` shards whose ``htm7`` trixel may overlap a region.

    Trixels come from the HTM level-7 envelope of the region, so the list is
    a (tight) superset of the overlapping shards.
    """
    return butler.query_datasets(
        "refcat",
        collections=collections,
        where="htm7 IN (ids)",
        bind={"ids": shard_ids_for(region)},
        limit=None,
        explain=False,
    )


def templates_overlapping(
    butler: Butler,
    instrument: str,
    skymap: str,
    region: sphgeom.Region,
    band: str,
    *,
    padding_arcsec: float = 0.0,
    collections: str | Sequence[str] | None = None,
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
    from workflow.core.instrument import bounding_circle

    if padding_arcsec > 0:
        region = bounding_circle(region, padding_arcsec)
    return butler.query_datasets(
        "template_coadd",
        collections=collections or templates_collection(instrument),
        where="patch.region OVERLAPS region AND skymap = sk AND band = bd",
        bind={"region": region, "sk": skymap, "bd": band},
        limit=None,
        explain=False,
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
    butler: Butler,
    instrument: str,
    *,
    order: str = "exposure",
    limit: int | None = None,
    seed: int | None = None,
    collections: str | Sequence[str] | None = None,
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
    refs = butler.query_datasets(
        "raw",
        collections=collections or raw_collection(instrument),
        instrument=instrument,
        with_dimension_records=True,
        limit=None,
        explain=False,
    )
    by_exposure: dict[int, list[DatasetRef]] = {}
    for ref in refs:
        by_exposure.setdefault(int(ref.dataId["exposure"]), []).append(ref)
    ids = sorted(by_exposure)
    if order == "random":
        random.Random(seed).shuffle(ids)
    return [
        PastExposure(
            by_exposure[i][0].dataId.records["exposure"], sorted(by_exposure[i], key=lambda r: r.dataId["detector"])
        )
        for i in ids[:limit]
    ]
