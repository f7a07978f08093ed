"""Raw files: one primary header plus one image HDU per amplifier.

Format (all instruments): HDU 0 is a data-less primary header with the
exposure cards (INSTRUME, DETECTOR, OBSID, ..., and an approximate TAN WCS
of the *assembled* image); HDUs 1..N are int32 amplifier segments in the raw
layout of `workflow.core.amplifiers`, EXTNAME = amplifier name, with DATASEC,
BIASSEC, PRESEC, PAROSEC, DETSEC, GAIN, RDNOISE, SATURATE cards.  A path
ending in ``.fz`` is written with RICE-compressed segments
(`astropy.io.fits.CompImageHDU`), as HSC raws are.

LSST-style cameras also publish a JSON sidecar next to each raw
(`raw_sidecar`): the primary header's cards as a flat dict.
"""

from __future__ import annotations

__all__ = [
    "RawImage",
    "write_raw",
    "read_raw",
    "raw_sidecar",
]

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from workflow.core.amplifiers import DetectorGeometry, assemble_image
from workflow.core.exceptions import NonRetriableError

_log = logging.getLogger(__name__)

_SKIP_SIDECAR = {"COMMENT", "HISTORY", "", "SIMPLE", "BITPIX", "NAXIS", "EXTEND"}


@dataclasses.dataclass(kw_only=True)
class RawImage:
    """The content of one raw file.

    Attributes
    ----------
    header : `astropy.io.fits.Header`
        Primary header.
    segments : `dict` [`str`, `numpy.ndarray`]
        int32 amplifier segments by amplifier name, in file order.
    segment_headers : `dict` [`str`, `astropy.io.fits.Header`]
        Header of each segment.
    """

    header: fits.Header
    segments: dict[str, np.ndarray]
    segment_headers: dict[str, fits.Header]

    def assemble(self, geometry: DetectorGeometry) -> np.ndarray:
        """Return the trimmed imaging pixels as one float32 image (no ISR)."""
        return assemble_image(self.segments, geometry)


def raw_sidecar(header: Mapping[str, Any] | fits.Header) -> dict[str, Any]:
    """Return the JSON sidecar content of a raw (its primary-header cards).

    Parameters
    ----------
    header : `astropy.io.fits.Header` or `~collections.abc.Mapping`
        Primary header of the raw.

    Returns
    -------
    sidecar : `dict`
        Card name to value; JSON-serializable (GROUPID, OBSID, ...).
    """
    out: dict[str, Any] = {}
    for key in header:
        if key in _SKIP_SIDECAR or key in out:
            continue
        value = header[key]
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, (str, int, float, bool)) or value is None:
            out[key] = value
    return out


def write_raw(path: str | os.PathLike[str], raw: RawImage, *, compress: bool | None = None) -> Path:
    """Write a raw file.

    Parameters
    ----------
    path : `str` or `os.PathLike`
        Destination; parent directories are created.
    raw : `RawImage`
        Content (a `workflow.sim.simulate.SimulatedRaw` is one).
    compress : `bool`, optional
        RICE-compress the segments; default: if ``path`` ends in ``.fz``.

    Returns
    -------
    path : `pathlib.Path`
        The written file.
    """
    path = Path(path)
    compress = path.suffix == ".fz" if compress is None else compress
    path.parent.mkdir(parents=True, exist_ok=True)
    hdus: list[fits.PrimaryHDU | fits.ImageHDU | fits.CompImageHDU] = [fits.PrimaryHDU(header=raw.header)]
    for name, data in raw.segments.items():
        header = raw.segment_headers.get(name, fits.Header()).copy()
        header["EXTNAME"] = name
        data = np.ascontiguousarray(data, dtype=np.int32)
        if compress:
            hdus.append(fits.CompImageHDU(data, header=header, compression_type="RICE_1"))
        else:
            hdus.append(fits.ImageHDU(data, header=header))
    fits.HDUList(hdus).writeto(path, overwrite=True)
    _log.debug("wrote raw %s (%d segments%s)", path, len(raw.segments), ", RICE" if compress else "")
    return path


def read_raw(path: str | os.PathLike[str], geometry: DetectorGeometry | None = None) -> RawImage:
    """Read a raw file written by `write_raw` (compressed or not).

    Parameters
    ----------
    path : `str` or `os.PathLike`
        The file.
    geometry : `workflow.core.amplifiers.DetectorGeometry`, optional
        If given, check that every amplifier is present with its raw shape.

    Returns
    -------
    raw : `RawImage`

    Raises
    ------
    NonRetriableError
        If the file is not a readable raw or does not match ``geometry``;
        the message names the file.
    """
    path = Path(path)
    try:
        with fits.open(path, memmap=False) as hdul:
            header = hdul[0].header.copy()
            segments, headers = {}, {}
            for hdu in hdul[1:]:
                name = hdu.header.get("EXTNAME") or hdu.name
                segments[name] = np.asarray(hdu.data, dtype=np.int32)
                headers[name] = hdu.header.copy()
    except (OSError, ValueError, TypeError) as exc:
        raise NonRetriableError(f"raw {path}: cannot read: {exc}") from exc
    if not segments:
        raise NonRetriableError(f"raw {path}: no amplifier HDUs")
    if geometry is not None:
        for amp in geometry.amplifiers:
            seg = segments.get(amp.name)
            if seg is None or seg.shape != amp.raw_shape:
                got = None if seg is None else seg.shape
                raise NonRetriableError(
                    f"raw {path} (detector {header.get('DETECTOR')}): amplifier {amp.name} "
                    f"has shape {got}, expected {amp.raw_shape}"
                )
    return RawImage(header=header, segments=segments, segment_headers=headers)
