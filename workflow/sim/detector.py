"""Detector and electronics effects applied to an image in electrons.

These are the steps of `workflow.sim.simulate.simulate_raw` after the sky is
drawn: photon noise, cosmic rays, full-well saturation with bleed trails,
and the readout into int32 raw amplifier segments (gain, bias structure,
per-amplifier bias level, row-dependent drift, read noise, ADC clipping).
"""

from __future__ import annotations

__all__ = ["add_photon_noise", "add_cosmic_rays", "bleed_columns", "read_out"]

import logging
import math

import numpy as np
from astropy.table import Table

from workflow.core.amplifiers import disassemble_image
from workflow.core.instrument import Detector, Instrument
from workflow.sim.calibs import amp_bias_levels, bias_pattern

_log = logging.getLogger(__name__)

_GAUSS_POISSON_LIMIT = 30.0


def add_photon_noise(
    signal: np.ndarray, rng: np.random.Generator, *, gaussian_above: float = _GAUSS_POISSON_LIMIT
) -> None:
    """Replace expected electrons by a noisy realization, in place.

    Parameters
    ----------
    signal : `numpy.ndarray`
        Expected electrons per pixel (float32); overwritten.
    rng : `numpy.random.Generator`
        Random source.
    gaussian_above : `float`
        Expected level (electrons) from which the noise is drawn Gaussian; `numpy.inf`
        draws Poisson noise at every level (its skew, ``1/sqrt(mean)``, is what biases
        mode-type background estimates; the Gaussian shortcut hides it).

    Notes
    -----
    Gaussian with variance equal to the mean where the mean is >= ``gaussian_above``
    (fast), Poisson below.
    """
    low = signal < gaussian_above
    expected_low = np.maximum(signal[low], 0.0) if low.any() else None
    noise = rng.standard_normal(signal.shape, dtype=np.float32)
    noise *= np.sqrt(np.maximum(signal, 0.0))
    signal += noise
    if expected_low is not None:
        signal[low] = rng.poisson(expected_low).astype(np.float32)


def add_cosmic_rays(image: np.ndarray, rate: float, exptime: float, pixel_um: float, rng: np.random.Generator) -> Table:
    """Add straight cosmic-ray tracks to an electron image, in place.

    Parameters
    ----------
    image : `numpy.ndarray`
        Electrons (float32); modified.
    rate : `float`
        Events per cm^2 per second.
    exptime : `float`
        Exposure time in seconds.
    pixel_um : `float`
        Pixel size (for the detector area).
    rng : `numpy.random.Generator`
        Random source.

    Returns
    -------
    tracks : `astropy.table.Table`
        ``x``, ``y`` (start, pixels), ``angle_deg``, ``length`` (pixels) and
        ``charge`` (total electrons, before clipping at the image edge).
    """
    ny, nx = image.shape
    area_cm2 = nx * ny * (pixel_um * 1e-4) ** 2
    n = int(rng.poisson(rate * area_cm2 * exptime))
    x0, y0 = rng.uniform(0, nx - 1, n), rng.uniform(0, ny - 1, n)
    angle = rng.uniform(0.0, 360.0, n)
    length = np.minimum(rng.exponential(6.0, n), 60.0)
    charge_per_pix = rng.uniform(500.0, 3000.0, n)
    for i in range(n):
        steps = np.arange(0.0, length[i] + 0.25, 0.25)
        xs = np.rint(x0[i] + steps * math.cos(math.radians(angle[i]))).astype(int)
        ys = np.rint(y0[i] + steps * math.sin(math.radians(angle[i]))).astype(int)
        ok = (xs >= 0) & (xs < nx) & (ys >= 0) & (ys < ny)
        np.add.at(image, (ys[ok], xs[ok]), np.float32(charge_per_pix[i] * 0.25))
    return Table({"x": x0, "y": y0, "angle_deg": angle, "length": length, "charge": charge_per_pix * (length + 0.25)})


def bleed_columns(image: np.ndarray, full_well: float) -> int:
    """Clip pixels at full well and spill the excess along their columns.

    Each saturated run of a column gives its excess charge to the pixels
    above and below it (half each), filling them to full well.

    Parameters
    ----------
    image : `numpy.ndarray`
        Electrons; modified in place.
    full_well : `float`
        Pixel capacity in electrons.

    Returns
    -------
    n_columns : `int`
        Number of columns that had saturated pixels.
    """
    columns = np.flatnonzero((image > full_well).any(axis=0))
    ny = image.shape[0]
    for x in columns:
        col = image[:, x]
        sat = col > full_well
        edges = np.flatnonzero(np.diff(np.concatenate([[0], sat.view(np.int8), [0]])))
        for start, stop in zip(edges[::2], edges[1::2], strict=True):
            excess = float(np.sum(col[start:stop] - full_well))
            col[start:stop] = full_well
            n = int(excess // full_well)
            top, bottom = min(ny, stop + n - n // 2), max(0, start - n // 2)
            col[stop:top] = np.maximum(col[stop:top], full_well)
            col[bottom:start] = np.maximum(col[bottom:start], full_well)
    return len(columns)


def _drift(rows: int, rng: np.random.Generator) -> np.ndarray:
    """Return a per-row bias drift (ADU): a slow sine plus a slope, ~1 ADU."""
    t = np.arange(rows, dtype=np.float64)[:, None] / rows
    wave = rng.uniform(0.0, 1.5) * np.sin(2 * np.pi * t * rng.uniform(0.5, 2.0) + rng.uniform(0, 2 * np.pi))
    return (wave + rng.uniform(-1.0, 1.0) * (t - 0.5)).astype(np.float32)


def read_out(
    instrument: Instrument, detector: Detector, electrons: np.ndarray, seed: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Convert an assembled electron image into int32 raw amplifier segments.

    Parameters
    ----------
    instrument : `workflow.core.instrument.Instrument`
        The camera.
    detector : `workflow.core.instrument.Detector`
        The detector (its bias structure and levels).
    electrons : `numpy.ndarray`
        Assembled image in electrons (float32).
    seed : `int`
        Universe seed of the detector signatures.
    rng : `numpy.random.Generator`
        Random source of this exposure (drift, level jitter, read noise).

    Returns
    -------
    segments : `dict` [`str`, `numpy.ndarray`]
        Raw segments (`workflow.core.amplifiers` layout): electrons / gain +
        `workflow.sim.calibs.bias_pattern` in the imaging area; everywhere the
        amplifier's bias level (+-1 ADU per exposure) + row drift + read
        noise; clipped to [0, SATURATE] and rounded.
    """
    geom = instrument.geometry
    adu = electrons / np.float32(geom.gain)
    adu += bias_pattern(instrument, detector, seed)
    segments = disassemble_image(adu, geom, fill=0.0, dtype=np.float32)
    levels = amp_bias_levels(instrument, detector, seed)
    out = {}
    for amp in geom.amplifiers:
        seg = segments[amp.name]
        seg += np.float32(levels[amp.name] + rng.normal(0.0, 1.0)) + _drift(amp.raw_shape[0], rng)
        seg += rng.standard_normal(seg.shape, dtype=np.float32) * np.float32(amp.read_noise / amp.gain)
        np.clip(seg, 0.0, amp.saturation, out=seg)
        out[amp.name] = np.rint(seg).astype(np.int32)
    return out
