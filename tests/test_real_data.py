"""Real DECam data through the pipeline's own steps: calibrate both, register, subtract.

The stacks and sfft's reference difference in ``tests/data/decam_sfft`` (see its README)
are real observations this project never simulated: few stars, PSFs with wings, sky
noise that is Poisson.  Nothing here is hand-picked: PSF stars, kernel stamps and the
registration come from the pipeline.  No reference catalogue ships with the cutouts, so
both images are calibrated against the template's own detections (a relative calibration).
"""

from __future__ import annotations

import unittest
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from workflow.science.calibrate import CalibrationResult, calibrate
from workflow.science.exposure import Exposure
from workflow.science.masks import MaskPlane
from workflow.science.photometry import detect_sources, estimate_background, robust_std, source_footprints
from workflow.science.subtract import subtract_images
from workflow.science.template_warp import TemplatePatch, warp_template

DATA = Path(__file__).parent / "data" / "decam_sfft"


def _load(name: str) -> Exposure:
    """Read a stack as an exposure: ADU, variance from the sky noise plus the sources' photons."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)  # TPV distortion keywords
        with fits.open(DATA / name) as hdul:
            header = hdul[0].header
            image = hdul[0].data.astype(np.float32)
            wcs = WCS(header)
    sky_var = robust_std(image[::2, ::2]) ** 2
    variance = sky_var + np.maximum(image, 0.0) / float(header["GAIN"])
    mask = np.zeros(image.shape, np.int32)
    mask[image > 0.9 * float(header["SATURATE"])] |= MaskPlane.SAT
    return Exposure(image=image, mask=mask, variance=variance, wcs=wcs)


def _refcat(template: Exposure) -> pd.DataFrame:
    """The template's own isolated detections as a reference catalogue (nJy for a zero point of 30)."""
    image = template.image - estimate_background(template.image, template.mask)
    found = detect_sources(image, template.variance, template.mask, threshold=5.0)
    found = found[found["sep_flags"] == 0]
    assert template.wcs is not None
    ra, dec = template.wcs.all_pix2world(found["x"].to_numpy(), found["y"].to_numpy(), 0)
    return pd.DataFrame({"ra": ra, "dec": dec, "i_flux": found["flux"].to_numpy() * 10 ** (0.4 * (31.4 - 30.0))})


def _calibrate(exposure: Exposure, refcat: pd.DataFrame) -> CalibrationResult:
    assert exposure.wcs is not None
    return calibrate(exposure, refcat, exposure.wcs, band="i", sip_degree=1)


