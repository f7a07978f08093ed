"""Content checks of one raw file: every amplifier present, of its shape, with usable pixels.

A raw can be valid FITS and still be garbage: a primary header without amplifier
HDUs, segments of another detector geometry, or floating-point segments that are
all NaN (cast to the int32 of `workflow.core.raw_fits.read_raw` those become
``-2**31``, "finite" pixels that ISR would happily process and the pipeline
fallback would end ``done``).  `raw_problem` says what is wrong, or `None`; the
caller (ingest) raises `workflow.stages.ingest.CorruptRawError` naming the file,
the visit and the detector.
"""

from __future__ import annotations

__all__ = ["raw_problem"]

from collections.abc import Sequence
from typing import Any

import numpy as np
from astropy.io import fits

from workflow.core.amplifiers import DetectorGeometry


def _segments(hdul: Sequence[Any]) -> dict[str, Any]:
    return {str(hdu.header.get("EXTNAME") or hdu.name): hdu for hdu in list(hdul)[1:]}


def _pixel_problem(name: str, data: np.ndarray) -> str | None:
    if not np.issubdtype(data.dtype, np.floating):
        return None  # integer pixels are always finite
    finite = np.isfinite(data)
    if not finite.any():
        return f"amplifier {name} has no finite pixel (all NaN or infinite)"
    bad = int(data.size - np.count_nonzero(finite))
    if bad:
        return f"amplifier {name} has {bad} non-finite pixel(s) of {data.size}"
    return None


def raw_problem(hdul: fits.HDUList, geometry: DetectorGeometry | None = None) -> str | None:
    """Return what makes an opened raw unusable, or `None` if it is a usable raw.

    Parameters
    ----------
    hdul : `astropy.io.fits.HDUList`
        The open raw (primary header + one image HDU per amplifier).
    geometry : `workflow.core.amplifiers.DetectorGeometry`, optional
        The detector's amplifiers: each must be present with its raw shape.
        Without it only the pixels are checked.

    Returns
    -------
    problem : `str` or `None`
        E.g. ``"no amplifier HDU"``, ``"amplifier C10 has shape (10, 10), expected
        (2048, 576)"``, ``"amplifier C00 has no finite pixel (all NaN or infinite)"``.
    """
    segments = _segments(hdul)
    images = {name: hdu for name, hdu in segments.items() if getattr(hdu, "data", None) is not None}
    if not images:
        return "no amplifier HDU with pixels"
    if geometry is not None:
        for amp in geometry.amplifiers:
            hdu = images.get(amp.name)
            if hdu is None:
                return f"amplifier {amp.name} is missing (HDUs: {', '.join(images)})"
            if tuple(hdu.data.shape) != tuple(amp.raw_shape):
                return f"amplifier {amp.name} has shape {tuple(hdu.data.shape)}, expected {tuple(amp.raw_shape)}"
    for name, hdu in images.items():
        problem = _pixel_problem(name, np.asarray(hdu.data))
        if problem is not None:
            return problem
    return None
