"""Simulate raw snaps of any configured camera, with ground truth.

`simulate_raw` renders one detector of one snap:

1. Visit conditions (`visit_conditions`, shared by all detectors and snaps
   of a visit, from ``(seed, group_id)``): seeing, a pointing error of a few
   arcsec (the raw header carries the *commanded* pointing and WCS, the
   pixels the true one), transparency and sky brightness.
2. The synthetic sky (`workflow.sim.sky_model`): refcat stars, exponential
   galaxies, variables at their flux at mid-exposure and active transients,
   drawn with a core+wing Gaussian PSF (`workflow.sim.render`), plus sky,
   in electrons.
3. Detector: the flat pattern and hot columns (`workflow.sim.calibs`), photon
   noise, cosmic rays, saturation with bleed trails along columns
   (`workflow.sim.detector`).
4. Electronics (`workflow.sim.detector.read_out`), per amplifier:
   electrons / gain + bias structure + the amplifier's bias level + a small
   per-exposure row-dependent drift + read noise, in the raw layout of
   `workflow.core.amplifiers` (prescan and overscans hold bias + drift + read
   noise only), clipped to [0, SATURATE], int32.

Photometry: AB zero points (magnitude giving 1 e-/s) of an LSST-like
6.4 m telescope, shifted by ``SimOptions.zeropoint_offset_mag`` (default
+0.5 for HSC, -3.6 for LATISS, 0 otherwise).  The truth ``image_flux`` of a
source is in electrons *before* the flat: ISR (overscan, bias, flat with the
calibs of `workflow.sim.calibs`, times the gain) recovers it.

Small images: ``Instrument.from_config(config, scale=0.125)`` shrinks the
detectors (same pixel scale, same focal-plane positions).  A 1/8-scale LSST
detector covers ~1/64 of the sky area, about 30-60 refcat stars to r = 23 at
the default density; raise ``SkyModel.star_density_r23_per_deg2`` (tests use
4x) or point near the galactic plane if a test needs more.
"""

from __future__ import annotations

__all__ = [
    "SimOptions",
    "VisitConditions",
    "SimulatedRaw",
    "visit_conditions",
    "simulate_raw",
    "simulate_visit",
    "raw_header",
    "ZEROPOINTS",
    "SKY_MAGNITUDES",
]

import dataclasses
import logging
import os
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from workflow.core.exposure_info import ExposureInfo
from workflow.core.instrument import Detector, Instrument
from workflow.core.raw_fits import RawImage, raw_sidecar, write_raw
from workflow.sim.calibs import bad_columns, flat_pattern
from workflow.sim.detector import add_cosmic_rays, add_photon_noise, bleed_columns, read_out
from workflow.sim.render import GaussianMixturePsf, render_scene
from workflow.sim.sky_model import SkyModel

_log = logging.getLogger(__name__)

ZEROPOINTS = {"u": 26.52, "g": 28.51, "r": 28.36, "i": 28.17, "z": 27.78, "y": 26.82}
"""AB magnitude giving 1 e-/s on an LSST-like telescope, per band."""

SKY_MAGNITUDES = {"u": 22.96, "g": 22.26, "r": 21.20, "i": 20.48, "z": 19.60, "y": 18.61}
"""Dark-sky brightness in AB mag/arcsec^2, per band."""

_ZP_OFFSET_BY_INSTRUMENT = {"HSC": 0.5, "LATISS": -3.6}
_VISIT_STREAM, _NOISE_STREAM = 21, 22


