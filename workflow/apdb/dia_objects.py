"""Create DiaObjects and compute their summary columns from DiaSource histories.

The summary columns follow the APDB ``DiaObject`` table definitions
(``lsst.sdm.schemas`` ``apdb.yaml``, schema 10.x): mean position, ``nDiaSources``,
first/last source times and, per band, ``<b>_psfFluxMean`` (inverse-variance
weighted), ``<b>_psfFluxMeanErr``, ``<b>_psfFluxSigma``, ``<b>_psfFluxNdata``,
``<b>_psfFluxMin``/``Max``, ``<b>_psfFluxMaxSlope``, ``<b>_psfFluxErrMean`` and the
weighted ``<b>_scienceFluxMean``/``Err``.  Which of them are written is decided by the
column list the caller passes (read from the APDB schema), not hard-coded here: a
column that the schema lacks is simply not produced.

New DiaObject ids are the ``diaSourceId`` of the object's first source, so a rerun of
the same detector-visit derives the same ids.
"""

from __future__ import annotations

__all__ = [
    "VALIDITY_COLUMNS",
    "bands_in",
    "new_object_ids",
    "summarize_objects",
]

import logging
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

_log = logging.getLogger(__name__)

VALIDITY_COLUMNS = ("validityStartMjdTai", "validityEndMjdTai")
"""Columns that ``Apdb.store`` fills itself (DiaObject versioning)."""

_NDATA = re.compile(r"^([a-z])_psfFluxNdata$")


def bands_in(columns: Sequence[str]) -> list[str]:
    """Return the bands that have per-band summary columns.

    Parameters
    ----------
    columns : `~collections.abc.Sequence` [`str`]
        DiaObject column names, as read from the APDB schema.

    Returns
    -------
    bands : `list` [`str`]
        Single-letter band names in column order, e.g. ``["u", "g", ...]``.
    """
    return [m.group(1) for c in columns if (m := _NDATA.match(c))]


def new_object_ids(dia_source_ids: np.ndarray | pd.Series) -> np.ndarray:
    """Derive deterministic ids for DiaObjects created from DiaSources.

    Parameters
    ----------
    dia_source_ids : `numpy.ndarray` or `pandas.Series`
        ``diaSourceId`` of each object's first source.

    Returns
    -------
    ids : `numpy.ndarray` [`numpy.int64`]
        The same values: a ``diaSourceId`` is unique over the survey, and an
        object's first source belongs to no other object.
    """
    return np.asarray(dia_source_ids, dtype=np.int64).copy()


def _weighted(frame: pd.DataFrame, keys: list[str], flux: str, err: str) -> pd.DataFrame:
    """Inverse-variance weighted mean and its error, grouped by ``keys``."""
    f = frame[flux].to_numpy(dtype=float, na_value=np.nan)
    e = frame[err].to_numpy(dtype=float, na_value=np.nan)
    good = np.isfinite(f) & np.isfinite(e) & (e > 0)
    w = np.where(good, 1.0 / np.where(good, e, 1.0) ** 2, 0.0)
    parts = pd.DataFrame({"w": w, "wf": np.where(good, w * np.where(good, f, 0.0), 0.0)})
    for key in keys:
        parts[key] = frame[key].to_numpy()
    sums = parts.groupby(keys, sort=False)[["w", "wf"]].sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(sums["w"] > 0, sums["wf"] / sums["w"], np.nan)
        mean_err = np.where(sums["w"] > 0, 1.0 / np.sqrt(sums["w"]), np.nan)
    return pd.DataFrame({"Mean": mean, "MeanErr": mean_err}, index=sums.index)


