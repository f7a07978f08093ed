"""The calibrated-exposure container, its mask planes, and science data errors.

An `Exposure` holds the pixel planes of one detector image (``image`` in
electrons, or nJy-scaled counts for templates; ``mask`` as `MaskPlane` bits;
``variance`` in the image unit squared) together with its WCS, PSF model,
photometric zero point and FITS metadata.  On disk it is one FITS file with
named extensions ``IMAGE``, ``MASK``, ``VARIANCE`` and (optionally) ``PSF``;
the WCS lives in the ``IMAGE`` header, the zero point and mask-plane bit
numbers in the primary header.

`grow_mask` and `interpolate_masked` are pixel-mask utilities.

The error classes here are raised by every science step (ISR, calibration,
template warping, subtraction, DIA detection).  Each names the step and,
when there is one, the file.  `ScienceDataError` marks "the data cannot
support this step"; the pipeline runner falls back to the next pipeline on it.
"""

from __future__ import annotations

__all__ = [
    "ScienceDataError",
    "BadImageError",
    "CorruptFileError",
    "TooFewStarsError",
    "NoTemplateError",
    "NumericalFailureError",
    "MaskPlane",
    "Exposure",
    "write_exposure",
    "read_exposure",
    "check_image",
    "grow_mask",
    "grow_regions",
    "interpolate_masked",
]

import dataclasses
import enum
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning
from astropy.wcs import WCS
from scipy import ndimage

from .exceptions import NonRetriableError

if TYPE_CHECKING:
    from .psf import PsfModel

_log = logging.getLogger(__name__)


class ScienceDataError(NonRetriableError):
    """The data given to a science step cannot support it.

    Parameters
    ----------
    step : `str`
        Name of the step that failed, e.g. ``"calibrate.astrometry"``.
    message : `str`
        What was wrong; the step name is prefixed to it.
    """

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step


class BadImageError(ScienceDataError, ValueError):
    """An input array has the wrong shape, or no usable (finite) pixels."""


class CorruptFileError(NonRetriableError, OSError):
    """A FITS file is truncated, corrupt, or lacks a required extension."""


class TooFewStarsError(ScienceDataError, ValueError):
    """Too few usable stars for PSF modelling, astrometry or photometry."""


class NoTemplateError(ScienceDataError, LookupError):
    """No template covers enough of the science image."""


class NumericalFailureError(ScienceDataError, ArithmeticError):
    """A fit of the step was singular or diverged on these data (e.g. a singular matrix)."""


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