@dataclasses.dataclass(frozen=True, kw_only=True)
class SimOptions:
    """Knobs of the simulation (defaults are LSST-like).

    Attributes
    ----------
    seeing_median_arcsec, seeing_scatter_dex, seeing_range_arcsec
        Log-normal PSF FWHM per visit, clipped to the range.
    pointing_error_arcsec : `float`
        RMS per axis of the true minus commanded boresight.
    rotation_error_deg : `float`
        RMS of the true minus commanded rotation (default none).
    transparency_rms_mag : `float`
        Cloud extinction per visit (half-normal, mag).
    sky_brightening_max_mag : `float`
        Sky brighter than dark by up to this much (uniform, mag).
    zeropoint_offset_mag : `float` or `None`
        Shift of the LSST-like zero points; `None` picks per instrument.
    cosmic_ray_rate_per_cm2_s : `float`
        Cosmic-ray events per cm^2 per second.
    bleed : `bool`
        Spill saturated charge along columns.
    margin_arcsec : `float`
        Sources this far outside the detector still add their wings.
    poisson_noise : `bool`
        Draw Poisson photon noise at every level (skewed, like real sky) instead of the
        faster Gaussian above 30 e-, which hides the bias of mode-type sky estimates.
    """

    seeing_median_arcsec: float = 0.8
    seeing_scatter_dex: float = 0.08
    seeing_range_arcsec: tuple[float, float] = (0.5, 1.6)
    pointing_error_arcsec: float = 3.0
    rotation_error_deg: float = 0.0
    transparency_rms_mag: float = 0.03
    sky_brightening_max_mag: float = 0.5
    zeropoint_offset_mag: float | None = None
    cosmic_ray_rate_per_cm2_s: float = 0.05
    bleed: bool = True
    margin_arcsec: float = 10.0
    poisson_noise: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisitConditions:
    """Observing conditions of one visit (the truth the pipeline should find).

    Attributes
    ----------
    seeing_arcsec : `float`
        PSF FWHM.
    offset_east_arcsec, offset_north_arcsec : `float`
        True boresight minus commanded, on the sky.
    rotation_error_deg : `float`
        True rotation minus commanded.
    true_ra, true_dec, true_rotation_deg : `float`
        True pointing.
    zeropoint : `float`
        AB magnitude giving 1 e-/s, transparency included.
    sky_mag : `float`
        Sky brightness in mag/arcsec^2.
    """

    seeing_arcsec: float
    offset_east_arcsec: float
    offset_north_arcsec: float
    rotation_error_deg: float
    true_ra: float
    true_dec: float
    true_rotation_deg: float
    zeropoint: float
    sky_mag: float


@dataclasses.dataclass(kw_only=True)
class SimulatedRaw(RawImage):
    """A simulated raw and its ground truth.

    Attributes
    ----------
    exposure : `workflow.sim.exposures.ExposureInfo`
        Identity of the snap.
    detector : `workflow.core.instrument.Detector`
        The detector.
    conditions : `VisitConditions`
        True conditions.
    true_wcs : `astropy.wcs.WCS`
        WCS the pixels were drawn with (assembled image, 0-based).
    psf : `workflow.sim.render.GaussianMixturePsf`
        PSF in pixels.
    stars : `astropy.table.Table`
        Drawn refcat stars with ``x``, ``y``, ``image_flux`` (e-), centre on
        the detector.
    galaxies : `astropy.table.Table`
        Drawn galaxies, likewise.
    truth : `astropy.table.Table`
        Injected variables and transients: ``id``, ``kind``, ``ra``,
        ``dec``, ``mean_flux``, ``flux`` (nJy), ``mag``, ``x``, ``y``,
        ``image_flux`` (e-), ``exposure``, ``detector``, ``mjd``; only those
        whose centre lies on the detector.
    cosmic_rays : `astropy.table.Table`
        ``x``, ``y`` (start), ``angle_deg``, ``length``, ``charge`` (e-).
    """

    exposure: ExposureInfo
    detector: Detector
    conditions: VisitConditions
    true_wcs: WCS
    psf: GaussianMixturePsf
    stars: Table
    galaxies: Table
    truth: Table
    cosmic_rays: Table

    def sidecar(self) -> dict[str, Any]:
        """Return the JSON sidecar of this raw (see `workflow.core.raw_fits.raw_sidecar`)."""
        return raw_sidecar(self.header)

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the raw to ``path`` (`workflow.core.raw_fits.write_raw`)."""
        return write_raw(path, self)


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def _offset(ra: float, dec: float, east_arcsec: float, north_arcsec: float) -> tuple[float, float]:
    """Move a sky position by a small tangent-plane offset."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [0.0, 0.0]
    wcs.wcs.cdelt = [1.0 / 3600.0, 1.0 / 3600.0]
    new_ra, new_dec = wcs.all_pix2world([[east_arcsec, north_arcsec]], 1)[0]
    return float(new_ra), float(new_dec)


