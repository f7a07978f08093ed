"""Tests for `workflow.science.template_warp`, `workflow.science.subtract` and `workflow.science.zogy`."""

from __future__ import annotations

import unittest

import numpy as np
from science_images import make_refcat, make_scene, make_wcs, render

from workflow.science.calibrate import calibrate
from workflow.science.dia_sources import detect_dia_sources
from workflow.science.errors import BadImageError, NoTemplateError, NumericalFailureError, ScienceDataError
from workflow.science.exposure import Exposure
from workflow.science.masks import MaskPlane
from workflow.science.subtract import alard_lupton_basis, subtract_images
from workflow.science.template_warp import TemplatePatch, template_coverage, warp_template
from workflow.science.zogy import check_flux_ratio

SHAPE = (512, 512)


def _stars(wcs, shape, refcat, fwhm=3.0):  # noqa: ANN001, ANN202
    x, y = wcs.all_world2pix(refcat["ra"], refcat["dec"], 0)
    return render(shape, x, y, refcat["r_flux"].to_numpy(), fwhm).astype(np.float32)


class WarpTestCase(unittest.TestCase):
    """Tests for `workflow.science.template_warp.warp_template`."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.wcs = make_wcs(SHAPE)
        cls.refcat = make_refcat(cls.wcs, SHAPE, density=1e-3, seed=3)
        cls.truth = _stars(cls.wcs, SHAPE, cls.refcat)

    def _patch(self, shape, rotation, shift, crop=None):  # noqa: ANN001, ANN202
        wcs = make_wcs(shape, rotation=rotation)
        wcs.wcs.crpix = wcs.wcs.crpix + np.array(shift)
        image = _stars(wcs, shape, self.refcat)
        if crop is not None:
            image, wcs = image[:, crop], wcs[:, crop]
        return TemplatePatch(image=image, variance=np.full(image.shape, 4.0, np.float32), wcs=wcs, name="t")

    def test_rotated_shifted_patch_reproduces_image(self) -> None:
        patch = self._patch((600, 600), 0.7, (0.37, -0.21))
        warped = warp_template([patch], self.wcs, SHAPE)
        self.assertFalse((warped.mask & MaskPlane.NO_DATA).any())
        resid = np.abs(warped.image - self.truth)[4:-4, 4:-4]
        self.assertLess(float(resid.max()), 0.01 * float(self.truth.max()))
        self.assertAlmostEqual(float(warped.image.sum() / self.truth.sum()), 1.0, delta=2e-3)
        self.assertEqual(warped.metadata["TMPLCOV"], 1.0)

    def test_two_patches_and_no_data(self) -> None:
        left = self._patch((600, 600), 0.3, (0.1, 0.2), crop=slice(0, 310))
        right = self._patch((600, 600), 0.3, (0.1, 0.2), crop=slice(290, 600))
        half = warp_template([left], self.wcs, SHAPE, min_coverage=0.3)
        nodata = (half.mask & MaskPlane.NO_DATA) != 0
        self.assertTrue(nodata[:, -50:].all())
        self.assertFalse(nodata[:, :200].any())
        self.assertTrue((half.image[nodata] == 0).all())
        self.assertAlmostEqual(template_coverage([left], self.wcs, SHAPE), 1.0 - nodata.mean(), delta=0.1)
        both = warp_template([left, right], self.wcs, SHAPE)
        self.assertFalse((both.mask & MaskPlane.NO_DATA).any())
        resid = np.abs(both.image - self.truth)[4:-4, 4:-4]
        self.assertLess(float(resid.max()), 0.01 * float(self.truth.max()))

    def test_no_template(self) -> None:
        with self.assertRaisesRegex(NoTemplateError, r"^warp_template: no template patches overlap"):
            warp_template([], self.wcs, SHAPE)
        far = self._patch((100, 100), 0.0, (5000.0, 0.0))
        expected = r"^warp_template: template covers 0.0% of the image, need 50%"
        with self.assertRaisesRegex(NoTemplateError, expected):
            warp_template([far], self.wcs, SHAPE)
        nan_patch = TemplatePatch(image=np.full((10, 10), np.nan), variance=np.ones((10, 10)), wcs=self.wcs)
        with self.assertRaisesRegex(BadImageError, r"template patch '' image has no finite pixels"):
            warp_template([nan_patch], self.wcs, SHAPE)


def _calibrated(scene):  # noqa: ANN001, ANN202
    sim = scene.science
    exposure = Exposure(image=sim.image, mask=np.zeros(SHAPE, np.int32), variance=sim.variance)
    return calibrate(exposure, scene.refcat, scene.wcs_guess, band="r")


class FluxRatioCheckTestCase(unittest.TestCase):
    """`workflow.science.zogy.check_flux_ratio`: the tolerance follows the calibration errors."""

    @staticmethod
    def _exposure(zero_point: float, zp_err: float, apcorr_err: float) -> Exposure:
        shape = (8, 8)
        exposure = Exposure(image=np.zeros(shape), mask=np.zeros(shape, np.int32), variance=np.ones(shape))
        exposure.zero_point = zero_point
        exposure.metadata.update(ZPERR=zp_err, APCORR=1.0, APCORERR=apcorr_err)
        return exposure

    def test_tolerance_from_errors(self) -> None:
        template = self._exposure(31.4, 0.0, 0.0)
        precise, loose = self._exposure(31.4, 0.002, 0.002), self._exposure(31.4, 0.03, 0.01)
        check_flux_ratio(1.04, precise, template)  # within the 5% floor
        with self.assertRaisesRegex(NumericalFailureError, r"by 13\.0% \(tolerance 6\.4%, scale error 0\.3%\)"):
            check_flux_ratio(1.13, precise, template)
        check_flux_ratio(1.13, loose, template)  # 5% + 5 x 3% scale error
        with self.assertRaisesRegex(NumericalFailureError, "differs from the zero points"):
            check_flux_ratio(1.30, loose, template)


class SubtractTestCase(unittest.TestCase):
    """Tests for `workflow.science.subtract.subtract_images` on a static sky."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.scene = make_scene(SHAPE, density=1.2e-3, seed=11)
        cls.cal = _calibrated(cls.scene)
        cls.template = warp_template([cls.scene.template], cls.cal.exposure.wcs, SHAPE)
        cls.blank = cls.scene.science.model < 1.0

    def _check_static(self, difference: Exposure, max_detections: int = 1, max_reliable: int = 1) -> None:
        good = (difference.mask == 0) & self.blank
        z = difference.image[good] / np.sqrt(difference.variance[good])
        self.assertAlmostEqual(float(np.std(z)), 1.0, delta=0.06)
        self.assertAlmostEqual(float(np.mean(z)), 0.0, delta=0.03)
        dia = detect_dia_sources(
            difference, visit=1, detector=0, band="r", midpoint_mjd_tai=60000.0, science=self.cal.exposure
        )
        self.assertLessEqual(len(dia), max_detections, dia[["x", "y", "snr"]])
        reliable = int((dia["reliability"] > 0.8).sum())
        self.assertLessEqual(reliable, max_reliable, dia[["x", "y", "snr", "reliability"]])

    def test_alard_lupton_convolve_template(self) -> None:
        result = subtract_images(self.cal.exposure, self.template, stars=self.cal.sources)
        self.assertEqual(result.difference.metadata["SUBCONV"], "template")
        # Kernel sum: science counts per template nJy.
        self.assertAlmostEqual(result.kernel.kernel_sum, 10 ** (-0.4 * 0.4), delta=0.01)
        self._check_static(result.difference)
        self.assertIs(result.difference.wcs, self.cal.exposure.wcs)

    def test_alard_lupton_convolve_science(self) -> None:
        scene = make_scene(SHAPE, density=1.2e-3, seed=11, template_fwhm=4.5)
        template = warp_template([scene.template], self.cal.exposure.wcs, SHAPE)
        result = subtract_images(self.cal.exposure, template, stars=self.cal.sources)
        self.assertEqual(result.difference.metadata["SUBCONV"], "science")
        self._check_static(result.difference)

    def test_zogy(self) -> None:
        result = subtract_images(self.cal.exposure, self.template, stars=self.cal.sources, method="zogy")
        self.assertEqual(result.method, "zogy")
        # Constant, empirical PSFs leave residuals at the brightest stars of this
        # dense field; they are detected, mostly scored unreliable (wing residuals
        # a few PSF widths out, where the science flux is low, are not).
        self._check_static(result.difference, max_detections=20, max_reliable=2)

    def test_errors(self) -> None:
        no_psf = Exposure(image=self.template.image, mask=self.template.mask, variance=self.template.variance)
        with self.assertRaisesRegex(ScienceDataError, r"^subtract_images: science exposure has no PSF"):
            subtract_images(no_psf, self.template)
        small = Exposure(image=np.ones((8, 8)), mask=np.zeros((8, 8)), variance=np.ones((8, 8)))
        message = r"^subtract_images: science \(512, 512\) and template \(8, 8\) differ"
        with self.assertRaisesRegex(BadImageError, message):
            subtract_images(self.cal.exposure, small)
        with self.assertRaisesRegex(ValueError, "unknown subtraction method 'hotpants'"):
            subtract_images(self.cal.exposure, self.template, method="hotpants")

    def test_basis(self) -> None:
        basis = alard_lupton_basis((0.5, 1.0, 2.0), (4, 2, 2), 7)
        self.assertEqual(basis.shape, (27, 15, 15))
        self.assertAlmostEqual(float(basis[0].sum()), 1.0, places=10)
        np.testing.assert_allclose(basis[1:].sum(axis=(1, 2)), 0.0, atol=1e-10)


if __name__ == "__main__":
    unittest.main()
