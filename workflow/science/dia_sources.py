"""Detect and measure sources on a difference image (DiaSources).

Detection is a PSF matched filter (`workflow.science.photometry.psf_matched_filter`):
each pixel holds the S/N of a point source centred there; footprints above
``+threshold`` and below ``-threshold`` are detected separately, with one or
more peaks each (`workflow.science.photometry.find_peaks`).  Masked pixels are zeroed
first and peaks on defects, saturation, no data or edges are dropped.  Close
positive and negative peaks become one dipole (fitted with two PSFs).  Each source gets a PSF-fit flux (nJy),
centroid, sky position, aperture flux, pixel flags from the mask and a
heuristic reliability.  Columns use the APDB ``DiaSource`` names
(lsst-sdm-schemas ``apdb.yaml``).
"""

from __future__ import annotations

__all__ = ["DIA_COLUMNS", "RELIABILITY_VERSION", "dia_source_ids", "find_peaks", "detect_dia_sources"]

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from astropy.time import Time
from astropy.wcs.utils import proj_plane_pixel_scales
from scipy.spatial import cKDTree

from workflow.science.errors import BadImageError, ScienceDataError
from workflow.science.exposure import Exposure
from workflow.science.masks import MaskPlane
from workflow.science.photometry import (
    BAD_PIXELS,
    aperture_photometry,
    find_peaks,
    matched_filter_noise_scale,
    psf_matched_filter,
    psf_photometry,
)
from workflow.science.psf import cutout_stamps

if TYPE_CHECKING:
    from astropy.wcs import WCS

    from workflow.science.psf import PsfModel

_log = logging.getLogger(__name__)

_STEP = "detect_dia_sources"

RELIABILITY_VERSION = "heur-v1"
"""Value of ``reliabilityVersion`` (schema allows 7 characters)."""

DIA_COLUMNS = [
    "diaSourceId",
    "visit",
    "detector",
    "midpointMjdTai",
    "exposureTime",
    "ra",
    "raErr",
    "dec",
    "decErr",
    "x",
    "xErr",
    "y",
    "yErr",
    "centroid_flag",
    "apFlux",
    "apFluxErr",
    "apFlux_flag",
    "apFlux_flag_apertureTruncated",
    "isNegative",
    "snr",
    "psfFlux",
    "psfFluxErr",
    "psfChi2",
    "psfNdata",
    "psfFlux_flag",
    "psfFlux_flag_edge",
    "psfFlux_flag_noGoodPixels",
    "trailNdata",
    "dipoleMeanFlux",
    "dipoleMeanFluxErr",
    "dipoleFluxDiff",
    "dipoleFluxDiffErr",
    "dipoleChi2",
    "dipoleLength",
    "dipoleAngle",
    "dipoleNdata",
    "dipoleFitAttempted",
    "isDipole",
    "scienceFlux",
    "scienceFluxErr",
    "ixxPSF",
    "iyyPSF",
    "ixyPSF",
    "reliability",
    "reliabilityVersion",
    "band",
    "timeProcessedMjdTai",
    "bboxSize",
    "pixelFlags",
    "pixelFlags_bad",
    "pixelFlags_cr",
    "pixelFlags_crCenter",
    "pixelFlags_edge",
    "pixelFlags_nodata",
    "pixelFlags_nodataCenter",
    "pixelFlags_interpolated",
    "pixelFlags_interpolatedCenter",
    "pixelFlags_offimage",
    "pixelFlags_saturated",
    "pixelFlags_saturatedCenter",
    "pixelFlags_suspect",
    "pixelFlags_suspectCenter",
]
"""Columns of the output table, all APDB ``DiaSource`` names."""

_FLAG_BITS = {
    "bad": MaskPlane.BAD,
    "cr": MaskPlane.CR,
    "edge": MaskPlane.EDGE | MaskPlane.NO_DATA,
    "nodata": MaskPlane.NO_DATA,
    "interpolated": MaskPlane.INTRP,
    "saturated": MaskPlane.SAT,
    "suspect": MaskPlane.SUSPECT,
}

