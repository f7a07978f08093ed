"""Amplifier geometry of a CCD and the raw <-> assembled pixel mapping.

The same functions serve the simulator (which cuts an assembled image into raw
amplifier segments) and ISR (which glues overscan-corrected segments back).

Raw layout
----------
A raw file holds one image HDU per amplifier (see `workflow.core.raw_fits`).  Each
amplifier segment is an array of shape ``(amp_ny + parallel_overscan,
prescan + amp_nx + serial_overscan)`` in *readout order*: numpy ``[row,
column]``, row 0 and column 0 are the first pixels read.  Inside a segment::

    rows amp_ny .. amp_ny+po-1  |  (unused) | parallel overscan | (unused) |
    rows 0 .. amp_ny-1          |  prescan  |   imaging data    |  serial   |
                                   cols 0..   prescan..           overscan

i.e. ``[0:prescan]`` is the prescan, ``[prescan:prescan+amp_nx]`` the imaging
columns and the last ``serial_overscan`` columns the serial overscan; the
parallel overscan is the top ``parallel_overscan`` rows over the imaging
columns only.  The unused corners hold bias + read noise as well.

Amplifiers tile the assembled (trimmed) detector image in a grid of
``columns x rows`` blocks of ``amp_nx x amp_ny`` pixels; amplifier
``C{row}{col}`` (row 0 at the bottom, col 0 at the left) covers
``x in [col*amp_nx, (col+1)*amp_nx)``, ``y in [row*amp_ny, (row+1)*amp_ny)``.
Each amplifier reads out towards its nearest detector edge: amplifiers in the
right half (``col >= columns/2``) are flipped in x and amplifiers in the top
row are flipped in y, so a segment's imaging data equals the assembled block
after those flips (`Amplifier.raw_to_assembled`).
"""

from __future__ import annotations

__all__ = [
    "Box",
    "Amplifier",
    "DetectorGeometry",
    "assemble_image",
    "disassemble_image",
]

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from workflow.core.exceptions import ConfigError, NonRetriableError

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Box:
    """An integer pixel box, lower bounds inclusive and upper exclusive.

    Parameters
    ----------
    x0, y0 : `int`
        First column and row.
    x1, y1 : `int`
        One past the last column and row.
    """

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        """Number of columns."""
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        """Number of rows."""
        return self.y1 - self.y0

    @property
    def shape(self) -> tuple[int, int]:
        """Numpy shape ``(height, width)``."""
        return (self.height, self.width)

    @property
    def slices(self) -> tuple[slice, slice]:
        """Numpy index ``(rows, columns)`` selecting this box."""
        return (slice(self.y0, self.y1), slice(self.x0, self.x1))

    def is_empty(self) -> bool:
        """Return `True` if the box holds no pixel."""
        return self.width <= 0 or self.height <= 0

    def to_fits(self, flip_x: bool = False, flip_y: bool = False) -> str:
        """Return the box as a 1-based FITS section, e.g. ``[1:509,1:2000]``.

        A flipped axis is written high-to-low, as in IRAF ``DETSEC`` cards.
        """
        xs = (self.x1, self.x0 + 1) if flip_x else (self.x0 + 1, self.x1)
        ys = (self.y1, self.y0 + 1) if flip_y else (self.y0 + 1, self.y1)
        return f"[{xs[0]}:{xs[1]},{ys[0]}:{ys[1]}]"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Amplifier:
    """One amplifier: where its pixels are in the raw segment and the detector.

    Attributes
    ----------
    name : `str`
        ``C{row}{col}``; also the EXTNAME of its raw HDU.
    index : `int`
        Position in `DetectorGeometry.amplifiers` (row-major from bottom-left).
    col, row : `int`
        Grid position in the detector.
    bbox : `Box`
        Imaging pixels in the assembled (trimmed) detector image.
    raw_shape : `tuple` [`int`, `int`]
        Shape of the raw segment.
    raw_data, raw_prescan, raw_serial_overscan, raw_parallel_overscan : `Box`
        Regions of the raw segment (see the module docstring).
    flip_x, flip_y : `bool`
        Whether the raw data are mirrored relative to the assembled image.
    gain : `float`
        Nominal gain in electrons per ADU.
    read_noise : `float`
        Read noise in electrons.
    bias_level : `float`
        Nominal bias level in ADU.
    saturation : `float`
        Raw ADU value (bias included) at which the ADC saturates.
    """

    name: str
    index: int
    col: int
    row: int
    bbox: Box
    raw_shape: tuple[int, int]
    raw_data: Box
    raw_prescan: Box
    raw_serial_overscan: Box
    raw_parallel_overscan: Box
    flip_x: bool
    flip_y: bool
    gain: float
    read_noise: float
    bias_level: float
    saturation: float

    def raw_to_assembled(self, data: np.ndarray) -> np.ndarray:
        """Flip an array in raw readout orientation to assembled orientation.

        Parameters
        ----------
        data : `numpy.ndarray`
            The imaging region of a raw segment (shape ``bbox.shape``).

        Returns
        -------
        block : `numpy.ndarray`
            A view in assembled orientation.
        """
        if self.flip_y:
            data = data[::-1, :]
        if self.flip_x:
            data = data[:, ::-1]
        return data

    def assembled_to_raw(self, block: np.ndarray) -> np.ndarray:
        """Flip an assembled block into raw readout orientation (the inverse)."""
        # Flips are their own inverse.
        return self.raw_to_assembled(block)

    def header_cards(self) -> dict[str, Any]:
        """Return the FITS cards describing this amplifier's raw HDU."""
        return {
            "EXTNAME": self.name,
            "DATASEC": self.raw_data.to_fits(),
            "BIASSEC": self.raw_serial_overscan.to_fits(),
            "PRESEC": self.raw_prescan.to_fits() if not self.raw_prescan.is_empty() else "",
            "PAROSEC": (self.raw_parallel_overscan.to_fits() if not self.raw_parallel_overscan.is_empty() else ""),
            "DETSEC": self.bbox.to_fits(self.flip_x, self.flip_y),
            "GAIN": self.gain,
            "RDNOISE": self.read_noise,
            "BIASLVL": self.bias_level,
            "SATURATE": self.saturation,
        }


