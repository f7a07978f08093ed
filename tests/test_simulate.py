"""Tests for `workflow.sim.simulate` (and, through it, `workflow.core.raw_fits`)."""

from __future__ import annotations

import functools
import json
import math
import tempfile
import unittest
from pathlib import Path

import numpy as np
import sep
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from scipy.ndimage import uniform_filter1d
from scipy.spatial import cKDTree

from workflow.core.amplifiers import assemble_image
from workflow.core.config import load_config
from workflow.core.exceptions import NonRetriableError
from workflow.core.instrument import Instrument
from workflow.core.raw_fits import read_raw, write_raw
from workflow.sim.calibs import amp_bias_levels, bad_columns, make_bias, make_flat
from workflow.sim.exposures import make_exposures
from workflow.sim.simulate import SimOptions, SimulatedRaw, simulate_raw, simulate_visit, visit_conditions
from workflow.sim.sky_model import SkyModel

SEED = 7
# 4x the default star density so a 1/8-scale detector has ~200 stars; dense
# variables and transients so each small detector holds dozens of them.
SKY = SkyModel(
    seed=SEED, star_density_r23_per_deg2=160000.0, variable_density_per_deg2=40000.0, transient_density_per_deg2=20000.0
)
FIELD = {"ra": 53.1, "dec": -28.1, "rotation_deg": 25.0}


@functools.cache
def _instrument(name: str = "LSSTComCamSim") -> Instrument:
    return Instrument.from_config(load_config(instrument=name), scale=0.125)


@functools.cache
def _visit(index: int, detector: int = 4) -> SimulatedRaw:
    """Snap of the index-th of three visits of one field, 40 min apart."""
    inst = _instrument()
    exposure = make_exposures(
        inst, start=f"2026-03-01T0{3 + index}:00:00", seq_num=10 + index, physical_filter="r_03", **FIELD
    )[0]
    return simulate_raw(inst, detector, exposure, seed=SEED, sky=SKY)


def isr(raw: SimulatedRaw, inst: Instrument) -> np.ndarray:
    """Return the overscan-, bias- and flat-corrected image in electrons."""
    geom = inst.geometry
    segments = {}
    for amp in geom.amplifiers:
        seg = raw.segments[amp.name].astype(np.float64)
        level = uniform_filter1d(np.mean(seg[amp.raw_serial_overscan.slices], axis=1), 31, mode="nearest")
        segments[amp.name] = seg[amp.raw_data.slices] - level[:, None]
    image = assemble_image(segments, geom, dtype=np.float64)
    image -= make_bias(inst, raw.detector, seed=SEED).image
    image /= make_flat(inst, raw.detector, raw.exposure.physical_filter, seed=SEED).image
    return image * geom.gain


def _isolated(
    raw: SimulatedRaw, x: np.ndarray, y: np.ndarray, flux: np.ndarray, inst: Instrument, radius: float = 10.0
) -> np.ndarray:
    """Mask of sources whose aperture gets little light from neighbours.

    Sources must be away from edges and bad columns, and the estimated light
    of other sources inside a ``radius`` aperture must be below 0.5 % of
    the flux plus 0.2 sigma of the sky noise in the aperture.
    """
    tables = [raw.stars, raw.galaxies, raw.truth]
    ax = np.concatenate([np.asarray(t["x"]) for t in tables])
    ay = np.concatenate([np.asarray(t["y"]) for t in tables])
    af = np.concatenate([np.asarray(t["image_flux"]) for t in tables])
    # Galaxies are extended: treat them as if they were closer.
    extent = np.concatenate(
        [
            np.zeros(len(raw.stars)),
            2.0 * np.asarray(raw.galaxies["hlr_arcsec"]) / inst.pixel_scale_arcsec,
            np.zeros(len(raw.truth)),
        ]
    )
    tree = cKDTree(np.c_[ax, ay])
    geom = inst.geometry
    ok = (x > 20) & (x < geom.nx - 21) & (y > 20) & (y < geom.ny - 21)
    for col in bad_columns(inst, raw.detector, SEED)["x"]:
        ok &= np.abs(x - col) > radius + 2
    area = math.pi * radius**2
    sky_noise = math.sqrt(area * raw.truth.meta["sky_e_per_pix"])
    for i in np.flatnonzero(ok):
        near = np.array(tree.query_ball_point([x[i], y[i]], radius + 40.0))
        dist = np.hypot(ax[near] - x[i], ay[near] - y[i])
        near, dist = near[dist > 1e-6], dist[dist > 1e-6]
        gap = np.maximum(dist - radius - extent[near], 0.0)
        light = af[near] * np.minimum(1.0, raw.psf.profile(gap) * area)
        ok[i] = light.sum() < 0.005 * flux[i] + 0.2 * sky_noise
    return ok


