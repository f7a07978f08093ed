"""Tests for the science chain (`workflow.science.pipelines`, `workflow.stages.pipeline`) on the project simulator.

One LSSTComCamSim detector-visit at 1/4 scale is simulated with
`workflow.sim.simulate`, its calibs with `workflow.sim.calibs`, refcat with
`workflow.sim.refcat` and templates with `workflow.sim.templates` (no Butler), and
run through ApPipe; results are compared with the simulator's truth.
"""

from __future__ import annotations

import dataclasses
import unittest
from pathlib import Path
from unittest import mock

import numpy as np
from astropy.io import fits
from science_images import simulate_detector_visit, true_zero_point, wcs_error_mas
from scipy.spatial import cKDTree

from workflow.core.config import load_yaml
from workflow.science.errors import BadImageError, NumericalFailureError, ScienceDataError
from workflow.science.masks import MaskPlane
from workflow.science.photometry import psf_photometry
from workflow.science.pipelines import run_pipelines
from workflow.science.psf import measure_psf
from workflow.sim.sky_model import SkyModel
from workflow.stages.pipeline import bias_in_electrons, template_patch

SEED = 7
SCALE = 0.25
DEFINITIONS = load_yaml(Path(__file__).resolve().parent.parent / "config" / "pipelines.yaml")["pipeline_definitions"]
ORDER = ["ApPipe", "SingleFrame", "Isr"]
UNUSABLE = int(MaskPlane.BAD | MaskPlane.SAT | MaskPlane.NO_DATA | MaskPlane.EDGE | MaskPlane.SUSPECT)


def _expected_changes(visit, run):  # noqa: ANN001, ANN202
    """Return the truth's positions, difference fluxes (nJy), S/N on the difference, and usability.

    Usable: on unmasked pixels 20 px inside the image, no other change within 10 px (blends).
    """
    truth, diff = visit.raw.truth, run.outputs["difference"]
    x, y = np.asarray(truth["x"]), np.asarray(truth["y"])
    delta = np.asarray(truth["flux"]) - np.asarray(truth["mean_flux"])
    forced = psf_photometry(diff.image, diff.variance, diff.psf, x, y, mask=diff.mask)
    snr = delta / (forced["flux_err"].to_numpy() * diff.njy_per_count)
    margin = 20
    inside = (x > margin) & (y > margin) & (x < diff.shape[1] - margin) & (y < diff.shape[0] - margin)
    ix = np.clip(np.rint(x).astype(int), 0, diff.shape[1] - 1)
    iy = np.clip(np.rint(y).astype(int), 0, diff.shape[0] - 1)
    isolated = cKDTree(np.column_stack([x, y])).query(np.column_stack([x, y]), k=2)[0][:, 1] > 10.0
    usable = inside & isolated & ((diff.mask[iy, ix] & UNUSABLE) == 0)
    return x, y, delta, snr, usable


