"""Detector signatures and the bias, flat and defect calibs that describe them.

The simulator and the calibs use the same functions, so ISR with these calibs
undoes exactly what the simulator did (up to the small noise of the calibs):

- `flat_pattern`: relative response, normalized to 1 on the optical axis:
  focal-plane vignetting ``1 - 0.03 rho^2 - 0.12 rho^6`` (``rho`` = radius
  over the focal-plane radius) x per-amplifier gain ratios (~1.5 % rms)
  x pixel response non-uniformity (0.4 % rms) x a 0.3 % band-dependent tilt.
  Dividing by it leaves the image as if every pixel sat on the axis.
- `bias_pattern`: the 2-d bias structure in ADU left after subtracting each
  row's serial-overscan level: a few-ADU transient at the start of each
  amplifier's readout plus 0.5 ADU fixed-pattern noise.
- `bad_columns`: hot column segments (dark current 20-100 e-/s), 1-4 per
  detector; `make_defects` lists them.
- `amp_bias_levels`: the per-amplifier overscan level in ADU (nominal
  bias +- ~1 %).

All arrays are in the assembled, trimmed geometry of
`workflow.core.amplifiers.DetectorGeometry` (``image[y, x]``), float32.  Every
signature is a deterministic function of ``(seed, detector)``.
"""

from __future__ import annotations

__all__ = [
    "Calib",
    "DEFAULT_VALID_START",
    "DEFAULT_VALID_END",
    "flat_pattern",
    "bias_pattern",
    "bad_columns",
    "amp_bias_levels",
    "make_bias",
    "make_flat",
    "make_defects",
]

import dataclasses
import functools
import logging
import math

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time

from workflow.core.amplifiers import assemble_image
from workflow.core.instrument import Detector, Instrument
from workflow.sim.refcat import BANDS

_log = logging.getLogger(__name__)

DEFAULT_VALID_START = "2020-01-01T00:00:00"
"""Default start of calib validity (TAI)."""
DEFAULT_VALID_END = "2100-01-01T00:00:00"
"""Default end of calib validity (TAI)."""

_FLAT_STREAM, _PRNU_STREAM, _BIAS_STREAM, _DEFECT_STREAM, _CALIB_NOISE_STREAM = 11, 12, 13, 14, 15


@dataclasses.dataclass(frozen=True, kw_only=True)
class Calib:
    """One calibration product of one detector.

    Attributes
    ----------
    kind : `str`
        ``"bias"`` or ``"flat"``.
    instrument : `str`
        Instrument name.
    detector : `int`
        Detector id.
    physical_filter : `str` or `None`
        Filter of a flat.
    image : `numpy.ndarray`
        float32, assembled and trimmed geometry (bias in ADU, flat unitless).
    header : `astropy.io.fits.Header`
        Identification and validity cards.
    valid_start, valid_end : `astropy.time.Time`
        Validity range (TAI), end exclusive.
    """

    kind: str
    instrument: str
    detector: int
    physical_filter: str | None
    image: np.ndarray
    header: fits.Header
    valid_start: Time
    valid_end: Time

    def is_valid(self, when: Time) -> bool:
        """Return `True` if the calib is valid at ``when``."""
        return bool(self.valid_start <= when < self.valid_end)

    def to_hdulist(self) -> fits.HDUList:
        """Return the calib as a FITS HDU list (primary holds the image)."""
        return fits.HDUList([fits.PrimaryHDU(self.image, header=self.header)])


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


def _focal_plane_radius(instrument: Instrument) -> float:
    geom = instrument.geometry
    half_diag = math.hypot(geom.nx, geom.ny) * geom.pixel_size_um / 2000.0
    return max(math.hypot(*d.center_mm) for d in instrument.detectors) + half_diag


def _vignetting(instrument: Instrument, det: Detector) -> np.ndarray:
    """Return ``1 - 0.03 rho^2 - 0.12 rho^6`` over the detector (float32)."""
    geom = instrument.geometry
    pix_mm = geom.pixel_size_um / 1000.0
    dx = (np.arange(geom.nx) - (geom.nx - 1) / 2.0) * pix_mm
    dy = (np.arange(geom.ny) - (geom.ny - 1) / 2.0) * pix_mm
    c, s = math.cos(math.radians(det.orientation_deg)), math.sin(math.radians(det.orientation_deg))
    scale = 1.0 / _focal_plane_radius(instrument)
    # Same mapping as Instrument.pixel_to_focal_plane, in radius units, float32.
    u = ((det.center_mm[0] + c * dx) * scale).astype(np.float32)[None, :]
    u = u - (s * dy * scale).astype(np.float32)[:, None]
    v = ((det.center_mm[1] + s * dx) * scale).astype(np.float32)[None, :]
    v = v + (c * dy * scale).astype(np.float32)[:, None]
    rho2 = u * u
    rho2 += v * v
    del u, v
    rho6 = rho2 * rho2
    rho6 *= rho2
    flat = np.float32(1.0) - np.float32(0.03) * rho2
    flat -= np.float32(0.12) * rho6
    return flat


