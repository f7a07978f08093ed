"""Warp template patches onto the science pixel grid.

For speed the WCS transforms are evaluated only on a coarse grid of science
pixels (every ``grid_step`` pixels); a bicubic spline interpolates the
template pixel coordinates to full resolution, and
`scipy.ndimage.map_coordinates` resamples the template (cubic B-spline by
default).  Several patches are combined (the first that covers a pixel wins);
pixels no patch covers are masked NO_DATA.
"""

from __future__ import annotations

__all__ = ["TemplatePatch", "warp_template", "template_coverage"]

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
from astropy.wcs import WCS
from scipy import ndimage
from scipy.interpolate import RectBivariateSpline

from workflow.science.errors import NoTemplateError, check_image
from workflow.science.exposure import Exposure
from workflow.science.masks import MaskPlane

_log = logging.getLogger(__name__)

_STEP = "warp_template"


@dataclasses.dataclass(kw_only=True)
class TemplatePatch:
    """One template image (e.g. a coadd patch) with its WCS.

    Attributes
    ----------
    image, variance : `numpy.ndarray`
        Template pixels and their variance.
    wcs : `astropy.wcs.WCS`
        Celestial WCS of the patch.
    mask : `numpy.ndarray`, optional
        `MaskPlane` bits; NO_DATA pixels are not used.
    zero_point : `float`, optional
        AB magnitude of one template count (31.4 for nJy coadds).
    name : `str`
        Label for logs, e.g. ``"tract 9813 patch 40"``.
    """

    image: np.ndarray
    variance: np.ndarray
    wcs: WCS
    mask: np.ndarray | None = None
    zero_point: float | None = None
    name: str = ""


def _coarse_axes(size: int, step: int) -> np.ndarray:
    axis = np.arange(0, size, step, dtype=float)
    return axis if axis[-1] == size - 1 else np.append(axis, size - 1)


