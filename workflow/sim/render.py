"""Fast rendering of point sources and galaxies into numpy images.

The PSF is a circular mixture of Gaussians (a core plus a broader wing,
`GaussianMixturePsf`); point sources are integrated exactly over pixels
(differences of error functions), galaxies are exponential discs written as
Gaussian mixtures, convolved analytically with the PSF and the pixel
response.  Sources are drawn in stamps sized by brightness and grouped by
stamp size so each group is one vectorized numpy operation; a full LSST
detector with a few thousand stars takes well under a second.

Pixel convention: 0-based, pixel ``(x, y)`` covers ``[x-0.5, x+0.5) x
[y-0.5, y+0.5)`` and is ``image[y, x]``.
"""

from __future__ import annotations

__all__ = [
    "GaussianMixturePsf",
    "add_point_sources",
    "add_galaxies",
    "exponential_mixture",
    "render_scene",
    "wcs_region",
]

import dataclasses
import functools
import logging
import math
from typing import cast

import lsst.sphgeom as sphgeom
import numpy as np
from astropy.table import Table
from astropy.wcs import WCS
from scipy.optimize import brentq, nnls
from scipy.special import erf

from workflow.core.instrument import polygon_from_sky
from workflow.sim.refcat import flux_from_mag
from workflow.sim.sky_model import SkyModel, galaxies_in_region, injected_sources

_log = logging.getLogger(__name__)

_STAMP_HALF_SIZES = np.array([2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256])
_MAX_CHUNK_PIXELS = 4_000_000
_PIXEL_VARIANCE = 1.0 / 12.0