def _max_slope(frame: pd.DataFrame) -> pd.Series:
    """Largest ``delta psfFlux / delta time`` between consecutive epochs per (object, band)."""
    data = frame.sort_values(["diaObjectId", "band", "midpointMjdTai"], kind="stable")
    ids = data["diaObjectId"].to_numpy()
    band = data["band"].to_numpy()
    f = data["psfFlux"].to_numpy(dtype=float, na_value=np.nan)
    t = data["midpointMjdTai"].to_numpy(dtype=float)
    same = np.zeros(len(data), bool)
    same[1:] = (ids[1:] == ids[:-1]) & (band[1:] == band[:-1])
    slope = np.full(len(data), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        slope[1:] = np.where(same[1:] & (t[1:] > t[:-1]), (f[1:] - f[:-1]) / (t[1:] - t[:-1]), np.nan)
    return pd.Series(slope, index=pd.MultiIndex.from_arrays([ids, band])).groupby(level=[0, 1]).max()


def _band_stats(history: pd.DataFrame) -> pd.DataFrame:
    """Per (diaObjectId, band) flux statistics; columns are suffixes like ``psfFluxMean``."""
    data = history[history["band"].notna()] if "band" in history else history.iloc[:0]
    keys = ["diaObjectId", "band"]
    if data.empty or "psfFlux" not in data:
        return pd.DataFrame(index=pd.MultiIndex.from_arrays([[], []], names=keys))
    flux = data["psfFlux"].astype(float)
    grouped = flux.groupby([data["diaObjectId"], data["band"]], sort=False)
    stats = pd.DataFrame(
        {
            "psfFluxNdata": grouped.count(),
            "psfFluxSigma": grouped.std(ddof=1),
            "psfFluxMin": grouped.min(),
            "psfFluxMax": grouped.max(),
        }
    )
    if "psfFluxErr" in data:
        errs = data["psfFluxErr"].astype(float).groupby([data["diaObjectId"], data["band"]], sort=False)
        stats["psfFluxErrMean"] = errs.mean()
        weighted = _weighted(data, keys, "psfFlux", "psfFluxErr")
        stats["psfFluxMean"] = weighted["Mean"]
        stats["psfFluxMeanErr"] = weighted["MeanErr"]
    else:
        stats["psfFluxMean"] = grouped.mean()
    if "midpointMjdTai" in data:
        stats["psfFluxMaxSlope"] = _max_slope(data)
    if "scienceFlux" in data and "scienceFluxErr" in data:
        science = _weighted(data, keys, "scienceFlux", "scienceFluxErr")
        stats["scienceFluxMean"] = science["Mean"]
        stats["scienceFluxMeanErr"] = science["MeanErr"]
    stats.index.names = keys
    return stats


def _positions(history: pd.DataFrame, ids: pd.Index) -> pd.DataFrame:
    """Mean position (of unit vectors) and propagated errors per object."""
    ra = np.radians(history["ra"].to_numpy(dtype=float))
    dec = np.radians(history["dec"].to_numpy(dtype=float))
    xyz = pd.DataFrame(
        {"x": np.cos(dec) * np.cos(ra), "y": np.cos(dec) * np.sin(ra), "z": np.sin(dec)},
        index=history["diaObjectId"].to_numpy(),
    )
    for col in ("raErr", "decErr"):
        xyz[col] = history[col].to_numpy(dtype=float, na_value=np.nan) ** 2 if col in history else np.nan
    grouped = xyz.groupby(level=0, sort=False)
    sums = grouped[["x", "y", "z"]].sum().reindex(ids)
    count = grouped.size().reindex(ids)
    out = pd.DataFrame(index=ids)
    out["ra"] = np.degrees(np.arctan2(sums["y"], sums["x"])) % 360.0
    out["dec"] = np.degrees(np.arctan2(sums["z"], np.hypot(sums["x"], sums["y"])))
    for col in ("raErr", "decErr"):
        # Error of an unweighted mean: sqrt(sum err^2) / n (NaN if any error is unknown).
        out[col] = np.sqrt(grouped[col].sum(min_count=1).reindex(ids)) / count
    times = history.groupby("diaObjectId", sort=False)["midpointMjdTai"]
    out["firstDiaSourceMjdTai"] = times.min().reindex(ids)
    out["lastDiaSourceMjdTai"] = times.max().reindex(ids)
    return out


def summarize_objects(
    object_ids: Sequence[int] | np.ndarray,
    history: pd.DataFrame,
    columns: Sequence[str],
    *,
    previous: pd.DataFrame | None = None,
    new_counts: pd.Series | None = None,
) -> pd.DataFrame:
    """Build DiaObject rows whose summary columns describe their DiaSources.

    Parameters
    ----------
    object_ids : sequence of `int`
        Ids of the objects to build, in output order.
    history : `pandas.DataFrame`
        Every known DiaSource of these objects (preloaded ones and this visit's),
        with ``diaObjectId``, ``ra``, ``dec``, ``midpointMjdTai`` and, when known,
        ``band``, ``psfFlux``, ``psfFluxErr``, ``scienceFlux``, ``scienceFluxErr``,
        ``raErr``, ``decErr``.
    columns : `~collections.abc.Sequence` [`str`]
        DiaObject columns of the APDB schema; only these are produced.
    previous : `pandas.DataFrame`, optional
        Latest stored version of the objects (from the preload): columns that are
        not summaries are carried over from it.
    new_counts : `pandas.Series`, optional
        Number of this visit's sources per object, indexed by ``diaObjectId``;
        ``nDiaSources`` is the previous value plus this (all of ``history`` when
        there is no previous version).

    Returns
    -------
    objects : `pandas.DataFrame`
        One row per id, columns ``columns`` (validity columns left to the APDB).
    """
    ids = pd.Index(np.asarray(object_ids, dtype=np.int64), name="diaObjectId")
    if previous is not None and len(previous):
        out = previous.drop_duplicates("diaObjectId", keep="last").set_index("diaObjectId").reindex(ids)
        out = out.reindex(columns=[c for c in columns if c != "diaObjectId"])
    else:
        out = pd.DataFrame(index=ids, columns=[c for c in columns if c != "diaObjectId"], dtype=float)
    summary = _positions(history, ids)
    for col in summary.columns:
        if col in out.columns:
            out[col] = summary[col].to_numpy()
    if "firstDiaSourceMjdTai" in out and previous is not None and len(previous):
        prior = previous.set_index("diaObjectId")["firstDiaSourceMjdTai"].reindex(ids).astype(float)
        out["firstDiaSourceMjdTai"] = np.fmin(prior.to_numpy(), summary["firstDiaSourceMjdTai"].to_numpy())
    counts = history.groupby("diaObjectId").size().reindex(ids, fill_value=0)
    if new_counts is not None and previous is not None and "nDiaSources" in out:
        before = pd.to_numeric(out["nDiaSources"], errors="coerce").fillna(0).to_numpy(dtype=np.int64)
        added = new_counts.reindex(ids, fill_value=0).to_numpy(dtype=np.int64)
        out["nDiaSources"] = np.maximum(before + added, counts.to_numpy())
    elif "nDiaSources" in out:
        out["nDiaSources"] = counts.to_numpy(dtype=np.int64)
    _fill_band_columns(out, _band_stats(history), ids, bands_in(columns))
    out = out.reset_index()
    return out[[c for c in columns if c in out.columns]]


def _fill_band_columns(out: pd.DataFrame, stats: pd.DataFrame, ids: pd.Index, bands: list[str]) -> None:
    """Write per-band statistics into ``out`` (in place).

    Only (object, band) pairs with data in the history are overwritten, so values
    that a previous version derived from sources older than the preload window
    survive; ``<b>_psfFluxNdata`` (required non-null) becomes 0 where unknown.
    """
    for band in bands:
        per_band = stats.xs(band, level="band") if band in stats.index.get_level_values("band") else None
        per_band = (per_band if per_band is not None else stats.iloc[:0].droplevel("band")).reindex(ids)
        has = per_band["psfFluxNdata"].notna().to_numpy() if "psfFluxNdata" in per_band else np.zeros(len(ids), bool)
        for suffix in per_band.columns:
            col = f"{band}_{suffix}"
            if col in out.columns:
                current = pd.to_numeric(out[col], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
                out[col] = np.where(has, per_band[suffix].to_numpy(dtype=float, na_value=np.nan), current)
        ndata = f"{band}_psfFluxNdata"
        if ndata in out.columns:
            out[ndata] = pd.to_numeric(out[ndata], errors="coerce").fillna(0).to_numpy(dtype=np.int64)