def _coarse_map(
    patch: TemplatePatch, science_wcs: WCS, shape: tuple[int, int], step: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return coarse axes and template pixel coordinates of the coarse science grid."""
    ys, xs = _coarse_axes(shape[0], step), _coarse_axes(shape[1], step)
    gx, gy = np.meshgrid(xs, ys)
    ra, dec = science_wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
    tx, ty = patch.wcs.all_world2pix(ra, dec, 0)
    return ys, xs, tx.reshape(gx.shape), ty.reshape(gx.shape)


def template_coverage(
    patches: Sequence[TemplatePatch], science_wcs: WCS, shape: tuple[int, int], *, grid_step: int = 64
) -> float:
    """Return the fraction of the science image covered by any patch (coarse-grid estimate)."""
    covered = np.zeros((len(_coarse_axes(shape[0], grid_step)), len(_coarse_axes(shape[1], grid_step))), bool)
    for patch in patches:
        _, _, tx, ty = _coarse_map(patch, science_wcs, shape, grid_step)
        ny, nx = patch.image.shape
        covered |= (tx >= 0) & (tx <= nx - 1) & (ty >= 0) & (ty <= ny - 1)
    return float(covered.mean())


def _noise_factor(frac: np.ndarray, order: int) -> np.ndarray:
    """Return the variance kept by 1-D spline interpolation at fractional offsets ``frac``.

    Interpolation averages neighbouring pixels, so the output noise variance is
    ``sum(w**2)`` of the input's; the weights come from interpolating an impulse.
    """
    impulse = np.zeros(64)
    impulse[32] = 1.0
    phases = np.linspace(0.0, 1.0, 33)
    positions = np.arange(16, 48)[None, :] + phases[:, None]
    weights = ndimage.map_coordinates(impulse, positions.ravel()[None, :], order=order)
    weights = weights.reshape(positions.shape)
    return np.interp(frac, phases, (weights**2).sum(axis=1)).astype(np.float32)


def _prepare(patch: TemplatePatch, order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Return the spline-prefiltered image, the variance and the bad-pixel map of a patch."""
    image = check_image(patch.image, _STEP, f"template patch {patch.name!r} image")
    bad = ~np.isfinite(image)
    if patch.mask is not None:
        bad |= (patch.mask & int(MaskPlane.NO_DATA)) != 0
    clean = np.where(bad, np.float32(0.0), image) if bad.any() else image
    filtered = ndimage.spline_filter(clean, order=order, output=np.float32) if order > 1 else clean
    variance = np.nan_to_num(np.asarray(patch.variance, dtype=np.float32), nan=0.0)
    return filtered, variance, (bad if bad.any() else None)


def _warp_one(patch: TemplatePatch, science_wcs: WCS, planes: dict[str, np.ndarray], step: int, order: int) -> None:
    """Resample one patch onto the science pixels not yet filled (``planes["todo"]``), in place.

    Rows are processed in blocks of 256 so temporaries stay small (and are
    recycled by the allocator instead of page-faulted in afresh).
    """
    shape = planes["todo"].shape
    ys, xs, tx, ty = _coarse_map(patch, science_wcs, shape, step)
    ny, nx = np.shape(patch.image)
    inside = (tx >= -step) & (tx <= nx - 1 + step) & (ty >= -step) & (ty <= ny - 1 + step)
    if not inside.any():
        return
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    r0, r1 = int(ys[max(rows[0] - 1, 0)]), int(ys[min(rows[-1] + 1, len(ys) - 1)]) + 1
    c0, c1 = int(xs[max(cols[0] - 1, 0)]), int(xs[min(cols[-1] + 1, len(xs) - 1)]) + 1
    filtered, variance, bad = _prepare(patch, order)
    jac = np.gradient(tx, xs, axis=1) * np.gradient(ty, ys, axis=0)
    jac -= np.gradient(tx, ys, axis=0) * np.gradient(ty, xs, axis=1)
    area = float(np.median(np.abs(jac)))
    # Interpolation lowers the per-pixel noise variance; use its mean over the coarse-grid phases.
    kept = float(np.mean(_noise_factor(tx % 1.0, order) * _noise_factor(ty % 1.0, order)))
    spline_x = RectBivariateSpline(ys, xs, tx, kx=3, ky=3)
    spline_y = RectBivariateSpline(ys, xs, ty, kx=3, ky=3)
    fx = np.arange(c0, c1, dtype=float)
    for b0 in range(r0, r1, 256):
        b1 = min(b0 + 256, r1)
        fy = np.arange(b0, b1, dtype=float)
        full_x, full_y = spline_x(fy, fx), spline_y(fy, fx)
        box = (slice(b0, b1), slice(c0, c1))
        use = planes["todo"][box] & (full_x >= 0) & (full_x <= nx - 1) & (full_y >= 0) & (full_y <= ny - 1)
        if not use.any():
            continue
        coords = np.stack([full_y[use], full_x[use]])
        values = ndimage.map_coordinates(filtered, coords, order=order, prefilter=False)
        planes["image"][box][use] = values * area
        planes["variance"][box][use] = ndimage.map_coordinates(variance, coords, order=0) * (area**2 * kept)
        mask = np.zeros(coords.shape[1], np.int32)
        if patch.mask is not None:
            mask = ndimage.map_coordinates(patch.mask.astype(np.int32), coords, order=0)
            mask &= ~int(MaskPlane.NO_DATA)
        if bad is not None:
            mask[ndimage.map_coordinates(bad.astype(np.float32), coords, order=1) > 0] |= MaskPlane.NO_DATA
        planes["mask"][box][use] = mask
        planes["todo"][box][use] = False


def warp_template(
    patches: Sequence[TemplatePatch],
    science_wcs: WCS,
    shape: tuple[int, int],
    *,
    grid_step: int = 64,
    order: int = 3,
    min_coverage: float = 0.5,
) -> Exposure:
    """Resample template patches onto the science pixel grid.

    Parameters
    ----------
    patches : sequence of `TemplatePatch`
        Candidate patches, in order of preference.
    science_wcs : `astropy.wcs.WCS`
        Calibrated WCS of the science exposure.
    shape : `tuple` [`int`, `int`]
        Science image shape.
    grid_step : `int`
        Spacing of the coarse grid on which WCS transforms are evaluated.
    order : `int`
        Spline order of the image resampling (1 = bilinear, 3 = cubic).
    min_coverage : `float`
        Smallest covered fraction of the science image accepted.

    Returns
    -------
    template : `workflow.science.exposure.Exposure`
        Warped template on the science grid: uncovered pixels are 0 with NO_DATA.

    Raises
    ------
    NoTemplateError
        If no patch is given or coverage is below ``min_coverage``.
    BadImageError
        If a patch image has no finite pixels.
    """
    if not patches:
        raise NoTemplateError(_STEP, "no template patches overlap the image")
    planes = {
        "image": np.zeros(shape, np.float32),
        "variance": np.zeros(shape, np.float32),
        "mask": np.full(shape, int(MaskPlane.NO_DATA), np.int32),
        "todo": np.ones(shape, bool),
    }
    for patch in patches:
        _warp_one(patch, science_wcs, planes, grid_step, order)
    image, variance, mask = planes["image"], planes["variance"], planes["mask"]
    coverage = float(((mask & int(MaskPlane.NO_DATA)) == 0).mean())
    _log.debug("Template coverage %.3f from %d patch(es)", coverage, len(patches))
    if coverage < min_coverage:
        raise NoTemplateError(_STEP, f"template covers {coverage:.1%} of the image, need {min_coverage:.0%}")
    image[(mask & int(MaskPlane.NO_DATA)) != 0] = 0.0
    exposure = Exposure(image=image, mask=mask, variance=variance, wcs=science_wcs, zero_point=patches[0].zero_point)
    exposure.metadata["TMPLCOV"] = (round(coverage, 4), "fraction of pixels with template")
    return exposure