_UNUSABLE_CENTRE = int(MaskPlane.BAD | MaskPlane.SAT | MaskPlane.NO_DATA | MaskPlane.EDGE)
"""Peaks on these pixels are dropped (as Rubin's ``badSourceFlags``: defects, saturation, no data)."""


def dia_source_ids(visit: int, detector: int, count: int) -> np.ndarray:
    """Return unique 63-bit ids: 41 bits of visit, 8 of detector, 14 of index.

    Raises
    ------
    ScienceDataError
        If a field does not fit its bits.
    """
    if not (0 <= visit < 2**41 and 0 <= detector < 2**8 and count <= 2**14):
        message = f"cannot pack ids for visit {visit}, detector {detector}, {count} sources"
        raise ScienceDataError(_STEP, message)
    return (np.int64(visit) << 22) | (np.int64(detector) << 14) | np.arange(count, dtype=np.int64)


def _pair_dipoles(peaks: pd.DataFrame, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Return index arrays of (positive, negative) peaks closer than ``radius``, greedily by distance."""
    pos, neg = np.flatnonzero(peaks["snr"] > 0), np.flatnonzero(peaks["snr"] < 0)
    if len(pos) == 0 or len(neg) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    xy = peaks[["x", "y"]].to_numpy()
    pairs = cKDTree(xy[pos]).sparse_distance_matrix(cKDTree(xy[neg]), radius, output_type="ndarray")
    used_p, used_n, out_p, out_n = set(), set(), [], []
    for rec in np.sort(pairs, order="v"):
        if rec["i"] not in used_p and rec["j"] not in used_n:
            used_p.add(rec["i"])
            used_n.add(rec["j"])
            out_p.append(pos[rec["i"]])
            out_n.append(neg[rec["j"]])
    return np.array(out_p, int), np.array(out_n, int)


def _pixel_flags(mask: np.ndarray, x: np.ndarray, y: np.ndarray, radius: int) -> dict[str, np.ndarray]:
    """OR the mask over a footprint box and over the 3x3 centre of each source."""
    ix, iy = np.rint(x).astype(int) + radius, np.rint(y).astype(int) + radius
    padded = np.pad(mask, radius, mode="constant", constant_values=int(MaskPlane.NO_DATA))
    foot = np.bitwise_or.reduce(cutout_stamps(padded, ix, iy, radius), axis=(1, 2))
    core = np.bitwise_or.reduce(cutout_stamps(padded, ix, iy, 1), axis=(1, 2))
    flags = {}
    for name, bits in _FLAG_BITS.items():
        flags[f"pixelFlags_{name}"] = (foot & int(bits)) != 0
        if name in ("cr", "nodata", "interpolated", "saturated", "suspect"):
            flags[f"pixelFlags_{name}Center"] = (core & int(bits)) != 0
    off = (x < -0.5) | (y < -0.5) | (x > mask.shape[1] - 0.5) | (y > mask.shape[0] - 0.5)
    flags["pixelFlags_offimage"] = off
    flags["pixelFlags"] = np.zeros(len(x), bool)
    return flags


def _reliability(
    chi2: np.ndarray,
    ndata: np.ndarray,
    dipole: np.ndarray,
    flags: dict[str, np.ndarray],
    contrast: np.ndarray,
) -> np.ndarray:
    """Heuristic probability that a source is astrophysical, in [0, 1].

    Lowered by a poor PSF fit, a dipole shape, bad pixels, and a difference
    flux below 10% of the science flux at the same place (a residual of a bright
    static source rather than a change).
    """
    reduced = chi2 / np.maximum(ndata - 1, 1)
    score = np.exp(-np.maximum(reduced - 1.3, 0.0) / 1.5)
    score = np.where(contrast < 0.1, 0.3 * score, score)
    score = np.where(dipole, 0.2 * score, score)
    factors = (
        ("saturatedCenter", 0.2),
        ("saturated", 0.8),
        ("crCenter", 0.3),
        ("nodataCenter", 0.2),
        ("bad", 0.6),
        ("edge", 0.7),
        ("interpolatedCenter", 0.6),
        ("suspectCenter", 0.7),
    )
    for name, factor in factors:
        score = np.where(flags[f"pixelFlags_{name}"], score * factor, score)
    return np.clip(np.nan_to_num(score), 0.0, 1.0)


def _positions(peaks: pd.DataFrame, fwhm: float) -> pd.DataFrame:
    """Merge dipole pairs; return one row per source with lobe indices (-1 if none)."""
    pos, neg = _pair_dipoles(peaks, 1.5 * fwhm + 0.5)
    single = np.setdiff1d(np.arange(len(peaks)), np.concatenate([pos, neg]))
    sp, sn = peaks.iloc[pos], peaks.iloc[neg]
    p_snr, n_snr = sp["snr"].to_numpy(), sn["snr"].to_numpy()
    strongest = np.where(p_snr >= -n_snr, p_snr, n_snr)
    dipoles = pd.DataFrame(
        {
            "x": 0.5 * (sp["x"].to_numpy() + sn["x"].to_numpy()),
            "y": 0.5 * (sp["y"].to_numpy() + sn["y"].to_numpy()),
            "snr": strongest,
            "bbox": np.maximum(sp["bbox"].to_numpy(), sn["bbox"].to_numpy())
            + np.ceil(np.hypot(*(sp[["x", "y"]].to_numpy() - sn[["x", "y"]].to_numpy()).T)),
            "centroid_flag": sp["centroid_flag"].to_numpy(bool) | sn["centroid_flag"].to_numpy(bool),
            "pos": pos,
            "neg": neg,
        }
    )
    singles = peaks.iloc[single].assign(pos=-1, neg=-1)
    return pd.concat([singles, dipoles], ignore_index=True)


def _position_angle(wcs: WCS, x0: float, y0: float, x1: float, y1: float) -> float:
    """Position angle (degrees east of north) of pixel (x1, y1) seen from (x0, y0)."""
    (ra0, dec0), (ra1, dec1) = wcs.all_pix2world([[x0, y0], [x1, y1]], 0)
    east = ((ra1 - ra0 + 180.0) % 360.0 - 180.0) * np.cos(np.radians(dec0))
    return float(np.degrees(np.arctan2(east, dec1 - dec0)) % 360.0)


def _dipole_columns(
    diff: Exposure, peaks: pd.DataFrame, src: pd.DataFrame, scale: float, pixel_arcsec: float
) -> dict[str, np.ndarray]:
    """Fit dipoles; return their lobe fluxes and geometry (NaN for other sources)."""
    n = len(src)
    names: tuple[str, ...] = ("dipoleMeanFlux", "dipoleMeanFluxErr", "dipoleFluxDiff", "dipoleLength", "dipoleAngle")
    names += ("dipoleChi2",)
    out = {k: np.full(n, np.nan) for k in names}
    out["dipoleNdata"] = np.zeros(n, np.int32)
    out["x"], out["y"] = src["x"].to_numpy().copy(), src["y"].to_numpy().copy()
    for row in np.flatnonzero(src["pos"].to_numpy() >= 0)[:500]:
        pos, neg = peaks.iloc[src["pos"].iloc[row]], peaks.iloc[src["neg"].iloc[row]]
        fit = fit_psf_pair(diff, (pos["x"], pos["y"]), (neg["x"], neg["y"]))
        if fit is None:
            continue
        fp, fn = fit["fp"] * scale, fit["fn"] * scale
        out["dipoleMeanFlux"][row] = 0.5 * (abs(fp) + abs(fn))
        out["dipoleMeanFluxErr"][row] = 0.5 * scale * np.hypot(fit["fp_err"], fit["fn_err"])
        out["dipoleFluxDiff"][row] = abs(fp) - abs(fn)
        out["dipoleLength"][row] = np.hypot(fit["xp"] - fit["xn"], fit["yp"] - fit["yn"]) * pixel_arcsec
        out["dipoleAngle"][row] = _position_angle(diff.wcs, fit["xn"], fit["yn"], fit["xp"], fit["yp"])
        out["dipoleChi2"][row], out["dipoleNdata"][row] = fit["chi2"], fit["ndata"]
        out["x"][row], out["y"][row] = 0.5 * (fit["xp"] + fit["xn"]), 0.5 * (fit["yp"] + fit["yn"])
    return out


def _two_psf_model(psf: PsfModel, region: tuple, positions: np.ndarray) -> np.ndarray:
    """Return the two unit-flux PSF images (2, ny, nx) at ``positions`` inside ``region``."""
    (r0, c0), shape = region
    stamps, ix, iy = psf.realize(positions[[0, 2]], positions[[1, 3]])
    out = np.zeros((2,) + shape)
    h = psf.half
    for k in range(2):
        out[k, iy[k] - h - r0 : iy[k] + h + 1 - r0, ix[k] - h - c0 : ix[k] + h + 1 - c0] = stamps[k]
    return out


def fit_psf_pair(diff: Exposure, pos_xy: tuple[float, float], neg_xy: tuple[float, float]) -> dict[str, float] | None:
    """Fit two PSFs jointly (a dipole: positions free, fluxes linear) on ``diff``.

    Returns
    -------
    fit : `dict` or `None`
        ``xp, yp, xn, yn`` (pixels), ``fp, fn`` and errors ``fp_err, fn_err``
        (image units), ``chi2``, ``ndata``; `None` near the image edge or if the fit is singular.
    """
    from scipy.optimize import least_squares

    psf = diff.psf
    assert psf is not None, "a difference exposure has a PSF"
    cx, cy = int(round((pos_xy[0] + neg_xy[0]) / 2)), int(round((pos_xy[1] + neg_xy[1]) / 2))
    spread = max(abs(pos_xy[0] - cx), abs(pos_xy[1] - cy), abs(neg_xy[0] - cx), abs(neg_xy[1] - cy))
    reach = int(np.ceil(spread)) + 4  # lobes may move 3 px; the rounding of realize adds 1
    h = psf.half + reach
    if cx - h < 0 or cy - h < 0 or cx + h >= diff.shape[1] or cy + h >= diff.shape[0]:
        return None
    box = (slice(cy - h, cy + h + 1), slice(cx - h, cx + h + 1))
    data, var = diff.image[box].astype(float), diff.variance[box].astype(float)
    usable = ((diff.mask[box] & BAD_PIXELS) == 0) & (var > 0) & np.isfinite(data) & np.isfinite(var)
    weight = np.where(usable, 1.0 / np.where(usable, var, 1.0), 0.0)
    data = np.where(usable, data, 0.0)
    region = ((cy - h, cx - h), data.shape)

    def solve(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        model = _two_psf_model(psf, region, positions).reshape(2, -1)
        normal = (model * weight.ravel()) @ model.T + np.eye(2) * 1e-30
        fluxes = np.linalg.solve(normal, (model * weight.ravel()) @ data.ravel())
        return fluxes, normal, (data.ravel() - fluxes @ model) * np.sqrt(weight.ravel())

    start = np.array([pos_xy[0], pos_xy[1], neg_xy[0], neg_xy[1]])
    bounds = (start - 3.0, start + 3.0)
    try:
        result = least_squares(lambda p: solve(p)[2], start, bounds=bounds, diff_step=1e-3)
        fluxes, normal, resid = solve(result.x)
        errors = np.sqrt(np.diag(np.linalg.inv(normal)))
    except (np.linalg.LinAlgError, ValueError):  # lobes on masked pixels: no fit
        return None
    xp, yp, xn, yn = result.x
    return {
        "xp": xp,
        "yp": yp,
        "xn": xn,
        "yn": yn,
        "fp": fluxes[0],
        "fn": fluxes[1],
        "fp_err": errors[0],
        "fn_err": errors[1],
        "chi2": float((resid**2).sum()),
        "ndata": int((weight > 0).sum()),
    }


def _check_difference(difference: Exposure) -> None:
    missing = [n for n in ("psf", "wcs", "zero_point") if getattr(difference, n) is None]
    if missing:
        raise ScienceDataError(_STEP, f"difference exposure lacks {', '.join(missing)}")
    if not np.isfinite(difference.image).any():
        raise BadImageError(_STEP, "difference image has no finite pixels")


def detect_dia_sources(
    difference: Exposure,
    *,
    visit: int,
    detector: int,
    band: str,
    midpoint_mjd_tai: float,
    exposure_time: float | None = None,
    threshold: float = 5.0,
    ap_radius: float = 12.0,
    science: Exposure | None = None,
) -> pd.DataFrame:
    """Detect positive and negative sources on a difference image and measure them.

    Parameters
    ----------
    difference : `workflow.science.exposure.Exposure`
        Difference exposure with PSF, WCS and zero point.
    visit, detector : `int`
        Visit and detector ids (used in ``diaSourceId``).
    band : `str`
        Band name.
    midpoint_mjd_tai : `float`
        Mid-exposure time, MJD TAI.
    exposure_time : `float`, optional
        Exposure time in seconds.
    threshold : `float`
        Detection threshold on the matched-filter S/N.  Peaks with BAD, SAT,
        NO_DATA or EDGE pixels in their 3x3 centre, or centred on SUSPECT (near
        saturation) pixels, are dropped.
    ap_radius : `float`
        Aperture radius in pixels for ``apFlux``.
    science : `workflow.science.exposure.Exposure`, optional
        Calibrated science exposure, for forced ``scienceFlux``.

    Returns
    -------
    sources : `pandas.DataFrame`
        One row per DiaSource, columns `DIA_COLUMNS`, fluxes in nJy.

    Raises
    ------
    ScienceDataError
        If the difference lacks a PSF, WCS or zero point, or ids cannot be packed.
    BadImageError
        If the difference image has no finite pixel.
    """
    _check_difference(difference)
    image, peaks = _usable_peaks(difference, threshold)
    assert difference.psf is not None  # checked by _check_difference
    src = _positions(peaks, difference.psf.fwhm)
    table: dict[str, Any] = _measure(difference, image, peaks, src, ap_radius)
    n = len(src)
    table |= {
        "diaSourceId": dia_source_ids(visit, detector, n),
        "visit": np.full(n, visit, np.int64),
        "detector": np.full(n, detector, np.int16),
        "midpointMjdTai": np.full(n, midpoint_mjd_tai),
        "exposureTime": np.full(n, np.nan if exposure_time is None else exposure_time, np.float32),
        "band": band,
        "timeProcessedMjdTai": np.full(n, Time.now().tai.mjd),
    }
    table |= _science_flux(science, table["x"], table["y"])
    science_flux = np.maximum(np.abs(np.nan_to_num(table["scienceFlux"], nan=0.0)), 1e-30)
    flags = {k: v for k, v in table.items() if k.startswith("pixelFlags")}
    contrast = np.abs(table["psfFlux"]) / science_flux
    fit = (table["psfChi2"], table["psfNdata"], table["isDipole"])
    table["reliability"] = _reliability(*fit, flags, contrast)
    table["reliabilityVersion"] = RELIABILITY_VERSION
    out = pd.DataFrame(table)[DIA_COLUMNS]
    counts = (int((out["snr"] > 0).sum()), int((out["snr"] < 0).sum()), int(out["isDipole"].sum()))
    _log.info("Detected %d DiaSources (%d positive, %d negative, %d dipoles)", len(out), *counts)
    return out


def _usable_peaks(difference: Exposure, threshold: float) -> tuple[np.ndarray, pd.DataFrame]:
    """Return the difference image with masked pixels zeroed and its usable peaks.

    Masked pixels (saturated cores, defects, no data) hold no difference signal:
    zeroed, they do not leak into the matched filter around them.
    """
    usable = np.isfinite(difference.image) & ((difference.mask & _UNUSABLE_CENTRE) == 0)
    image = np.where(usable, difference.image, np.float32(0.0))
    assert difference.psf is not None  # checked by _check_difference
    stamp = difference.psf.image_at(*difference.psf.center)
    filtered, snr_map = psf_matched_filter(image, difference.variance, stamp)
    allowed = (difference.mask & int(MaskPlane.NO_DATA)) == 0
    snr_map /= matched_filter_noise_scale(snr_map, allowed & (difference.mask == 0))
    peaks = find_peaks(snr_map, allowed, threshold, flux=filtered, psf_stamp=stamp)
    ix, iy = np.rint(peaks["x"]).astype(int) + 1, np.rint(peaks["y"]).astype(int) + 1
    padded = np.pad(difference.mask, 1, constant_values=int(MaskPlane.NO_DATA))
    core = np.bitwise_or.reduce(cutout_stamps(padded, ix, iy, 1).reshape(len(ix), 9), axis=1)
    drop = ((core & _UNUSABLE_CENTRE) != 0) | ((padded[iy, ix] & int(MaskPlane.SUSPECT)) != 0)
    return image, peaks[~drop].reset_index(drop=True)


def _measure(
    difference: Exposure, image: np.ndarray, peaks: pd.DataFrame, src: pd.DataFrame, ap_radius: float
) -> dict[str, np.ndarray]:
    """Measure positions, PSF and aperture fluxes (nJy), dipoles and pixel flags of detections."""
    psf, scale, n = difference.psf, difference.njy_per_count, len(src)
    assert psf is not None and difference.wcs is not None  # checked by _check_difference
    # PSF fluxes are stamp fluxes: the science calibration's aperture correction makes them total.
    psf_scale = scale * float(difference.metadata.get("APCORR", 1.0))
    pixel_arcsec = float(np.mean(proj_plane_pixel_scales(difference.wcs.celestial))) * 3600.0
    table = _dipole_columns(difference, peaks, src, psf_scale, pixel_arcsec)
    x, y = table["x"], table["y"]
    phot = psf_photometry(image, difference.variance, psf, x, y, mask=difference.mask)
    ap_flux, ap_err, ap_flags = aperture_photometry(image, difference.variance, difference.mask, x, y, ap_radius)
    dipole = src["pos"].to_numpy() >= 0
    pos_err = np.sqrt(2.0) * psf.sigma / np.maximum(np.abs((phot["flux"] / phot["flux_err"]).to_numpy()), 1e-3)
    ra, dec = difference.wcs.all_pix2world(x, y, 0) if n else (np.zeros(0), np.zeros(0))
    table |= {
        "ra": ra,
        "raErr": pos_err * pixel_arcsec / 3600.0,
        "dec": dec,
        "decErr": pos_err * pixel_arcsec / 3600.0,
        "xErr": pos_err,
        "yErr": pos_err,
        "centroid_flag": src["centroid_flag"].to_numpy(bool),
        "apFlux": ap_flux * scale,
        "apFluxErr": ap_err * scale,
        "apFlux_flag": ap_flags != 0,
        "apFlux_flag_apertureTruncated": (ap_flags & 16) != 0,
        "isNegative": (src["snr"].to_numpy() < 0) & ~dipole,
        "snr": src["snr"].to_numpy(),
        "psfFlux": phot["flux"].to_numpy() * psf_scale,
        "psfFluxErr": phot["flux_err"].to_numpy() * psf_scale,
        "psfChi2": phot["chi2"].to_numpy(),
        "psfNdata": phot["ndata"].to_numpy(np.int32),
        "psfFlux_flag": ~np.isfinite(phot["flux"].to_numpy()),
        "psfFlux_flag_edge": phot["frac_used"].to_numpy() < 0.99,
        "psfFlux_flag_noGoodPixels": phot["ndata"].to_numpy() == 0,
        "trailNdata": np.zeros(n, np.int32),
        "dipoleFitAttempted": np.ones(n, bool),
        "isDipole": dipole,
        "bboxSize": src["bbox"].to_numpy(np.int32),
        "ixxPSF": np.full(n, psf.sigma**2),
        "iyyPSF": np.full(n, psf.sigma**2),
        "ixyPSF": np.zeros(n),
    }
    table["dipoleFluxDiffErr"] = 2.0 * table["dipoleMeanFluxErr"]
    return table | _pixel_flags(difference.mask, x, y, max(int(np.ceil(psf.fwhm)), 2))


def _science_flux(science: Exposure | None, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    if science is None or science.psf is None or science.zero_point is None or len(x) == 0:
        return {"scienceFlux": np.full(len(x), np.nan), "scienceFluxErr": np.full(len(x), np.nan)}
    phot = psf_photometry(science.image, science.variance, science.psf, x, y, mask=science.mask)
    scale = science.njy_per_count * float(science.metadata.get("APCORR", 1.0))
    flux, err = phot["flux"].to_numpy(), phot["flux_err"].to_numpy()
    return {"scienceFlux": flux * scale, "scienceFluxErr": err * scale}
