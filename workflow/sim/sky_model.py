"""The synthetic sky: stars, galaxies, variables and transients.

Every population is generated per HTM level-7 shard from ``(seed, stream,
shard)`` (transients also per 30-day bin), like the refcat, so any visit or
template of any field sees the same objects: three visits of one field share
the same variables, and the coadd of a patch holds the same galaxies as the
visits that overlap it.

- *stars* are the refcat (`workflow.sim.refcat`), static.
- *galaxies*: exponential discs (half-light radius, axis ratio, position
  angle), static, ``galaxy_density_per_deg2`` to r = 24.5.
- *variables*: point sources with a sinusoidal light curve
  ``flux(t) = mean * (1 + amplitude * sin(2 pi t / period + phase))``, so the
  time-averaged flux (what templates show) is ``mean``.
- *transients*: point sources that rise as a half Gaussian to a peak at
  ``t_peak`` and decay exponentially; absent from templates.

Fluxes are nJy, times MJD (TAI).
"""

from __future__ import annotations

__all__ = [
    "SkyModel",
    "galaxies_in_region",
    "variables_in_region",
    "transients_in_region",
    "variable_flux",
    "transient_flux",
    "injected_sources",
]

import dataclasses
import functools
import logging
import math

import lsst.sphgeom as sphgeom
import numpy as np
import numpy.typing as npt
from astropy.table import Table, vstack

from workflow.sim.refcat import (
    BANDS,
    RefcatModel,
    flux_from_mag,
    load_refcat,
    mag_from_flux,
    region_contains,
    sample_in_shard,
    shard_area_deg2,
    shard_ids,
    star_colors,
)

_log = logging.getLogger(__name__)

_GALAXY_STREAM = 2
_VARIABLE_STREAM = 3
_TRANSIENT_STREAM = 4
_KIND_BITS = 58
_TRANSIENT_BIN_DAYS = 30.0
_TRANSIENT_MAX_DECAY_DAYS = 20.0
_TRANSIENT_MAX_RISE_DAYS = 5.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class SkyModel:
    """Seed and densities of the synthetic sky.

    Attributes
    ----------
    seed : `int`
        Seed of every population (the universe).
    star_density_r23_per_deg2 : `float`
        Refcat stars brighter than r = 23 at the galactic poles.
    galaxy_density_per_deg2 : `float`
        Galaxies brighter than r = 24.5.
    variable_density_per_deg2 : `float`
        Variable point sources (mean r 17.5-22.5).
    transient_density_per_deg2 : `float`
        Transients peaking per 30 days (peak r 18-23).
    """

    seed: int = 0
    star_density_r23_per_deg2: float = 40000.0
    galaxy_density_per_deg2: float = 6000.0
    variable_density_per_deg2: float = 400.0
    transient_density_per_deg2: float = 300.0

    def refcat_model(self) -> RefcatModel:
        """Return the refcat parameters of this sky."""
        return RefcatModel(seed=self.seed, density_r23_per_deg2=self.star_density_r23_per_deg2)

    def stars(self, region: sphgeom.Region) -> Table:
        """Return the (refcat) stars inside a region."""
        return load_refcat(region, model=self.refcat_model())


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


def _ids(kind: int, shard: int, n: int, extra: int = 0) -> np.ndarray:
    return (
        (np.int64(kind) << _KIND_BITS)
        | (np.int64(extra) << 34)
        | (np.int64(shard) << 16)
        | np.arange(n, dtype=np.int64)
    )