def visit_conditions(
    instrument: Instrument, exposure: ExposureInfo, *, seed: int = 0, options: SimOptions | None = None
) -> VisitConditions:
    """Return the true conditions of a visit (same for all its detectors and snaps).

    Parameters
    ----------
    instrument : `workflow.core.instrument.Instrument`
        The camera.
    exposure : `workflow.sim.exposures.ExposureInfo`
        Any snap of the visit (only ``group_id``, pointing and filter are used).
    seed : `int`, optional
        Universe seed.
    options : `SimOptions`, optional
        Distributions.

    Returns
    -------
    conditions : `VisitConditions`
    """
    opts = options or SimOptions()
    rng = _rng(seed, _VISIT_STREAM, _crc(instrument.name), _crc(exposure.group_id))
    lo, hi = opts.seeing_range_arcsec
    seeing = opts.seeing_median_arcsec * 10 ** rng.normal(0.0, opts.seeing_scatter_dex)
    seeing = float(np.clip(seeing, lo, hi))
    east, north = rng.normal(0.0, opts.pointing_error_arcsec, 2)
    rot_err = float(rng.normal(0.0, opts.rotation_error_deg)) if opts.rotation_error_deg else 0.0
    band = instrument.band(exposure.physical_filter)
    offset = opts.zeropoint_offset_mag
    if offset is None:
        offset = _ZP_OFFSET_BY_INSTRUMENT.get(instrument.name, 0.0)
    zp = ZEROPOINTS[band] + offset - abs(rng.normal(0.0, opts.transparency_rms_mag))
    sky_mag = SKY_MAGNITUDES[band] - rng.uniform(0.0, opts.sky_brightening_max_mag)
    ra, dec = _offset(exposure.ra, exposure.dec, float(east), float(north))
    return VisitConditions(
        seeing_arcsec=seeing,
        offset_east_arcsec=float(east),
        offset_north_arcsec=float(north),
        rotation_error_deg=rot_err,
        true_ra=ra,
        true_dec=dec,
        true_rotation_deg=exposure.rotation_deg + rot_err,
        zeropoint=float(zp),
        sky_mag=float(sky_mag),
    )


def raw_header(instrument: Instrument, detector: int | str | Detector, exposure: ExposureInfo) -> fits.Header:
    """Return the primary header of a raw, with the commanded-pointing WCS.

    Parameters
    ----------
    instrument : `workflow.core.instrument.Instrument`
        The camera.
    detector : `int`, `str` or `Detector`
        The detector.
    exposure : `workflow.sim.exposures.ExposureInfo`
        The snap.

    Returns
    -------
    header : `astropy.io.fits.Header`
    """
    det = instrument.detector(detector)
    end = exposure.end
    h = fits.Header()
    cards: list[tuple[str, Any, str]] = [
        ("ORIGIN", "prompt-snake simulator", ""),
        ("INSTRUME", instrument.name, "instrument"),
        ("DETECTOR", det.id, "detector id"),
        ("DETNAME", det.name, "detector name"),
    ]
    if det.raft is not None:
        cards += [("RAFTBAY", det.raft, "raft"), ("CCDSLOT", det.sensor, "sensor slot")]
    cards += [
        ("OBSID", exposure.obs_id, "observation id"),
        ("EXPID", exposure.exposure_id, "exposure id"),
        ("GROUPID", exposure.group_id, "visit group id"),
        ("DAYOBS", str(exposure.day_obs), "observing day (TAI - 12 h)"),
        ("SEQNUM", exposure.seq_num, "sequence number"),
        ("SNAP", exposure.snap, "snap index in the visit"),
        ("NSNAPS", exposure.n_snaps, "snaps in the visit"),
        ("IMGTYPE", "OBJECT", ""),
        ("OBSTYPE", "science", ""),
        ("TIMESYS", "TAI", ""),
        ("DATE-OBS", exposure.start.isot, "shutter open (TAI)"),
        ("DATE-BEG", exposure.start.isot, "shutter open (TAI)"),
        ("DATE-END", end.isot, "shutter close (TAI)"),
        ("MJD-OBS", float(exposure.start.mjd), "shutter open (MJD TAI)"),
        ("MJD-BEG", float(exposure.start.mjd), ""),
        ("MJD-END", float(end.mjd), ""),
        ("EXPTIME", exposure.exptime, "[s]"),
        ("DARKTIME", exposure.exptime, "[s]"),
        ("FILTER", exposure.physical_filter, "physical filter"),
        ("RASTART", exposure.ra, "[deg] commanded boresight RA"),
        ("DECSTART", exposure.dec, "[deg] commanded boresight Dec"),
        ("RA", exposure.ra, "[deg]"),
        ("DEC", exposure.dec, "[deg]"),
        ("BORE-RA", exposure.ra, "[deg]"),
        ("BORE-DEC", exposure.dec, "[deg]"),
        ("ROTPA", exposure.rotation_deg, "[deg] sky position angle of focal-plane +y"),
        ("ROTCOORD", "sky", ""),
        ("RADESYS", "ICRS", ""),
    ]
    for key, value, comment in cards:
        h[key] = (value, comment)
    wcs = instrument.detector_wcs(det, exposure.ra, exposure.dec, exposure.rotation_deg)
    h.extend(wcs.to_header(), update=True)
    h["COMMENT"] = "WCS: commanded pointing, pixels of the assembled trimmed image"
    return h


def _segment_headers(instrument: Instrument) -> dict[str, fits.Header]:
    return {amp.name: fits.Header(list(amp.header_cards().items())) for amp in instrument.geometry.amplifiers}


