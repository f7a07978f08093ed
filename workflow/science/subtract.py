"""Image differencing: Alard-Lupton PSF matching with decorrelation, or ZOGY.

Alard-Lupton: a kernel of Gaussian x polynomial bases (widths from the PSF
width difference, one broad enough for the PSF wings), with coefficients
varying as a low-order polynomial over the image (constant kernel sum;
constant kernel when stamps are few), is fitted on star stamps so that
``target ~ kernel (*) source + background``; the sharper image is the source.
Stamps are clipped only when their residual is an outlier for their flux, so
the bright stars that constrain the wings stay in.  The difference is
whitened with Rubin's decorrelation afterburner (Reiss & Lupton 2016),
``phi(k) = sqrt((s_t^2 + kbar^2 s_s^2) / (s_t^2 + s_s^2 |kappa(k)|^2))``, all in
one zero-padded Fourier pass.  A flux ratio (kernel sum) that contradicts
the zero points raises `NumericalFailureError`.  ``method="zogy"`` uses `workflow.science.zogy`
instead; both end in `workflow.science.zogy.difference_exposure` (masks, background,
variance, bright-star halos).
"""

from __future__ import annotations

__all__ = [
    "MatchingKernel",
    "SubtractionResult",
    "alard_lupton_basis",
    "fit_matching_kernel",
    "subtract_images",
]

import dataclasses
import logging

import numpy as np
import pandas as pd
import scipy.fft as sfft
from scipy.signal import fftconvolve

from workflow.science.calibrate import clean_stars, psf_at_sources
from workflow.science.errors import BadImageError, NumericalFailureError, ScienceDataError, TooFewStarsError
from workflow.science.exposure import Exposure
from workflow.science.masks import MaskPlane
from workflow.science.photometry import BAD_PIXELS, detect_sources, fft_shape
from workflow.science.psf import PsfModel, cutout_stamps, embed_at_origin, poly_terms
from workflow.science.zogy import check_flux_ratio, difference_exposure, flux_ratio_from_stars, zogy_difference

_log = logging.getLogger(__name__)

_STEP = "subtract_images"
_NO_STAMP = BAD_PIXELS | int(MaskPlane.EDGE)
_BASIS_SCALES, _BASIS_DEGREES = (0.5, 1.0, 2.0, 4.0), (4, 2, 2, 0)
"""Alard-Lupton basis: Gaussian widths in units of the matching width, and polynomial degrees."""
_MIN_MATCH_SIGMA, _MAX_KERNEL_HALF = 0.6, 15
_MIN_STAMPS_SPATIAL = 60
"""Fewer kernel stamps than this: the kernel varies only if it predicts left-out stamps better."""
_CLIP_FRACTION = 0.02
"""Fraction of a kernel stamp's pixel values added to its noise when clipping outlier stamps."""


def alard_lupton_basis(sigmas: tuple[float, ...], degrees: tuple[int, ...], half: int) -> np.ndarray:
    """Return Gaussian x polynomial basis kernels, shape (nbasis, 2 half + 1, 2 half + 1).

    Basis 0 (the first Gaussian, degree 0) sums to 1; all others are made to
    sum to 0 by subtracting a multiple of basis 0, so that only basis 0 sets
    the photometric scale.  Each is scaled to unit L2 norm (basis 0 excepted).
    """
    v, u = np.mgrid[-half : half + 1, -half : half + 1].astype(float)
    kernels = []
    for sigma, degree in zip(sigmas, degrees, strict=False):
        gauss = np.exp(-(u**2 + v**2) / (2.0 * sigma**2))
        for d in range(degree + 1):
            for i in range(d, -1, -1):
                kernels.append(gauss * (u / half) ** i * (v / half) ** (d - i))
    basis = np.array(kernels)
    basis[0] /= basis[0].sum()
    for k in range(1, len(basis)):
        basis[k] -= basis[0] * basis[k].sum()
        basis[k] /= np.sqrt((basis[k] ** 2).sum())
    return basis


