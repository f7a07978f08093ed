"""Associate a detector-visit's DiaSources with preloaded DiaObjects.

Matching is nearest-neighbour on the sphere within a radius, one-to-one: all
(source, object) pairs closer than the radius are found with a KD-tree on unit
vectors, then assigned greedily by increasing distance, so each object takes at
most one source of this visit and each source at most one object.  Unmatched
sources start new DiaObjects whose id is their ``diaSourceId`` (a rerun derives the
same ids).  Matched objects get a new version with their summary columns
recomputed from their preloaded history plus the new source (see
`workflow.apdb.dia_objects`).  All of it works on plain `pandas.DataFrame` tables with APDB
column names; `workflow.apdb.load` joins it with the store and the alerts.
"""

from __future__ import annotations

__all__ = [
    "REQUIRED_DIA_SOURCE_COLUMNS",
    "AssociationResult",
    "InvalidDiaSourceTable",
    "associate",
    "footprint_radec",
    "match_sources",
    "padded_region",
    "validate_dia_sources",
]

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import lsst.sphgeom as sphgeom
import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy.spatial import cKDTree

from workflow.apdb.dia_objects import VALIDITY_COLUMNS, new_object_ids, summarize_objects
from workflow.core.exceptions import NonRetriableError

_log = logging.getLogger(__name__)

REQUIRED_DIA_SOURCE_COLUMNS = (
    "diaSourceId",
    "visit",
    "detector",
    "midpointMjdTai",
    "ra",
    "dec",
    "x",
    "y",
    "psfNdata",
    "trailNdata",
    "dipoleNdata",
    "timeProcessedMjdTai",
    "bboxSize",
)
"""DiaSource columns that must be present and non-null before association.

These are the non-nullable DiaSource columns of APDB schema 10.x except
``diaObjectId``, which association fills; `workflow.apdb.store.store_detector_visit`
checks again against the list read from the live schema.
"""

_MIN_OBJECT_COLUMNS = ("diaObjectId", "ra", "dec", "nDiaSources") + tuple(f"{b}_psfFluxNdata" for b in "ugrizy")


class InvalidDiaSourceTable(NonRetriableError, ValueError):
    """The DIA source table of a detector-visit cannot be associated or stored.

    The message names the detector-visit and the offending column.
    """


@dataclasses.dataclass(frozen=True, kw_only=True)
class AssociationResult:
    """Outcome of associating one detector-visit.

    Attributes
    ----------
    sources : `pandas.DataFrame`
        The DiaSources with ``diaObjectId`` set.
    objects : `pandas.DataFrame`
        DiaObject rows to store: new versions of matched objects, then new objects.
    n_matched : `int`
        Sources matched to a preloaded object.
    n_new : `int`
        Sources that started a new object.
    """

    sources: pd.DataFrame
    objects: pd.DataFrame
    n_matched: int
    n_new: int


def validate_dia_sources(
    sources: pd.DataFrame,
    *,
    visit: int,
    detector: int,
    required: Sequence[str] = REQUIRED_DIA_SOURCE_COLUMNS,
) -> None:
    """Check that a DIA source table can be associated and stored.

    Parameters
    ----------
    sources : `pandas.DataFrame`
        DiaSources of one detector-visit, APDB column names.
    visit, detector : `int`
        The detector-visit the table belongs to.
    required : `~collections.abc.Sequence` [`str`], optional
        Columns that must be present with no null value.

    Raises
    ------
    InvalidDiaSourceTable
        If a required column is missing or has null/NaN values, coordinates are
        not finite, a row belongs to another detector-visit, or ids repeat.
    """
    where = f"visit {visit} detector {detector}"
    missing = [c for c in required if c not in sources.columns]
    if missing:
        raise InvalidDiaSourceTable(f"{where}: DIA source table lacks required column(s) {missing}")
    for col in required:
        nulls = int(sources[col].isna().sum())
        if nulls:
            raise InvalidDiaSourceTable(f"{where}: column {col!r} has {nulls} null/NaN value(s)")
    for col in ("ra", "dec"):
        if col in sources and not np.isfinite(sources[col].to_numpy(dtype=float)).all():
            raise InvalidDiaSourceTable(f"{where}: column {col!r} has non-finite coordinates")
    for col, value in (("visit", visit), ("detector", detector)):
        if col in sources and len(sources) and (sources[col].to_numpy() != value).any():
            raise InvalidDiaSourceTable(f"{where}: column {col!r} holds rows of another {col}")
    if "diaSourceId" in sources and sources["diaSourceId"].duplicated().any():
        raise InvalidDiaSourceTable(f"{where}: column 'diaSourceId' has duplicate ids")


