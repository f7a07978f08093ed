"""Science data errors, raised by every science step, and the input image check.

Each error names the step and, when there is one, the file.  `ScienceDataError`
marks "the data cannot support this step"; the pipeline runner falls back to the
next pipeline on it.
"""

from __future__ import annotations

__all__ = [
    "ScienceDataError",
    "BadImageError",
    "CorruptFileError",
    "TooFewStarsError",
    "NoTemplateError",
    "NumericalFailureError",
    "check_image",
]

from typing import Any

import numpy as np

from workflow.core.exceptions import NonRetriableError


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