class ApPipeOnSimulatorTestCase(unittest.TestCase):
    """Tests for `workflow.science.pipelines.run_pipelines` on a simulated detector with variables and transients."""

    @classmethod
    def setUpClass(cls) -> None:
        sky = SkyModel(seed=SEED, variable_density_per_deg2=20000.0, transient_density_per_deg2=20000.0)
        cls.visit = simulate_detector_visit(scale=SCALE, seed=SEED, sky=sky)
        cls.result = run_pipelines(ORDER, DEFINITIONS, cls.visit.inputs)

    def test_ap_pipe_ran(self) -> None:
        self.assertEqual(self.result.pipeline, "ApPipe")
        self.assertEqual([a.status for a in self.result.attempts], ["succeeded", "not_run", "not_run"])
        for name in ("post_isr", "calexp", "template", "difference", "dia_sources"):
            self.assertIn(name, self.result.outputs)

    def test_isr_units(self) -> None:
        post = self.result.outputs["post_isr"]
        sky = self.visit.raw.truth.meta["sky_e_per_pix"]  # electrons, as the flat leaves it on the axis
        self.assertAlmostEqual(float(np.median(post.image)) / sky, 1.0, delta=0.02)
        stars = self.visit.raw.stars
        bright = np.asarray(stars["image_flux"]) > 2e7
        if bright.any():
            x, y = np.asarray(stars["x"])[bright], np.asarray(stars["y"])[bright]
            sat = post.mask[np.rint(y).astype(int), np.rint(x).astype(int)] & int(MaskPlane.SAT)
            self.assertTrue((sat != 0).all())

    def test_astrometry_and_zero_point(self) -> None:
        calexp = self.result.outputs["calexp"]
        self.assertLess(wcs_error_mas(calexp.wcs, self.visit.raw.true_wcs, calexp.shape), 20.0)
        self.assertAlmostEqual(calexp.zero_point, true_zero_point(self.visit.raw), delta=0.02)
        # Template (nJy coadd) and science are matched: the kernel sum is the flux ratio.
        ratio = 10 ** (0.4 * (calexp.zero_point - 31.4))
        kernel_sum = self.result.outputs["difference"].metadata["KERNSUM"]
        expected = ratio if self.result.outputs["difference"].metadata["SUBCONV"] == "template" else 1 / ratio
        self.assertAlmostEqual(kernel_sum / expected, 1.0, delta=0.02)

    def test_changes_recovered(self) -> None:
        dia = self.result.outputs["dia_sources"]
        x, y, delta, snr, usable = _expected_changes(self.visit, self.result)
        strong = usable & (np.abs(snr) > 10.0)
        self.assertGreater(strong.sum(), 10)
        dist, index = cKDTree(dia[["x", "y"]].to_numpy()).query(np.column_stack([x[strong], y[strong]]))
        found = dist < 2.0  # 0.4 arcsec; variables on bright stars are pulled by the stars' residuals
        self.assertGreaterEqual(found.mean(), 0.95, f"{int((~found).sum())} of {strong.sum()} missed")
        self.assertLess(float(np.median(dist[found])), 0.3)
        self.assertGreaterEqual(float(np.mean(dist[found] < 1.0)), 0.9)
        rows = dia.iloc[index[found]]
        flux, err = rows["psfFlux"].to_numpy(), rows["psfFluxErr"].to_numpy()
        expected = delta[strong][found]
        np.testing.assert_array_equal(np.sign(flux), np.sign(expected))
        close = np.abs(flux - expected) < np.maximum(5.0 * err, 0.1 * np.abs(expected))
        self.assertGreaterEqual(close.mean(), 0.9)
        pull = (flux - expected) / err
        self.assertLess(abs(float(np.median(pull))), 1.0)

    def test_few_false_detections(self) -> None:
        dia = self.result.outputs["dia_sources"]
        x, y, _, _, _ = _expected_changes(self.visit, self.result)
        near = cKDTree(np.column_stack([x, y])).query(dia[["x", "y"]].to_numpy())[0]
        self.assertLessEqual(int((near > 2.0).sum()), 8)

    def test_fallback_without_template(self) -> None:
        run = run_pipelines(ORDER, DEFINITIONS, dataclasses.replace(self.visit.inputs, templates=[]))
        self.assertEqual(run.pipeline, "SingleFrame")
        self.assertEqual((run.attempts[0].step, run.attempts[0].error), ("warp_template", "NoTemplateError"))
        self.assertIn("no template patches", run.attempts[0].reason)

    def test_fallback_without_refcat(self) -> None:
        run = run_pipelines(ORDER, DEFINITIONS, dataclasses.replace(self.visit.inputs, refcat=None))
        self.assertEqual(run.pipeline, "Isr")
        failed = run.attempts[1]
        self.assertEqual((failed.step, failed.error), ("calibrate.astrometry", "TooFewStarsError"))
        self.assertEqual(failed.reason, "calibrate.astrometry: reference catalogue is empty")

    def test_template_in_wrong_units_falls_back(self) -> None:
        patches = [dataclasses.replace(p, zero_point=31.0) for p in self.visit.inputs.templates]
        run = run_pipelines(ORDER, DEFINITIONS, dataclasses.replace(self.visit.inputs, templates=patches))
        self.assertEqual(run.pipeline, "SingleFrame")
        failed = run.attempts[0]
        self.assertEqual((failed.step, failed.error), ("subtract_images", "NumericalFailureError"))
        self.assertRegex(failed.reason, r"^subtract_images: fitted flux ratio .* differs from the zero points'")

    def test_numerical_failure_falls_back(self) -> None:
        singular = np.linalg.LinAlgError("Singular matrix")
        with mock.patch("workflow.science.pipelines.subtract_images", side_effect=singular):
            run = run_pipelines(ORDER, DEFINITIONS, self.visit.inputs)
        self.assertEqual(run.pipeline, "SingleFrame")
        failed = run.attempts[0]
        self.assertEqual((failed.step, failed.error), ("subtract_images", "NumericalFailureError"))
        self.assertEqual(run.attempts[0].reason, "subtract_images: numerical failure (Singular matrix)")