def simulate_raw(
    instrument: Instrument,
    detector: int | str | Detector,
    exposure: ExposureInfo,
    *,
    seed: int = 0,
    sky: SkyModel | None = None,
    options: SimOptions | None = None,
) -> SimulatedRaw:
    """Simulate the raw of one detector in one snap.

    Parameters
    ----------
    instrument : `workflow.core.instrument.Instrument`
        The camera (possibly scaled down).
    detector : `int`, `str` or `Detector`
        Detector id or name.
    exposure : `workflow.sim.exposures.ExposureInfo`
        The snap (`workflow.sim.exposures.make_exposures`).
    seed : `int`, optional
        Universe seed: detector signatures, visit conditions, noise.
    sky : `workflow.sim.sky_model.SkyModel`, optional
        Synthetic sky (default ``SkyModel(seed=seed)``).
    options : `SimOptions`, optional
        Simulation knobs.

    Returns
    -------
    raw : `SimulatedRaw`

    Raises
    ------
    KeyError
        If the detector or the filter is unknown to the instrument.
    """
    t0 = time.perf_counter()
    opts = options or SimOptions()
    sky = sky or SkyModel(seed=seed)
    det = instrument.detector(detector)
    geom = instrument.geometry
    band = instrument.band(exposure.physical_filter)
    cond = visit_conditions(instrument, exposure, seed=seed, options=opts)
    true_wcs = instrument.detector_wcs(det, cond.true_ra, cond.true_dec, cond.true_rotation_deg)
    psf = GaussianMixturePsf.from_fwhm(cond.seeing_arcsec / instrument.pixel_scale_arcsec)
    e_per_njy = exposure.exptime * 10.0 ** (-0.4 * (31.4 - cond.zeropoint))
    rng = _rng(seed, _NOISE_STREAM, exposure.exposure_id, det.id)

    image = np.zeros(geom.shape, dtype=np.float32)
    stars, galaxies, injected = render_scene(
        image,
        true_wcs,
        band,
        psf,
        sky=sky,
        flux_scale=e_per_njy,
        mjd=exposure.mjd_mid,
        pixel_scale_arcsec=instrument.pixel_scale_arcsec,
        margin_pix=opts.margin_arcsec / instrument.pixel_scale_arcsec,
    )
    sky_e = 10.0 ** (-0.4 * (cond.sky_mag - cond.zeropoint)) * instrument.pixel_scale_arcsec**2
    sky_e *= exposure.exptime
    image += np.float32(sky_e)
    image *= flat_pattern(instrument, det, band, seed)
    for col in bad_columns(instrument, det, seed):
        image[col["y0"] : col["y1"], col["x"]] += np.float32(col["rate"] * exposure.exptime)
    add_photon_noise(image, rng, **({"gaussian_above": np.inf} if opts.poisson_noise else {}))
    cosmic_rays = add_cosmic_rays(image, opts.cosmic_ray_rate_per_cm2_s, exposure.exptime, geom.pixel_size_um, rng)
    if opts.bleed:
        bleed_columns(image, (geom.saturation - geom.bias_level) * geom.gain)
    segments = read_out(instrument, det, image, seed, rng)

    truth = _on_detector(injected, geom.nx, geom.ny)
    truth["exposure"] = np.full(len(truth), exposure.exposure_id, dtype=np.int64)
    truth["detector"] = np.full(len(truth), det.id, dtype=np.int64)
    truth["mjd"] = np.full(len(truth), exposure.mjd_mid)
    truth.meta.update(
        {"band": band, "e_per_nJy": e_per_njy, "seeing_arcsec": cond.seeing_arcsec, "sky_e_per_pix": sky_e}
    )
    _log.debug(
        "simulated %s detector %s exposure %d in %.2f s",
        instrument.name,
        det.name,
        exposure.exposure_id,
        time.perf_counter() - t0,
    )
    return SimulatedRaw(
        header=raw_header(instrument, det, exposure),
        segments=segments,
        segment_headers=_segment_headers(instrument),
        exposure=exposure,
        detector=det,
        conditions=cond,
        true_wcs=true_wcs,
        psf=psf,
        stars=_on_detector(stars, geom.nx, geom.ny),
        galaxies=_on_detector(galaxies, geom.nx, geom.ny),
        truth=truth,
        cosmic_rays=cosmic_rays,
    )


def _on_detector(table: Table, nx: int, ny: int) -> Table:
    x, y = np.asarray(table["x"]), np.asarray(table["y"])
    return table[(x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)]


def simulate_visit(
    instrument: Instrument,
    detector: int | str | Detector,
    exposures: list[ExposureInfo],
    *,
    seed: int = 0,
    sky: SkyModel | None = None,
    options: SimOptions | None = None,
) -> list[SimulatedRaw]:
    """Simulate every snap of a visit for one detector (see `simulate_raw`)."""
    return [simulate_raw(instrument, detector, e, seed=seed, sky=sky, options=options) for e in exposures]
