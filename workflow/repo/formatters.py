"""Butler formatters for the data types prompt-snake stores itself.

Rubin's FITS formatters live in ``obs_base`` and need ``afw``, which is not on
PyPI; this module gives the Butler a plain `astropy.io.fits.HDUList` instead.
It is registered as storage class ``FitsHDUList`` by the configuration in
``config/butler`` (see `workflow.repo.central_repo.butler_seed_config`).
"""

from __future__ import annotations

__all__ = ["FitsHDUListFormatter", "STORAGE_CLASS", "FORMATTER_NAME"]

import logging
from typing import Any

from astropy.io import fits
from lsst.daf.butler import FormatterV2
from lsst.resources import ResourcePath

_log = logging.getLogger(__name__)

STORAGE_CLASS = "FitsHDUList"
"""Name of the storage class for `astropy.io.fits.HDUList` datasets."""

FORMATTER_NAME = f"{__name__}.FitsHDUListFormatter"
"""Fully qualified name of `FitsHDUListFormatter`, as Butler configs spell it."""


class FitsHDUListFormatter(FormatterV2):
    """Read and write `astropy.io.fits.HDUList` datasets as FITS files.

    Reads load every HDU into memory and close the file, so the returned
    list stays valid after a remote (e.g. S3) file's local copy is removed.
    Tile-compressed files (``.fz``) are read like any other FITS file.
    """

    default_extension = ".fits"
    supported_extensions = frozenset({".fits", ".fz", ".fits.fz", ".fit"})
    can_read_from_local_file = True

    def read_from_local_file(self, path: str, component: str | None = None, expected_size: int = -1) -> Any:
        """Read a FITS file into a fully loaded `astropy.io.fits.HDUList`.

        Parameters
        ----------
        path : `str`
            Local file to read.
        component : `str`, optional
            Not supported; must be `None`.
        expected_size : `int`, optional
            Expected size of the file in bytes (unused).

        Returns
        -------
        hdulist : `astropy.io.fits.HDUList`
            Every HDU, header and data, in memory.

        Raises
        ------
        ValueError
            If a component is requested or the file is not FITS; the message
            names the file.
        """
        if component is not None:
            raise ValueError(f"{path}: FITS HDUList has no component {component!r}")
        try:
            with fits.open(path, memmap=False, lazy_load_hdus=False) as hdul:
                for hdu in hdul:
                    hdu.data  # noqa: B018 - read (and decompress) the pixels before the file closes
                hdus = list(hdul)
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not a readable FITS file: {exc}") from exc
        return fits.HDUList(hdus)

    def write_local_file(self, in_memory_dataset: Any, uri: ResourcePath) -> None:
        """Write an `astropy.io.fits.HDUList` to a local FITS file.

        Parameters
        ----------
        in_memory_dataset : `astropy.io.fits.HDUList`
            The HDUs to write.
        uri : `lsst.resources.ResourcePath`
            Local file to write.

        Raises
        ------
        TypeError
            If the dataset is not an `astropy.io.fits.HDUList`.
        """
        if not isinstance(in_memory_dataset, fits.HDUList):
            raise TypeError(f"{uri}: expected an astropy.io.fits.HDUList, got {type(in_memory_dataset).__name__}")
        in_memory_dataset.writeto(uri.ospath, overwrite=True)
