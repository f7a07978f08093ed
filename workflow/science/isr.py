"""Instrument signature removal: raw amplifier pixels to a calibrated exposure.

Per amplifier: serial-overscan subtraction (median of each overscan row,
smoothed along the columns), optional parallel-overscan subtraction,
saturation masking, gain to electrons; then assembly into the detector
image, bias subtraction, variance (Poisson + read noise), flat division,
defect, edge and cosmic-ray masking with interpolation.  Two-snap visits
are summed, with cosmic rays rejected from the snap difference.

Amplifier geometry comes in as `AmpGeometry`, boxes in raw pixels, so this
module does not depend on how the instrument description is stored.
"""

from __future__ import annotations

__all__ = [
    "Box",
    "AmpGeometry",
    "subtract_overscan",
    "assemble",
    "run_isr",
    "combine_snaps",
    "find_cosmic_rays",
]

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import sep
from scipy import ndimage

from workflow.science.errors import BadImageError, check_image
from workflow.science.exposure import Exposure
from workflow.science.masks import MaskPlane, grow_mask, interpolate_masked

_log = logging.getLogger(__name__)

_STEP = "isr"


@dataclasses.dataclass(frozen=True)
class Box:
    """Half-open pixel box ``[x0, x1) x [y0, y1)``, 0-based (fields as `workflow.core.amplifiers.Box`).

    Any object with ``x0``, ``y0``, ``x1``, ``y1`` attributes is accepted where a `Box` is expected.
    """

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def shape(self) -> tuple[int, int]:
        """Box shape ``(ny, nx)``."""
        return self.y1 - self.y0, self.x1 - self.x0


