"""Empirical PSF model: a stacked star stamp with low-order spatial variation.

`measure_psf` stacks sub-pixel-recentred, flux-normalised stamps of bright
isolated stars and fits, pixel by pixel, a polynomial in the star position
(PSFEx-like, native pixel sampling).  `PsfModel` evaluates the model at any
position and sub-pixel phase (Fourier shift), gives its FWHM and Gaussian
equivalent width, and round-trips through a FITS ``PSF`` extension.
"""

from __future__ import annotations

__all__ = [
    "PsfModel",
    "measure_psf",
    "fourier_shift",
    "cutout_stamps",
    "embed_at_origin",
    "poly_terms",
    "footprint_radius",
]

import dataclasses
import functools
import logging

import numpy as np
import numpy.typing as npt
from astropy.io import fits
from scipy import ndimage
from scipy.spatial import cKDTree

from workflow.science.errors import NumericalFailureError, TooFewStarsError
from workflow.science.masks import MaskPlane

_log = logging.getLogger(__name__)

_STEP = "calibrate.psf"
_MODEL_ERROR = 0.03
"""Fractional PSF-model error allowed before a star pixel is clipped as an outlier."""
_BAD_FOR_PSF = MaskPlane.SAT | MaskPlane.BAD | MaskPlane.CR | MaskPlane.NO_DATA | MaskPlane.EDGE


def poly_terms(u: np.ndarray, v: np.ndarray, order: int) -> np.ndarray:
    """Return the 2-D polynomial terms ``u**i v**j`` (i + j <= order), shape (n, nterm)."""
    terms = [u**i * v ** (d - i) for d in range(order + 1) for i in range(d, -1, -1)]
    return np.stack(terms, axis=-1)


