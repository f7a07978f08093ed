"""ZOGY image differencing (Zackay, Ofek & Gal-Yam 2016), spatially constant PSFs.

With the template scaled to science photometric units (flux ratio 1) and
scalar noise levels ``s_n``, ``s_r``::

    D^ = (P_r^ N^ - P_n^ R^) / sqrt(s_n^2 |P_r^|^2 + s_r^2 |P_n^|^2)

has white unit-variance noise; a point source of flux ``a`` appears in it as
``a F_D P_D`` with ``F_D = 1 / sqrt(s_n^2 + s_r^2)``.  The output is ``D / F_D``
(science units) with PSF ``P_D``, so DIA measurement works on it unchanged.
"""

from __future__ import annotations

__all__ = ["flux_ratio_from_stars", "zogy_difference"]

import logging

import numpy as np
import scipy.fft as sfft
import sep

from .exposure import Exposure
from .photometry import BAD_PIXELS
from .psf import PsfModel

_log = logging.getLogger(__name__)


def flux_ratio_from_stars(
    science: Exposure, template: Exposure, x: np.ndarray, y: np.ndarray, radius: float
) -> float:
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


def _local_aperture(
    exposure: Exposure, x: np.ndarray, y: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
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


def _difference_psf(
    pn_hat: np.ndarray, pr_hat: np.ndarray, var_n: float, var_r: float, size: int
) -> np.ndarray:
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
    science : `workflow.exposure.Exposure`
        Calibrated science exposure with a PSF.
    template : `workflow.exposure.Exposure`
        Warped template on the same grid.
    template_psf : `workflow.psf.PsfModel`
        PSF of the warped template.
    flux_ratio : `float`
        Science counts per template count.

    Returns
    -------
    difference, variance : `numpy.ndarray`
        Difference image and variance plane (``var_n + ratio^2 var_r`` per pixel).
    psf : `workflow.psf.PsfModel`
        Constant PSF of the difference.
    """
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
