"""Mask-plane bits and pixel-mask utilities (grow, interpolate over masked pixels)."""

from __future__ import annotations

__all__ = ["MaskPlane", "grow_mask", "grow_regions", "interpolate_masked"]

import enum
from collections.abc import Callable

import numpy as np
from scipy import ndimage


class MaskPlane(enum.IntFlag):
    """Mask-plane bits, named as in the LSST science pipelines."""

    BAD = 1
    SAT = 2
    INTRP = 4
    CR = 8
    EDGE = 16
    DETECTED = 32
    DETECTED_NEGATIVE = 64
    SUSPECT = 128
    NO_DATA = 256


def grow_mask(flags: np.ndarray) -> None:
    """Grow a sparse boolean map by one pixel (8-connected), in place."""
    iy, ix = np.nonzero(flags)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            flags[np.clip(iy + dy, 0, flags.shape[0] - 1), np.clip(ix + dx, 0, flags.shape[1] - 1)] = True


def grow_regions(flags: np.ndarray, radius: float | Callable[[tuple[slice, slice]], float]) -> np.ndarray:
    """Return ``flags`` grown by a disk (region by region: fast for sparse maps).

    ``radius`` is in pixels, or a function of each connected region's bounding box
    (a pair of slices) returning its radius.
    """
    out = flags.copy()
    labels, _ = ndimage.label(flags)
    for region in ndimage.find_objects(labels):
        grow = float(radius(region)) if callable(radius) else float(radius)
        reach = int(np.ceil(grow))
        rows = slice(max(region[0].start - reach, 0), region[0].stop + reach)
        cols = slice(max(region[1].start - reach, 0), region[1].stop + reach)
        distance = ndimage.distance_transform_edt(~flags[rows, cols])
        out[rows, cols] |= distance <= grow
    return out


def interpolate_masked(image: np.ndarray, bad: np.ndarray, *, sigma: float = 1.5) -> None:
    """Replace ``bad`` pixels in place by a Gaussian-weighted mean of good neighbours.

    Each connected bad region is handled in its padded bounding box; pixels with
    no good neighbour within reach take the median of the box's good pixels.
    """
    labels, _ = ndimage.label(bad, structure=np.ones((3, 3), bool))
    pad = int(np.ceil(3 * sigma))
    for index, region in enumerate(ndimage.find_objects(labels), start=1):
        rows = slice(max(region[0].start - pad, 0), region[0].stop + pad)
        cols = slice(max(region[1].start - pad, 0), region[1].stop + pad)
        box, hole = image[rows, cols], bad[rows, cols]
        weight = ndimage.gaussian_filter((~hole).astype(np.float32), sigma, mode="constant")
        total = ndimage.gaussian_filter(np.where(hole, 0.0, box).astype(np.float32), sigma, mode="constant")
        fill = labels[rows, cols] == index
        fallback = float(np.median(box[~hole])) if (~hole).any() else 0.0
        box[fill] = np.where(weight[fill] > 1e-3, total[fill] / np.maximum(weight[fill], 1e-3), fallback)