class HeaderTestCase(unittest.TestCase):
    """Tests for raw headers and sidecars."""

    def test_cards(self) -> None:
        raw = _visit(0)
        h = raw.header
        self.assertEqual(h["INSTRUME"], "LSSTComCamSim")
        self.assertEqual(h["DETECTOR"], 4)
        self.assertEqual(h["DETNAME"], "R22_S11")
        self.assertEqual(h["OBSID"], "CC_S_20260228_000010")
        self.assertEqual(h["EXPID"], 2026022800010)
        self.assertEqual(h["GROUPID"], "2026-03-01T03:00:00.000")
        self.assertEqual(h["DATE-OBS"], "2026-03-01T03:00:00.000")
        self.assertEqual(h["TIMESYS"], "TAI")
        self.assertAlmostEqual(h["MJD-OBS"], 61100.125)
        self.assertEqual(h["EXPTIME"], 30.0)
        self.assertEqual(h["FILTER"], "r_03")
        self.assertEqual((h["RASTART"], h["DECSTART"], h["ROTPA"]), (53.1, -28.1, 25.0))
        self.assertEqual(h["SNAP"], 0)
        self.assertEqual(h["RAFTBAY"], "R22")
        self.assertEqual(h["CCDSLOT"], "S11")

    def test_header_wcs_is_commanded(self) -> None:
        raw = _visit(0)
        predicted = _instrument().detector_wcs(4, FIELD["ra"], FIELD["dec"], FIELD["rotation_deg"])
        header_wcs = WCS(raw.header)
        pix = np.array([[0.0, 0.0], [300.0, 200.0]])
        np.testing.assert_allclose(header_wcs.all_pix2world(pix, 0), predicted.all_pix2world(pix, 0), atol=1e-10)

    def test_sidecar(self) -> None:
        sidecar = _visit(0).sidecar()
        self.assertEqual(sidecar["GROUPID"], "2026-03-01T03:00:00.000")
        self.assertEqual(sidecar["OBSID"], "CC_S_20260228_000010")
        json.dumps(sidecar)


class RawGeometryTestCase(unittest.TestCase):
    """Tests for the raw amplifier layout."""

    def test_overscan_is_bias_and_noise(self) -> None:
        raw = _visit(0)
        inst = _instrument()
        levels = amp_bias_levels(inst, 4, SEED)
        noise_adu = inst.geometry.read_noise / inst.geometry.gain
        for amp in inst.geometry.amplifiers:
            seg = raw.segments[amp.name]
            self.assertEqual(seg.dtype, np.int32)
            self.assertEqual(seg.shape, amp.raw_shape)
            for box in (amp.raw_serial_overscan, amp.raw_parallel_overscan, amp.raw_prescan):
                pixels = seg[box.slices].astype(float)
                self.assertAlmostEqual(pixels.mean(), levels[amp.name], delta=4.0)
                self.assertLess(np.abs(pixels - levels[amp.name]).max(), 8 * noise_adu + 6)
            serial = seg[amp.raw_serial_overscan.slices].astype(float)
            # Row-by-row: only read noise remains after removing the row mean.
            resid = serial - serial.mean(axis=1, keepdims=True)
            self.assertAlmostEqual(
                resid.std() * math.sqrt(serial.shape[1] / (serial.shape[1] - 1)), noise_adu, delta=0.15 * noise_adu
            )
            self.assertGreater(np.median(seg[amp.raw_data.slices]), levels[amp.name] + 300)

    def test_deterministic(self) -> None:
        inst = _instrument()
        again = simulate_raw(inst, 4, _visit(0).exposure, seed=SEED, sky=SKY)
        for name, seg in _visit(0).segments.items():
            np.testing.assert_array_equal(again.segments[name], seg)


class AstrometryTestCase(unittest.TestCase):
    """Tests that stars are drawn where the WCS says."""

    def test_stars_at_true_wcs_and_pointing_error(self) -> None:
        raw, inst = _visit(0), _instrument()
        image = isr(raw, inst)
        stars = raw.stars
        flux = np.asarray(stars["image_flux"])
        x, y = np.asarray(stars["x"]), np.asarray(stars["y"])
        sel = _isolated(raw, x, y, flux, inst, 5.0) & (flux > 2e4) & (flux < 4e5)
        self.assertGreaterEqual(sel.sum(), 8)
        sub = image - sep.Background(image).back()
        xc, yc, _ = sep.winpos(sub, x[sel], y[sel], np.full(sel.sum(), raw.psf.fwhm / 2.355))
        # Truth positions come from the true WCS: centroids agree to ~0.05 px.
        resid = np.hypot(xc - x[sel], yc - y[sel])
        self.assertLess(np.median(resid), 0.05)
        self.assertLess(np.percentile(resid, 90), 0.15)
        # The true pointing predicts them too.
        cond = raw.conditions
        wcs = inst.detector_wcs(4, cond.true_ra, cond.true_dec, cond.true_rotation_deg)
        px, py = wcs.all_world2pix(stars["ra"][sel], stars["dec"][sel], 0)
        self.assertLess(np.median(np.hypot(px - xc, py - yc)), 0.05)
        # The header WCS is off by the deliberate pointing error only.
        hx, hy = WCS(raw.header).all_world2pix(stars["ra"][sel], stars["dec"][sel], 0)
        shift = np.hypot(np.median(hx - xc), np.median(hy - yc)) * inst.pixel_scale_arcsec
        expected = math.hypot(cond.offset_east_arcsec, cond.offset_north_arcsec)
        self.assertGreater(expected, 0.3)
        self.assertAlmostEqual(shift, expected, delta=0.02)
        self.assertLess(np.std(hx - xc), 0.1)