@functools.lru_cache(maxsize=2)
def _flat_cached(instrument: Instrument, det_id: int, band: str, seed: int) -> np.ndarray:
    geom = instrument.geometry
    det = instrument.detector(det_id)
    flat = _vignetting(instrument, det)
    amp_gain = 1.0 + _rng(seed, _FLAT_STREAM, det.id).normal(0.0, 0.015, len(geom.amplifiers))
    for amp, ratio in zip(geom.amplifiers, amp_gain, strict=True):
        flat[amp.bbox.slices] *= np.float32(ratio)
    prnu = _rng(seed, _PRNU_STREAM, det.id).standard_normal(geom.shape, dtype=np.float32)
    prnu *= np.float32(0.004)
    prnu += np.float32(1.0)
    flat *= prnu
    tilt = 0.003 * (BANDS.index(band) - 2.5) / 2.5
    x = np.arange(geom.nx, dtype=np.float32)[None, :]
    flat *= (1.0 + tilt * (x / max(geom.nx - 1, 1) - 0.5) * 2.0).astype(np.float32)
    flat.flags.writeable = False
    return flat


def flat_pattern(instrument: Instrument, detector: int | str | Detector, band: str, seed: int = 0) -> np.ndarray:
    """Return the true relative response of a detector in one band.

    Parameters
    ----------
    instrument : `workflow.core.instrument.Instrument`
        The camera.
    detector : `int`, `str` or `Detector`
        Detector id or name.
    band : `str`
        Band (``u``..``y``).
    seed : `int`, optional
        Universe seed.

    Returns
    -------
    flat : `numpy.ndarray`
        Read-only float32 array of the assembled shape (see module docstring).
    """
    return _flat_cached(instrument, instrument.detector(detector).id, band, int(seed))


@functools.lru_cache(maxsize=2)
def _bias_cached(instrument: Instrument, det_id: int, seed: int) -> np.ndarray:
    geom = instrument.geometry
    rng = _rng(seed, _BIAS_STREAM, det_id)
    segments = {}
    readout_col = np.arange(geom.amp_nx, dtype=np.float32) + geom.prescan
    for amp in geom.amplifiers:
        amplitude = np.float32(rng.uniform(2.0, 8.0))
        ramp = amplitude * np.exp(-readout_col / np.float32(10.0))
        segments[amp.name] = np.broadcast_to(ramp, amp.bbox.shape)
    bias = assemble_image(segments, geom)
    bias += rng.standard_normal(geom.shape, dtype=np.float32) * np.float32(0.5)
    bias.flags.writeable = False
    return bias


def bias_pattern(instrument: Instrument, detector: int | str | Detector, seed: int = 0) -> np.ndarray:
    """Return the true 2-d bias structure (ADU) of a detector.

    Returns
    -------
    bias : `numpy.ndarray`
        Read-only float32 array of the assembled shape: what remains of the
        bias after a row-by-row serial-overscan subtraction.
    """
    return _bias_cached(instrument, instrument.detector(detector).id, int(seed))


def amp_bias_levels(instrument: Instrument, detector: int | str | Detector, seed: int = 0) -> dict[str, float]:
    """Return each amplifier's mean overscan level in ADU."""
    geom = instrument.geometry
    det = instrument.detector(detector)
    sigma = 0.01 * abs(geom.bias_level) + 1.0
    offsets = _rng(seed, _BIAS_STREAM, det.id, 1).normal(0.0, sigma, len(geom.amplifiers))
    return {amp.name: float(amp.bias_level + off) for amp, off in zip(geom.amplifiers, offsets, strict=True)}


def bad_columns(instrument: Instrument, detector: int | str | Detector, seed: int = 0) -> Table:
    """Return the hot column segments of a detector.

    Returns
    -------
    columns : `astropy.table.Table`
        ``x``, ``y0``, ``y1`` (rows ``y0 <= y < y1`` of column ``x``, assembled
        pixels) and ``rate`` (dark current, e-/s).
    """
    geom = instrument.geometry
    det = instrument.detector(detector)
    rng = _rng(seed, _DEFECT_STREAM, det.id)
    n = 1 + min(int(rng.poisson(1.0)), 3)
    x = rng.choice(np.arange(2, geom.nx - 2), size=n, replace=False)
    length = rng.uniform(0.2, 1.0, n) * geom.ny
    y0 = rng.uniform(0.0, 1.0, n) * (geom.ny - length)
    return Table(
        {
            "x": x.astype(int),
            "y0": y0.astype(int),
            "y1": (y0 + length).astype(int),
            "rate": rng.uniform(20.0, 100.0, n),
        }
    )


def _times(valid_start: Time | str, valid_end: Time | str) -> tuple[Time, Time]:
    start = valid_start if isinstance(valid_start, Time) else Time(valid_start, scale="tai")
    end = valid_end if isinstance(valid_end, Time) else Time(valid_end, scale="tai")
    return start.tai, end.tai


