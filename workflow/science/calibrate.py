"""Single-frame calibration: background, PSF, sources, astrometry, zero point.

`calibrate` turns a post-ISR `Exposure` into a background-subtracted,
calibrated exposure (WCS, PSF, zero point) plus a source table whose fluxes
are in nJy.  Each sub-step raises `TooFewStarsError` naming itself
(``calibrate.detection``, ``calibrate.psf``, ``calibrate.astrometry``,
``calibrate.photometry``) when the image has too few usable stars.
"""

from __future__ import annotations

__all__ = ["CalibrationResult", "calibrate", "select_psf_stars", "clean_stars", "psf_at_sources"]

import dataclasses
import logging

import numpy as np
import pandas as pd
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales
from scipy.spatial import cKDTree

from workflow.science.astrometry import AstrometryResult, fit_astrometry
from workflow.science.errors import ScienceDataError, TooFewStarsError, check_image
from workflow.science.exposure import Exposure
from workflow.science.masks import MaskPlane
from workflow.science.photometry import (
    aperture_photometry,
    detect_sources,
    estimate_background,
    fit_zero_point,
    psf_photometry,
)
from workflow.science.psf import PsfModel, cutout_stamps, footprint_radius, measure_psf

_log = logging.getLogger(__name__)


@dataclasses.dataclass(kw_only=True)
class CalibrationResult:
    """Outcome of `calibrate`.

    Attributes
    ----------
    exposure : `workflow.science.exposure.Exposure`
        Background-subtracted exposure with ``wcs``, ``psf`` and ``zero_point``.
    sources : `pandas.DataFrame`
        Detected sources (single-visit stars), fluxes in nJy.
    astrometry : `workflow.science.astrometry.AstrometryResult`
        Details of the astrometric fit.
    """

    exposure: Exposure
    sources: pd.DataFrame
    astrometry: AstrometryResult


def _isolated(xy: np.ndarray, flux: np.ndarray, radius: float, contrast: float) -> np.ndarray:
    """Return which sources have no neighbour brighter than ``contrast`` x their flux within ``radius``."""
    ok = np.ones(len(xy), bool)
    if len(xy) < 2:
        return ok
    for i, j in cKDTree(xy).query_pairs(radius, output_type="ndarray"):
        ok[i] &= flux[j] < contrast * flux[i]
        ok[j] &= flux[i] < contrast * flux[j]
    return ok


def select_psf_stars(sources: pd.DataFrame, fwhm: float, half: int, *, min_snr: float = 30.0) -> pd.DataFrame:
    """Return bright, isolated, unsaturated, unflagged, star-sized sources.

    A star is isolated when no detection brighter than 0.2% of it lies within
    1.5 ``half`` (its PSF stamp half-width), nor any detection within 2 FWHM.
    ``sources`` needs ``x``, ``y``, ``flux``, ``a``, ``b``, ``sep_flags``,
    ``ap_snr`` and ``saturated`` columns; at most the 300 brightest are kept.
    """
    xy = sources[["x", "y"]].to_numpy()
    flux = np.maximum(sources["flux"].to_numpy(), 1e-12)
    size = np.sqrt(sources["a"] * sources["b"])
    ok = (sources["ap_snr"] > min_snr) & ~sources["saturated"] & (sources["sep_flags"] == 0)
    ok &= _isolated(xy, flux, 1.5 * half, 0.002) & _isolated(xy, flux, 2.0 * fwhm, 0.0)
    if ok.sum() >= 5:
        med = np.median(size[ok])
        mad = 1.4826 * np.median(np.abs(size[ok] - med)) + 0.02 * med
        ok &= np.abs(size - med) < 3.0 * mad
    return sources[ok].sort_values("ap_snr", ascending=False).head(300)