@dataclasses.dataclass(frozen=True)
class GaussianMixturePsf:
    """A circular PSF made of concentric Gaussians (sigmas in pixels).

    Build it with `GaussianMixturePsf.from_fwhm`.
    """

    weights: tuple[float, ...]
    sigmas: tuple[float, ...]

    @classmethod
    def from_fwhm(cls, fwhm_pix: float, *, wing_fraction: float = 0.1, wing_ratio: float = 2.5) -> GaussianMixturePsf:
        """Return a core + wing PSF whose total FWHM is ``fwhm_pix``.

        Parameters
        ----------
        fwhm_pix : `float`
            Full width at half maximum in pixels.
        wing_fraction : `float`, optional
            Flux fraction in the wing Gaussian.
        wing_ratio : `float`, optional
            Wing sigma over core sigma.
        """
        weights = (1.0 - wing_fraction, wing_fraction)

        def half_width(core: float) -> float:
            psf = cls(weights, (core, core * wing_ratio))
            return float(psf.profile(fwhm_pix / 2.0) - 0.5 * psf.profile(0.0))

        core = brentq(half_width, fwhm_pix / 2.355 / wing_ratio, fwhm_pix / 2.355 * 1.001)
        return cls(weights, (core, core * wing_ratio))

    def profile(self, radius: float | np.ndarray) -> np.ndarray:
        """Return the surface brightness (per pixel^2, unit flux) at ``radius``."""
        r2 = np.asarray(radius, dtype=float) ** 2
        pairs = zip(self.weights, self.sigmas, strict=True)
        # A mixture has at least one component, so the sum is never the start value 0.
        return cast(np.ndarray, sum(w / (2 * np.pi * s**2) * np.exp(-r2 / (2 * s**2)) for w, s in pairs))

    @property
    def fwhm(self) -> float:
        """Full width at half maximum in pixels."""
        peak = float(self.profile(0.0))
        return 2.0 * brentq(lambda r: float(self.profile(r)) - 0.5 * peak, 0.0, 10 * max(self.sigmas))

    def enclosed_fraction(self, radius: float) -> float:
        """Return the flux fraction inside a circle of ``radius`` pixels."""
        pairs = zip(self.weights, self.sigmas, strict=True)
        return float(sum(w * (1.0 - math.exp(-(radius**2) / (2 * s**2))) for w, s in pairs))

    def half_size(self, flux: np.ndarray, threshold: float) -> np.ndarray:
        """Return stamp half sizes so the profile beyond is below ``threshold``."""
        flux = np.asarray(flux, dtype=float)
        radius = np.zeros_like(flux)
        for w, s in zip(self.weights, self.sigmas, strict=False):
            ratio = np.maximum(flux * w / (2 * np.pi * s**2 * threshold), 1.0)
            radius = np.maximum(radius, s * np.sqrt(2.0 * np.log(ratio)))
        return np.ceil(radius + 1.0).astype(int)

    def stamp(self, half_size: int, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
        """Return a pixel-integrated unit-flux image of the PSF.

        Parameters
        ----------
        half_size : `int`
            The stamp is ``2 * half_size + 1`` pixels square.
        dx, dy : `float`, optional
            Offset of the centre from the central pixel.
        """
        image = np.zeros((2 * half_size + 1,) * 2)
        add_point_sources(
            image,
            np.array([half_size + dx]),
            np.array([half_size + dy]),
            np.array([1.0]),
            self,
            threshold=0.0,
            max_half_size=half_size,
        )
        return image


def _bucket(half: np.ndarray, max_half_size: int) -> np.ndarray:
    sizes = _STAMP_HALF_SIZES[_STAMP_HALF_SIZES <= max_half_size]
    sizes = np.append(sizes, max_half_size) if sizes[-1] != max_half_size else sizes
    return sizes[np.minimum(np.searchsorted(sizes, half), len(sizes) - 1)]


def _accumulate(image: np.ndarray, x0: np.ndarray, y0: np.ndarray, stamps: np.ndarray) -> None:
    """Add stamps whose lower-left pixels are (x0, y0), clipping at edges."""
    size = stamps.shape[1]
    ny, nx = image.shape
    cols = x0[:, None] + np.arange(size)
    rows = y0[:, None] + np.arange(size)
    valid = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
    flat = rows[:, :, None] * nx + cols[:, None, :]
    np.add.at(image.reshape(-1), flat[valid], stamps[valid].astype(image.dtype, copy=False))


def _chunks(indices: np.ndarray, size: int) -> list[np.ndarray]:
    per_chunk = max(1, _MAX_CHUNK_PIXELS // (size * size))
    return [indices[i : i + per_chunk] for i in range(0, len(indices), per_chunk)]


def _visible(image: np.ndarray, x: np.ndarray, y: np.ndarray, half: np.ndarray) -> np.ndarray:
    ny, nx = image.shape
    return (x + half >= -0.5) & (x - half <= nx - 0.5) & (y + half >= -0.5) & (y - half <= ny - 0.5)


def add_point_sources(
    image: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    psf: GaussianMixturePsf,
    *,
    threshold: float = 0.5,
    max_half_size: int = 256,
) -> None:
    """Add PSF-shaped point sources to an image in place.

    Parameters
    ----------
    image : `numpy.ndarray`
        2-d, C-contiguous, float; modified in place.
    x, y : `numpy.ndarray`
        Source centres in pixels.
    flux : `numpy.ndarray`
        Total fluxes in image units.
    psf : `GaussianMixturePsf`
        The PSF.
    threshold : `float`, optional
        Stamps extend until the profile falls below this (image units).
    max_half_size : `int`, optional
        Largest stamp half size.
    """
    x, y, flux = (np.atleast_1d(np.asarray(a, dtype=float)) for a in (x, y, flux))
    half = _bucket(
        psf.half_size(np.abs(flux), max(threshold, 1e-30)) if threshold > 0 else np.full(len(x), max_half_size),
        max_half_size,
    )
    keep = _visible(image, x, y, half) & (flux != 0)
    for h in np.unique(half[keep]):
        size = 2 * int(h) + 1
        for idx in _chunks(np.flatnonzero(keep & (half == h)), size):
            x0 = np.rint(x[idx]).astype(np.int64) - h
            y0 = np.rint(y[idx]).astype(np.int64) - h
            edges = np.arange(size + 1) - 0.5
            ex = (x0[:, None] + edges) - x[idx, None]
            ey = (y0[:, None] + edges) - y[idx, None]
            stamps = np.zeros((len(idx), size, size))
            for w, s in zip(psf.weights, psf.sigmas, strict=False):
                gx = np.diff(erf(ex / (s * math.sqrt(2.0))), axis=1) * 0.5
                gy = np.diff(erf(ey / (s * math.sqrt(2.0))), axis=1) * 0.5
                stamps += w * gy[:, :, None] * gx[:, None, :]
            stamps *= flux[idx, None, None]
            _accumulate(image, x0, y0, stamps)


@functools.cache
def exponential_mixture(n_components: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Return a Gaussian mixture approximating a unit exponential disc.

    The disc ``I(r) ~ exp(-r)`` (scale length 1, half-light radius 1.678) is
    fitted with ``n_components`` Gaussians of fixed log-spaced variances
    (non-negative least squares); the amplitudes sum to 1.

    Returns
    -------
    amplitudes, variances : `numpy.ndarray`
        Flux fractions and variances (scale-length units squared).
    """
    variances = np.logspace(-3.0, 1.5, n_components)
    r = np.linspace(0.0, 12.0, 600)
    target = np.exp(-r) / (2 * np.pi)
    design = np.exp(-(r[:, None] ** 2) / (2 * variances)) / (2 * np.pi * variances)
    weight = np.sqrt(r + 0.01)[:, None]
    amps, _ = nnls(design * weight, target * weight[:, 0])
    return amps / amps.sum(), variances


def add_galaxies(
    image: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    hlr_pix: np.ndarray,
    axis_ratio: np.ndarray,
    theta_rad: np.ndarray,
    psf: GaussianMixturePsf,
    *,
    max_half_size: int = 64,
) -> None:
    """Add PSF-convolved exponential discs to an image in place.

    Parameters
    ----------
    image : `numpy.ndarray`
        2-d, C-contiguous, float; modified in place.
    x, y : `numpy.ndarray`
        Centres in pixels.
    flux : `numpy.ndarray`
        Total fluxes in image units.
    hlr_pix : `numpy.ndarray`
        Major-axis half-light radii in pixels.
    axis_ratio : `numpy.ndarray`
        Minor over major axis.
    theta_rad : `numpy.ndarray`
        Angle of the major axis from the +x pixel axis, counter-clockwise.
    psf : `GaussianMixturePsf`
        The PSF.
    max_half_size : `int`, optional
        Largest stamp half size.
    """
    x, y, flux, hlr, q, theta = (
        np.atleast_1d(np.asarray(a, dtype=float)) for a in (x, y, flux, hlr_pix, axis_ratio, theta_rad)
    )
    amps, variances = exponential_mixture()
    significant = amps > 1e-3
    amps, variances = amps[significant] / amps[significant].sum(), variances[significant]
    scale2 = (hlr / 1.678) ** 2
    cos, sin = np.cos(theta), np.sin(theta)
    # Shape matrix of the unit-variance component: R diag(1, q^2) R^T.
    sxx = cos**2 + (q * sin) ** 2
    syy = sin**2 + (q * cos) ** 2
    sxy = cos * sin * (1.0 - q**2)
    extent = np.sqrt(variances[-1] * scale2 + max(psf.sigmas) ** 2)
    half = _bucket(np.ceil(3.5 * extent + 1).astype(int), max_half_size)
    keep = _visible(image, x, y, half) & (flux != 0)
    for h in np.unique(half[keep]):
        size = 2 * int(h) + 1
        for idx in _chunks(np.flatnonzero(keep & (half == h)), size):
            x0 = np.rint(x[idx]).astype(np.int64) - h
            y0 = np.rint(y[idx]).astype(np.int64) - h
            dx = (x0[:, None] + np.arange(size) - x[idx, None])[:, None, :]
            dy = (y0[:, None] + np.arange(size) - y[idx, None])[:, :, None]
            stamps = np.zeros((len(idx), size, size))
            for a, v in zip(amps, variances, strict=False):
                for w, s in zip(psf.weights, psf.sigmas, strict=False):
                    iso = s**2 + _PIXEL_VARIANCE
                    cxx = v * scale2[idx] * sxx[idx] + iso
                    cyy = v * scale2[idx] * syy[idx] + iso
                    cxy = v * scale2[idx] * sxy[idx]
                    det = cxx * cyy - cxy**2
                    norm = (a * w / (2 * np.pi * np.sqrt(det)))[:, None, None]
                    quad = (
                        cyy[:, None, None] * dx**2 - 2 * cxy[:, None, None] * dx * dy + cxx[:, None, None] * dy**2
                    ) / det[:, None, None]
                    stamps += norm * np.exp(-0.5 * quad)
            stamps *= flux[idx, None, None]
            _accumulate(image, x0, y0, stamps)


def wcs_region(wcs: WCS, shape: tuple[int, int], padding_pix: float = 0.0) -> sphgeom.ConvexPolygon:
    """Return the sky polygon of an image (optionally grown by a margin)."""
    ny, nx = shape
    lo, hx, hy = -0.5 - padding_pix, nx - 0.5 + padding_pix, ny - 0.5 + padding_pix
    ra, dec = wcs.all_pix2world(np.array([lo, hx, hx, lo]), np.array([lo, lo, hy, hy]), 0)
    return polygon_from_sky(ra, dec)


def _pixel_angle(wcs: WCS, pa_deg: np.ndarray) -> np.ndarray:
    """Return the pixel-frame angles (rad, from +x) of sky position angles."""
    pa = np.radians(pa_deg)
    # Local (east, north) direction -> pixel direction through the inverse CD matrix.
    pix = np.linalg.inv(wcs.pixel_scale_matrix) @ np.stack([np.sin(pa), np.cos(pa)])
    return np.arctan2(pix[1], pix[0])


def render_scene(
    image: np.ndarray,
    wcs: WCS,
    band: str,
    psf: GaussianMixturePsf,
    *,
    sky: SkyModel,
    flux_scale: float,
    mjd: float | None,
    pixel_scale_arcsec: float,
    margin_pix: float = 30.0,
) -> tuple[Table, Table, Table]:
    """Draw the synthetic sky of an image's footprint into it.

    Parameters
    ----------
    image : `numpy.ndarray`
        Float image, modified in place.
    wcs : `astropy.wcs.WCS`
        Maps 0-based pixels of ``image`` to the sky (the *true* WCS).
    band : `str`
        Band of the fluxes.
    psf : `GaussianMixturePsf`
        PSF in pixels.
    sky : `workflow.sim.sky_model.SkyModel`
        The synthetic sky.
    flux_scale : `float`
        Image units per nJy (electrons per nJy for a raw, 1 for a coadd).
    mjd : `float` or `None`
        Time of the variable and transient fluxes; `None` draws variables
        at their mean flux and no transients (a template).
    pixel_scale_arcsec : `float`
        Pixel scale, for galaxy sizes.
    margin_pix : `float`, optional
        Sources this far outside the image still contribute their wings.

    Returns
    -------
    stars, galaxies, injected : `astropy.table.Table`
        Drawn refcat stars, galaxies and variables/transients, each with
        the columns of their catalogue plus ``x``, ``y`` (pixels) and
        ``image_flux`` (image units); ``injected`` as from
        `workflow.sim.sky_model.injected_sources`.
    """
    region = wcs_region(wcs, image.shape, margin_pix)
    stars = sky.stars(region)
    _add_pixels(stars, wcs)
    stars["image_flux"] = np.asarray(stars[f"{band}_flux"]) * flux_scale
    add_point_sources(image, stars["x"], stars["y"], stars["image_flux"], psf)

    gals = galaxies_in_region(region, sky)
    _add_pixels(gals, wcs)
    if len(gals):
        gals["image_flux"] = flux_from_mag(np.asarray(gals[f"{band}_mag"])) * flux_scale
        theta = _pixel_angle(wcs, np.asarray(gals["pa_deg"]))
        add_galaxies(
            image,
            gals["x"],
            gals["y"],
            gals["image_flux"],
            np.asarray(gals["hlr_arcsec"]) / pixel_scale_arcsec,
            gals["axis_ratio"],
            theta,
            psf,
        )
    else:
        gals["image_flux"] = np.zeros(0)

    injected = injected_sources(region, sky, band, mjd)
    _add_pixels(injected, wcs)
    injected["image_flux"] = np.asarray(injected["flux"]) * flux_scale
    add_point_sources(image, injected["x"], injected["y"], injected["image_flux"], psf)
    _log.debug("rendered %d stars, %d galaxies, %d injected", len(stars), len(gals), len(injected))
    return stars, gals, injected


def _add_pixels(table: Table, wcs: WCS) -> None:
    if len(table):
        x, y = wcs.all_world2pix(np.asarray(table["ra"]), np.asarray(table["dec"]), 0)
    else:
        x = y = np.zeros(0)
    table["x"] = np.asarray(x, dtype=float)
    table["y"] = np.asarray(y, dtype=float)