def _calib_header(kind: str, instrument: Instrument, det: Detector, start: Time, end: Time, seed: int) -> fits.Header:
    header = fits.Header()
    header["OBSTYPE"] = kind
    header["INSTRUME"] = instrument.name
    header["DETECTOR"] = det.id
    header["DETNAME"] = det.name
    header["VALIDSTA"] = (start.isot, "start of validity (TAI)")
    header["VALIDEND"] = (end.isot, "end of validity (TAI), exclusive")
    header["TIMESYS"] = "TAI"
    header["SIMSEED"] = seed
    return header


def make_bias(
    instrument: Instrument,
    detector: int | str | Detector,
    *,
    seed: int = 0,
    valid_start: Time | str = DEFAULT_VALID_START,
    valid_end: Time | str = DEFAULT_VALID_END,
    noise_adu: float = 0.3,
    unit: str = "adu",
) -> Calib:
    """Return the bias calib of a detector.

    Parameters
    ----------
    instrument : `workflow.core.instrument.Instrument`
        The camera.
    detector : `int`, `str` or `Detector`
        Detector id or name.
    seed : `int`, optional
        Universe seed (as given to the simulator).
    valid_start, valid_end : `astropy.time.Time` or `str`, optional
        Validity range (ISO strings are TAI).
    noise_adu : `float`, optional
        Noise of the combined bias (ADU).
    unit : `str`, optional
        ``"adu"`` (default) or ``"electron"`` (multiplied by the nominal
        gain, for an ISR that applies the gain before the bias).

    Returns
    -------
    bias : `Calib`
        ``image`` is `bias_pattern` plus noise, to subtract after the
        row-by-row serial-overscan correction; ``header["BUNIT"]`` names
        the unit.

    Raises
    ------
    ValueError
        If ``unit`` is not ``"adu"`` or ``"electron"``.
    """
    if unit not in ("adu", "electron"):
        raise ValueError(f"make_bias: unit must be 'adu' or 'electron', got {unit!r}")
    det = instrument.detector(detector)
    start, end = _times(valid_start, valid_end)
    rng = _rng(seed, _CALIB_NOISE_STREAM, det.id, 0)
    noise = rng.standard_normal(instrument.geometry.shape, dtype=np.float32)
    image = bias_pattern(instrument, det, seed) + noise * np.float32(noise_adu)
    if unit == "electron":
        image *= np.float32(instrument.geometry.gain)
    header = _calib_header("bias", instrument, det, start, end, seed)
    header["BUNIT"] = unit
    return Calib(
        kind="bias",
        instrument=instrument.name,
        detector=det.id,
        physical_filter=None,
        image=image,
        header=header,
        valid_start=start,
        valid_end=end,
    )


def make_flat(
    instrument: Instrument,
    detector: int | str | Detector,
    physical_filter: str,
    *,
    seed: int = 0,
    valid_start: Time | str = DEFAULT_VALID_START,
    valid_end: Time | str = DEFAULT_VALID_END,
    noise: float = 0.001,
) -> Calib:
    """Return the flat calib of a detector in one physical filter.

    Parameters are as for `make_bias`, plus ``physical_filter`` and the
    relative ``noise`` of the combined flat.

    Returns
    -------
    flat : `Calib`
        ``image`` is `flat_pattern` times (1 + noise); divide by it.

    Raises
    ------
    KeyError
        If the filter is unknown to the instrument.
    """
    det = instrument.detector(detector)
    band = instrument.band(physical_filter)
    start, end = _times(valid_start, valid_end)
    rng = _rng(seed, _CALIB_NOISE_STREAM, det.id, 1 + BANDS.index(band))
    image = flat_pattern(instrument, det, band, seed) * (
        1.0 + rng.standard_normal(instrument.geometry.shape, dtype=np.float32) * np.float32(noise)
    )
    header = _calib_header("flat", instrument, det, start, end, seed)
    header["FILTER"] = physical_filter
    header["BAND"] = band
    return Calib(
        kind="flat",
        instrument=instrument.name,
        detector=det.id,
        physical_filter=physical_filter,
        image=image,
        header=header,
        valid_start=start,
        valid_end=end,
    )


def make_defects(
    instrument: Instrument,
    detector: int | str | Detector,
    *,
    seed: int = 0,
    valid_start: Time | str = DEFAULT_VALID_START,
    valid_end: Time | str = DEFAULT_VALID_END,
) -> Table:
    """Return the defect boxes of a detector (its hot columns).

    Returns
    -------
    defects : `astropy.table.Table`
        ``x0``, ``y0``, ``x1``, ``y1`` (assembled pixels, upper bounds
        exclusive); ``meta`` holds the header cards of `make_bias` with
        ``OBSTYPE = "defects"``.
    """
    det = instrument.detector(detector)
    start, end = _times(valid_start, valid_end)
    cols = bad_columns(instrument, det, seed)
    table = Table({"x0": cols["x"], "y0": cols["y0"], "x1": cols["x"] + 1, "y1": cols["y1"]})
    table.meta.update(dict(_calib_header("defects", instrument, det, start, end, seed)))
    return table
