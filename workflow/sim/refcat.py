"""A synthetic reference catalog of stars, sharded on HTM level 7.

Each HTM level-7 trixel ("shard", ids 131072..262143, about 0.31 deg2) is
generated on its own from ``(seed, shard id)``, so any part of the sky can be
made on demand and two overlapping queries always agree.  The same stars are
what the simulator draws (`workflow.sim.simulate`); catalogue magnitudes are the
true ones (the quoted errors describe a realistic catalogue, the values are
not scattered), positions are exact and proper motions are zero.

Density: ``density_r23_per_deg2`` stars brighter than r = 23 at the galactic
poles (default 40 000, i.e. about 2000 per LSST detector), rising towards the
galactic plane by ``1 + plane_boost * exp(-|b| / plane_scale_deg)``;
magnitudes follow ``log10 N(<m) = count_slope * m`` between ``bright_mag``
and ``faint_mag``.

Columns: ``id`` (int64), ``ra``, ``dec`` (deg), ``pm_ra``, ``pm_dec``
(mas/yr), ``epoch`` (MJD TAI), and per band ``{band}_mag``, ``{band}_magErr``
(AB), ``{band}_flux``, ``{band}_fluxErr`` (nJy).
"""

from __future__ import annotations

__all__ = [
    "HTM_LEVEL",
    "BANDS",
    "RefcatModel",
    "flux_from_mag",
    "mag_from_flux",
    "shard_ids",
    "shard_polygon",
    "shard_area_deg2",
    "sample_in_shard",
    "star_colors",
    "make_shard",
    "load_refcat",
    "region_contains",
]

import dataclasses
import functools
import logging
import math
from collections.abc import Iterable

import lsst.sphgeom as sphgeom
import numpy as np
from astropy.table import Table, vstack

_log = logging.getLogger(__name__)

HTM_LEVEL = 7
"""HTM level of the shards (as Rubin's refcats)."""

BANDS = ("u", "g", "r", "i", "z", "y")
"""Bands with magnitudes in every synthetic catalogue."""

_AB_NJY_ZP = 31.4
_STAR_STREAM = 1
_GALACTIC_POLE = (192.85948, 27.12825)
_PIXELIZATION = sphgeom.HtmPixelization(HTM_LEVEL)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RefcatModel:
    """Parameters of the synthetic star population (see the module docstring)."""

    seed: int = 0
    density_r23_per_deg2: float = 40000.0
    plane_boost: float = 4.0
    plane_scale_deg: float = 10.0
    bright_mag: float = 14.0
    faint_mag: float = 24.0
    count_slope: float = 0.25
    epoch_mjd: float = 60000.0


def flux_from_mag(mag: np.ndarray | float) -> np.ndarray:
    """Convert AB magnitudes to nJy."""
    return 10.0 ** (-0.4 * (np.asarray(mag, dtype=float) - _AB_NJY_ZP))