def clean_stars(
    stars: pd.DataFrame, mask: np.ndarray, margin: int, *, bad: int, min_snr: float = 20.0, limit: int = 250
) -> tuple[np.ndarray, np.ndarray]:
    """Return positions of bright stars whose ``margin`` stamps are inside and free of ``bad`` bits.

    ``stars`` needs ``x``, ``y``; ``snr``, ``pixelFlags_saturated``, ``pixelFlags_edge`` and
    ``calib_astrometry_used`` (reference-matched, preferred when 20 or more) are used if present.
    At most ``limit`` stars, brightest first.
    """
    ok = np.ones(len(stars), bool)
    if "snr" in stars:
        ok &= stars["snr"].to_numpy() > min_snr
    for flag in ("pixelFlags_saturated", "pixelFlags_edge"):
        if flag in stars:
            ok &= ~stars[flag].to_numpy(dtype=bool)
    if "calib_astrometry_used" in stars and stars["calib_astrometry_used"][ok].sum() >= 20:
        ok &= stars["calib_astrometry_used"].to_numpy(dtype=bool)
    chosen = stars[ok].sort_values("snr", ascending=False) if "snr" in stars else stars[ok]
    x, y = chosen["x"].to_numpy(), chosen["y"].to_numpy()
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    inside = (ix >= margin) & (iy >= margin) & (ix < mask.shape[1] - margin) & (iy < mask.shape[0] - margin)
    x, y, ix, iy = x[inside], y[inside], ix[inside], iy[inside]
    clean = ~(cutout_stamps(mask, ix, iy, margin) & bad).any(axis=(1, 2)) if len(ix) else np.zeros(0, bool)
    return x[clean][:limit], y[clean][:limit]


def psf_at_sources(
    exposure: Exposure, sources: pd.DataFrame, *, like: PsfModel, mask: np.ndarray, step: str
) -> PsfModel:
    """Measure the PSF of another image (e.g. a warped template) at a calibration's stars.

    Uses the ``calib_psf_used`` stars of ``sources`` (isolated) when there are at
    least 5 with clean stamps in ``mask``, else the brightest clean ones; other
    sources (``snr`` given) are blanked.  The stamp size is that of ``like``.

    Raises
    ------
    TooFewStarsError
        If fewer than 5 usable stars remain (message starts with ``step``).
    """
    bad = int(MaskPlane.SAT | MaskPlane.BAD | MaskPlane.CR | MaskPlane.NO_DATA | MaskPlane.EDGE)
    x, y = clean_stars(sources, mask, like.half + 1, bad=bad)
    if "calib_psf_used" in sources and sources["calib_psf_used"].sum() >= 5:
        px, py = clean_stars(sources[sources["calib_psf_used"]], mask, like.half + 1, bad=bad)
        x, y = (px, py) if len(px) >= 5 else (x, y)
    neighbours = radius = None
    if "snr" in sources:
        neighbours = sources[["x", "y"]].to_numpy()
        radius = footprint_radius(np.abs(sources["snr"].to_numpy()), like.sigma)
    return measure_psf(
        exposure.image,
        exposure.variance,
        x,
        y,
        mask=mask,
        half=like.half,
        min_stars=5,
        neighbours=neighbours,
        neighbour_radius=radius,
        step=step,
    )


def _measure(exposure: Exposure, sources: pd.DataFrame, fwhm: float, ap_radius: float) -> pd.DataFrame:
    """Add aperture fluxes, saturation and edge flags to ``sources``."""
    x, y = sources["x"].to_numpy(), sources["y"].to_numpy()
    flux, err, flags = aperture_photometry(exposure.image, exposure.variance, exposure.mask, x, y, ap_radius)
    near = int(np.ceil(max(2.0 * fwhm, 3.0)))
    ix = np.clip(np.rint(x).astype(int), near, exposure.shape[1] - 1 - near)
    iy = np.clip(np.rint(y).astype(int), near, exposure.shape[0] - 1 - near)
    sat_sum = np.asarray((cutout_stamps(exposure.mask, ix, iy, near) & int(MaskPlane.SAT)).any(axis=(1, 2)))
    small = aperture_photometry(exposure.image, exposure.variance, exposure.mask, x, y, max(2.0 * fwhm, 3.0))
    edge = (x < ap_radius) | (y < ap_radius)
    edge |= (x > exposure.shape[1] - 1 - ap_radius) | (y > exposure.shape[0] - 1 - ap_radius)
    return sources.assign(
        ap_flux=flux,
        ap_flux_err=err,
        ap_snr=small[0] / np.maximum(small[1], 1e-30),
        saturated=sat_sum > 0,
        edge=edge | (flags & 16 > 0),
    )