class PhotometryTestCase(unittest.TestCase):
    """Tests that truth tables match the pixels."""

    def _pulls(
        self, raw: SimulatedRaw, table: Table, image: np.ndarray, radius: float
    ) -> tuple[np.ndarray, np.ndarray]:
        inst = _instrument()
        x, y = np.asarray(table["x"]), np.asarray(table["y"])
        flux = np.asarray(table["image_flux"])
        sel = _isolated(raw, x, y, flux, inst, radius) & (flux > 0)
        # The true sky: after the flat it is flat; a measured background would
        # include the light of fainter (down to r = 24) stars and galaxies.
        sky = raw.truth.meta["sky_e_per_pix"]
        noise = math.sqrt(sky + inst.geometry.read_noise**2)
        measured, err, _ = sep.sum_circle(image - sky, x[sel], y[sel], radius, err=noise, gain=1.0)
        expected = flux[sel] * raw.psf.enclosed_fraction(radius)
        return (measured - expected) / err, measured / expected

    def test_injected_sources(self) -> None:
        raw, inst = _visit(0), _instrument()
        truth = raw.truth
        self.assertGreater(len(truth), 20)
        self.assertEqual(set(truth["kind"]), {"variable", "transient"})
        self.assertTrue(np.all(truth["exposure"] == raw.exposure.exposure_id))
        np.testing.assert_allclose(truth["image_flux"], truth["flux"] * truth.meta["e_per_nJy"])
        pulls, _ = self._pulls(raw, truth, isr(raw, inst), 2.0 * raw.psf.fwhm)
        self.assertGreaterEqual(len(pulls), 10)
        self.assertLess(abs(np.median(pulls)), 0.8)
        self.assertGreaterEqual(np.mean(np.abs(pulls) < 4.0), 0.85)

    def test_stars(self) -> None:
        raw, inst = _visit(0), _instrument()
        bright = raw.stars[(raw.stars["image_flux"] > 5e3) & (raw.stars["image_flux"] < 4e5)]
        pulls, ratio = self._pulls(raw, bright, isr(raw, inst), 2.5 * raw.psf.fwhm)
        self.assertGreaterEqual(len(ratio), 10)
        self.assertAlmostEqual(np.median(ratio), 1.0, delta=0.015)
        self.assertGreaterEqual(np.mean(np.abs(pulls) < 4.0), 0.85)

    def test_visits_share_variables(self) -> None:
        truths = [_visit(i).truth for i in range(3)]
        variables = [t[t["kind"] == "variable"] for t in truths]
        ids = [set(v["id"]) for v in variables]
        common = ids[0] & ids[1] & ids[2]
        self.assertGreaterEqual(len(common), 0.8 * len(ids[0]))
        rows = [{int(r["id"]): r for r in v} for v in variables]
        changed = 0
        for i in common:
            self.assertEqual((rows[0][i]["ra"], rows[0][i]["dec"]), (rows[2][i]["ra"], rows[2][i]["dec"]))
            self.assertEqual(rows[0][i]["mean_flux"], rows[1][i]["mean_flux"])
            changed += abs(rows[0][i]["flux"] / rows[2][i]["flux"] - 1) > 0.01
        self.assertGreater(changed, 0.3 * len(common))
        conditions = [_visit(i).conditions for i in range(3)]
        self.assertEqual(len({c.seeing_arcsec for c in conditions}), 3)