def _star_residuals(diff: np.ndarray, noise: float, x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """RMS of ``diff / noise`` within ``radius`` of each star."""
    yy, xx = np.indices(diff.shape)
    return np.array(
        [np.sqrt(np.mean((diff[np.hypot(xx - u, yy - v) <= radius] / noise) ** 2)) for u, v in zip(x, y, strict=True)]
    )


class _Pair:
    """One template/science pair run through calibrate, warp and subtract."""

    def __init__(self, template_name: str, science_name: str) -> None:
        template, science = _load(template_name), _load(science_name)
        refcat = _refcat(template)
        self.template_cal, self.science_cal = _calibrate(template, refcat), _calibrate(science, refcat)
        tcal, scal = self.template_cal.exposure, self.science_cal.exposure
        assert tcal.wcs is not None and scal.wcs is not None and scal.psf is not None
        patch = TemplatePatch(
            image=tcal.image, variance=tcal.variance, wcs=tcal.wcs, mask=tcal.mask, zero_point=tcal.zero_point
        )
        warped = warp_template([patch], scal.wcs, scal.shape)
        self.difference = subtract_images(scal, warped, stars=self.science_cal.sources).difference
        # Blank sky: away from everything either image detects, unmasked in the difference.
        found = detect_sources(scal.image, scal.variance, scal.mask, threshold=3.0)
        noise = float(np.sqrt(np.median(scal.variance)))
        self.blank = ~source_footprints(scal.shape, found, scal.psf.sigma, noise) & (self.difference.mask == 0)
        yy, xx = np.indices(scal.shape)
        for u, v in pd.concat([self.template_cal.sources, self.science_cal.sources])[["x", "y"]].to_numpy():
            self.blank &= np.hypot(xx - u, yy - v) > 3.0 * scal.psf.fwhm


class DecamSingleEpochTestCase(unittest.TestCase):
    """One exposure per epoch: white noise, so the propagated error can be checked."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.pair = _Pair("DEC-OBS04a.mini.fits", "DEC-OBS18a.mini.fits")

    def test_calibration_finds_psf_stars(self) -> None:
        for result in (self.pair.template_cal, self.pair.science_cal):
            self.assertGreaterEqual(int(result.sources["calib_psf_used"].sum()), 5)
            assert result.exposure.psf is not None
            self.assertTrue(2.5 < result.exposure.psf.fwhm < 7.0, result.exposure.psf.fwhm)
            self.assertTrue(0.9 < result.exposure.metadata["APCORR"] < 1.2)

    def test_blank_sky_noise_matches_propagated_error(self) -> None:
        diff, blank = self.pair.difference, self.pair.blank
        self.assertGreater(int(blank.sum()), 5000)
        # The variance plane was rescaled to the measured noise; undo that to get the propagated error.
        propagated = diff.variance / np.float32(diff.metadata["VARSCALE"])
        z = diff.image[blank] / np.sqrt(propagated[blank])
        self.assertLess(abs(float(np.std(z)) - 1.0), 0.10, f"blank-sky rms / propagated error {np.std(z):.3f}")
        self.assertLess(abs(float(np.mean(z))), 0.05, f"blank-sky mean offset {np.mean(z):.3f} sigma")


class DecamStackTestCase(unittest.TestCase):
    """The stacks sfft differenced: residuals at stars against its published differences.

    (Their noise is correlated, a 2x2 sum has 1.4-1.6x the white-noise rms, so a
    per-pixel variance does not describe them; the noise check is on single epochs.)
    """

    @classmethod
    def setUpClass(cls) -> None:
        cls.pair = _Pair("Stack-DEC-OBS04.fits", "Stack-DEC-OBS18.fits")
        cls.references = {}
        for name in ("FinalDifference.fits", "FinalDifference.DeCorr.fits"):
            with fits.open(DATA / name) as hdul:
                cls.references[name] = hdul[0].data.astype(np.float32)

    def test_star_residuals_no_worse_than_reference(self) -> None:
        stars = self.pair.science_cal.sources
        stars = stars[(stars["snr"] > 20) & ~stars["pixelFlags_saturated"]]
        scal, diff, blank = self.pair.science_cal.exposure, self.pair.difference, self.pair.blank
        assert scal.psf is not None
        margin = 3.0 * scal.psf.fwhm + 16
        inside = (stars["x"] > margin) & (stars["y"] > margin) & (stars["x"] < scal.shape[1] - margin)
        stars = stars[inside & (stars["y"] < scal.shape[0] - margin)]
        self.assertGreaterEqual(len(stars), 5)
        x, y, radius = stars["x"].to_numpy(), stars["y"].to_numpy(), 2.0 * scal.psf.fwhm
        # Each difference in units of its own blank-sky noise.
        ours = _star_residuals(diff.image, robust_std(diff.image[blank]), x, y, radius)
        for name, reference in self.references.items():
            with self.subTest(reference=name):
                ref = _star_residuals(reference, robust_std(reference[blank]), x, y, radius)
                detail = f"median residual {np.median(ours):.2f} vs sfft {np.median(ref):.2f}: {ours} {ref}"
                self.assertLessEqual(float(np.median(ours)), float(np.median(ref)), detail)


if __name__ == "__main__":
    unittest.main()