def _slices(box: Box) -> tuple[slice, slice]:
    return slice(box.y0, box.y1), slice(box.x0, box.x1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AmpGeometry:
    """Geometry and electronics of one amplifier.

    Attributes
    ----------
    name : `str`
        Amplifier name, e.g. ``"C00"``.
    data_box : `Box`
        Imaging pixels in raw coordinates.
    serial_overscan_box : `Box`
        Serial overscan in raw coordinates (same rows as ``data_box``).
    parallel_overscan_box : `Box` or `None`
        Parallel overscan in raw coordinates (same columns as ``data_box``).
    detector_box : `Box`
        Where the imaging pixels go in the assembled detector image.
    flip_x, flip_y : `bool`
        Whether the raw data must be flipped to sit in ``detector_box``.
    gain : `float`
        Electrons per ADU.
    read_noise : `float`
        Read noise in electrons.
    saturation : `float`
        Raw ADU value (bias included) at which pixels saturate.
    """

    name: str
    data_box: Box
    serial_overscan_box: Box
    parallel_overscan_box: Box | None = None
    detector_box: Box
    flip_x: bool = False
    flip_y: bool = False
    gain: float = 1.0
    read_noise: float = 5.0
    saturation: float = 1.0e30

    @classmethod
    def from_amplifier(cls, amp: object) -> AmpGeometry:
        """Build from an object with `workflow.core.amplifiers.Amplifier` attribute names (duck-typed)."""
        names = {
            "data_box": "raw_data",
            "serial_overscan_box": "raw_serial_overscan",
            "detector_box": "bbox",
            "parallel_overscan_box": "raw_parallel_overscan",
        }
        fields = ("name", "flip_x", "flip_y", "gain", "read_noise", "saturation")
        return cls(**{k: getattr(amp, v) for k, v in names.items()}, **{k: getattr(amp, k) for k in fields})


def find_cosmic_rays(
    image: np.ndarray,
    variance: np.ndarray,
    *,
    min_fwhm: float = 2.0,
    nsigma: float = 5.0,
    cond: float = 2.5,
    ignore: np.ndarray | None = None,
) -> np.ndarray:
    """Flag pixels sharper than any PSF of FWHM >= ``min_fwhm`` (cosmic rays).

    A pixel above ``nsigma`` is a cosmic ray if, along some direction (rows,
    columns, diagonals), ``p - cond*sigma_p`` exceeds the PSF peak-to-neighbour
    ratio times ``mean(a, b) + cond*sigma_ab`` of its two opposite neighbours.
    Flagged pixels are grown by one pixel.

    Parameters
    ----------
    image, variance : `numpy.ndarray`
        Sky-subtracted image and its variance.
    ignore : `numpy.ndarray`, optional
        Boolean map of pixels (already masked) that are never cosmic rays.

    Returns
    -------
    cr : `numpy.ndarray`
        Boolean cosmic-ray map.
    """
    noise = np.sqrt(np.maximum(variance, 1e-12))
    candidates = image[1:-1, 1:-1] > nsigma * noise[1:-1, 1:-1]
    if ignore is not None:
        candidates &= ~ignore[1:-1, 1:-1]
    iy, ix = np.nonzero(candidates)
    iy, ix = iy + 1, ix + 1
    p = image[iy, ix] - cond * noise[iy, ix]
    sigma = min_fwhm / 2.3548
    hit = np.zeros(len(iy), dtype=bool)
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        ratio = np.exp((dy * dy + dx * dx) / (2.0 * sigma**2))
        mean = 0.5 * (image[iy + dy, ix + dx] + image[iy - dy, ix - dx])
        spread = 0.5 * np.sqrt(variance[iy + dy, ix + dx] + variance[iy - dy, ix - dx])
        hit |= p > ratio * (mean + cond * spread)
    cr = np.zeros(image.shape, dtype=bool)
    cr[iy[hit], ix[hit]] = True
    grow_mask(cr)
    return cr


def _check_boxes(amp: AmpGeometry, shape: tuple[int, ...]) -> None:
    for label in ("data_box", "serial_overscan_box", "parallel_overscan_box"):
        box = getattr(amp, label)
        if box is not None and not (0 <= box.x0 < box.x1 <= shape[-1] and 0 <= box.y0 < box.y1 <= shape[-2]):
            message = f"amplifier {amp.name}: {label} {box} lies outside raw of shape {shape}"
            raise BadImageError(_STEP, message)
    if Box.shape.fget(amp.detector_box) != Box.shape.fget(amp.data_box):  # type: ignore[attr-defined]
        raise BadImageError(_STEP, f"amplifier {amp.name}: detector_box and data_box differ in shape")


def subtract_overscan(
    raw: np.ndarray, amp: AmpGeometry, *, smooth_rows: int = 11, parallel: bool = False
) -> np.ndarray:
    """Return the overscan-subtracted imaging pixels of one amplifier, in ADU.

    Parameters
    ----------
    raw : `numpy.ndarray`
        Raw array holding the amplifier (the boxes of ``amp`` index into it).
    amp : `AmpGeometry`
        Amplifier geometry.
    smooth_rows : `int`
        Width of the running mean over the per-row overscan medians (and,
        with ``parallel``, over the per-column parallel-overscan medians).
    parallel : `bool`
        Also subtract the per-column median of the parallel overscan.

    Returns
    -------
    data : `numpy.ndarray`
        Imaging pixels minus overscan, `float32`, in raw orientation.
    """
    _check_boxes(amp, raw.shape)
    data = raw[_slices(amp.data_box)].astype(np.float32)
    serial = raw[_slices(amp.serial_overscan_box)].astype(np.float32)
    level = np.nanmedian(serial, axis=1)
    level = ndimage.uniform_filter1d(level, size=max(1, smooth_rows), mode="nearest")
    data -= level[:, None]
    if parallel and amp.parallel_overscan_box is not None:
        box = amp.parallel_overscan_box
        par = raw[_slices(box)].astype(np.float32)
        serial_box = amp.serial_overscan_box
        par -= np.nanmedian(raw[box.y0 : box.y1, serial_box.x0 : serial_box.x1], axis=1)[:, None]
        cols = ndimage.uniform_filter1d(np.nanmedian(par, axis=0), size=max(1, smooth_rows), mode="nearest")
        data -= cols[None, :]
    return data


def assemble(
    raw: np.ndarray | Sequence[np.ndarray],
    amps: Sequence[AmpGeometry],
    *,
    smooth_rows: int = 11,
    parallel: bool = False,
    saturation_margin: float = 0.01,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Overscan-correct, gain-correct and assemble amplifiers into a detector image.

    Parameters
    ----------
    raw : `numpy.ndarray` or sequence of `numpy.ndarray`
        One raw array holding every amplifier, or one array per amplifier.
    amps : sequence of `AmpGeometry`
        Amplifier geometries, in the order of ``raw`` when it is a sequence.
    smooth_rows, parallel
        Passed to `subtract_overscan`.
    saturation_margin : `float`
        Pixels above ``(1 - saturation_margin) * saturation`` raw ADU are
        flagged SAT: full-well pixels sit one per-amplifier bias offset away
        from the ADC clip value, on either side of it.

    Returns
    -------
    image : `numpy.ndarray`
        Detector image in electrons.
    read_var : `numpy.ndarray`
        Read-noise variance per pixel, electrons squared.
    saturated : `numpy.ndarray`
        Boolean map of saturated pixels.

    Raises
    ------
    BadImageError
        If a box lies outside its raw array or a raw has no finite pixels.
    """
    if not amps:
        raise BadImageError(_STEP, "no amplifier geometry given")
    if isinstance(raw, np.ndarray):
        raw = check_image(raw, _STEP, "raw")  # one 2-D array holding every amplifier
    shape = (max(a.detector_box.y1 for a in amps), max(a.detector_box.x1 for a in amps))
    image, read_var = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    saturated = np.zeros(shape, bool)
    for index, amp in enumerate(amps):
        pixels = raw if isinstance(raw, np.ndarray) else check_image(raw[index], _STEP, f"raw amplifier {index}")
        data = subtract_overscan(pixels, amp, smooth_rows=smooth_rows, parallel=parallel)
        sat = pixels[_slices(amp.data_box)] >= (1.0 - saturation_margin) * amp.saturation
        if amp.flip_x:
            data, sat = data[:, ::-1], sat[:, ::-1]
        if amp.flip_y:
            data, sat = data[::-1, :], sat[::-1, :]
        box = _slices(amp.detector_box)
        saturated[box], image[box], read_var[box] = sat, data * amp.gain, amp.read_noise**2
    return image, read_var, saturated


def _apply_calibs(image: np.ndarray, read_var: np.ndarray, mask: np.ndarray, bias: Any, flat: Any) -> np.ndarray:
    """Subtract bias, build variance, divide flat (in place on ``image``); return variance."""
    if bias is not None:
        image -= check_image(bias, _STEP, "bias", image.shape)
    variance = np.maximum(image, 0.0) + read_var
    if flat is not None:
        flat = check_image(flat, _STEP, "flat", image.shape)
        bad = ~np.isfinite(flat) | (flat <= 0.05)
        safe = np.where(bad, 1.0, flat)
        image /= safe
        variance /= safe**2
        mask[bad] |= MaskPlane.BAD | MaskPlane.NO_DATA
        image[bad] = 0.0
    return variance


def _single_snap(
    raw: np.ndarray | Sequence[np.ndarray],
    amps: Sequence[AmpGeometry],
    bias: Any,
    flat: Any,
    bad_columns: Sequence[int] | None,
    defects: Sequence[Box] | None,
    options: dict[str, Any],
) -> Exposure:
    """ISR of one snap up to flat fielding and defect masking."""
    image, read_var, saturated = assemble(raw, amps, **options)
    mask: np.ndarray = np.zeros(image.shape, dtype=np.int32)
    mask[saturated] |= MaskPlane.SAT
    nonfinite = ~np.isfinite(image)
    if nonfinite.all():
        raise BadImageError(_STEP, "raw has no finite imaging pixels (all NaN)")
    image[nonfinite] = 0.0
    mask[nonfinite] |= MaskPlane.NO_DATA | MaskPlane.BAD
    variance = _apply_calibs(image, read_var, mask, bias, flat)
    columns = [c for c in (bad_columns or ()) if 0 <= c < mask.shape[1]]
    mask[:, columns] |= MaskPlane.BAD
    for box in defects or ():
        mask[_slices(box)] |= MaskPlane.BAD
    return Exposure(image=image, mask=mask, variance=variance)


def combine_snaps(
    first: Exposure, second: Exposure, *, reject_crs: bool = True, nsigma: float = 5.0, frac: float = 0.1
) -> Exposure:
    """Sum two snaps, replacing cosmic-ray pixels found in their difference.

    A pixel is a cosmic ray in one snap when that snap exceeds the other by more
    than ``nsigma`` times the noise of the difference, where the noise includes
    ``frac`` of the pixel value (to tolerate seeing changes on bright stars).
    Such pixels (grown by one pixel where above 2 sigma) take twice the other
    snap's value and are masked CR.

    Returns
    -------
    exposure : `Exposure`
        The summed exposure.
    """
    image, variance = first.image + second.image, first.variance + second.variance
    mask = first.mask | second.mask
    if not reject_crs:
        return Exposure(image=image, mask=mask, variance=variance)
    diff = first.image - second.image
    noise = np.sqrt(first.variance + second.variance + (frac * np.maximum(first.image, second.image)) ** 2)
    for hits, other in ((diff > nsigma * noise, second), (-diff > nsigma * noise, first)):
        grown = hits.copy()
        grow_mask(grown)
        hits |= grown & (np.abs(diff) > 2.0 * noise)
        image[hits], variance[hits] = 2.0 * other.image[hits], 4.0 * other.variance[hits]
        mask[hits] |= MaskPlane.CR
    _log.debug("Snap difference found %d cosmic-ray pixels", int(((mask & int(MaskPlane.CR)) != 0).sum()))
    return Exposure(image=image, mask=mask, variance=variance)


def run_isr(
    raws: Sequence[np.ndarray | Sequence[np.ndarray]],
    amps: Sequence[AmpGeometry],
    *,
    bias: np.ndarray | None = None,
    flat: np.ndarray | None = None,
    bad_columns: Sequence[int] | None = None,
    edge_width: int = 4,
    crs: bool = True,
    min_fwhm: float = 2.0,
    smooth_rows: int = 11,
    parallel_overscan: bool = False,
    saturation_margin: float = 0.01,
    defects: Sequence[Box] | None = None,
) -> Exposure:
    """Run instrument signature removal on the snaps of one detector-visit.

    Parameters
    ----------
    raws : sequence
        One entry per snap (1 or 2); each is one raw array or one array per amplifier.
    amps : sequence of `AmpGeometry`
        Amplifier geometries.
    bias : `numpy.ndarray`, optional
        Master bias in electrons, assembled detector shape.
    flat : `numpy.ndarray`, optional
        Normalised master flat, assembled detector shape.
    bad_columns : sequence of `int`, optional
        Detector columns to mask BAD and interpolate.
    edge_width : `int`
        Width of the border masked EDGE.
    crs : `bool`
        Find cosmic rays (snap difference for 2 snaps, sharpness for 1).
    min_fwhm : `float`
        Smallest PSF FWHM in pixels; sharper features are cosmic rays.
    smooth_rows, parallel_overscan
        Overscan options, see `subtract_overscan`.
    saturation_margin : `float`
        See `assemble`.
    defects : sequence of `Box`, optional
        Defect boxes in detector pixels to mask BAD and interpolate.

    Returns
    -------
    exposure : `Exposure`
        Image and variance in electrons, mask planes SAT/BAD/EDGE/CR/INTRP/NO_DATA.

    Raises
    ------
    BadImageError
        If there are no snaps or more than two, a raw has the wrong shape or
        no finite pixels, or a calib has the wrong shape.
    """
    if len(raws) not in (1, 2):
        raise BadImageError(_STEP, f"expected 1 or 2 snaps, got {len(raws)}")
    options = dict(smooth_rows=smooth_rows, parallel=parallel_overscan, saturation_margin=saturation_margin)
    snaps = [_single_snap(raw, amps, bias, flat, bad_columns, defects, options) for raw in raws]
    exposure = combine_snaps(*snaps, reject_crs=crs) if len(snaps) == 2 else snaps[0]
    if (w := edge_width) > 0:
        for border in (np.s_[:w, :], np.s_[-w:, :], np.s_[:, :w], np.s_[:, -w:]):
            exposure.mask[border] |= MaskPlane.EDGE
    if crs and len(snaps) == 1:
        sky = sep.Background(exposure.image, mask=exposure.mask != 0, bw=128, bh=128).back()
        known = (exposure.mask & int(MaskPlane.BAD | MaskPlane.SAT | MaskPlane.NO_DATA)) != 0
        # Hot columns and bleed trails are sharp too, but already masked: no CR search there.
        cr = find_cosmic_rays(exposure.image - sky, exposure.variance, min_fwhm=min_fwhm, ignore=known)
        exposure.mask[cr] |= MaskPlane.CR
    to_fill = (exposure.mask & int(MaskPlane.BAD | MaskPlane.CR)) != 0
    to_fill &= (exposure.mask & int(MaskPlane.NO_DATA)) == 0
    interpolate_masked(exposure.image, to_fill)
    exposure.mask[to_fill] |= MaskPlane.INTRP
    n_cr = int(((exposure.mask & int(MaskPlane.CR)) != 0).sum())
    exposure.metadata["ISR_NCR"] = (n_cr, "cosmic-ray pixels")
    return exposure
