"""Tests for `workflow.sim.sky_model` and `workflow.sim.render`."""

from __future__ import annotations

import unittest

import lsst.sphgeom as sphgeom
import numpy as np

from workflow.sim.render import GaussianMixturePsf, add_galaxies, add_point_sources, exponential_mixture
from workflow.sim.sky_model import (
    SkyModel,
    galaxies_in_region,
    injected_sources,
    transient_flux,
    transients_in_region,
    variable_flux,
    variables_in_region,
)


def _circle(ra: float, dec: float, radius_deg: float) -> sphgeom.Circle:
    return sphgeom.Circle(
        sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(ra, dec)), sphgeom.Angle.fromDegrees(radius_deg)
    )


class SkyModelTestCase(unittest.TestCase):
    """Tests for the synthetic populations."""

    sky = SkyModel(seed=3, variable_density_per_deg2=2000.0, transient_density_per_deg2=2000.0)

    def test_variables_consistent(self) -> None:
        big = variables_in_region(_circle(80.0, -20.0, 0.3), self.sky)
        small = variables_in_region(_circle(80.1, -20.1, 0.1), self.sky)
        self.assertGreater(len(small), 10)
        common = {int(i): (r, d) for i, r, d in zip(big["id"], big["ra"], big["dec"], strict=False)}
        for i, r, d in zip(small["id"], small["ra"], small["dec"], strict=False):
            self.assertEqual(common[int(i)], (r, d))

    def test_variable_flux(self) -> None:
        table = variables_in_region(_circle(80.0, -20.0, 0.1), self.sky)
        mean = variable_flux(table, "r", None)
        times = np.linspace(60000.0, 60040.0, 4001)
        curves = np.array([variable_flux(table, "r", t) for t in times])
        short = np.asarray(table["period_days"]) < 4.0  # many cycles in 40 days
        self.assertGreater(short.sum(), 5)
        np.testing.assert_allclose(curves.mean(axis=0)[short] / mean[short], 1.0, atol=0.05)
        self.assertTrue(np.all(curves > 0))

    def test_transients(self) -> None:
        region = _circle(80.0, -20.0, 0.2)
        table = transients_in_region(region, self.sky, 60010.0)
        self.assertGreater(len(table), 0)
        peak = transient_flux(table, "g", np.asarray(table["t_peak"]))
        np.testing.assert_allclose(peak, 10 ** (-0.4 * (np.asarray(table["g_mag"]) - 31.4)))
        before = transient_flux(table, "g", np.asarray(table["t_peak"]) - 30.0)
        self.assertTrue(np.all(before < 1e-3 * peak))
        # The same transient appears in queries at nearby times.
        later = transients_in_region(region, self.sky, 60012.0)
        self.assertTrue(set(table["id"]) & set(later["id"]))

    def test_injected(self) -> None:
        region = _circle(80.0, -20.0, 0.1)
        truth = injected_sources(region, self.sky, "i", 60010.0)
        self.assertEqual(set(truth["kind"]), {"variable", "transient"})
        self.assertTrue(np.all(truth["mean_flux"][truth["kind"] == "transient"] == 0))
        template = injected_sources(region, self.sky, "i", None)
        self.assertEqual(set(template["kind"]), {"variable"})
        np.testing.assert_array_equal(template["flux"], template["mean_flux"])

    def test_galaxies(self) -> None:
        gals = galaxies_in_region(_circle(80.0, -20.0, 0.1), self.sky)
        self.assertGreater(len(gals), 100)
        self.assertTrue(np.all((gals["axis_ratio"] > 0.29) & (gals["axis_ratio"] <= 1.0)))


class RenderTestCase(unittest.TestCase):
    """Tests for `workflow.sim.render`."""

    def test_psf(self) -> None:
        psf = GaussianMixturePsf.from_fwhm(4.0)
        self.assertAlmostEqual(psf.fwhm, 4.0, places=6)
        stamp = psf.stamp(30, 0.3, -0.2)
        self.assertAlmostEqual(stamp.sum(), 1.0, places=4)
        yy, xx = np.mgrid[-30:31, -30:31]
        self.assertAlmostEqual((stamp * xx).sum(), 0.3, places=3)
        self.assertAlmostEqual((stamp * yy).sum(), -0.2, places=3)

    def test_point_sources_flux_and_edges(self) -> None:
        psf = GaussianMixturePsf.from_fwhm(3.0)
        image = np.zeros((100, 120))
        add_point_sources(
            image, np.array([50.2, -3.0, 119.4]), np.array([40.7, 50.0, 99.0]), np.array([1e5, 1e5, 1e5]), psf
        )
        ys, xs = np.mgrid[0:100, 0:120]
        near = np.hypot(xs - 50.2, ys - 40.7) < 25
        self.assertAlmostEqual(image[near].sum() / 1e5, 1.0, places=3)
        self.assertGreater(image[:, :3].sum(), 0)  # wing of the source off the left edge

    def test_galaxies_flux(self) -> None:
        psf = GaussianMixturePsf.from_fwhm(3.0)
        image = np.zeros((200, 200))
        add_galaxies(
            image,
            np.array([100.0]),
            np.array([100.0]),
            np.array([1e4]),
            np.array([4.0]),
            np.array([0.5]),
            np.array([0.3]),
            psf,
        )
        self.assertAlmostEqual(image.sum() / 1e4, 1.0, delta=0.01)
        amps, variances = exponential_mixture()
        self.assertAlmostEqual(amps.sum(), 1.0)
        self.assertEqual(len(amps), len(variances))
        # Elongated along 0.3 rad: second moments reflect the orientation.
        yy, xx = np.mgrid[0:200, 0:200] - 100.0
        ixy = (image * xx * yy).sum()
        self.assertGreater(ixy, 0)


if __name__ == "__main__":
    unittest.main()