def _check_refcat(refcat: pd.DataFrame | None, flux_column: str) -> pd.DataFrame:
    if refcat is None or len(refcat) == 0:
        raise TooFewStarsError("calibrate.astrometry", "reference catalogue is empty")
    missing = [c for c in ("ra", "dec", flux_column) if c not in refcat.columns]
    if missing:
        raise ScienceDataError("calibrate", f"reference catalogue lacks column(s) {', '.join(missing)}")
    return refcat.sort_values(flux_column, ascending=False, ignore_index=True)


def calibrate(
    exposure: Exposure,
    refcat: pd.DataFrame | None,
    wcs_guess: WCS,
    *,
    band: str,
    flux_column: str | None = None,
    detect_threshold: float = 5.0,
    ap_radius: float = 12.0,
    sip_degree: int = 2,
    max_offset_arcsec: float = 15.0,
    min_psf_stars: int = 5,
) -> CalibrationResult:
    """Calibrate one post-ISR exposure.

    Parameters
    ----------
    exposure : `workflow.science.exposure.Exposure`
        Output of ISR (image in electrons with sky); not modified.
    refcat : `pandas.DataFrame`
        Reference stars: ``ra``, ``dec`` (degrees) and ``flux_column`` (nJy).
    wcs_guess : `astropy.wcs.WCS`
        Approximate WCS from the pointing.
    band : `str`
        Band name, e.g. ``"r"``.
    flux_column : `str`, optional
        Reference flux column; ``"<band>_flux"`` by default.
    detect_threshold : `float`
        Detection threshold (pixel sigma).
    ap_radius : `float`
        Aperture radius in pixels for ``apFlux``.
    sip_degree : `int`
        SIP degree of the WCS fit.
    max_offset_arcsec : `float`
        Largest pointing error searched.
    min_psf_stars : `int`
        Fewest stars to model the PSF.

    Returns
    -------
    result : `CalibrationResult`
        Calibrated exposure, sources and astrometry details.

    Raises
    ------
    TooFewStarsError
        If detection, PSF, astrometry or photometry has too few stars.
    BadImageError
        If the image has no finite pixel.
    ScienceDataError
        If the reference catalogue lacks a needed column.
    """
    check_image(exposure.image, "calibrate", "image")
    refcat = _check_refcat(refcat, flux_column or f"{band}_flux")
    flux_column = flux_column or f"{band}_flux"
    out = exposure.copy()
    background = estimate_background(out.image, out.mask)
    out.image -= background
    sources, stars = _sources_and_psf(out, detect_threshold, ap_radius, min_psf_stars)
    good = sources[(sources["psf_snr"] > 10) & ~sources["saturated"]].sort_values("psf_flux", ascending=False)
    astrometry = fit_astrometry(
        good[["x", "y"]].to_numpy(),
        refcat["ra"].to_numpy(),
        refcat["dec"].to_numpy(),
        wcs_guess,
        out.shape,
        sip_degree=sip_degree,
        max_offset_arcsec=max_offset_arcsec,
    )
    out.wcs = astrometry.wcs
    matched = good.iloc[astrometry.source_index]
    zp, zp_err, n_zp = fit_zero_point(
        matched["psf_flux"].to_numpy(),
        matched["psf_flux_err"].to_numpy(),
        refcat[flux_column].to_numpy()[astrometry.ref_index],
    )
    out.zero_point = zp
    table = _source_table(sources, out, stars.index, matched.index)
    _record_metadata(out, background, astrometry, zp_err, n_zp, len(stars))
    assert out.psf is not None  # set by _sources_and_psf
    _log.info(
        "Calibrated: %d sources, FWHM %.2f px, astrometric rms %.1f mas (%d), zp %.3f (%d)",
        len(table),
        out.psf.fwhm,
        astrometry.rms_mas,
        astrometry.n_matched,
        zp,
        n_zp,
    )
    return CalibrationResult(exposure=out, sources=table, astrometry=astrometry)