class StaticFieldTestCase(unittest.TestCase):
    """Tests for `workflow.science.pipelines.run_pipelines` on a simulated static field (false detections)."""

    def test_few_false_detections(self) -> None:
        sky = SkyModel(seed=SEED + 1, variable_density_per_deg2=0.0, transient_density_per_deg2=0.0)
        visit = simulate_detector_visit(scale=SCALE, seed=SEED + 1, sky=sky, field=(150.3, 2.1))
        self.assertEqual(len(visit.raw.truth), 0)
        run = run_pipelines(ORDER, DEFINITIONS, visit.inputs)
        self.assertEqual(run.pipeline, "ApPipe")
        self.assertLessEqual(len(run.outputs["dia_sources"]), 6)


class UnitsAndErrorsTestCase(unittest.TestCase):
    """Tests for unit handling in `workflow.stages.pipeline` and numerical-failure errors."""

    def test_bias_units(self) -> None:
        geometry = mock.Mock(
            amplifiers=[
                mock.Mock(bbox=mock.Mock(x0=0, y0=0, x1=2, y1=4), gain=1.5),
                mock.Mock(bbox=mock.Mock(x0=2, y0=0, x1=4, y1=4), gain=2.0),
            ]
        )
        bias = np.ones((4, 4), np.float32)
        electrons = bias_in_electrons(bias, "adu", geometry)
        np.testing.assert_array_equal(electrons[:, :2], 1.5)
        np.testing.assert_array_equal(electrons[:, 2:], 2.0)
        np.testing.assert_array_equal(bias_in_electrons(bias, "electron", geometry), bias)
        with self.assertRaisesRegex(BadImageError, r"^isr: bias has unknown unit 'dn'"):
            bias_in_electrons(bias, "DN", geometry)

    def test_template_zero_point(self) -> None:
        header = fits.Header({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "BUNIT": "nJy"})
        image = np.zeros((4, 4), np.float32)
        self.assertEqual(template_patch(image, image, header).zero_point, 31.4)
        header["BUNIT"], header["ZEROPNT"] = "count", 27.0
        self.assertEqual(template_patch(image, image, header).zero_point, 27.0)

    def test_singular_psf_fit(self) -> None:
        rng = np.random.default_rng(1)
        image = rng.normal(0.0, 1.0, (200, 200)).astype(np.float32)
        x, y = rng.uniform(30, 170, 12), rng.uniform(30, 170, 12)
        for xi, yi in zip(x, y, strict=False):
            image[int(yi) - 2 : int(yi) + 3, int(xi) - 2 : int(xi) + 3] += 500.0
        with mock.patch("numpy.linalg.solve", side_effect=np.linalg.LinAlgError("Singular matrix")):
            with self.assertRaisesRegex(ScienceDataError, r"^calibrate\.psf: singular PSF fit") as caught:
                measure_psf(image, np.ones_like(image), x, y, half=6)
        self.assertIsInstance(caught.exception, NumericalFailureError)
        blank = np.zeros_like(image)  # every star pixel rejected: no data for the fit
        with self.assertRaisesRegex(ScienceDataError, r"^calibrate\.psf: .*usable PSF star"):
            measure_psf(blank, np.ones_like(image), x, y, half=6)


if __name__ == "__main__":
    unittest.main()
