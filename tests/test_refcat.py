"""Tests for `workflow.sim.refcat`."""

from __future__ import annotations

import math
import unittest

import lsst.sphgeom as sphgeom
import numpy as np

from workflow.sim.refcat import (
    RefcatModel,
    flux_from_mag,
    load_refcat,
    mag_from_flux,
    make_shard,
    shard_area_deg2,
    shard_ids,
    shard_polygon,
)


def _circle(ra: float, dec: float, radius_deg: float) -> sphgeom.Circle:
    return sphgeom.Circle(
        sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(ra, dec)), sphgeom.Angle.fromDegrees(radius_deg)
    )


class RefcatTestCase(unittest.TestCase):
    """Tests for the synthetic refcat."""

    def test_deterministic(self) -> None:
        shard = shard_ids(_circle(45.0, -20.0, 0.01))[0]
        a = make_shard(shard)
        b = make_shard(shard, RefcatModel())
        self.assertEqual(len(a), len(b))
        np.testing.assert_array_equal(a["ra"], b["ra"])
        np.testing.assert_array_equal(a["r_flux"], b["r_flux"])
        other = make_shard(shard, RefcatModel(seed=1))
        self.assertFalse(len(other) == len(a) and np.array_equal(other["ra"], a["ra"]))
        self.assertEqual(a.meta["SHARD"], shard)
        self.assertEqual(len(np.unique(a["id"])), len(a))

    def test_stars_inside_shard(self) -> None:
        shard = shard_ids(_circle(200.0, 60.0, 0.01))[0]
        table = make_shard(shard)
        inside = shard_polygon(shard).contains(np.radians(table["ra"]), np.radians(table["dec"]))
        self.assertTrue(np.all(inside))

    def test_region_query_consistent(self) -> None:
        region = _circle(150.0, 2.0, 0.3)
        table = load_refcat(region)
        self.assertTrue(np.all(region.contains(np.radians(table["ra"]), np.radians(table["dec"]))))
        whole = load_refcat(region, trim=False)
        self.assertGreater(len(whole), len(table))
        self.assertTrue(set(table["id"]) <= set(whole["id"]))
        # A smaller region inside gives the same stars there.
        small = _circle(150.05, 2.05, 0.05)
        sub = load_refcat(small)
        self.assertTrue(set(sub["id"]) <= set(table["id"]))
        # Shards cover the region.
        area = sum(shard_area_deg2(s) for s in shard_ids(region))
        self.assertGreater(area, math.pi * 0.3**2)

    def test_density(self) -> None:
        region = _circle(10.0, -60.0, 0.5)  # high galactic latitude
        table = load_refcat(region)
        density = np.sum(table["r_mag"] < 23.0) / (math.pi * 0.5**2)
        self.assertGreater(density, 30000)
        self.assertLess(density, 60000)
        for band in "ugrizy":
            np.testing.assert_allclose(table[f"{band}_flux"], flux_from_mag(table[f"{band}_mag"]))
        self.assertTrue(np.all(table["r_fluxErr"] > 0))

    def test_mag_flux(self) -> None:
        self.assertAlmostEqual(float(flux_from_mag(31.4)), 1.0)
        self.assertAlmostEqual(float(mag_from_flux(3631e9)), 0.0, places=3)
        self.assertTrue(np.isnan(mag_from_flux(-1.0)))

    def test_bad_shard(self) -> None:
        with self.assertRaisesRegex(ValueError, "5 is not an HTM level-7 trixel id"):
            make_shard(5)


if __name__ == "__main__":
    unittest.main()
