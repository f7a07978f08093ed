"""The calibrated-exposure container: pixels, WCS, PSF, zero point, and its FITS file.

An `Exposure` holds the pixel planes of one detector image (``image`` in
electrons, or nJy-scaled counts for templates; ``mask`` as `MaskPlane` bits;
``variance`` in the image unit squared) together with its WCS, PSF model,
photometric zero point and FITS metadata.  On disk it is one FITS file with
named extensions ``IMAGE``, ``MASK``, ``VARIANCE`` and (optionally) ``PSF``;
the WCS lives in the ``IMAGE`` header, the zero point and mask-plane bit
numbers in the primary header.
"""

from __future__ import annotations

__all__ = ["Exposure", "write_exposure", "read_exposure"]

import dataclasses
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning
from astropy.wcs import WCS

from workflow.science.errors import BadImageError, CorruptFileError
from workflow.science.masks import MaskPlane

if TYPE_CHECKING:
    from workflow.science.psf import PsfModel

_log = logging.getLogger(__name__)


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
    psf : `workflow.science.psf.PsfModel` or `None`
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
        return self.image.shape

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
    from workflow.science.psf import PsfModel

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