def _unit_vectors(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    ra, dec = np.radians(np.asarray(ra_deg, float)), np.radians(np.asarray(dec_deg, float))
    return np.column_stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])


def match_sources(
    src_ra: np.ndarray,
    src_dec: np.ndarray,
    obj_ra: np.ndarray,
    obj_dec: np.ndarray,
    radius_arcsec: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Match sources to objects one-to-one, nearest first, within a radius.

    Parameters
    ----------
    src_ra, src_dec : `numpy.ndarray`
        Source coordinates in degrees.
    obj_ra, obj_dec : `numpy.ndarray`
        Object coordinates in degrees.
    radius_arcsec : `float`
        Largest separation of a match.

    Returns
    -------
    index : `numpy.ndarray` [`int`]
        Per source, the index of its object, or -1 if unmatched.
    separation : `numpy.ndarray` [`float`]
        Per source, the separation in arcsec (NaN if unmatched).
    """
    index = np.full(len(src_ra), -1, dtype=np.int64)
    separation = np.full(len(src_ra), np.nan)
    if len(src_ra) == 0 or len(obj_ra) == 0:
        return index, separation
    chord = 2.0 * np.sin(np.radians(radius_arcsec / 3600.0) / 2.0)
    pairs = cKDTree(_unit_vectors(obj_ra, obj_dec)).sparse_distance_matrix(
        cKDTree(_unit_vectors(src_ra, src_dec)), chord, output_type="ndarray"
    )
    if len(pairs) == 0:
        return index, separation
    # Greedy by distance; ties broken by source then object index (deterministic).
    order = np.lexsort((pairs["i"], pairs["j"], pairs["v"]))
    used = np.zeros(len(obj_ra), dtype=bool)
    for obj, src, dist in zip(pairs["i"][order], pairs["j"][order], pairs["v"][order], strict=False):
        if index[src] < 0 and not used[obj]:
            index[src], used[obj] = obj, True
            separation[src] = np.degrees(2.0 * np.arcsin(dist / 2.0)) * 3600.0
    return index, separation


def footprint_radec(wcs: Any, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Return RA/Dec (degrees) of the four pixel corners of a detector image.

    Parameters
    ----------
    wcs : `astropy.wcs.WCS`
        Celestial WCS of the image.
    shape : `tuple` [`int`, `int`]
        Image shape ``(ny, nx)``.

    Returns
    -------
    ra, dec : `numpy.ndarray`
        Corner coordinates, in degrees.
    """
    ny, nx = shape
    x = np.array([-0.5, nx - 0.5, nx - 0.5, -0.5])
    y = np.array([-0.5, -0.5, ny - 0.5, ny - 0.5])
    ra, dec = wcs.all_pix2world(x, y, 0)
    return np.asarray(ra, float), np.asarray(dec, float)


def padded_region(ra_deg: npt.ArrayLike, dec_deg: npt.ArrayLike, padding_arcsec: float) -> sphgeom.Circle:
    """Return a circle around a footprint, padded by ``padding_arcsec``.

    Parameters
    ----------
    ra_deg, dec_deg : array-like of `float`
        Footprint corners (or any points of it) in degrees, e.g. from `footprint_radec`.
    padding_arcsec : `float`
        Extra radius, e.g. ``apdb.preload_padding_arcsec``.

    Returns
    -------
    region : `lsst.sphgeom.Circle`
        Circle through the farthest point from the centroid, plus the padding.
    """
    ra, dec = np.radians(np.asarray(ra_deg, float)), np.radians(np.asarray(dec_deg, float))
    xyz = np.column_stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])
    center = xyz.mean(axis=0)
    center /= np.linalg.norm(center)
    radius = float(np.degrees(np.arccos(np.clip(xyz @ center, -1.0, 1.0))).max())
    return sphgeom.Circle(sphgeom.UnitVector3d(*center), sphgeom.Angle.fromDegrees(radius + padding_arcsec / 3600))