def mag_from_flux(flux: np.ndarray | float) -> np.ndarray:
    """Convert nJy to AB magnitudes (NaN for non-positive flux)."""
    flux = np.asarray(flux, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(flux > 0, _AB_NJY_ZP - 2.5 * np.log10(np.where(flux > 0, flux, 1.0)), np.nan)


def shard_ids(region: sphgeom.Region) -> list[int]:
    """Return the HTM level-7 shard ids that may overlap a region.

    Parameters
    ----------
    region : `lsst.sphgeom.Region`
        Sky region, e.g. a padded detector footprint.

    Returns
    -------
    ids : `list` [`int`]
        Sorted shard ids (a superset of the overlapping ones).
    """
    out: list[int] = []
    for begin, end in _PIXELIZATION.envelope(region):
        out.extend(range(begin, end))
    return out


def shard_polygon(shard: int) -> sphgeom.ConvexPolygon:
    """Return the trixel of one shard."""
    return _PIXELIZATION.triangle(shard)


def _vertices(shard: int) -> np.ndarray:
    return np.array([[v.x(), v.y(), v.z()] for v in shard_polygon(shard).getVertices()])


def shard_area_deg2(shard: int) -> float:
    """Return the area of a shard in square degrees."""
    v0, v1, v2 = _vertices(shard)
    num = abs(np.dot(v0, np.cross(v1, v2)))
    den = 1.0 + np.dot(v0, v1) + np.dot(v1, v2) + np.dot(v2, v0)
    return float(2.0 * math.atan2(num, den) * (180.0 / math.pi) ** 2)


def _unit(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    ra, dec = np.radians(ra), np.radians(dec)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def sample_in_shard(shard: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw points uniformly inside a shard.

    Parameters
    ----------
    shard : `int`
        HTM level-7 id.
    n : `int`
        Number of points.
    rng : `numpy.random.Generator`
        Random source.

    Returns
    -------
    ra, dec : `numpy.ndarray`
        Degrees.
    """
    verts = _vertices(shard)
    center = verts.sum(axis=0)
    center /= np.linalg.norm(center)
    cos_r = float(np.min(verts @ center)) - 1e-12
    normals = np.cross(verts, np.roll(verts, -1, axis=0))
    normals *= np.sign(normals @ center)[:, None]
    helper = np.array([0.0, 0.0, 1.0]) if abs(center[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    e1 = np.cross(center, helper)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(center, e1)
    points = np.empty((0, 3))
    while len(points) < n:
        m = max(16, int(2.5 * (n - len(points))))
        cos_t = rng.uniform(cos_r, 1.0, m)
        sin_t = np.sqrt(1.0 - cos_t**2)
        phi = rng.uniform(0.0, 2 * np.pi, m)
        cand = cos_t[:, None] * center + (sin_t * np.cos(phi))[:, None] * e1 + (sin_t * np.sin(phi))[:, None] * e2
        points = np.concatenate([points, cand[np.all(cand @ normals.T >= 0.0, axis=1)]])
    points = points[:n]
    ra = np.degrees(np.arctan2(points[:, 1], points[:, 0])) % 360.0
    dec = np.degrees(np.arcsin(np.clip(points[:, 2], -1.0, 1.0)))
    return ra, dec


def _sin_galactic_latitude(ra: float, dec: float) -> float:
    pole = _unit(np.array(_GALACTIC_POLE[0]), np.array(_GALACTIC_POLE[1]))
    return float(_unit(np.array(ra), np.array(dec)) @ pole)


def _shard_center(shard: int) -> tuple[float, float]:
    center = _vertices(shard).sum(axis=0)
    ll = sphgeom.LonLat(sphgeom.Vector3d(*center))
    return ll.getLon().asDegrees(), ll.getLat().asDegrees()


def _cumulative(model: RefcatModel, mag: float) -> float:
    return 10.0 ** (model.count_slope * mag) - 10.0 ** (model.count_slope * model.bright_mag)


def _draw_mags(model: RefcatModel, n: int, rng: np.random.Generator) -> np.ndarray:
    lo = 10.0 ** (model.count_slope * model.bright_mag)
    hi = 10.0 ** (model.count_slope * model.faint_mag)
    return np.log10(lo + rng.uniform(0.0, 1.0, n) * (hi - lo)) / model.count_slope


def star_colors(gr: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Return magnitude offsets from r along a crude stellar locus.

    Parameters
    ----------
    gr : `numpy.ndarray`
        g - r colours.
    rng : `numpy.random.Generator`
        Random source for a 0.02 mag scatter per colour.

    Returns
    -------
    offsets : `dict` [`str`, `numpy.ndarray`]
        ``mag[band] - mag["r"]`` for each band.
    """
    n = len(gr)
    scatter = rng.normal(0.0, 0.02, (4, n))
    ri = 0.38 * gr - 0.03 + 1.5 * np.maximum(gr - 1.3, 0.0) + scatter[0]
    ug = 0.9 + 1.1 * gr + scatter[1]
    iz = 0.5 * ri + scatter[2]
    zy = 0.3 * ri + scatter[3]
    return {"u": gr + ug, "g": gr, "r": np.zeros(n), "i": -ri, "z": -ri - iz, "y": -ri - iz - zy}


def _mag_errors(mag: np.ndarray) -> np.ndarray:
    return np.hypot(0.005, 0.2 * 10.0 ** (0.4 * (mag - 24.5)))


@functools.lru_cache(maxsize=48)
def _shard_arrays(shard: int, model: RefcatModel) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(np.random.SeedSequence([model.seed, _STAR_STREAM, shard]))
    ra0, dec0 = _shard_center(shard)
    boost = 1.0 + model.plane_boost * math.exp(
        -abs(math.degrees(math.asin(_sin_galactic_latitude(ra0, dec0)))) / model.plane_scale_deg
    )
    expected = (
        model.density_r23_per_deg2
        * boost
        * shard_area_deg2(shard)
        * _cumulative(model, model.faint_mag)
        / _cumulative(model, 23.0)
    )
    n = int(rng.poisson(expected))
    ra, dec = sample_in_shard(shard, n, rng)
    r_mag = _draw_mags(model, n, rng)
    gr = np.clip(rng.beta(2.0, 3.0, n) * 1.6, 0.1, None)
    offsets = star_colors(gr, rng)
    cols: dict[str, np.ndarray] = {
        "id": (np.int64(1) << 58) | (np.int64(shard) << 24) | np.arange(n, dtype=np.int64),
        "ra": ra,
        "dec": dec,
        "pm_ra": np.zeros(n),
        "pm_dec": np.zeros(n),
        "epoch": np.full(n, model.epoch_mjd),
    }
    for band in BANDS:
        mag = r_mag + offsets[band]
        err = _mag_errors(mag)
        flux = flux_from_mag(mag)
        cols[f"{band}_mag"] = mag
        cols[f"{band}_magErr"] = err
        cols[f"{band}_flux"] = flux
        cols[f"{band}_fluxErr"] = flux * err * (math.log(10.0) / 2.5)
    for arr in cols.values():
        arr.flags.writeable = False
    return cols


_UNITS = {"ra": "deg", "dec": "deg", "pm_ra": "mas / yr", "pm_dec": "mas / yr", "epoch": "d"}


def _to_table(cols: dict[str, np.ndarray], mask: np.ndarray | None = None) -> Table:
    table = Table({k: (v if mask is None else v[mask]).copy() for k, v in cols.items()})
    for name, column in table.columns.items():
        if name in _UNITS:
            column.unit = _UNITS[name]
        elif name.endswith("_mag") or name.endswith("_magErr"):
            column.unit = "mag"
        elif name.endswith("_flux") or name.endswith("_fluxErr"):
            column.unit = "nJy"
    return table


def make_shard(shard: int, model: RefcatModel | None = None) -> Table:
    """Generate one refcat shard.

    Parameters
    ----------
    shard : `int`
        HTM level-7 trixel id.
    model : `RefcatModel`, optional
        Population parameters and seed.

    Returns
    -------
    table : `astropy.table.Table`
        The shard's stars (see the module docstring); ``meta`` holds
        ``HTM_LEVEL``, ``SHARD`` and ``SEED``.

    Raises
    ------
    ValueError
        If ``shard`` is not a level-7 trixel id.
    """
    model = model or RefcatModel()
    if not (8 * 4**HTM_LEVEL <= shard < 16 * 4**HTM_LEVEL):
        raise ValueError(f"refcat: {shard} is not an HTM level-{HTM_LEVEL} trixel id")
    table = _to_table(_shard_arrays(int(shard), model))
    table.meta.update({"HTM_LEVEL": HTM_LEVEL, "SHARD": int(shard), "SEED": model.seed})
    return table


def region_contains(region: sphgeom.Region, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Return a mask of points (degrees) inside a sphgeom region."""
    ra, dec = np.asarray(ra, dtype=float), np.asarray(dec, dtype=float)
    if ra.size == 0:
        return np.zeros(0, dtype=bool)
    return np.asarray(region.contains(np.radians(ra), np.radians(dec)), dtype=bool)


def load_refcat(
    region: sphgeom.Region | None = None,
    *,
    shards: Iterable[int] | None = None,
    model: RefcatModel | None = None,
    trim: bool = True,
) -> Table:
    """Return the refcat stars of a region (or of a list of shards).

    Parameters
    ----------
    region : `lsst.sphgeom.Region`, optional
        Sky region; its overlapping shards are generated.
    shards : iterable of `int`, optional
        Explicit shard ids (instead of, or in addition to, ``region``).
    model : `RefcatModel`, optional
        Population parameters and seed.
    trim : `bool`, optional
        Keep only stars inside ``region`` (default); otherwise whole shards.

    Returns
    -------
    table : `astropy.table.Table`
        Stars, columns as in `make_shard`.
    """
    model = model or RefcatModel()
    ids = set(shards or ())
    if region is not None:
        ids.update(shard_ids(region))
    parts = []
    for shard in sorted(ids):
        cols = _shard_arrays(int(shard), model)
        mask = region_contains(region, cols["ra"], cols["dec"]) if (trim and region is not None) else None
        parts.append(_to_table(cols, mask))
    if not parts:
        return _to_table({k: v[:0] for k, v in _shard_arrays(8 * 4**HTM_LEVEL, model).items()})
    table = vstack(parts, metadata_conflicts="silent") if len(parts) > 1 else parts[0]
    table.meta.update({"HTM_LEVEL": HTM_LEVEL, "SEED": model.seed})
    _log.debug("refcat: %d stars from %d shards", len(table), len(ids))
    return table