@dataclasses.dataclass(frozen=True, kw_only=True)
class MatchingKernel:
    """A fitted, spatially varying matching kernel plus a background polynomial."""

    basis: np.ndarray
    coeffs: np.ndarray
    kc: np.ndarray
    sc: np.ndarray
    spatial_order: int
    center: tuple[float, float]
    scale: tuple[float, float]
    n_stamps: int

    def spatial_kernels(self) -> np.ndarray:
        """Return one kernel image per spatial polynomial term, shape (nterm, K, K)."""
        nterm = (self.spatial_order + 1) * (self.spatial_order + 2) // 2
        out = np.zeros((nterm,) + self.basis.shape[1:])
        for a, k, s in zip(self.coeffs, self.kc, self.sc, strict=False):
            if k < len(self.basis):
                out[s] += a * self.basis[k]
        return out

    def background_coeffs(self) -> np.ndarray:
        """Return the background polynomial coefficients (spatial-term order)."""
        bg = self.kc == len(self.basis)
        return self.coeffs[bg][np.argsort(self.sc[bg])]

    @property
    def kernel_sum(self) -> float:
        """Photometric scale of the kernel, constant over the image (`float`)."""
        return float(self.spatial_kernels()[0].sum())


def _stamp_system(
    source: np.ndarray,
    target: np.ndarray,
    variance: np.ndarray,
    ix: np.ndarray,
    iy: np.ndarray,
    basis: np.ndarray,
    stamp_half: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Convolve source stamps with every basis; return C (n, nb+1, P), targets and weights (n,)."""
    kh = basis.shape[-1] // 2
    src = cutout_stamps(source, ix, iy, stamp_half + kh).astype(float)
    size = src.shape[-1]
    src_hat = sfft.rfft2(src, workers=1)
    basis_hat = sfft.rfft2(basis, s=(size, size), workers=1)
    full = sfft.irfft2(src_hat[:, None] * basis_hat[None], s=(size, size), workers=1)
    conv = full[..., 2 * kh :, 2 * kh :]  # circular wrap only touches the discarded border
    n = len(ix)
    conv = conv.reshape(n, len(basis), -1)
    conv = np.concatenate([conv, np.ones((n, 1, conv.shape[-1]))], axis=1)  # background column
    tgt = cutout_stamps(target, ix, iy, stamp_half).reshape(n, -1).astype(float)
    # One weight per stamp: per-pixel weights from a data-derived variance bias the fit low.
    stamp_var = np.median(cutout_stamps(variance, ix, iy, stamp_half).reshape(n, -1), axis=1)
    return conv, tgt, 1.0 / np.maximum(stamp_var.astype(float), 1e-6)


def _coefficient_layout(nb: int, spatial_order: int, bg_order: int) -> tuple[np.ndarray, np.ndarray]:
    """Return, per fitted coefficient, its basis index (``nb`` = background) and spatial term."""
    nterm = (spatial_order + 1) * (spatial_order + 2) // 2
    nbg = (bg_order + 1) * (bg_order + 2) // 2
    kc = np.array([0] + [k for k in range(1, nb) for _ in range(nterm)] + [nb] * nbg)
    sc = np.array([0] + [s for _ in range(1, nb) for s in range(nterm)] + list(range(nbg)))
    return kc, sc


@dataclasses.dataclass(frozen=True, kw_only=True)
class _KernelSystem:
    """Per-stamp normal equations of the kernel fit (``q``, ``r``) and what evaluates residuals."""

    conv: np.ndarray
    tgt: np.ndarray
    weight: np.ndarray
    q: np.ndarray
    r: np.ndarray
    terms: np.ndarray
    nb: int

    def parts(self, kc: np.ndarray, sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return every stamp's normal matrix and right-hand side, shapes (n, c, c) and (n, c)."""
        tq = self.terms[:, sc]
        normal = np.einsum("ncd,nc,nd->ncd", self.q[:, kc][:, :, kc], tq, tq)
        return normal, self.r[:, kc] * tq

    def solve(
        self, kc: np.ndarray, sc: np.ndarray, use: np.ndarray, parts: tuple[np.ndarray, np.ndarray] | None = None
    ) -> np.ndarray:
        """Return the coefficients fitted on the ``use`` stamps (``parts`` from `parts`, if computed).

        Raises
        ------
        NumericalFailureError
            If the normal equations are singular.
        """
        normal_parts, rhs_parts = parts if parts is not None else self.parts(kc, sc)
        normal, rhs = normal_parts[use].sum(axis=0), rhs_parts[use].sum(axis=0)
        normal += np.eye(len(kc)) * 1e-9 * np.trace(normal) / len(kc)
        try:
            return np.linalg.solve(normal, rhs)
        except np.linalg.LinAlgError as exc:
            raise NumericalFailureError(_STEP, f"singular kernel fit on {int(use.sum())} stamps") from exc

    def chi(self, kc: np.ndarray, sc: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
        """Return every stamp's mean squared residual, relative to noise plus a fraction of the star.

        Bright stars (which constrain the kernel wings) are then clipped only when their
        residual is an outlier for their flux.
        """
        alpha = np.zeros((len(self.tgt), self.nb + 1))
        for c, (k, s) in enumerate(zip(kc, sc, strict=False)):
            alpha[:, k] += coeffs[c] * self.terms[:, s]
        model = np.einsum("nk,nkp->np", alpha, self.conv)
        noise = 1.0 / self.weight[:, None] + (_CLIP_FRACTION * self.tgt) ** 2
        return np.asarray(((self.tgt - model) ** 2 / noise).mean(axis=1))


def _choose_spatial_order(system: _KernelSystem, spatial_order: int, bg_order: int) -> int:
    """Return ``spatial_order`` if it predicts left-out stamps better than a constant kernel, else 0.

    With few stamps a varying kernel may fit noise, yet on real data (differential
    distortion, PSF variation) a constant one leaves dipoles at bright stars: each
    stamp's residual is predicted from a fit to all the others (leave-one-out), and the
    varying kernel is kept when its median predicted residual is lower.
    """
    n = len(system.tgt)
    nterm = (spatial_order + 1) * (spatial_order + 2) // 2
    if n < 3 * nterm:
        return 0
    scores = {}
    for order in (0, spatial_order):
        kc, sc = _coefficient_layout(system.nb, order, bg_order)
        parts, left_out = system.parts(kc, sc), np.empty(n)
        for i in range(n):
            left_out[i] = system.chi(kc, sc, system.solve(kc, sc, np.arange(n) != i, parts))[i]
        scores[order] = float(np.median(left_out))
    chosen = spatial_order if scores[spatial_order] < scores[0] else 0
    _log.debug("Kernel spatial order %d from %d stamps (leave-one-out chi2 %s)", chosen, n, scores)
    return chosen


def fit_matching_kernel(
    source: np.ndarray,
    target: np.ndarray,
    variance: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    basis: np.ndarray,
    *,
    spatial_order: int = 1,
    bg_order: int = 1,
    stamp_half: int = 10,
    min_stamps: int = 5,
) -> MatchingKernel:
    """Fit ``target ~ K (*) source + bg`` on stamps at ``(x, y)`` with clipping.

    Parameters
    ----------
    source, target, variance : `numpy.ndarray`
        Image to convolve, image to match, and the variance of the fit residual.
    x, y : `numpy.ndarray`
        Stamp centres (bright stars), all at least ``stamp_half + kernel half`` from the edges.
    basis : `numpy.ndarray`
        Kernel basis from `alard_lupton_basis`.
    spatial_order, bg_order : `int`
        Polynomial orders of the kernel variation and of the background; with fewer
        than `_MIN_STAMPS_SPATIAL` stamps the kernel varies only if that predicts
        left-out stamps better (`_choose_spatial_order`).
    stamp_half : `int`
        Half side of the fitted target stamps.
    min_stamps : `int`
        Fewest stamps accepted after clipping.

    Returns
    -------
    kernel : `MatchingKernel`
        The fit.

    Raises
    ------
    TooFewStarsError
        If fewer than ``min_stamps`` stamps are available or survive clipping.
    """
    shape = source.shape
    center, scale = ((shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0), (shape[1] / 2.0, shape[0] / 2.0)
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    if len(ix) < min_stamps:
        raise TooFewStarsError(_STEP, f"{len(ix)} kernel stamp(s), need {min_stamps}")
    conv, tgt, weight = _stamp_system(source, target, variance, ix, iy, basis, stamp_half)
    terms = poly_terms((ix - center[0]) / scale[0], (iy - center[1]) / scale[1], max(spatial_order, bg_order, 1))
    q = np.einsum("nkp,nlp->nkl", conv, conv) * weight[:, None, None]
    r = np.einsum("nkp,np->nk", conv, tgt) * weight[:, None]
    system = _KernelSystem(conv=conv, tgt=tgt, weight=weight, q=q, r=r, terms=terms, nb=len(basis))
    if len(ix) < _MIN_STAMPS_SPATIAL and spatial_order > 0:
        spatial_order = _choose_spatial_order(system, spatial_order, bg_order)
    kc, sc = _coefficient_layout(len(basis), spatial_order, bg_order)
    parts, use = system.parts(kc, sc), np.ones(len(ix), bool)
    for _ in range(4):
        if use.sum() < min_stamps:
            message = f"{int(use.sum())} kernel stamp(s) left after clipping, need {min_stamps}"
            raise TooFewStarsError(_STEP, message)
        coeffs = system.solve(kc, sc, use, parts)
        chi = system.chi(kc, sc, coeffs)
        med = np.median(chi[use])
        new = chi < med + 4.0 * 1.4826 * np.median(np.abs(chi[use] - med)) + 0.1
        if (new == use).all():
            break
        use = new
    _log.debug("Kernel fit on %d of %d stamps, median chi2/pix %.2f", use.sum(), len(ix), med)
    return MatchingKernel(
        basis=basis,
        coeffs=coeffs,
        kc=kc,
        sc=sc,
        spatial_order=spatial_order,
        center=center,
        scale=scale,
        n_stamps=int(use.sum()),
    )


@dataclasses.dataclass(kw_only=True)
class SubtractionResult:
    """Outcome of `subtract_images`.

    ``difference``: science minus template in science units, with variance, mask,
    PSF, science WCS and zero point; ``method``; ``kernel`` (Alard-Lupton only)."""

    difference: Exposure
    method: str
    kernel: MatchingKernel | None = None


def _whitening(kernel_hat: np.ndarray, var_target: float, var_source: float, ksum: float) -> np.ndarray:
    """Return the decorrelation filter in Fourier space (real, phi(0) = 1)."""
    denominator = var_target + var_source * np.abs(kernel_hat) ** 2
    return np.sqrt((var_target + ksum**2 * var_source) / denominator)


def _axis_terms(shape: tuple[int, int], kernel: MatchingKernel, order: int) -> list[tuple[np.ndarray, ...]]:
    """Return the spatial polynomial terms as (row vector u**i, column vector v**j) pairs."""
    u = ((np.arange(shape[1]) - kernel.center[0]) / kernel.scale[0]).astype(np.float32)[None, :]
    v = ((np.arange(shape[0]) - kernel.center[1]) / kernel.scale[1]).astype(np.float32)[:, None]
    return [(u**i, v ** (d - i)) for d in range(order + 1) for i in range(d, -1, -1)]


def _subtract_background(diff: np.ndarray, kernel: MatchingKernel) -> None:
    """Subtract the fitted background polynomial from ``diff`` in place."""
    coeffs = kernel.background_coeffs()
    terms = _axis_terms(diff.shape, kernel, 2)[: len(coeffs)]
    powers = [(i, d - i) for d in range(3) for i in range(d, -1, -1)][: len(coeffs)]
    for j in sorted({pj for _, pj in powers}):
        row = sum(float(c) * u for c, (u, _), (_, pj) in zip(coeffs, terms, powers, strict=False) if pj == j)
        column = next(v for (_, v), (_, pj) in zip(terms, powers, strict=False) if pj == j)
        diff -= column * row


def _apply_kernel(
    source: Exposure, target: Exposure, kernel: MatchingKernel, decorrelate: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``target - K (*) source - bg`` (decorrelated if asked) and the small-grid filter."""
    shape, padded = target.shape, fft_shape(target.shape)
    kernels = kernel.spatial_kernels().astype(np.float32)
    diff_hat = sfft.rfft2(target.image, s=padded, workers=1)
    k0_hat = None
    for (u, v), kern in zip(_axis_terms(shape, kernel, kernel.spatial_order), kernels, strict=False):
        k_hat = sfft.rfft2(embed_at_origin(kern, padded), workers=1)
        k0_hat = k_hat if k0_hat is None else k0_hat
        weighted = source.image * v
        weighted *= u
        weighted_hat = sfft.rfft2(weighted, s=padded, workers=1)
        weighted_hat *= k_hat
        diff_hat -= weighted_hat
    ksum, size, phi_small = kernel.kernel_sum, 2 * (kernels.shape[-1] + 8) + 1, np.ones((1, 1))
    var_t, var_s = float(np.median(target.variance[::4, ::4])), float(np.median(source.variance[::4, ::4]))
    if decorrelate:
        assert k0_hat is not None  # a matching kernel has at least one spatial term
        diff_hat *= _whitening(k0_hat, var_t, var_s, ksum)
        small_hat = np.fft.fft2(embed_at_origin(kernels[0], (size, size)))
        phi_small = np.fft.fftshift(np.fft.ifft2(_whitening(small_hat, var_t, var_s, ksum)).real)
        phi_small /= phi_small.sum()
    diff = sfft.irfft2(diff_hat, s=padded, workers=1)[: shape[0], : shape[1]].astype(np.float32)
    _subtract_background(diff, kernel)
    return diff, phi_small


def _alard_lupton(
    science: Exposure, template: Exposure, template_psf: PsfModel, x: np.ndarray, y: np.ndarray, opts: tuple
) -> tuple[np.ndarray, np.ndarray, PsfModel, MatchingKernel, int, str]:
    """Fit and apply the matching kernel; return difference, variance, PSF, kernel, border, mode."""
    mode, spatial_order, bg_order, decorrelate = opts
    assert science.psf is not None, "a calibrated science exposure has a PSF"
    convolve_template = mode == "template" or (mode == "auto" and template_psf.sigma <= science.psf.sigma)
    source, target = (template, science) if convolve_template else (science, template)
    sigma_s, sigma_t = template_psf.sigma, science.psf.sigma
    match = float(np.sqrt(max(abs(sigma_s**2 - sigma_t**2), _MIN_MATCH_SIGMA**2)))
    sigmas = tuple(max(scale * match, 0.4) for scale in _BASIS_SCALES)
    half = int(np.clip(np.ceil(3.0 * sigmas[-1]), 5, _MAX_KERNEL_HALF))
    stamp_half = half + max(int(np.ceil(science.psf.fwhm)), 3)
    margin = stamp_half + half
    inside = (x >= margin) & (y >= margin) & (x < science.shape[1] - 1 - margin)
    inside &= y < science.shape[0] - 1 - margin
    kernel = fit_matching_kernel(
        source.image,
        target.image,
        target.variance + source.variance,
        x[inside],
        y[inside],
        alard_lupton_basis(sigmas, _BASIS_DEGREES, half),
        spatial_order=spatial_order,
        bg_order=bg_order,
        stamp_half=stamp_half,
    )
    diff, phi = _apply_kernel(source, target, kernel, decorrelate)
    ksum, k0 = kernel.kernel_sum, kernel.spatial_kernels()[0]
    scale2 = ksum**2 if decorrelate else float((k0**2).sum())  # variance factor of the convolved image
    if convolve_template:
        var = science.variance + scale2 * template.variance
        return diff, var, science.psf.convolved(phi), kernel, half, "template"
    var = (template.variance + scale2 * science.variance) / ksum**2
    psf = science.psf.convolved(fftconvolve(phi, k0 / ksum, mode="full"))
    return -diff / ksum, var, psf, kernel, half, "science"


def subtract_images(
    science: Exposure,
    template: Exposure,
    *,
    method: str = "alard_lupton",
    stars: pd.DataFrame | None = None,
    mode: str = "auto",
    spatial_order: int = 1,
    bg_order: int = 1,
    decorrelate: bool = True,
    max_stamps: int = 250,
) -> SubtractionResult:
    """Subtract a warped template from a calibrated science exposure.

    Parameters
    ----------
    science : `workflow.science.exposure.Exposure`
        Calibrated, background-subtracted science exposure with a PSF.
    template : `workflow.science.exposure.Exposure`
        Template warped onto the science grid (`workflow.science.template_warp.warp_template`).
    method : `str`
        ``"alard_lupton"`` (default) or ``"zogy"``.
    stars : `pandas.DataFrame`, optional
        Star list (``x``, ``y`` and optionally ``snr``, ``pixelFlags_saturated``,
        ``calib_astrometry_used``), e.g. the calibrate source table; detected if omitted.
    mode : `str`
        Alard-Lupton only: ``"auto"`` (convolve the sharper image), ``"template"`` or ``"science"``.
    spatial_order, bg_order : `int`
        Polynomial orders of kernel variation and differential background.
    decorrelate : `bool`
        Apply the decorrelation afterburner (Alard-Lupton only).
    max_stamps : `int`
        Most kernel stamps used.

    Returns
    -------
    result : `SubtractionResult`
        The difference exposure (science minus template, science units).

    Raises
    ------
    TooFewStarsError
        If too few clean stars exist for the template PSF or the kernel fit.
    NumericalFailureError
        If the kernel fit is singular, or the fitted flux ratio contradicts the
        zero points (`workflow.science.zogy.check_flux_ratio`).
    BadImageError
        If the images differ in shape.
    ScienceDataError
        If the science exposure has no PSF.
    ValueError
        If ``method`` or ``mode`` is unknown.
    """
    if method not in ("alard_lupton", "zogy") or mode not in ("auto", "template", "science"):
        raise ValueError(f"unknown subtraction method {method!r} or mode {mode!r}")
    if science.shape != template.shape:
        raise BadImageError(_STEP, f"science {science.shape} and template {template.shape} differ in shape")
    if science.psf is None:
        raise ScienceDataError(_STEP, "science exposure has no PSF (run calibrate first)")
    if stars is None:
        stars = detect_sources(science.image, science.variance, science.mask, threshold=10.0)
        noise = np.sqrt(stars["npix"] * np.median(science.variance[::4, ::4]))
        stars = stars.assign(snr=stars["flux"] / noise)
    mask = science.mask | template.mask
    x, y = clean_stars(stars, mask, science.psf.half + 1, bad=_NO_STAMP, limit=max_stamps)
    template_psf = psf_at_sources(template, stars, like=science.psf, mask=mask, step=_STEP)
    kernel = None
    if method == "zogy":
        ratio = flux_ratio_from_stars(science, template, x, y, 3.0 * max(science.psf.fwhm, template_psf.fwhm))
        diff, var, psf = zogy_difference(science, template, template_psf, ratio)
        grow, convolved = science.psf.half, "none"
    else:
        options = (mode, spatial_order, bg_order, decorrelate)
        result = _alard_lupton(science, template, template_psf, x, y, options)
        diff, var, psf, kernel, grow, convolved = result
    if kernel is not None:
        ratio = kernel.kernel_sum if convolved == "template" else 1.0 / kernel.kernel_sum
    check_flux_ratio(ratio, science, template)
    out = difference_exposure(science, template, diff, var, psf, grow, stars=stars)
    out.metadata.update(SUBMETH=method, SUBCONV=convolved, TMPLFWHM=round(template_psf.fwhm, 4))
    if kernel is not None:
        out.metadata.update(KERNSUM=kernel.kernel_sum, KERNSTMP=kernel.n_stamps)
    _log.info("Subtracted (%s, convolved %s)", method, convolved)
    return SubtractionResult(difference=out, method=method, kernel=kernel)