def check_image(array: Any, step: str, name: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Return ``array`` as a 2-D `float32` array after sanity checks.

    Parameters
    ----------
    array : array-like
        The pixels.
    step : `str`
        Step name used in error messages.
    name : `str`
        What the array is (``"raw"``, ``"flat"``...), used in error messages.
    shape : `tuple` [`int`, `int`], optional
        Required shape.

    Returns
    -------
    image : `numpy.ndarray`
        2-D `float32` view or copy of ``array``.

    Raises
    ------
    BadImageError
        If the array is not 2-D, has the wrong shape, or has no finite pixel.
    """
    image = np.asarray(array, dtype=np.float32)
    if image.ndim != 2:
        raise BadImageError(step, f"{name} must be a 2-D image, got {image.ndim} dimension(s)")
    if shape is not None and image.shape != tuple(shape):
        raise BadImageError(step, f"{name} has shape {image.shape}, expected {tuple(shape)}")
    if image.size == 0 or not np.isfinite(image).any():
        raise BadImageError(step, f"{name} has no finite pixels (all NaN or empty)")
    return image


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


@dataclasses.dataclass(kw_only=True)
class Exposure:
    """Pixels and calibration of one detector image.

    Attributes
    ----------
    image : `numpy.ndarray`
        2-D `float32` pixel values.
    mask : `numpy.ndarray`
        2-D `int32` `MaskPlane` bits, same shape.
    variance : `numpy.ndarray`
        2-D `float32` per-pixel variance, same shape.
    wcs : `astropy.wcs.WCS` or `None`
        Celestial WCS (0-based pixel convention when used via astropy).
    psf : `workflow.psf.PsfModel` or `None`
        PSF model.
    zero_point : `float` or `None`
        AB magnitude of one image count: ``mag = zero_point - 2.5 log10(counts)``.
    metadata : `astropy.io.fits.Header`
        Free-form keys (visit, detector, band, MJD, quality measures).
    """

    image: np.ndarray
    mask: np.ndarray
    variance: np.ndarray
    wcs: WCS | None = None
    psf: PsfModel | None = None
    zero_point: float | None = None
    metadata: fits.Header = dataclasses.field(default_factory=fits.Header)

    def __post_init__(self) -> None:
        self.image = np.asarray(self.image, dtype=np.float32)
        self.mask = np.asarray(self.mask, dtype=np.int32)
        self.variance = np.asarray(self.variance, dtype=np.float32)
        shape = self.image.shape
        if self.image.ndim != 2 or self.mask.shape != shape or self.variance.shape != shape:
            raise BadImageError(
                "exposure",
                f"image {self.image.shape}, mask {self.mask.shape} and variance "
                f"{self.variance.shape} must be 2-D and of one shape",
            )

    @property
    def shape(self) -> tuple[int, int]:
        """Image shape ``(ny, nx)`` (`tuple` [`int`, `int`])."""
        return self.image.shape  # type: ignore[return-value]

    @property
    def njy_per_count(self) -> float:
        """Flux in nJy of one image count, from ``zero_point`` (`float`).

        Raises
        ------
        ValueError
            If the exposure has no zero point.
        """
        if self.zero_point is None:
            raise ValueError("exposure has no photometric zero point")
        return float(10.0 ** (0.4 * (31.4 - self.zero_point)))

    def copy(self) -> Exposure:
        """Return a deep copy (arrays and header copied; WCS and PSF deep-copied)."""
        return dataclasses.replace(
            self,
            image=self.image.copy(),
            mask=self.mask.copy(),
            variance=self.variance.copy(),
            wcs=None if self.wcs is None else self.wcs.deepcopy(),
            metadata=self.metadata.copy(),
        )


def write_exposure(exposure: Exposure, path: str | os.PathLike[str]) -> Path:
    """Write an exposure as a multi-extension FITS file.

    Parameters
    ----------
    exposure : `Exposure`
        What to write.
    path : `str` or `os.PathLike`
        Output file; written to a temporary name then renamed.

    Returns
    -------
    path : `pathlib.Path`
        The written file.
    """
    path = Path(path)
    primary = fits.PrimaryHDU(header=exposure.metadata.copy())
    if exposure.zero_point is not None:
        primary.header["ZEROPNT"] = (float(exposure.zero_point), "AB mag of one image count")
    for plane in MaskPlane:
        primary.header[f"HIERARCH MP_{plane.name}"] = (int(plane).bit_length() - 1, "mask plane bit")
    image_header = exposure.wcs.to_header(relax=True) if exposure.wcs is not None else fits.Header()
    hdus = [
        primary,
        fits.ImageHDU(exposure.image, header=image_header, name="IMAGE"),
        fits.ImageHDU(exposure.mask, name="MASK"),
        fits.ImageHDU(exposure.variance, name="VARIANCE"),
    ]
    if exposure.psf is not None:
        hdus.append(exposure.psf.to_hdu())
    tmp = path.with_name(path.name + ".tmp")
    fits.HDUList(hdus).writeto(tmp, overwrite=True)
    os.replace(tmp, path)
    _log.debug("Wrote exposure %s", path)
    return path


def _read_hdus(path: Path) -> dict[str, Any]:
    """Read every HDU of ``path`` into memory; raise `CorruptFileError` on failure."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", AstropyUserWarning)  # "File may have been truncated"
            with fits.open(path, memmap=False) as hdul:
                hdul.verify("silentfix")
                data = {"PRIMARY": hdul[0].header.copy()}
                for hdu in hdul[1:]:
                    data[hdu.name] = (hdu.header.copy(), None if hdu.data is None else np.array(hdu.data))
    except FileNotFoundError as exc:
        raise CorruptFileError(f"read_exposure: {path}: no such file") from exc
    except (OSError, ValueError, TypeError, IndexError, AstropyUserWarning) as exc:
        raise CorruptFileError(f"read_exposure: {path}: not a readable FITS file ({exc})") from exc
    return data


def read_exposure(path: str | os.PathLike[str]) -> Exposure:
    """Read an exposure written by `write_exposure`.

    Parameters
    ----------
    path : `str` or `os.PathLike`
        The FITS file.

    Returns
    -------
    exposure : `Exposure`
        The exposure; ``psf`` is `None` if the file has no ``PSF`` extension.

    Raises
    ------
    CorruptFileError
        If the file is missing, truncated, not FITS, or lacks ``IMAGE``,
        ``MASK`` or ``VARIANCE``, or if those have inconsistent shapes.
    """
    from .psf import PsfModel

    path = Path(path)
    hdus = _read_hdus(path)
    missing = [name for name in ("IMAGE", "MASK", "VARIANCE") if hdus.get(name, (None, None))[1] is None]
    if missing:
        raise CorruptFileError(f"read_exposure: {path}: missing or empty extension(s) {', '.join(missing)}")
    primary: fits.Header = hdus["PRIMARY"]
    image_header, image = hdus["IMAGE"]
    wcs = WCS(image_header) if image_header.get("CTYPE1") else None
    metadata = primary.copy()
    for key in [k for k in metadata if k == "ZEROPNT" or k.startswith("MP_")]:
        del metadata[key]
    for key in ("SIMPLE", "BITPIX", "NAXIS", "EXTEND"):
        metadata.remove(key, ignore_missing=True)
    psf = PsfModel.from_fits(*hdus["PSF"]) if "PSF" in hdus else None
    try:
        return Exposure(
            image=image,
            mask=hdus["MASK"][1],
            variance=hdus["VARIANCE"][1],
            wcs=wcs,
            psf=psf,
            zero_point=primary.get("ZEROPNT"),
            metadata=metadata,
        )
    except BadImageError as exc:
        raise CorruptFileError(f"read_exposure: {path}: {exc}") from exc
