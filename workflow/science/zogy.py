"""ZOGY image differencing (Zackay, Ofek & Gal-Yam 2016), spatially constant PSFs.

With the template scaled to science photometric units (flux ratio 1) and
scalar noise levels ``s_n``, ``s_r``::

    D^ = (P_r^ N^ - P_n^ R^) / sqrt(s_n^2 |P_r^|^2 + s_r^2 |P_n^|^2)

has white unit-variance noise; a point source of flux ``a`` appears in it as
``a F_D P_D`` with ``F_D = 1 / sqrt(s_n^2 + s_r^2)``.  The output is ``D / F_D``
(science units) with PSF ``P_D``, so DIA measurement works on it unchanged.

`difference_exposure` turns the difference image of either method (this one
or Alard-Lupton, `workflow.science.subtract`) into an `Exposure`: masks, background,
variance rescaling, saturation halos and a systematic-error variance term.
"""

from __future__ import annotations

__all__ = ["flux_ratio_from_stars", "check_flux_ratio", "zogy_difference", "difference_exposure"]

import logging
from collections.abc import Callable

import numpy as np
import pandas as pd
import scipy.fft as sfft
import sep
from scipy import ndimage

from workflow.science.errors import NumericalFailureError
from workflow.science.exposure import Exposure
from workflow.science.masks import MaskPlane, grow_regions
from workflow.science.photometry import BAD_PIXELS, estimate_background, variance_scale
from workflow.science.psf import PsfModel

_log = logging.getLogger(__name__)

_FLUX_RATIO_FLOOR, _FLUX_RATIO_SIGMAS = 0.05, 5.0
"""A fitted flux ratio may differ from the zero points' by this fraction (the kernel sum's own
systematics) plus this many standard errors of the zero points and aperture corrections."""
_SYSTEMATIC_FRACTION, _REGISTRATION_PX = 0.005, 0.08
"""Subtraction systematics added to the difference variance (`_systematic_variance`)."""
_SAT_HALO_FWHM = 5.5
"""Pixels within this many PSF FWHM of saturated pixels are masked SUSPECT in the difference."""
_HALO_NOISE, _HALO_MIN_PEAK = 2.0, 300.0
"""Wings of stars peaking above ``_HALO_MIN_PEAK`` pixel-noise sigma are masked SUSPECT out to
where they fade below ``_HALO_NOISE`` sigma."""


def flux_ratio_from_stars(science: Exposure, template: Exposure, x: np.ndarray, y: np.ndarray, radius: float) -> float:
    """Return science counts per template count from aperture fluxes of stars.

    Falls back to the zero points when fewer than 3 stars are usable, and to 1.
    """
    fs, es = _local_aperture(science, x, y, radius)
    ft, et = _local_aperture(template, x, y, radius)
    good = (fs > 20 * es) & (ft > 20 * et)
    if good.sum() >= 3:
        ratio = float(np.median(fs[good] / ft[good]))
        for _ in range(3):  # weighted slope through the origin, 4-sigma clipped
            weight = 1.0 / (es**2 + ratio**2 * et**2)
            resid = (fs - ratio * ft) * np.sqrt(weight)
            use = good & (np.abs(resid) < 4.0 * 1.4826 * np.median(np.abs(resid[good])) + 1e-12)
            ratio = float((fs * ft * weight)[use].sum() / (ft * ft * weight)[use].sum())
        return ratio
    if science.zero_point is not None and template.zero_point is not None:
        return float(10 ** (0.4 * (science.zero_point - template.zero_point)))
    return 1.0


def _relative_scale_error(exposure: Exposure) -> float:
    """Relative standard error of an exposure's flux scale: zero point and aperture correction."""
    zp_err = float(exposure.metadata.get("ZPERR", 0.0) or 0.0)
    apcorr = float(exposure.metadata.get("APCORR", 1.0) or 1.0)
    apcorr_err = float(exposure.metadata.get("APCORERR", 0.0) or 0.0)
    return float(np.hypot(0.4 * np.log(10.0) * zp_err, apcorr_err / apcorr))