def _sources_and_psf(
    out: Exposure, threshold: float, ap_radius: float, min_psf_stars: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Detect and measure sources, model the PSF (set on ``out``) and add PSF fluxes.

    Returns the sources and the PSF stars.
    """
    sources = detect_sources(out.image, out.variance, out.mask, threshold=threshold)
    if len(sources) < min_psf_stars:
        message = f"{len(sources)} source(s) detected, need {min_psf_stars}"
        raise TooFewStarsError("calibrate.detection", message)
    fwhm_guess = sources.attrs["fwhm_guess"]
    sources = _measure(out, sources, fwhm_guess, ap_radius)
    half = int(np.clip(np.ceil(3.0 * fwhm_guess), 8, 20))
    stars = select_psf_stars(sources, fwhm_guess, half)
    out.psf = measure_psf(
        out.image,
        out.variance,
        stars["x"].to_numpy(),
        stars["y"].to_numpy(),
        mask=out.mask,
        half=half,
        min_stars=min_psf_stars,
        neighbours=sources[["x", "y"]].to_numpy(),
        neighbour_radius=footprint_radius(sources["ap_snr"].to_numpy(), fwhm_guess / 2.3548),
    )
    x, y = sources["x"].to_numpy(), sources["y"].to_numpy()
    phot = psf_photometry(out.image, out.variance, out.psf, x, y, mask=out.mask)
    sources = sources.assign(psf_flux=phot["flux"].to_numpy(), psf_flux_err=phot["flux_err"].to_numpy())
    return sources.assign(psf_snr=sources["psf_flux"] / sources["psf_flux_err"]), stars


def _source_table(
    sources: pd.DataFrame, exposure: Exposure, psf_index: pd.Index, astrom_index: pd.Index
) -> pd.DataFrame:
    """Build the single-visit star table (fluxes in nJy)."""
    scale = exposure.njy_per_count
    assert exposure.wcs is not None  # fitted by calibrate
    ra, dec = exposure.wcs.all_pix2world(sources["x"].to_numpy(), sources["y"].to_numpy(), 0)
    return pd.DataFrame(
        {
            "sourceId": np.arange(len(sources), dtype=np.int64),
            "x": sources["x"].to_numpy(),
            "y": sources["y"].to_numpy(),
            "ra": ra,
            "dec": dec,
            "psfFlux": sources["psf_flux"].to_numpy() * scale,
            "psfFluxErr": sources["psf_flux_err"].to_numpy() * scale,
            "apFlux": sources["ap_flux"].to_numpy() * scale,
            "apFluxErr": sources["ap_flux_err"].to_numpy() * scale,
            "snr": sources["psf_snr"].to_numpy(),
            "pixelFlags_saturated": sources["saturated"].to_numpy(),
            "pixelFlags_edge": sources["edge"].to_numpy(),
            "calib_psf_used": sources.index.isin(psf_index),
            "calib_astrometry_used": sources.index.isin(astrom_index),
        }
    )


def _record_metadata(
    exposure: Exposure,
    background: np.ndarray,
    astrometry: AstrometryResult,
    zp_err: float,
    n_zp: int,
    n_psf: int,
) -> None:
    assert exposure.wcs is not None and exposure.psf is not None  # fitted by calibrate
    scale = float(np.mean(proj_plane_pixel_scales(exposure.wcs.celestial))) * 3600.0
    header = exposure.metadata
    header["FWHMPIX"] = (round(exposure.psf.fwhm, 4), "PSF FWHM at centre, pixels")
    header["SEEING"] = (round(exposure.psf.fwhm * scale, 4), "PSF FWHM at centre, arcsec")
    header["NPSFSTAR"] = (n_psf, "PSF candidate stars")
    header["SKYLEVEL"] = (float(np.median(background[::8, ::8])), "median sky, electrons/pixel")
    noise = float(np.sqrt(np.median(exposure.variance[::4, ::4])))
    header["SKYNOISE"] = (noise, "median pixel noise, electrons")
    header["ASTRMS"] = (round(astrometry.rms_mas, 2), "astrometric rms vs refcat, mas")
    header["NASTROM"] = (astrometry.n_matched, "astrometric matches")
    header["ZPERR"] = (zp_err, "zero-point standard error, mag")
    header["NPHOTCAL"] = (n_zp, "stars in zero point")