class DetectorEffectsTestCase(unittest.TestCase):
    """Tests for saturation, bleed trails, cosmic rays and snaps."""

    def test_saturation_and_bleed(self) -> None:
        inst = _instrument()
        exposure = _visit(0).exposure
        # An 8-magnitude brighter telescope saturates many stars.
        raw = simulate_raw(inst, 4, exposure, seed=SEED, sky=SKY, options=SimOptions(zeropoint_offset_mag=5.0))
        sat_level = inst.geometry.saturation
        image = assemble_image(raw.segments, inst.geometry, dtype=np.int64)
        saturated = image >= sat_level
        self.assertGreater(saturated.sum(), 50)
        self.assertTrue(all(int(seg.max()) <= sat_level for seg in raw.segments.values()))
        # Bleed trails run along columns: saturated extents are taller than wide.
        ys, xs = np.nonzero(saturated)
        self.assertGreater(np.ptp(ys[xs == np.bincount(xs).argmax()]), 3)
        columns = np.count_nonzero(saturated.any(axis=0))
        rows = np.count_nonzero(saturated.any(axis=1))
        self.assertGreater(rows, columns)

    def test_cosmic_rays(self) -> None:
        inst = _instrument()
        raw = simulate_raw(
            inst, 4, _visit(0).exposure, seed=SEED, sky=SKY, options=SimOptions(cosmic_ray_rate_per_cm2_s=5.0)
        )
        crs = raw.cosmic_rays
        self.assertGreater(len(crs), 10)
        image = isr(raw, inst)
        hits = image[np.rint(crs["y"]).astype(int), np.rint(crs["x"]).astype(int)]
        self.assertGreater(np.median(hits), np.median(image) + 300)

    def test_snaps(self) -> None:
        inst = _instrument()
        exposures = make_exposures(
            inst, start="2026-03-01T03:00:00", seq_num=5, n_snaps=2, physical_filter="g_01", **FIELD
        )
        raws = simulate_visit(inst, 0, exposures, seed=SEED, sky=SKY)
        self.assertEqual([r.header["SNAP"] for r in raws], [0, 1])
        self.assertEqual(raws[0].header["GROUPID"], raws[1].header["GROUPID"])
        self.assertEqual(raws[1].header["EXPID"], raws[0].header["EXPID"] + 1)
        self.assertEqual(raws[0].conditions, raws[1].conditions)
        self.assertFalse(np.array_equal(raws[0].segments["C00"], raws[1].segments["C00"]))
        self.assertEqual(raws[0].conditions, visit_conditions(inst, exposures[1], seed=SEED))


class RawFitsTestCase(unittest.TestCase):
    """Tests for writing and reading raws."""

    def test_round_trip(self) -> None:
        raw = _visit(1)
        with tempfile.TemporaryDirectory() as tmp:
            path = raw.write(Path(tmp) / "a" / "raw.fits")
            back = read_raw(path, _instrument().geometry)
            self.assertEqual(back.header["OBSID"], raw.header["OBSID"])
            self.assertEqual(list(back.segments), [a.name for a in _instrument().geometry.amplifiers])
            for name, seg in raw.segments.items():
                np.testing.assert_array_equal(back.segments[name], seg)
            self.assertEqual(back.segment_headers["C10"]["DATASEC"], raw.segment_headers["C10"]["DATASEC"])
            with fits.open(path) as hdul:
                self.assertEqual(len(hdul), 17)

    def test_hsc_compressed(self) -> None:
        inst = _instrument("HSC")
        exposure = make_exposures(inst, start="2026-03-01T05:00:00", seq_num=3, physical_filter="HSC-I", **FIELD)[0]
        raw = simulate_raw(inst, 50, exposure, seed=SEED, sky=SKY)
        self.assertEqual(raw.header["DETNAME"], "050")
        self.assertNotIn("RAFTBAY", raw.header)
        self.assertEqual(raw.header["GROUPID"], str(exposure.exposure_id))
        with tempfile.TemporaryDirectory() as tmp:
            path = write_raw(Path(tmp) / "raw.fz", raw)
            with fits.open(path) as hdul:
                self.assertIsInstance(hdul[1], fits.CompImageHDU)
            back = read_raw(path, inst.geometry)
            for name, seg in raw.segments.items():
                np.testing.assert_array_equal(back.segments[name], seg)
            with self.assertRaisesRegex(NonRetriableError, r"raw .*raw.fz \(detector 50\): amplifier C00"):
                read_raw(path, _instrument().geometry)
            bad = Path(tmp) / "bad.fits"
            bad.write_text("not a fits file")
            with self.assertRaisesRegex(NonRetriableError, "bad.fits"):
                read_raw(bad)

    def test_latiss(self) -> None:
        inst = _instrument("LATISS")
        exposure = make_exposures(inst, start="2026-03-01T05:00:00", seq_num=3, physical_filter="SDSSr_65mm", **FIELD)[
            0
        ]
        raw = simulate_raw(inst, 0, exposure, seed=SEED, sky=SKY)
        self.assertEqual(raw.header["OBSID"], "AT_O_20260228_000003")
        self.assertEqual(raw.header["DETNAME"], "R00_S00")
        # A 1.2 m telescope: about 3.6 mag less signal per star.
        self.assertLess(raw.truth.meta["e_per_nJy"], 0.1 * _visit(0).truth.meta["e_per_nJy"])


if __name__ == "__main__":
    unittest.main()