def check_flux_ratio(ratio: float, science: Exposure, template: Exposure) -> None:
    """Check a fitted flux ratio (science counts per template count) against the zero points.

    The zero points are those of total (aperture-corrected) fluxes, so their ratio is the
    expected kernel sum; the tolerance is `_FLUX_RATIO_FLOOR` plus `_FLUX_RATIO_SIGMAS`
    times the combined standard error of both exposures' zero points (``ZPERR``) and
    aperture corrections (``APCORR``, ``APCORERR``).

    Raises
    ------
    NumericalFailureError
        If they differ by more than the tolerance (a failed PSF-matching fit).
    """
    if science.zero_point is None or template.zero_point is None:
        return
    expected = 10 ** (0.4 * (science.zero_point - template.zero_point))
    sigma = float(np.hypot(_relative_scale_error(science), _relative_scale_error(template)))
    tolerance = _FLUX_RATIO_FLOOR + _FLUX_RATIO_SIGMAS * sigma
    if abs(ratio / expected - 1.0) > tolerance:
        message = f"fitted flux ratio {ratio:.4g} differs from the zero points' {expected:.4g}"
        detail = f"by {abs(ratio / expected - 1.0):.1%} (tolerance {tolerance:.1%}, scale error {sigma:.1%})"
        raise NumericalFailureError("subtract_images", f"{message} {detail}")