def _band_mags(r_mag: np.ndarray, offsets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{band}_mag": r_mag + offsets[band] for band in BANDS}


@functools.lru_cache(maxsize=256)
def _galaxy_shard(shard: int, seed: int, density: float) -> Table:
    rng = _rng(seed, _GALAXY_STREAM, shard)
    n = int(rng.poisson(density * shard_area_deg2(shard)))
    ra, dec = sample_in_shard(shard, n, rng)
    lo, hi = 10.0 ** (0.35 * 18.0), 10.0 ** (0.35 * 24.5)
    r_mag = np.log10(lo + rng.uniform(0, 1, n) * (hi - lo)) / 0.35
    gr = rng.normal(0.7, 0.25, n)
    offsets = {
        "u": gr + rng.normal(1.2, 0.3, n),
        "g": gr,
        "r": np.zeros(n),
        "i": -rng.normal(0.35, 0.12, n),
    }
    offsets["z"] = offsets["i"] - rng.normal(0.2, 0.08, n)
    offsets["y"] = offsets["z"] - rng.normal(0.1, 0.08, n)
    hlr = np.clip(0.6 * 10.0 ** (-0.1 * (r_mag - 22.0)) * 10.0 ** rng.normal(0.0, 0.2, n), 0.15, 3.0)
    table = Table(
        {
            "id": _ids(2, shard, n),
            "ra": ra,
            "dec": dec,
            "hlr_arcsec": hlr,
            "axis_ratio": rng.uniform(0.3, 1.0, n),
            "pa_deg": rng.uniform(0.0, 180.0, n),
            **_band_mags(r_mag, offsets),
        }
    )
    return table


@functools.lru_cache(maxsize=256)
def _variable_shard(shard: int, seed: int, density: float) -> Table:
    rng = _rng(seed, _VARIABLE_STREAM, shard)
    n = int(rng.poisson(density * shard_area_deg2(shard)))
    ra, dec = sample_in_shard(shard, n, rng)
    r_mag = rng.uniform(17.5, 22.5, n)
    offsets = star_colors(np.clip(rng.beta(2.0, 3.0, n) * 1.6, 0.1, None), rng)
    return Table(
        {
            "id": _ids(3, shard, n),
            "ra": ra,
            "dec": dec,
            "amplitude": rng.uniform(0.15, 0.8, n),
            "period_days": 10.0 ** rng.uniform(math.log10(0.05), math.log10(20.0), n),
            "phase": rng.uniform(0.0, 2 * np.pi, n),
            **_band_mags(r_mag, offsets),
        }
    )


@functools.lru_cache(maxsize=1024)
def _transient_shard_bin(shard: int, time_bin: int, seed: int, density: float) -> Table:
    rng = _rng(seed, _TRANSIENT_STREAM, shard, time_bin)
    n = int(rng.poisson(density * shard_area_deg2(shard)))
    ra, dec = sample_in_shard(shard, n, rng)
    r_mag = rng.uniform(18.0, 23.0, n)
    color = rng.normal(0.0, 0.15, n)
    offsets = {b: color * k for b, k in zip(BANDS, (-1.5, -0.7, 0.0, 0.5, 0.9, 1.2), strict=True)}
    return Table(
        {
            "id": _ids(4, shard, n, extra=time_bin),
            "ra": ra,
            "dec": dec,
            "t_peak": (time_bin + rng.uniform(0.0, 1.0, n)) * _TRANSIENT_BIN_DAYS,
            "rise_days": rng.uniform(1.0, _TRANSIENT_MAX_RISE_DAYS, n),
            "decay_days": rng.uniform(3.0, _TRANSIENT_MAX_DECAY_DAYS, n),
            **_band_mags(r_mag, offsets),
        }
    )


def _collect(parts: list[Table], region: sphgeom.Region) -> Table:
    parts = [p[region_contains(region, p["ra"], p["dec"])] for p in parts]
    if not parts:
        return Table()
    return vstack(parts, metadata_conflicts="silent") if len(parts) > 1 else parts[0].copy()


def galaxies_in_region(region: sphgeom.Region, sky: SkyModel) -> Table:
    """Return the galaxies inside a region.

    Returns
    -------
    table : `astropy.table.Table`
        ``id``, ``ra``, ``dec``, ``hlr_arcsec`` (major-axis half-light
        radius), ``axis_ratio``, ``pa_deg`` (east of north) and
        ``{band}_mag``.
    """
    return _collect([_galaxy_shard(s, sky.seed, sky.galaxy_density_per_deg2) for s in shard_ids(region)], region)


def variables_in_region(region: sphgeom.Region, sky: SkyModel) -> Table:
    """Return the variable point sources inside a region.

    Returns
    -------
    table : `astropy.table.Table`
        ``id``, ``ra``, ``dec``, ``amplitude``, ``period_days``, ``phase``
        and mean ``{band}_mag``.
    """
    return _collect([_variable_shard(s, sky.seed, sky.variable_density_per_deg2) for s in shard_ids(region)], region)


def transients_in_region(region: sphgeom.Region, sky: SkyModel, mjd: float) -> Table:
    """Return the transients inside a region that may be visible at ``mjd``.

    Returns
    -------
    table : `astropy.table.Table`
        ``id``, ``ra``, ``dec``, ``t_peak`` (MJD), ``rise_days``,
        ``decay_days`` and peak ``{band}_mag``.
    """
    first = math.floor((mjd - 7.0 * _TRANSIENT_MAX_DECAY_DAYS) / _TRANSIENT_BIN_DAYS)
    last = math.floor((mjd + 4.0 * _TRANSIENT_MAX_RISE_DAYS) / _TRANSIENT_BIN_DAYS)
    parts = [
        _transient_shard_bin(s, b, sky.seed, sky.transient_density_per_deg2)
        for s in shard_ids(region)
        for b in range(first, last + 1)
    ]
    return _collect(parts, region)


def variable_flux(table: Table, band: str, mjd: float | None) -> np.ndarray:
    """Return variables' fluxes (nJy) at ``mjd``, or their mean if `None`."""
    mean = flux_from_mag(np.asarray(table[f"{band}_mag"]))
    if mjd is None:
        return mean
    phase = 2 * np.pi * mjd / np.asarray(table["period_days"]) + np.asarray(table["phase"])
    return mean * (1.0 + np.asarray(table["amplitude"]) * np.sin(phase))


def transient_flux(table: Table, band: str, mjd: float) -> np.ndarray:
    """Return transients' fluxes (nJy) at ``mjd``."""
    peak = flux_from_mag(np.asarray(table[f"{band}_mag"]))
    dt = mjd - np.asarray(table["t_peak"], dtype=float)
    rise = np.exp(-0.5 * (np.minimum(dt, 0.0) / np.asarray(table["rise_days"])) ** 2)
    decay = np.exp(-np.maximum(dt, 0.0) / np.asarray(table["decay_days"]))
    return peak * np.where(dt < 0, rise, decay)


def injected_sources(region: sphgeom.Region, sky: SkyModel, band: str, mjd: float | None) -> Table:
    """Return the variables and transients of a region with fluxes at ``mjd``.

    Parameters
    ----------
    region : `lsst.sphgeom.Region`
        Sky region.
    sky : `SkyModel`
        The synthetic sky.
    band : `str`
        Band of the fluxes.
    mjd : `float` or `None`
        Time (MJD TAI); `None` means "a template": variables at their mean
        flux and no transients.

    Returns
    -------
    truth : `astropy.table.Table`
        ``id``, ``kind`` (``"variable"``/``"transient"``), ``ra``, ``dec``,
        ``mean_flux`` (what a template shows; 0 for transients), ``flux``
        (nJy at ``mjd``) and ``mag``.  Transients fainter than 1e-3 of their
        peak are left out.
    """
    var = variables_in_region(region, sky)
    tra = transients_in_region(region, sky, mjd) if mjd is not None else Table()
    rows = []
    if len(var):
        mean = variable_flux(var, band, None)
        rows.append(_truth_rows(var, "variable", mean, variable_flux(var, band, mjd)))
    if len(tra):
        assert mjd is not None  # a template (mjd None) has no transients
        flux = transient_flux(tra, band, mjd)
        keep = flux > 1e-3 * flux_from_mag(np.asarray(tra[f"{band}_mag"]))
        rows.append(_truth_rows(tra[keep], "transient", np.zeros(keep.sum()), flux[keep]))
    if not rows:
        return _truth_rows(Table({"id": np.zeros(0, np.int64), "ra": [], "dec": []}), "variable", [], [])
    return vstack(rows) if len(rows) > 1 else rows[0]


def _truth_rows(table: Table, kind: str, mean: npt.ArrayLike, flux: npt.ArrayLike) -> Table:
    flux = np.asarray(flux, dtype=float)
    return Table(
        {
            "id": np.asarray(table["id"], dtype=np.int64),
            "kind": np.array([kind] * len(table), dtype="U9"),
            "ra": np.asarray(table["ra"], dtype=float),
            "dec": np.asarray(table["dec"], dtype=float),
            "mean_flux": np.asarray(mean, dtype=float),
            "flux": flux,
            "mag": mag_from_flux(flux),
        }
    )