def fourier_shift(stamps: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Shift a stack of stamps by sub-pixel amounts with the Fourier shift theorem.

    Parameters
    ----------
    stamps : `numpy.ndarray`
        Stack of shape (n, S, S).
    dx, dy : `numpy.ndarray`
        Shifts in pixels, shape (n,); positive moves the content to larger x, y.

    Returns
    -------
    shifted : `numpy.ndarray`
        Shifted stamps, shape (n, S, S), `float64`.
    """
    size_y, size_x = stamps.shape[-2:]
    ky = np.fft.fftfreq(size_y)[None, :, None]
    kx = np.fft.rfftfreq(size_x)[None, None, :]
    dx = np.asarray(dx, dtype=float)[:, None, None]
    dy = np.asarray(dy, dtype=float)[:, None, None]
    phase = np.exp(-2j * np.pi * (kx * dx + ky * dy))
    return np.fft.irfft2(np.fft.rfft2(stamps) * phase, s=(size_y, size_x))


def cutout_stamps(image: np.ndarray, ix: np.ndarray, iy: np.ndarray, half: int) -> np.ndarray:
    """Cut square stamps of side ``2 * half + 1`` centred on integer pixels.

    Callers must ensure every stamp lies inside the image.

    Returns
    -------
    stamps : `numpy.ndarray`
        Shape (n, 2 half + 1, 2 half + 1).
    """
    offsets = np.arange(-half, half + 1)
    rows = (np.asarray(iy)[:, None] + offsets)[:, :, None]
    cols = (np.asarray(ix)[:, None] + offsets)[:, None, :]
    return image[rows, cols]


def embed_at_origin(kernel: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Place a centred, odd-sized kernel at pixel (0, 0) of a zero array, wrapped (for FFTs)."""
    half = kernel.shape[-1] // 2
    out = np.zeros(shape, np.float32)
    out[: half + 1, : half + 1] = kernel[half:, half:]
    out[: half + 1, -half:] = kernel[half:, :half]
    out[-half:, : half + 1] = kernel[:half, half:]
    out[-half:, -half:] = kernel[:half, :half]
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class PsfModel:
    """A pixel-sampled PSF whose pixels are polynomials in position.

    Attributes
    ----------
    coeffs : `numpy.ndarray`
        Shape (nterm, S, S); term 0 sums to 1, the others sum to 0.
    order : `int`
        Spatial polynomial order (0 = constant PSF).
    center : `tuple` [`float`, `float`]
        ``(x, y)`` pixel position where the polynomial variables are 0.
    scale : `tuple` [`float`, `float`]
        Divisors that bring positions to roughly [-1, 1].
    """

    coeffs: np.ndarray
    order: int = 0
    center: tuple[float, float] = (0.0, 0.0)
    scale: tuple[float, float] = (1.0, 1.0)

    @classmethod
    def gaussian(cls, fwhm: float, size: int | None = None) -> PsfModel:
        """Return a constant, pixel-integrated circular Gaussian PSF of ``fwhm`` pixels."""
        from scipy.special import erf

        sigma = fwhm / 2.3548
        size = size or 2 * int(np.ceil(3.0 * fwhm)) + 1
        edges = np.arange(size + 1) - size / 2.0
        profile = np.diff(erf(edges / (np.sqrt(2.0) * sigma)))
        stamp = np.outer(profile, profile)
        return cls(coeffs=(stamp / stamp.sum())[None])

    @property
    def size(self) -> int:
        """Stamp side in pixels (`int`)."""
        return int(self.coeffs.shape[-1])

    @property
    def half(self) -> int:
        """Half stamp side: the centre pixel index (`int`)."""
        return self.size // 2

    def _terms(self, x: npt.ArrayLike, y: npt.ArrayLike) -> np.ndarray:
        u = (np.asarray(x, dtype=float) - self.center[0]) / self.scale[0]
        v = (np.asarray(y, dtype=float) - self.center[1]) / self.scale[1]
        return poly_terms(np.atleast_1d(u), np.atleast_1d(v), self.order)

    def image_at(self, x: float, y: float) -> np.ndarray:
        """Return the PSF at ``(x, y)`` centred on the stamp's central pixel, sum 1."""
        stamp = np.tensordot(self._terms(x, y)[0], self.coeffs, axes=1)
        return stamp / stamp.sum()

    def realize(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return PSF stamps positioned as sources at ``(x, y)`` would appear.

        Parameters
        ----------
        x, y : `numpy.ndarray`
            Source positions in pixels (0-based).

        Returns
        -------
        stamps : `numpy.ndarray`
            Shape (n, S, S); stamp centre pixel maps to image pixel ``(iy, ix)``.
        ix, iy : `numpy.ndarray`
            Nearest integer pixels of the sources.
        """
        x = np.atleast_1d(np.asarray(x, dtype=float))
        y = np.atleast_1d(np.asarray(y, dtype=float))
        ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
        stamps = np.einsum("nt,tij->nij", self._terms(x, y), self.coeffs)
        stamps = fourier_shift(stamps, x - ix, y - iy)
        stamps /= stamps.sum(axis=(1, 2), keepdims=True)
        return stamps, ix, iy

    @functools.cached_property
    def fwhm(self) -> float:
        """FWHM in pixels at the model centre, from the half-maximum area (`float`)."""
        return self.fwhm_at(*self.center)

    def fwhm_at(self, x: float, y: float) -> float:
        """Return the circularised FWHM in pixels at ``(x, y)``."""
        step, reach = 0.1, min(self.half, 10)
        axis = np.arange(-reach, reach + step / 2, step) + self.half
        yy, xx = np.meshgrid(axis, axis, indexing="ij")
        fine = ndimage.map_coordinates(self.image_at(x, y), [yy, xx], order=3)
        area = np.count_nonzero(fine > 0.5 * fine.max()) * step**2
        return float(2.0 * np.sqrt(area / np.pi))

    @functools.cached_property
    def sigma(self) -> float:
        """Gaussian-equivalent width in pixels from adaptive second moments (`float`)."""
        stamp = self.image_at(*self.center)
        yy, xx = np.indices(stamp.shape) - self.half
        sigma = max(self.fwhm / 2.3548, 0.5)
        for _ in range(20):
            weighted = stamp * np.exp(-(xx**2 + yy**2) / (2.0 * sigma**2))
            second = (weighted * (xx**2 + yy**2)).sum() / (2.0 * weighted.sum())
            new = float(np.sqrt(max(2.0 * second, 0.01)))
            if abs(new - sigma) < 1e-4:
                break
            sigma = new
        return sigma

    def convolved(self, kernel: np.ndarray) -> PsfModel:
        """Return this model with every coefficient image convolved by ``kernel`` (same stamp size)."""
        from scipy.signal import fftconvolve

        coeffs = np.array([fftconvolve(c, kernel, mode="same") for c in self.coeffs])
        coeffs[0] /= coeffs[0].sum()
        return dataclasses.replace(self, coeffs=coeffs)

    def to_hdu(self) -> fits.ImageHDU:
        """Return the model as a FITS image extension named ``PSF``."""
        header = fits.Header()
        header["PSFORDER"] = (self.order, "spatial polynomial order")
        header["PSFCX"], header["PSFCY"] = self.center
        header["PSFSX"], header["PSFSY"] = self.scale
        header["PSFFWHM"] = (self.fwhm, "FWHM at centre, pixels")
        return fits.ImageHDU(self.coeffs.astype(np.float64), header=header, name="PSF")

    @classmethod
    def from_fits(cls, header: fits.Header, data: np.ndarray) -> PsfModel:
        """Build a model from the header and data of a ``PSF`` extension."""
        return cls(
            coeffs=np.asarray(data, dtype=float).reshape((-1,) + data.shape[-2:]),
            order=int(header.get("PSFORDER", 0)),
            center=(float(header.get("PSFCX", 0.0)), float(header.get("PSFCY", 0.0))),
            scale=(float(header.get("PSFSX", 1.0)), float(header.get("PSFSY", 1.0))),
        )


def _usable(mask: np.ndarray | None, ix: np.ndarray, iy: np.ndarray, half: int, shape: tuple) -> np.ndarray:
    """Return which stamps lie inside the image and hold no bad mask bits."""
    inside = (ix >= half) & (iy >= half) & (ix < shape[1] - half) & (iy < shape[0] - half)
    if mask is not None and inside.any():
        bad = (cutout_stamps(mask, ix[inside], iy[inside], half) & int(_BAD_FOR_PSF)).any(axis=(1, 2))
        inside[np.flatnonzero(inside)[bad]] = False
    return inside


def _fit_spatial(stamps: np.ndarray, weights: np.ndarray, terms: np.ndarray, step: str = _STEP) -> np.ndarray:
    """Fit every stamp pixel as a polynomial in position, with per-star, per-pixel weights.

    Raises
    ------
    TooFewStarsError
        If some pixel has no weight in any star.
    NumericalFailureError
        If the normal equations are singular or the model is not finite.
    """
    flat = stamps.reshape(len(stamps), -1)
    w = weights.reshape(len(stamps), -1)
    if not (w.sum(axis=0) > 0).all():
        raise TooFewStarsError(step, f"PSF pixels without usable data in all {len(stamps)} star(s)")
    normal = np.einsum("ip,it,iu->ptu", w, terms, terms)
    ridge = 1e-10 * np.median(np.trace(normal, axis1=1, axis2=2)) / terms.shape[1]
    normal += np.eye(terms.shape[1])[None] * ridge
    rhs = np.einsum("ip,it,ip->pt", w, terms, flat)
    try:
        solution = np.linalg.solve(normal, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError as exc:
        message = f"singular PSF fit ({len(stamps)} stars, {terms.shape[1]} spatial terms)"
        raise NumericalFailureError(step, message) from exc
    coeffs = solution.T.reshape((terms.shape[1],) + stamps.shape[1:])
    if not np.isfinite(coeffs).all() or coeffs[0].sum() <= 0:
        message = f"PSF fit of {len(stamps)} stars gave a non-finite or zero-sum model"
        raise NumericalFailureError(step, message)
    coeffs[0] /= coeffs[0].sum()
    for k in range(1, len(coeffs)):
        coeffs[k] -= coeffs[0] * coeffs[k].sum()
    return coeffs


def footprint_radius(snr: np.ndarray, sigma: float) -> np.ndarray:
    """Return the radius where a point source of PSF S/N ``snr`` fades into the pixel noise.

    A Gaussian PSF of width ``sigma`` has peak/pixel-noise ``snr / (sigma sqrt(pi))``;
    the radius where that profile reaches 1 sigma, plus one pixel.
    """
    peak = np.maximum(np.asarray(snr, dtype=float) / (sigma * np.sqrt(np.pi)), 1.0)
    return sigma * np.sqrt(2.0 * np.log(peak)) + 1.0


def _neighbour_weights(
    shape: tuple[int, ...],
    x: np.ndarray,
    y: np.ndarray,
    ix: np.ndarray,
    iy: np.ndarray,
    others: np.ndarray | None,
    radius: np.ndarray | None,
) -> np.ndarray:
    """Return 0/1 pixel weights that blank disks around other sources in each stamp."""
    weights = np.ones(shape)
    if others is None or len(others) == 0:
        return weights
    assert radius is not None  # measure_psf gives a radius with the neighbours
    half = shape[-1] // 2
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    tree = cKDTree(others)
    for k, near in enumerate(tree.query_ball_point(np.column_stack([x, y]), half * 1.5 + radius.max())):
        for j in near:
            ox, oy = others[j] - (ix[k], iy[k])
            if np.hypot(ox + ix[k] - x[k], oy + iy[k] - y[k]) > 1.0:  # not the star itself
                weights[k][(xx - ox) ** 2 + (yy - oy) ** 2 <= radius[j] ** 2] = 0.0
    return weights


def measure_psf(
    image: np.ndarray,
    variance: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    half: int = 12,
    max_order: int = 2,
    min_stars: int = 3,
    neighbours: np.ndarray | None = None,
    neighbour_radius: np.ndarray | None = None,
    step: str = _STEP,
) -> PsfModel:
    """Fit an empirical, spatially varying PSF to star stamps.

    Pixels of other sources (``neighbours``, disks of ``neighbour_radius``)
    get no weight; pixels more than 5 sigma from the model are rejected and
    the fit repeated (undetected neighbours, cosmic rays), as are stars whose
    residual is an outlier.

    Parameters
    ----------
    image, variance : `numpy.ndarray`
        Background-subtracted image and its variance.
    x, y : `numpy.ndarray`
        Centroids of candidate PSF stars (bright, isolated, unsaturated).
    mask : `numpy.ndarray`, optional
        Mask bits; stamps touching SAT/BAD/CR/EDGE/NO_DATA are dropped.
    half : `int`
        Half side of the stamps.
    max_order : `int`
        Highest spatial order; lowered to 1 below 30 stars, 0 below 10.
    min_stars : `int`
        Fewest usable stars accepted.
    neighbours : `numpy.ndarray`, optional
        Positions (n, 2) of all detected sources.
    neighbour_radius : `numpy.ndarray`, optional
        Radius in pixels to blank around each neighbour.
    step : `str`
        Step name for error messages.

    Returns
    -------
    psf : `PsfModel`
        The fitted model.

    Raises
    ------
    TooFewStarsError
        If fewer than ``min_stars`` stars are usable, or a stamp pixel has no usable data.
    NumericalFailureError
        If the fit is singular or not finite.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    good = _usable(mask, ix, iy, half, image.shape)
    x, y, ix, iy = x[good], y[good], ix[good], iy[good]
    stamps = fourier_shift(cutout_stamps(image, ix, iy, half).astype(float), ix - x, iy - y)
    pixel_var = cutout_stamps(variance, ix, iy, half).astype(float)
    sky_var = np.median(pixel_var.reshape(len(x), -1), axis=1) if len(x) else np.zeros(0)
    flux = stamps.sum(axis=(1, 2))
    keep = flux > 0
    if keep.sum() < min_stars:
        raise TooFewStarsError(step, f"{int(keep.sum())} usable PSF star(s), need at least {min_stars}")
    stamps, x, y, ix, iy = stamps[keep] / flux[keep, None, None], x[keep], y[keep], ix[keep], iy[keep]
    flux, sky_var, pixel_var = flux[keep], sky_var[keep], np.maximum(pixel_var[keep], 1e-12)
    order = min(max_order, 0 if len(x) < 10 else 1 if len(x) < 30 else 2)
    shape = image.shape
    center, scale = ((shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0), (shape[1] / 2.0, shape[0] / 2.0)
    terms = poly_terms((x - center[0]) / scale[0], (y - center[1]) / scale[1], order)
    star_weight = flux**2 / sky_var
    star_weight = np.minimum(star_weight, np.percentile(star_weight, 90))
    radius = neighbour_radius
    if neighbours is not None and radius is None:
        radius = np.full(len(neighbours), 3.0)
    pixel_weight = _neighbour_weights(stamps.shape, x, y, ix, iy, neighbours, radius)
    use = np.ones(len(x), bool)
    for _ in range(3):
        weights = pixel_weight * (star_weight * use)[:, None, None]
        coeffs = _fit_spatial(stamps, weights, terms, step)
        model = np.einsum("nt,tij->nij", terms, coeffs)
        # A 3% model-error floor keeps the cores of bright stars (where the stacked
        # model is limited by sub-pixel resampling, not noise) from being clipped.
        scaled_model = (_MODEL_ERROR * flux)[:, None, None] * model
        z2 = (stamps - model) ** 2 * flux[:, None, None] ** 2 / (pixel_var + scaled_model**2)
        clipped = np.where(z2 > 25.0, 0.0, pixel_weight)
        lost = (clipped * (star_weight * use)[:, None, None]).sum(axis=0) <= 0
        pixel_weight = np.where(lost[None], pixel_weight, clipped)
        chi = (z2 * (pixel_weight > 0)).sum(axis=(1, 2)) / np.maximum((pixel_weight > 0).sum(axis=(1, 2)), 1)
        med = np.median(chi[use])
        use &= chi < med + 5.0 * 1.4826 * np.median(np.abs(chi[use] - med)) + 1e-12
        if use.sum() < max(min_stars, terms.shape[1]):
            use[:] = True
    psf = PsfModel(coeffs=coeffs, order=order, center=center, scale=scale)
    _log.debug("PSF from %d of %d stars, order %d, FWHM %.2f px", use.sum(), len(x), order, psf.fwhm)
    return psf