def associate(
    dia_sources: pd.DataFrame,
    preloaded_objects: pd.DataFrame,
    preloaded_sources: pd.DataFrame,
    *,
    visit: int,
    detector: int,
    radius_arcsec: float,
    visit_mjd_tai: float | None = None,
    object_columns: Sequence[str] | None = None,
) -> AssociationResult:
    """Associate one detector-visit's DiaSources and build the DiaObjects to store.

    Parameters
    ----------
    dia_sources : `pandas.DataFrame`
        This detector-visit's DiaSources (APDB column names).
    preloaded_objects : `pandas.DataFrame`
        Latest DiaObject versions around the detector (`workflow.apdb.store.preload`).
    preloaded_sources : `pandas.DataFrame`
        Recent DiaSources of those objects.
    visit, detector : `int`
        The detector-visit, for messages and checks.
    radius_arcsec : `float`
        Association radius.
    visit_mjd_tai : `float`, optional
        Visit time; when given, ``validityStartMjdTai`` of the output objects is
        set to it (as ``Apdb.store`` will), so alerts carry it.
    object_columns : `~collections.abc.Sequence` [`str`], optional
        DiaObject columns of the schema; default: the columns of
        ``preloaded_objects`` (which come from the APDB schema).

    Returns
    -------
    result : `AssociationResult`
        Sources with ``diaObjectId``, and the objects to store.

    Raises
    ------
    InvalidDiaSourceTable
        If ``dia_sources`` fails `validate_dia_sources`.
    """
    validate_dia_sources(dia_sources, visit=visit, detector=detector)
    columns = list(object_columns if object_columns is not None else preloaded_objects.columns)
    if not columns:
        columns = list(_MIN_OBJECT_COLUMNS)
    objs = preloaded_objects.reset_index(drop=True)
    index, _ = match_sources(
        dia_sources["ra"].to_numpy(float),
        dia_sources["dec"].to_numpy(float),
        objs["ra"].to_numpy(float) if len(objs) else np.zeros(0),
        objs["dec"].to_numpy(float) if len(objs) else np.zeros(0),
        radius_arcsec,
    )
    matched = index >= 0
    sources = dia_sources.copy()
    object_ids = new_object_ids(sources["diaSourceId"])
    if matched.any():
        object_ids[matched] = objs["diaObjectId"].to_numpy(dtype=np.int64)[index[matched]]
    sources["diaObjectId"] = object_ids
    updated = _updated_objects(sources[matched], objs, preloaded_sources, columns)
    created = summarize_objects(object_ids[~matched], sources[~matched], columns)
    objects = pd.concat([f for f in (updated, created) if len(f)], ignore_index=True) if len(sources) else created
    if visit_mjd_tai is not None:
        for col, value in zip(VALIDITY_COLUMNS, (visit_mjd_tai, np.nan), strict=False):
            if col in objects.columns:
                objects[col] = value
    _log.info(
        "visit %d detector %d: %d sources -> %d matched, %d new DiaObjects (radius %.2f arcsec, %d preloaded)",
        visit,
        detector,
        len(sources),
        int(matched.sum()),
        int((~matched).sum()),
        radius_arcsec,
        len(objs),
    )
    return AssociationResult(
        sources=sources, objects=objects, n_matched=int(matched.sum()), n_new=int((~matched).sum())
    )


def _updated_objects(
    matched_sources: pd.DataFrame,
    objects: pd.DataFrame,
    preloaded_sources: pd.DataFrame,
    columns: list[str],
) -> pd.DataFrame:
    """New versions of the matched objects, summaries over preloaded + new sources."""
    if matched_sources.empty:
        return pd.DataFrame(columns=columns)
    ids = matched_sources["diaObjectId"].to_numpy(dtype=np.int64)
    history = matched_sources
    if len(preloaded_sources) and "diaObjectId" in preloaded_sources:
        prior = preloaded_sources[preloaded_sources["diaObjectId"].isin(ids)]
        # A source of this visit already in the preload (a rerun) must not count twice.
        prior = prior[~prior["diaSourceId"].isin(matched_sources["diaSourceId"])]
        if len(prior):
            history = pd.concat([prior, matched_sources], ignore_index=True)
    previous = objects[objects["diaObjectId"].isin(ids)]
    counts = matched_sources.groupby("diaObjectId").size()
    return summarize_objects(ids, history, columns, previous=previous, new_counts=counts)