@dataclasses.dataclass(frozen=True, kw_only=True)
class DetectorGeometry:
    """Pixel geometry and electronics shared by all detectors of a camera.

    Build it with `DetectorGeometry.from_config`.

    Attributes
    ----------
    nx, ny : `int`
        Size of the assembled (trimmed) image.
    pixel_size_um : `float`
        Pixel pitch in micrometres.
    amp_columns, amp_rows : `int`
        Amplifier grid.
    amp_nx, amp_ny : `int`
        Imaging pixels per amplifier.
    prescan, serial_overscan, parallel_overscan : `int`
        Extra columns/rows of each raw segment.
    amplifiers : `tuple` [`Amplifier`, ...]
        Row-major from the bottom-left amplifier.
    gain, read_noise, bias_level, saturation : `float`
        Nominal electronics (see `Amplifier`).
    scale : `float`
        Factor applied to the configured sizes (1 = full size).
    """

    nx: int
    ny: int
    pixel_size_um: float
    amp_columns: int
    amp_rows: int
    amp_nx: int
    amp_ny: int
    prescan: int
    serial_overscan: int
    parallel_overscan: int
    amplifiers: tuple[Amplifier, ...]
    gain: float
    read_noise: float
    bias_level: float
    saturation: float
    scale: float = 1.0

    @property
    def shape(self) -> tuple[int, int]:
        """Numpy shape ``(ny, nx)`` of the assembled image."""
        return (self.ny, self.nx)

    @property
    def raw_amp_shape(self) -> tuple[int, int]:
        """Numpy shape of each raw amplifier segment."""
        return self.amplifiers[0].raw_shape

    def amplifier(self, name: str) -> Amplifier:
        """Return the amplifier called ``name``.

        Raises
        ------
        KeyError
            If there is no such amplifier; the message lists the known names.
        """
        for amp in self.amplifiers:
            if amp.name == name:
                return amp
        raise KeyError(f"no amplifier {name!r}; expected one of {[a.name for a in self.amplifiers]}")

    @classmethod
    def from_config(cls, detector_config: Mapping[str, Any], *, scale: float = 1.0) -> DetectorGeometry:
        """Build the geometry from the ``detector`` config section.

        Parameters
        ----------
        detector_config : `~collections.abc.Mapping`
            The ``detector`` section of the merged config.
        scale : `float`, optional
            Shrink factor for small test images: the imaging size per
            amplifier and the prescan/overscan sizes are multiplied by it
            (rounded, at least 1 imaging pixel; overscans keep at least 4
            columns and 2 rows when configured non-zero).  Pixel size,
            electronics and the number of amplifiers are unchanged.

        Returns
        -------
        geometry : `DetectorGeometry`

        Raises
        ------
        ConfigError
            If the image size is not a multiple of the amplifier grid, or
            ``scale`` is not in (0, 1].
        """
        if not 0.0 < scale <= 1.0:
            raise ConfigError(f"detector geometry: scale must be in (0, 1], got {scale!r}")
        cols = int(detector_config["amplifiers"]["columns"])
        rows = int(detector_config["amplifiers"]["rows"])
        nx, ny = int(detector_config["nx"]), int(detector_config["ny"])
        if nx % cols or ny % rows:
            raise ConfigError(f"detector: nx={nx}, ny={ny} is not a multiple of the amplifier grid {cols}x{rows}")
        amp_nx = max(1, round(nx // cols * scale))
        amp_ny = max(1, round(ny // rows * scale))
        prescan = _scaled(detector_config["prescan"], scale, minimum=1)
        serial = _scaled(detector_config["serial_overscan"], scale, minimum=4)
        parallel = _scaled(detector_config["parallel_overscan"], scale, minimum=2)
        electronics = {
            "gain": float(detector_config["gain_e_per_adu"]),
            "read_noise": float(detector_config["read_noise_e"]),
            "bias_level": float(detector_config["bias_level_adu"]),
            "saturation": float(detector_config["saturation_adu"]),
        }
        amps = tuple(
            _make_amplifier(col, row, cols, rows, amp_nx, amp_ny, prescan, serial, parallel, electronics)
            for row in range(rows)
            for col in range(cols)
        )
        return cls(
            nx=amp_nx * cols,
            ny=amp_ny * rows,
            pixel_size_um=float(detector_config["pixel_size_um"]),
            amp_columns=cols,
            amp_rows=rows,
            amp_nx=amp_nx,
            amp_ny=amp_ny,
            prescan=prescan,
            serial_overscan=serial,
            parallel_overscan=parallel,
            amplifiers=amps,
            scale=scale,
            **electronics,
        )


def _scaled(value: int, scale: float, *, minimum: int) -> int:
    value = int(value)
    if value == 0:
        return 0
    return max(minimum, round(value * scale)) if scale < 1.0 else value


def _make_amplifier(
    col: int,
    row: int,
    cols: int,
    rows: int,
    amp_nx: int,
    amp_ny: int,
    prescan: int,
    serial: int,
    parallel: int,
    electronics: Mapping[str, float],
) -> Amplifier:
    width = prescan + amp_nx + serial
    return Amplifier(
        name=f"C{row}{col}",
        index=row * cols + col,
        col=col,
        row=row,
        bbox=Box(col * amp_nx, row * amp_ny, (col + 1) * amp_nx, (row + 1) * amp_ny),
        raw_shape=(amp_ny + parallel, width),
        raw_data=Box(prescan, 0, prescan + amp_nx, amp_ny),
        raw_prescan=Box(0, 0, prescan, amp_ny),
        raw_serial_overscan=Box(prescan + amp_nx, 0, width, amp_ny),
        raw_parallel_overscan=Box(prescan, amp_ny, prescan + amp_nx, amp_ny + parallel),
        flip_x=cols > 1 and col >= cols / 2,
        flip_y=rows > 1 and row == rows - 1,
        **electronics,
    )


def assemble_image(
    segments: Mapping[str, np.ndarray], geometry: DetectorGeometry, *, dtype: Any = np.float32
) -> np.ndarray:
    """Trim raw amplifier segments and place them in one detector image.

    Parameters
    ----------
    segments : `~collections.abc.Mapping` [`str`, `numpy.ndarray`]
        Raw segments by amplifier name (full raw shape, e.g. after overscan
        subtraction) or just their imaging regions (shape ``bbox.shape``).
    geometry : `DetectorGeometry`
        Geometry the segments follow.
    dtype : `numpy.dtype`, optional
        Type of the assembled image.

    Returns
    -------
    image : `numpy.ndarray`
        Assembled, trimmed image of shape ``geometry.shape``.

    Raises
    ------
    NonRetriableError
        If an amplifier is missing or a segment has the wrong shape.
    """
    image = np.empty(geometry.shape, dtype=dtype)
    for amp in geometry.amplifiers:
        if amp.name not in segments:
            raise NonRetriableError(f"assemble: amplifier {amp.name} missing; got {sorted(segments)}")
        seg = np.asarray(segments[amp.name])
        if seg.shape == amp.raw_shape:
            seg = seg[amp.raw_data.slices]
        elif seg.shape != amp.bbox.shape:
            raise NonRetriableError(
                f"assemble: amplifier {amp.name} has shape {seg.shape}; "
                f"expected raw {amp.raw_shape} or trimmed {amp.bbox.shape}"
            )
        image[amp.bbox.slices] = amp.raw_to_assembled(seg)
    return image


def disassemble_image(
    image: np.ndarray, geometry: DetectorGeometry, *, fill: float = 0.0, dtype: Any = None
) -> dict[str, np.ndarray]:
    """Cut an assembled image into raw-layout amplifier segments.

    Parameters
    ----------
    image : `numpy.ndarray`
        Assembled image of shape ``geometry.shape``.
    geometry : `DetectorGeometry`
        Target layout.
    fill : `float`, optional
        Value of the prescan and overscan pixels.
    dtype : `numpy.dtype`, optional
        Type of the segments (default: that of ``image``).

    Returns
    -------
    segments : `dict` [`str`, `numpy.ndarray`]
        Full raw segments by amplifier name.

    Raises
    ------
    NonRetriableError
        If ``image`` does not have the geometry's shape.
    """
    if image.shape != geometry.shape:
        raise NonRetriableError(f"disassemble: image shape {image.shape} != detector shape {geometry.shape}")
    dtype = image.dtype if dtype is None else dtype
    segments = {}
    for amp in geometry.amplifiers:
        seg = np.full(amp.raw_shape, fill, dtype=dtype)
        seg[amp.raw_data.slices] = amp.assembled_to_raw(image[amp.bbox.slices])
        segments[amp.name] = seg
    return segments
