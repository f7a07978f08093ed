"""Tests for `workflow.core.instrument`."""

from __future__ import annotations

import functools
import math
import unittest

import numpy as np

from workflow.core.config import load_config, merge_configs
from workflow.core.exceptions import ConfigError
from workflow.core.instrument import Instrument, bounding_circle, polygon_from_sky


@functools.cache
def _config(name: str) -> dict:
    return load_config(instrument=name)


@functools.cache
def _instrument(name: str, scale: float = 1.0) -> Instrument:
    return Instrument.from_config(_config(name), scale=scale)


def _sky_separation_arcsec(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    r1, d1, r2, d2 = map(math.radians, (ra1, dec1, ra2, dec2))
    cos = math.sin(d1) * math.sin(d2) + math.cos(d1) * math.cos(d2) * math.cos(r1 - r2)
    return math.degrees(math.acos(min(1.0, cos))) * 3600.0


class LayoutTestCase(unittest.TestCase):
    """Tests for detector layouts of `Instrument.from_config`."""

    def test_lsstcam(self) -> None:
        for name, total in (("LSSTCam", 205), ("LSSTCam-imSim", 189)):
            inst = _instrument(name)
            self.assertEqual(len(inst.detectors), total)
            self.assertEqual([d.id for d in inst.detectors], list(range(total)))
            self.assertEqual(inst.detectors[0].name, "R01_S00")
            self.assertEqual(inst.detectors[188].name, "R43_S22")
            self.assertEqual(inst.detector("R22_S11").id, 94)
            self.assertEqual(inst.detector(94).center_mm, (0.0, 0.0))
            self.assertEqual(len(inst.active_detectors()), 189)
            self.assertEqual({d.purpose for d in inst.active_detectors()}, {"SCIENCE"})
            self.assertEqual(len({d.name for d in inst.detectors}), total)

    def test_lsstcam_corner_sensors_as_obs_lsst_numbers_them(self) -> None:
        inst = _instrument("LSSTCam")
        corners = [d for d in inst.detectors if d.id >= 189]
        expected = [
            f"{raft}_{sensor}" for raft in ("R00", "R04", "R40", "R44") for sensor in ("SG0", "SG1", "SW0", "SW1")
        ]
        self.assertEqual([d.name for d in corners], expected)
        self.assertEqual((inst.detector("R00_SW0").id, inst.detector("R44_SW1").id), (191, 204))
        self.assertEqual(inst.detector("R00_SG0").purpose, "GUIDER")
        self.assertEqual(inst.detector("R40_SW1").purpose, "WAVEFRONT")
        self.assertFalse(any(d.active for d in corners))
        # Corner rafts sit outside the science rafts' square.
        self.assertTrue(all(min(abs(c) for c in d.center_mm) > 2 * 127.0 - 127.0 for d in corners))

    def test_raft_positions(self) -> None:
        inst = _instrument("LSSTCam")
        # R01 is row 0, column 1; S00 is the lower-left sensor of the raft.
        self.assertEqual(inst.detector("R01_S00").center_mm, (-127.0 - 42.25, -254.0 - 42.25))
        self.assertEqual(inst.detector("R43_S22").center_mm, (127.0 + 42.25, 254.0 + 42.25))
        self.assertEqual(inst.detector("R22_S12").center_mm, (42.25, 0.0))

    def test_comcam_and_latiss(self) -> None:
        comcam = _instrument("LSSTComCamSim")
        self.assertEqual([d.name for d in comcam.detectors][:3], ["R22_S00", "R22_S01", "R22_S02"])
        self.assertEqual(len(comcam.detectors), 9)
        self.assertEqual(comcam.detector(4).center_mm, (0.0, 0.0))
        comcam = _instrument("LSSTComCam")
        self.assertEqual(
            [d.name for d in comcam.detectors],
            [f"R22_S{s}" for s in ("00", "01", "02", "10", "11", "12", "20", "21", "22")],
        )
        self.assertEqual((comcam.detector("R22_S11").id, comcam.obs_id_prefix, comcam.controller), (4, "CC", "O"))
        latiss = _instrument("LATISS")
        self.assertEqual(len(latiss.detectors), 1)
        self.assertEqual(latiss.detector(0).name, "R00_S00")  # as Rubin names it in keys and headers
        self.assertEqual(latiss.detector("R00_S00").id, 0)
        self.assertEqual(latiss.detector(0).center_mm, (0.0, 0.0))

    def test_hsc_grid(self) -> None:
        inst = _instrument("HSC")
        self.assertEqual(len(inst.detectors), 104)
        self.assertEqual(inst.detectors[0].name, "000")
        self.assertEqual(inst.detectors[103].name, "103")
        self.assertFalse(inst.detector(9).active)
        self.assertEqual(len(inst.active_detectors()), 103)
        self.assertEqual(inst.camera_style, "generic")
        # Row 0 has 10 cells: columns 2..11; detector 0 is column 2.
        self.assertAlmostEqual(inst.detector(0).center_mm[0], (2 - 6.5) * 31.8)
        self.assertAlmostEqual(inst.detector(0).center_mm[1], -3.5 * 63.9)
        centers = np.array([d.center_mm for d in inst.detectors])
        np.testing.assert_allclose(centers.mean(axis=0), [0.0, 0.0], atol=1e-9)

    def test_active_overrides(self) -> None:
        config = merge_configs(
            _config("LSSTComCamSim"), {"active_detectors": {"default": False, "overrides": {"4": True}}}
        )
        inst = Instrument.from_config(config)
        self.assertEqual([d.id for d in inst.active_detectors()], [4])
        bad = merge_configs(_config("LSSTComCamSim"), {"active_detectors": {"overrides": {"9": False}}})
        message = "LSSTComCamSim: active_detectors.overrides names detector 9"
        with self.assertRaisesRegex(ConfigError, message):
            Instrument.from_config(bad)

    def test_lookup_errors(self) -> None:
        inst = _instrument("LSSTComCamSim")
        with self.assertRaisesRegex(KeyError, "no detector 'R99_S00'"):
            inst.detector("R99_S00")
        with self.assertRaisesRegex(KeyError, "unknown physical filter 'r_57'"):
            inst.band("r_57")
        self.assertEqual(inst.band("r_03"), "r")
        self.assertEqual(_instrument("HSC").band("HSC-R2"), "r")


class GeometryTestCase(unittest.TestCase):
    """Tests for the detector geometry carried by `Instrument`."""

    def test_electronics(self) -> None:
        geom = _instrument("LSSTCam").geometry
        self.assertEqual(geom.shape, (4000, 4072))
        self.assertEqual(len(geom.amplifiers), 16)
        self.assertEqual(geom.raw_amp_shape, (2048, 576))
        self.assertEqual(geom.gain, 1.6)
        hsc = _instrument("HSC").geometry
        self.assertEqual(hsc.shape, (4176, 2048))
        self.assertEqual([a.name for a in hsc.amplifiers], ["C00", "C01", "C02", "C03"])

    def test_scaled(self) -> None:
        geom = _instrument("LSSTCam", 0.125).geometry
        self.assertEqual(geom.shape, (500, 512))
        self.assertEqual(geom.serial_overscan, 8)
        self.assertEqual(geom.parallel_overscan, 6)
        self.assertEqual(geom.prescan, 1)
        with self.assertRaisesRegex(ConfigError, "scale must be in"):
            Instrument.from_config(_config("LSSTCam"), scale=2.0)


class WcsTestCase(unittest.TestCase):
    """Tests for predicted WCS and footprints."""

    def test_center_detector(self) -> None:
        inst = _instrument("LSSTCam")
        wcs = inst.detector_wcs(94, 150.0, 2.0, 0.0)
        ra, dec = wcs.all_pix2world([[2035.5, 1999.5]], 0)[0]
        self.assertAlmostEqual(ra, 150.0, places=9)
        self.assertAlmostEqual(dec, 2.0, places=9)
        scales = np.sqrt(np.abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600.0
        self.assertAlmostEqual(scales, 0.2, places=9)

    def test_rotation(self) -> None:
        inst = _instrument("LSSTCam")
        # Rotation 0: +y is north, +x is west.
        wcs = inst.detector_wcs(94, 10.0, 0.0, 0.0)
        ra, dec = wcs.all_pix2world([[2035.5, 2999.5], [3035.5, 1999.5]], 0).T
        self.assertAlmostEqual(dec[0], 200.0 / 3600.0, places=6)
        self.assertLess(ra[1], 10.0)
        # Rotation 90: +y points east.
        wcs = inst.detector_wcs(94, 10.0, 0.0, 90.0)
        ra, dec = wcs.all_pix2world([[2035.5, 2999.5]], 0)[0]
        self.assertAlmostEqual(ra, 10.0 + 200.0 / 3600.0, places=6)
        self.assertAlmostEqual(dec, 0.0, places=6)

    def test_off_center_detector(self) -> None:
        inst = _instrument("LSSTCam")
        det = inst.detector("R43_S22")
        wcs = inst.detector_wcs(det, 30.0, -40.0, 0.0)
        ra, dec = wcs.all_pix2world([[2035.5, 1999.5]], 0)[0]
        u, v = det.center_mm
        expected = math.hypot(u, v) * inst.plate_scale_arcsec_per_mm
        # Gnomonic: the angular distance is atan of the tangent-plane distance.
        expected = math.degrees(math.atan(math.radians(expected / 3600.0))) * 3600.0
        self.assertAlmostEqual(_sky_separation_arcsec(ra, dec, 30.0, -40.0), expected, delta=0.01)
        self.assertGreater(dec, -40.0)  # +y (row 4) is north at rotation 0

    def test_focal_plane_round_trip(self) -> None:
        inst = _instrument("HSC")
        x, y = np.array([0.0, 100.0, 2047.0]), np.array([0.0, 3000.0, 4175.0])
        u, v = inst.pixel_to_focal_plane(57, x, y)
        x2, y2 = inst.focal_plane_to_pixel(57, u, v)
        np.testing.assert_allclose(x2, x, atol=1e-9)
        np.testing.assert_allclose(y2, y, atol=1e-9)

    def test_regions(self) -> None:
        inst = _instrument("LSSTComCamSim")
        region = inst.detector_region(0, 20.0, -10.0, 30.0)
        padded = inst.detector_region(0, 20.0, -10.0, 30.0, padding_arcsec=50.0)
        wcs = inst.detector_wcs(0, 20.0, -10.0, 30.0)
        ra, dec = wcs.all_pix2world([[2000.0, 2000.0], [-100.0, 2000.0]], 0).T
        inside = region.contains(np.radians(ra), np.radians(dec))
        self.assertEqual(list(inside), [True, False])
        self.assertTrue(padded.contains(math.radians(ra[1]), math.radians(dec[1])))
        corners = inst.detector_corners(0, 20.0, -10.0, 30.0)
        self.assertEqual(corners.shape, (4, 2))
        visit = inst.visit_region(20.0, -10.0, 30.0)
        for det in inst.detectors:
            w = inst.detector_wcs(det, 20.0, -10.0, 30.0)
            ra, dec = w.all_pix2world([[1.0, 1.0], [4070.0, 3998.0], [1.0, 3998.0], [4070.0, 1.0]], 0).T
            self.assertTrue(all(visit.contains(np.radians(ra), np.radians(dec))), det.name)
        circle = bounding_circle(region, 50.0)
        self.assertGreater(
            circle.getOpeningAngle().asDegrees(), region.getBoundingCircle().getOpeningAngle().asDegrees()
        )
        self.assertTrue(polygon_from_sky([0, 1, 1], [0, 0, 1]).contains(math.radians(0.9), math.radians(0.2)))


if __name__ == "__main__":
    unittest.main()


def test_instrument_for_run_takes_override_keys_of_yaml_and_json_layers_together():
    from workflow.core.config import load_config
    from workflow.core.instrument import instrument_for_run

    config = load_config(instrument="LSSTCam")
    # The shipped file's corner overrides have int keys; a JSON layer's are strings.
    overrides = {**config["active_detectors"]["overrides"], "0": False, "1": False}
    config = {**config, "active_detectors": {**config["active_detectors"], "overrides": overrides}}
    active = [d.id for d in instrument_for_run(config).active_detectors()]
    assert active[:2] == [2, 3] and 189 not in active and len(active) == 187