def _local_aperture(exposure: Exposure, x: np.ndarray, y: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Aperture fluxes with the local background (annulus) removed, and their errors."""
    ignore = (exposure.mask & BAD_PIXELS) != 0
    image = np.ascontiguousarray(exposure.image, dtype=np.float32)
    variance = np.ascontiguousarray(exposure.variance, dtype=np.float32)
    annulus = (radius + 2.0, radius + 8.0)
    flux, err, _ = sep.sum_circle(image, x, y, radius, var=variance, mask=ignore, bkgann=annulus)
    return flux, err


def _psf_hat(psf: PsfModel, shape: tuple[int, int], x: float, y: float) -> np.ndarray:
    """Fourier transform of the PSF at ``(x, y)`` placed at the origin of a ``shape`` grid."""
    stamp = psf.image_at(x, y).astype(np.float32)
    half = stamp.shape[0] // 2
    grid = np.zeros(shape, np.float32)
    grid[: half + 1, : half + 1] = stamp[half:, half:]
    grid[: half + 1, -half:] = stamp[half:, :half]
    grid[-half:, : half + 1] = stamp[:half, half:]
    grid[-half:, -half:] = stamp[:half, :half]
    return sfft.rfft2(grid, workers=1)


def _difference_psf(pn_hat: np.ndarray, pr_hat: np.ndarray, var_n: float, var_r: float, size: int) -> np.ndarray:
    """Return the normalised PSF of the ZOGY difference on a ``size`` x ``size`` stamp."""
    denom = np.sqrt(var_n * np.abs(pr_hat) ** 2 + var_r * np.abs(pn_hat) ** 2) + 1e-12
    pd_hat = pr_hat * pn_hat * np.sqrt(var_n + var_r) / denom
    stamp = np.fft.fftshift(np.fft.irfft2(pd_hat, s=(size, size)))
    return stamp / stamp.sum()


def zogy_difference(
    science: Exposure, template: Exposure, template_psf: PsfModel, flux_ratio: float
) -> tuple[np.ndarray, np.ndarray, PsfModel]:
    """Return the ZOGY difference image, its variance and PSF, in science units.

    Parameters
    ----------
    science : `workflow.science.exposure.Exposure`
        Calibrated science exposure with a PSF.
    template : `workflow.science.exposure.Exposure`
        Warped template on the same grid.
    template_psf : `workflow.science.psf.PsfModel`
        PSF of the warped template.
    flux_ratio : `float`
        Science counts per template count.

    Returns
    -------
    difference, variance : `numpy.ndarray`
        Difference image and variance plane (``var_n + ratio^2 var_r`` per pixel).
    psf : `workflow.science.psf.PsfModel`
        Constant PSF of the difference.
    """
    assert science.psf is not None, "ZOGY needs the science PSF"
    shape = science.shape
    cx, cy = (shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0
    ref = template.image * np.float32(flux_ratio)
    ref_var = template.variance * np.float32(flux_ratio**2)
    var_n, var_r = float(np.median(science.variance[::4, ::4])), float(np.median(ref_var[::4, ::4]))
    pn_hat = _psf_hat(science.psf, shape, cx, cy)
    pr_hat = _psf_hat(template_psf, shape, cx, cy)
    denom = np.sqrt(var_n * np.abs(pr_hat) ** 2 + var_r * np.abs(pn_hat) ** 2) + np.float32(1e-12)
    d_hat = pr_hat * sfft.rfft2(science.image, workers=1) - pn_hat * sfft.rfft2(ref, workers=1)
    d_hat *= np.float32(np.sqrt(var_n + var_r)) / denom
    diff = sfft.irfft2(d_hat, s=shape, workers=1).astype(np.float32)
    diff -= np.float32(np.median(diff[::4, ::4]))  # differential background (science sky residual)
    size = max(science.psf.size, template_psf.size) + 8
    small_n = np.fft.rfft2(np.fft.ifftshift(_pad(science.psf.image_at(cx, cy), size)))
    small_r = np.fft.rfft2(np.fft.ifftshift(_pad(template_psf.image_at(cx, cy), size)))
    stamp = _difference_psf(small_n, small_r, var_n, var_r, size)
    _log.debug("ZOGY: ratio %.4f, noise %.2f / %.2f", flux_ratio, np.sqrt(var_n), np.sqrt(var_r))
    return diff, science.variance + ref_var, PsfModel(coeffs=stamp[None])


def _pad(stamp: np.ndarray, size: int) -> np.ndarray:
    """Centre-pad or crop an odd stamp to ``size``."""
    out = np.zeros((size, size))
    half, h = size // 2, stamp.shape[0] // 2
    r = min(half, h)
    out[half - r : half + r + 1, half - r : half + r + 1] = stamp[h - r : h + r + 1, h - r : h + r + 1]
    return out


def difference_exposure(
    science: Exposure,
    template: Exposure,
    diff: np.ndarray,
    var: np.ndarray,
    psf: PsfModel,
    grow: int,
    stars: pd.DataFrame | None = None,
) -> Exposure:
    """Assemble a difference exposure from either method's difference image and variance.

    The masks are combined (template NO_DATA grown by ``grow``, the border of
    width ``grow`` marked EDGE; pixels near saturation and the wings of bright
    ``stars`` SUSPECT, see `_bright_star_halos`), NO_DATA pixels zeroed, a smooth
    background (residual sky offsets) subtracted, the variance plane rescaled to
    the measured noise, and subtraction systematics on bright sources added to it
    (`_systematic_variance`).

    Parameters
    ----------
    science, template : `workflow.science.exposure.Exposure`
        Calibrated science exposure and warped template.
    diff, var : `numpy.ndarray`
        Difference image and variance in science units (modified in place).
    psf : `workflow.science.psf.PsfModel`
        PSF of the difference.
    grow : `int`
        Kernel half width: border and template NO_DATA growth.
    stars : `pandas.DataFrame`, optional
        Calibration sources (``x``, ``y``, ``psfFlux``, ``calib_astrometry_used``).

    Returns
    -------
    difference : `workflow.science.exposure.Exposure`
        With the science WCS, zero point and metadata, and ``psf``.
    """
    mask = _difference_mask(science, template, grow)
    saturated = (mask & int(MaskPlane.SAT)) != 0
    if saturated.any():  # PSF-wing mismatch leaves residuals around saturated stars
        assert science.psf is not None, "a calibrated science exposure has a PSF"
        halo = _saturation_halo(science.psf.fwhm)
        mask[grow_regions(saturated, halo) & ~saturated] |= MaskPlane.SUSPECT
    _bright_star_halos(mask, science, stars)
    diff[(mask & int(MaskPlane.NO_DATA)) != 0] = 0.0
    diff -= estimate_background(diff, mask, box=256)  # residual sky offsets bias the S/N map
    # Again without significant pixels of either sign: a clipped mean (unbiased under Poisson
    # sky, unlike a mode) is pulled up by the faint wings of positive residuals otherwise.
    diff -= estimate_background(diff, mask, box=256, ignore=_significant(diff, var, psf.fwhm))
    scale = variance_scale(diff, var, mask)
    var *= np.float32(scale)
    var += _systematic_variance(science.image)
    out = Exposure(
        image=diff,
        mask=mask,
        variance=var,
        wcs=science.wcs,
        psf=psf,
        zero_point=science.zero_point,
        metadata=science.metadata.copy(),
    )
    out.metadata["VARSCALE"] = (round(scale, 4), "empirical variance-plane rescaling")
    return out


def _significant(diff: np.ndarray, var: np.ndarray, fwhm: float) -> np.ndarray:
    """Return pixels near 3x3-smoothed values beyond 3 sigma of either sign, grown by one FWHM.

    Both signs are left out alike, so the noise that remains stays symmetric.
    """
    smooth = ndimage.uniform_filter(diff, size=3)
    noise = np.sqrt(np.maximum(ndimage.uniform_filter(var, size=3), np.float32(1e-12))) / np.float32(3.0)
    beyond = (np.abs(smooth) > np.float32(3.0) * noise).view(np.uint8)
    return ndimage.maximum_filter(beyond, size=2 * int(np.ceil(fwhm)) + 1) > 0


def _saturation_halo(fwhm: float) -> Callable[[tuple[slice, slice]], float]:
    """Return the SUSPECT radius around a saturated region (given its bounding box).

    Brighter stars saturate wider cores and show wing residuals further out: the
    radius where a core+wing PSF falls to a fixed level grows like 2.5 times the
    saturated core radius (half the region's width; bleed trails run along columns).
    """

    def radius(box: tuple[slice, slice]) -> float:
        core = 0.5 * (box[1].stop - box[1].start)
        return float(np.hypot(2.5 * core, _SAT_HALO_FWHM * fwhm))

    return radius


def _psf_profile(psf: PsfModel) -> np.ndarray:
    """Return the PSF's highest pixel value at each integer radius out to the stamp edge, non-increasing."""
    stamp = psf.image_at(*psf.center)
    yy, xx = np.indices(stamp.shape) - psf.half
    radius = np.minimum(np.rint(np.hypot(xx, yy)).astype(int), psf.half)
    profile = np.zeros(psf.half + 1)
    np.maximum.at(profile, radius.ravel(), stamp.ravel())
    return np.minimum.accumulate(profile)


def _bright_star_halos(mask: np.ndarray, science: Exposure, stars: pd.DataFrame | None) -> None:
    """Mark SUSPECT the wings of bright reference stars, in place.

    Seeing changes the PSF's core and wings differently, which no matching
    kernel fully follows: bright stars leave rings in the difference.  For each
    star matched to the reference catalogue (``calib_astrometry_used``) whose
    peak exceeds `_HALO_MIN_PEAK` times the pixel noise, the
    annulus from half a FWHM (variables at the centre stay detectable) to the
    radius where its profile fades below `_HALO_NOISE` times the pixel noise (at
    most the PSF stamp's half width) is masked.
    """
    if stars is None or len(stars) == 0 or "psfFlux" not in stars or science.zero_point is None:
        return
    chosen = stars[stars["calib_astrometry_used"]] if "calib_astrometry_used" in stars else stars
    counts = chosen["psfFlux"].to_numpy() / science.njy_per_count
    noise = float(np.sqrt(np.median(science.variance[::4, ::4])))
    assert science.psf is not None, "a calibrated science exposure has a PSF"
    profile, r_in = _psf_profile(science.psf), 0.5 * science.psf.fwhm
    outer = np.array([np.flatnonzero(c * profile > _HALO_NOISE * noise).max(initial=0) for c in counts])
    outer[counts * profile[0] < _HALO_MIN_PEAK * noise] = 0
    ny, nx = mask.shape
    for x, y, r_out in zip(chosen["x"].to_numpy(), chosen["y"].to_numpy(), outer, strict=False):
        if r_out <= r_in + 1:
            continue
        x0, x1 = max(int(x - r_out), 0), min(int(x + r_out) + 2, nx)
        y0, y1 = max(int(y - r_out), 0), min(int(y + r_out) + 2, ny)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        distance = np.hypot(xx - x, yy - y)
        mask[y0:y1, x0:x1][(distance >= r_in) & (distance <= r_out)] |= MaskPlane.SUSPECT


def _systematic_variance(image: np.ndarray) -> np.ndarray:
    """Return the variance of subtraction systematics on bright sources (science units squared).

    ``(f I)**2 + (d |grad I|)**2`` with ``f`` = `_SYSTEMATIC_FRACTION` (PSF-matching
    residual) and ``d`` = `_REGISTRATION_PX` (registration error), like ZOGY's
    astrometric-noise term: it keeps the residuals of very bright stars (dipoles,
    rings) below the detection threshold and is negligible on faint sources and sky.
    """
    positive = np.maximum(image, np.float32(0.0))
    grad_y, grad_x = np.gradient(positive)
    out = grad_x * grad_x
    out += grad_y * grad_y
    out *= np.float32(_REGISTRATION_PX**2)
    out += np.float32(_SYSTEMATIC_FRACTION**2) * positive * positive
    return out


def _difference_mask(science: Exposure, template: Exposure, grow: int) -> np.ndarray:
    """OR the masks; grow template NO_DATA by the kernel size; mark the FFT-wrapped border EDGE."""
    nodata = (template.mask & int(MaskPlane.NO_DATA)) != 0
    if nodata.any():
        nodata = ndimage.maximum_filter(nodata.view(np.uint8), size=2 * grow + 1) > 0
    mask = science.mask | (template.mask & ~int(MaskPlane.EDGE))
    mask[nodata] |= MaskPlane.NO_DATA
    edge = np.ones(mask.shape, bool)
    edge[grow:-grow, grow:-grow] = False
    mask[edge] |= MaskPlane.EDGE
    return mask
