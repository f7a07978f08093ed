"""Tests for `workflow.core.skymap`."""

from __future__ import annotations

import math
import unittest

import numpy as np

from workflow.core.config import load_config
from workflow.core.instrument import Instrument
from workflow.core.skymap import RingsSkyMap


class RingsSkyMapTestCase(unittest.TestCase):
    """Tests for `RingsSkyMap`."""

    @classmethod
    def setUpClass(cls) -> None:
        config = load_config(instrument="LSSTComCamSim")
        cls.skymap = RingsSkyMap.from_config(config)
        cls.instrument = Instrument.from_config(config)

    def test_tracts(self) -> None:
        sm = self.skymap
        self.assertEqual(sm.num_tracts, 18938)
        self.assertEqual(sm.tract(0).ring, -1)
        self.assertEqual(sm.tract(sm.num_tracts - 1).ring, sm.num_rings)
        self.assertEqual(sm.find_tract(10.0, -89.9).id, 0)
        self.assertEqual(sm.find_tract(359.99, 0.1).id, sm.find_tract(0.01, 0.1).id)
        for ra, dec in [(10.0, -30.0), (150.0, 2.0), (300.0, 70.0), (359.0, -5.0)]:
            tract = sm.find_tract(ra, dec)
            x, y = tract.wcs.all_world2pix([[ra, dec]], 0)[0]
            # The point is well inside the tract's pixel box.
            self.assertTrue(0 < x < tract.bbox.x1 and 0 < y < tract.bbox.y1)
            nx, ny = tract.num_patches
            self.assertEqual(tract.bbox.x1, nx * 4000)
            self.assertEqual(tract.bbox.y1, ny * 4000)
        with self.assertRaisesRegex(KeyError, "no tract 99999"):
            sm.tract(99999)

    def test_patch_wcs(self) -> None:
        tract = self.skymap.find_tract(150.0, 2.0)
        patch = self.skymap.patch(tract, (2, 3))
        self.assertEqual(patch.id, 3 * tract.num_patches[0] + 2)
        self.assertEqual(patch.shape, (4200, 4200))
        self.assertEqual(patch.inner_bbox.x0, 8000)
        self.assertEqual(patch.outer_bbox.x0, 7900)
        # Patch pixel (100, 100) is tract pixel (8000, 12000).
        sky_patch = patch.wcs.all_pix2world([[100.0, 100.0]], 0)[0]
        sky_tract = tract.wcs.all_pix2world([[8000.0, 12000.0]], 0)[0]
        np.testing.assert_allclose(sky_patch, sky_tract, atol=1e-10)
        self.assertEqual(self.skymap.patch(tract, patch.id).index, (2, 3))
        with self.assertRaisesRegex(KeyError, "has no patch"):
            self.skymap.patch(tract, (99, 0))

    def test_patches_overlapping_footprint(self) -> None:
        for ra, dec in [(10.0, -30.0), (0.05, 0.0), (200.0, 80.0)]:
            region = self.instrument.detector_region(4, ra, dec, 15.0, padding_arcsec=50.0)
            patches = self.skymap.patches_overlapping(region)
            self.assertGreater(len(patches), 0)
            for patch in patches:
                self.assertFalse(region.isDisjointFrom(patch.polygon()))
            # Every point of the footprint is in some patch's inner box.
            wcs = self.instrument.detector_wcs(4, ra, dec, 15.0)
            xs, ys = np.meshgrid(np.linspace(0, 4071, 7), np.linspace(0, 3999, 7))
            pra, pdec = wcs.all_pix2world(xs.ravel(), ys.ravel(), 0)
            covered = np.zeros(pra.size, dtype=bool)
            for patch in patches:
                covered |= patch.polygon().contains(np.radians(pra), np.radians(pdec))
            self.assertTrue(covered.all(), (ra, dec))

    def test_small_patches(self) -> None:
        config = load_config(instrument="LSSTComCamSim")
        config["skymap"] = dict(config["skymap"], patch_inner_pixels=1000, patch_border_pixels=20)
        sm = RingsSkyMap.from_config(config)
        region = self.instrument.detector_region(4, 10.0, -30.0, 0.0)
        patches = sm.patches_overlapping(region)
        # A 13.6' detector spans a few 200" patches per axis.
        self.assertGreaterEqual(len(patches), 9)
        self.assertLessEqual(len(patches), 40)
        self.assertTrue(all(p.shape == (1040, 1040) for p in patches))
        self.assertLess(math.fabs(sm.ring_size_deg - 180.0 / 121), 1e-12)


if __name__ == "__main__":
    unittest.main()
