"""Single-frame calibration: background, PSF, sources, astrometry, zero point.

`calibrate` turns a post-ISR `Exposure` into a background-subtracted,
calibrated exposure (WCS, PSF, zero point) plus a source table whose fluxes
are in nJy.  Each sub-step raises `TooFewStarsError` naming itself
(``calibrate.detection``, ``calibrate.psf``, ``calibrate.astrometry``,
``calibrate.photometry``) when the image has too few usable stars.
"""

from __future__ import annotations

__all__ = [
    "CalibrationResult",
    "aperture_correction",
    "calibrate",
    "select_psf_stars",
    "clean_stars",
    "psf_at_sources",
]

import dataclasses
import logging

import numpy as np
import pandas as pd
from astropy.stats import sigma_clipped_stats
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales
from scipy import ndimage
from scipy.spatial import cKDTree

from workflow.science.astrometry import AstrometryResult, fit_astrometry
from workflow.science.errors import ScienceDataError, TooFewStarsError, check_image
from workflow.science.exposure import Exposure
from workflow.science.masks import MaskPlane
from workflow.science.photometry import (
    BAD_PIXELS,
    aperture_photometry,
    detect_sources,
    estimate_background,
    fit_zero_point,
    psf_photometry,
    source_footprints,
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


_ISOLATION_TIERS = ((0.002, 0.0), (0.05, 0.01), (np.inf, 0.01))
"""(wing contrast within 1.5 stamp half-widths, core contrast within 2 FWHM) of the PSF-star
isolation cut: strict first, relaxed when the strict one leaves too few stars (the PSF fit
blanks neighbours' pixels, so a neighbour in the wings costs little; one in the core, a
blend, is never accepted)."""
_SNR_TIERS = (1.0, 0.5, 1.0 / 3.0)
"""Fractions of ``min_snr`` tried in turn when too few stars pass."""


def _stellar_locus(concentration: np.ndarray, size: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Return which sources lie on the stellar locus of concentration and size.

    Point sources are the most concentrated (galaxies spread their light; cosmic rays
    are masked before calibration): the locus is the median concentration of the most
    concentrated third of the candidates, and a star lies within 0.1 (or 3 robust sigma)
    of it; sizes then within 3 robust sigma (plus 5%) of the stars' median.
    """
    ok = candidates & np.isfinite(concentration)
    if ok.sum() < 3:
        return ok
    values = np.sort(concentration[ok])[::-1]
    top = values[: max(3, len(values) // 3)]
    locus = float(np.median(top))
    width = max(0.1, 3.0 * 1.4826 * float(np.median(np.abs(top - locus))))
    ok &= np.abs(concentration - locus) < width
    if ok.sum() >= 3:
        med = float(np.median(size[ok]))
        mad = 1.4826 * float(np.median(np.abs(size[ok] - med))) + 0.05 * med
        ok &= np.abs(size - med) < 3.0 * mad
    return ok


def select_psf_stars(
    sources: pd.DataFrame, fwhm: float, half: int, *, min_snr: float = 30.0, min_stars: int = 5
) -> pd.DataFrame:
    """Return bright, star-like, isolated, unsaturated sources whose stamps fit in the image.

    Galaxies and blends are rejected by the stellar locus (`_stellar_locus`: light
    concentration ``conc`` and size) and by sep's blend flags; isolation
    (`_ISOLATION_TIERS`) and the S/N cut (`_SNR_TIERS`) are relaxed in turn until at
    least ``2 min_stars`` stars pass (small fields hold few bright stars).
    ``sources`` needs ``x``, ``y``, ``flux``, ``a``, ``b``, ``sep_flags``, ``ap_snr``,
    ``saturated`` and ``conc``; at most the 300 brightest are kept.  The returned frame's
    ``attrs["cuts"]`` counts the sources passing each cut (for error messages).
    """
    xy = sources[["x", "y"]].to_numpy()
    flux = np.maximum(sources["flux"].to_numpy(), 1e-12)
    size = np.sqrt(sources["a"].to_numpy() * sources["b"].to_numpy())
    shape_x, shape_y = sources.attrs.get("shape", (np.inf, np.inf))[::-1]
    inside = (xy[:, 0] >= half) & (xy[:, 1] >= half) & (xy[:, 0] < shape_x - half) & (xy[:, 1] < shape_y - half)
    clean = ~sources["saturated"].to_numpy() & inside
    blended = (sources["sep_flags"].to_numpy() & 2) != 0
    best, cuts = sources.iloc[:0], {}
    for snr_factor in _SNR_TIERS:
        bright = clean & (sources["ap_snr"].to_numpy() > snr_factor * min_snr)
        star = _stellar_locus(sources["conc"].to_numpy(), size, bright) & ~blended
        for wing, core in _ISOLATION_TIERS:
            ok = star & _isolated(xy, flux, 1.5 * half, wing) & _isolated(xy, flux, 2.0 * fwhm, core)
            chosen = sources[ok].sort_values("ap_snr", ascending=False).head(300)
            if len(chosen) > len(best):
                best = chosen
                cuts = {
                    f"S/N > {snr_factor * min_snr:g}": int(bright.sum()),
                    "star-like, unblended": int(star.sum()),
                    "isolated": int(ok.sum()),
                }
            if len(best) >= 2 * min_stars:
                break
        if len(best) >= 2 * min_stars:
            break
    best = best.copy()
    best.attrs["cuts"] = {"detected": len(sources), "unsaturated, stamp inside": int(clean.sum()), **cuts}
    return best


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
    core = aperture_photometry(exposure.image, exposure.variance, exposure.mask, x, y, max(0.6 * fwhm, 1.5))
    edge = (x < ap_radius) | (y < ap_radius)
    edge |= (x > exposure.shape[1] - 1 - ap_radius) | (y > exposure.shape[0] - 1 - ap_radius)
    return sources.assign(
        ap_flux=flux,
        ap_flux_err=err,
        ap_snr=small[0] / np.maximum(small[1], 1e-30),
        saturated=sat_sum > 0,
        edge=edge | (flags & 16 > 0),
        conc=core[0] / np.where(small[0] > 0, small[0], np.nan),
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


def _half_max_fwhm(exposure: Exposure, sources: pd.DataFrame, *, reach: int = 12, count: int = 40) -> float | None:
    """Return the FWHM (pixels) of the narrowest third of bright sources, from their half-maximum area.

    sep's second moments of bright stars include their wings down to the detection
    isophote (on DECam they gave 1.4x the seeing), which sets too large PSF stamps and
    isolation radii.  The area above half the peak of a 4x-upsampled cutout sees only the
    core; galaxies are wider, so the lower third of the ``count`` brightest unflagged,
    unmasked sources is taken.  `None` with fewer than 3 such sources.
    """
    noise = float(np.sqrt(max(np.median(exposure.variance[::4, ::4]), 1e-12)))
    ny, nx = exposure.shape
    x, y = np.rint(sources["x"].to_numpy()).astype(int), np.rint(sources["y"].to_numpy()).astype(int)
    ok = (sources["sep_flags"].to_numpy() == 0) & (sources["peak"].to_numpy() > 20.0 * noise)
    ok &= (x >= reach) & (y >= reach) & (x < nx - reach) & (y < ny - reach)
    order = np.argsort(-sources["peak"].to_numpy()[ok])[:count]
    x, y = x[ok][order], y[ok][order]
    if len(x) == 0:
        return None
    stamps = cutout_stamps(exposure.image, x, y, reach).astype(float)
    clean = ~(cutout_stamps(exposure.mask, x, y, reach) & int(BAD_PIXELS)).any(axis=(1, 2))
    widths = []
    for stamp in stamps[clean]:
        fine = ndimage.zoom(stamp, 4, order=3)
        widths.append(2.0 * np.sqrt(np.count_nonzero(fine > 0.5 * fine.max()) / 16.0 / np.pi))
    if len(widths) < 3:
        return None
    return float(np.quantile(widths, 1.0 / 3.0))


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
    fwhm_guess = _half_max_fwhm(out, sources) or sources.attrs["fwhm_guess"]
    # Second background pass with the sources' footprints left out: a clipped mean
    # over pixels that still hold faint wings would over-subtract the sky.
    noise = float(np.sqrt(max(np.median(out.variance[::4, ::4]), 1e-12)))
    footprints = source_footprints(out.shape, sources, fwhm_guess / 2.3548, noise)
    out.image -= estimate_background(out.image, out.mask, ignore=footprints)
    sources = _measure(out, sources, fwhm_guess, ap_radius)
    half = int(np.clip(np.ceil(3.0 * fwhm_guess), 8, 20))
    sources.attrs["shape"] = out.shape
    stars = select_psf_stars(sources, fwhm_guess, half, min_stars=min_psf_stars)
    if len(stars) < min_psf_stars:
        cuts = ", ".join(f"{name}: {count}" for name, count in stars.attrs["cuts"].items())
        message = f"{len(stars)} PSF star(s) pass the selection ({cuts}), need at least {min_psf_stars}"
        raise TooFewStarsError("calibrate.psf", message)
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
    flux, flux_err = phot["flux"].to_numpy(), phot["flux_err"].to_numpy()
    used = sources.index.isin(stars.index)
    # The correcting aperture holds at least the PSF stamp (a smaller one would lose flux).
    radius = max(ap_radius, 1.5 * out.psf.half)
    total, _, _ = aperture_photometry(out.image, out.variance, out.mask, x[used], y[used], radius)
    apcorr, apcorr_err = aperture_correction(total, flux[used], flux_err[used])
    out.metadata["APCORR"] = (round(apcorr, 5), "PSF flux to total (aperture) flux")
    out.metadata["APCORERR"] = (round(apcorr_err, 5), "aperture correction standard error")
    sources = sources.assign(psf_flux=flux * apcorr, psf_flux_err=flux_err * apcorr)
    return sources.assign(psf_snr=sources["psf_flux"] / sources["psf_flux_err"]), stars


def aperture_correction(ap_flux: np.ndarray, psf_flux: np.ndarray, psf_flux_err: np.ndarray) -> tuple[float, float]:
    """Return the factor that turns PSF-stamp fluxes into aperture (total) fluxes, and its error.

    The PSF model sums to 1 over its stamp, which holds only part of a PSF with wings
    (a 17x17 stamp held 88% of a space-telescope PSF): the sigma-clipped median of
    ``ap_flux / psf_flux`` over PSF stars (S/N > 20), ``ap_flux`` in an aperture at least
    as wide as the stamp, corrects that, as Rubin's
    aperture correction does.  1 (error 0) with fewer than 3 such stars or an
    implausible value (outside 0.7-1.5).
    """
    good = (psf_flux > 20.0 * psf_flux_err) & np.isfinite(ap_flux) & (ap_flux > 0)
    if good.sum() < 3:
        return 1.0, 0.0
    ratio = ap_flux[good] / psf_flux[good]
    _, median, std = sigma_clipped_stats(ratio, sigma=3.0, maxiters=5)
    if not 0.7 < median < 1.5:
        _log.warning("Implausible aperture correction %.3f from %d stars: not applied", median, good.sum())
        return 1.0, 0.0
    return float(median), float(1.2533 * std / np.sqrt(good.sum()))


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
