"""Tests for `workflow.science.pipelines` and the exposure FITS I/O of `workflow.science.exposure`."""

from __future__ import annotations

import tempfile
import unittest
from pathlib import Path

import numpy as np
from astropy.io import fits
from science_images import make_raw, make_scene, make_wcs, observe

from workflow.core.config import load_yaml
from workflow.core.exceptions import ConfigError
from workflow.science.errors import BadImageError, CorruptFileError, NoTemplateError, TooFewStarsError
from workflow.science.exposure import Exposure, read_exposure, write_exposure
from workflow.science.pipelines import NoPipelineRanError, ProcessingInputs, run_pipelines, select_pipelines

SHAPE = (512, 512)
CONFIG = Path(__file__).resolve().parent.parent / "config"
DEFINITIONS = load_yaml(CONFIG / "pipelines.yaml")["pipeline_definitions"]
ORDER = ["ApPipe", "SingleFrame", "Isr"]


def _inputs(scene, *, templates=None, image=None, refcat=None) -> ProcessingInputs:  # noqa: ANN001
    raw, amps = make_raw(scene.science.image if image is None else image)
    return ProcessingInputs(
        raws=[raw],
        amps=amps,
        visit=2024112800123,
        detector=4,
        band="r",
        midpoint_mjd_tai=60642.25,
        wcs_guess=scene.wcs_guess,
        exposure_time=30.0,
        refcat=scene.refcat if refcat is None else refcat,
        templates=[scene.template] if templates is None else templates,
    )


class RunPipelinesTestCase(unittest.TestCase):
    """Tests for `workflow.science.pipelines.run_pipelines` and its fallback."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.scene = make_scene(SHAPE, inject_snr=np.array([15.0, 20.0, 25.0]), seed=31)

    def test_ap_pipe_runs(self) -> None:
        with self.assertLogs("timer.workflow.science.isr", level="DEBUG") as logs:
            run = run_pipelines(ORDER, DEFINITIONS, _inputs(self.scene))
        self.assertEqual(run.pipeline, "ApPipe")
        self.assertEqual([a.status for a in run.attempts], ["succeeded", "not_run", "not_run"])
        self.assertEqual(run.attempts[1].reason, "ApPipe succeeded")
        self.assertEqual([t.step for t in run.timings], DEFINITIONS["ApPipe"])
        self.assertTrue(all(t.wall_s > 0 and t.cpu_s >= 0 for t in run.timings))
        expected = r"DEBUG:timer.workflow.science.isr:isr \(ApPipe\): wall [0-9.]+ s, cpu [0-9.]+ s"
        self.assertRegex(logs.output[0], expected)
        dia = run.outputs["dia_sources"]
        self.assertGreaterEqual(len(dia), 3)
        self.assertTrue((dia["visit"] == 2024112800123).all())
        self.assertEqual(run.to_dict()["pipeline"], "ApPipe")
        self.assertIn("difference", run.to_dict()["outputs"])

    def test_no_template_falls_back_to_single_frame(self) -> None:
        run = run_pipelines(ORDER, DEFINITIONS, _inputs(self.scene, templates=[]))
        self.assertEqual(run.pipeline, "SingleFrame")
        first = run.attempts[0]
        self.assertEqual(
            (first.pipeline, first.status, first.step, first.error),
            ("ApPipe", "failed", "warp_template", "NoTemplateError"),
        )
        self.assertEqual(first.reason, "warp_template: no template patches overlap the image")
        self.assertEqual(run.attempts[2].status, "not_run")
        # ISR and calibrate ran once: SingleFrame reused them.
        reused = [(t.pipeline, t.step) for t in run.timings if t.reused]
        self.assertEqual(reused, [("SingleFrame", "isr"), ("SingleFrame", "calibrate")])
        self.assertIn("calexp", run.outputs)
        self.assertNotIn("dia_sources", run.outputs)

    def test_too_few_stars_falls_back_to_isr(self) -> None:
        blank = observe(self.scene.refcat.iloc[:0], self.scene.science.wcs, SHAPE, seed=5).image
        run = run_pipelines(ORDER, DEFINITIONS, _inputs(self.scene, image=blank))
        self.assertEqual(run.pipeline, "Isr")
        self.assertEqual([a.status for a in run.attempts], ["failed", "failed", "succeeded"])
        self.assertEqual({a.error for a in run.attempts[:2]}, {"TooFewStarsError"})
        self.assertRegex(run.attempts[1].reason, r"^calibrate.detection: \d+ source\(s\) detected")
        self.assertEqual(sum(1 for t in run.timings if t.step == "calibrate" and not t.reused), 1)
        self.assertIn("post_isr", run.outputs)

    def test_all_fail_and_config_errors(self) -> None:
        blank = observe(self.scene.refcat.iloc[:0], self.scene.science.wcs, SHAPE, seed=5).image
        expected = r"ApPipe: calibrate.detection: .*SingleFrame: calibrate"
        with self.assertRaisesRegex(NoPipelineRanError, expected) as ctx:
            run_pipelines(["ApPipe", "SingleFrame"], DEFINITIONS, _inputs(self.scene, image=blank))
        self.assertIsInstance(ctx.exception.__cause__, TooFewStarsError)
        with self.assertRaisesRegex(ConfigError, r"pipeline 'Nope' is not in pipeline_definitions"):
            run_pipelines(["Nope"], DEFINITIONS, _inputs(self.scene))
        with self.assertRaisesRegex(ConfigError, r"pipeline 'Odd' uses unknown step\(s\) fly"):
            run_pipelines(["Odd"], {"Odd": ["isr", "fly"]}, _inputs(self.scene))
        ignored = run_pipelines([], DEFINITIONS, _inputs(self.scene))
        self.assertIsNone(ignored.pipeline)
        self.assertTrue(issubclass(NoTemplateError, LookupError))


class SelectPipelinesTestCase(unittest.TestCase):
    """Tests for `workflow.science.pipelines.select_pipelines`."""

    NODES = [
        {"survey": "BLOCK-365", "pipelines": []},
        {"ra": [350.0, 10.0], "dec": [-10.0, 10.0], "pipelines": ["ApPipe", "Isr"]},
        {"survey": "DEEP", "ra": [149.0, 151.5], "dec": [1.0, 3.5], "pipelines": ["SingleFrame"]},
        {"pipelines": ["Isr"]},
    ]

    def test_first_match_wins(self) -> None:
        self.assertEqual(select_pipelines(self.NODES, survey="BLOCK-365", ra=0.0, dec=0.0), [])
        self.assertEqual(select_pipelines(self.NODES, survey="DEEP", ra=355.0, dec=0.0), ["ApPipe", "Isr"])
        self.assertEqual(select_pipelines(self.NODES, survey="DEEP", ra=5.0, dec=0.0), ["ApPipe", "Isr"])
        self.assertEqual(select_pipelines(self.NODES, survey="DEEP", ra=-5.0, dec=0.0), ["ApPipe", "Isr"])
        self.assertEqual(select_pipelines(self.NODES, survey="DEEP", ra=20.0, dec=0.0), ["Isr"])
        self.assertEqual(select_pipelines(self.NODES, survey="DEEP", ra=150.0, dec=2.0), ["SingleFrame"])
        self.assertEqual(select_pipelines(self.NODES, survey="WIDE", ra=150.0, dec=2.0), ["Isr"])
        self.assertEqual(select_pipelines(self.NODES[:3], survey="WIDE", ra=150.0, dec=2.0), [])

    def test_shipped_configs(self) -> None:
        hsc = load_yaml(CONFIG / "instruments" / "HSC.yaml")["pipelines"]
        self.assertEqual(select_pipelines(hsc, survey="x", ra=150.0, dec=2.0), ORDER)
        self.assertEqual(select_pipelines(hsc, survey="x", ra=10.0, dec=2.0), ["SingleFrame", "Isr"])


class ExposureIoTestCase(unittest.TestCase):
    """Tests for `workflow.science.exposure.write_exposure` and `read_exposure`."""

    @classmethod
    def setUpClass(cls) -> None:
        scene = make_scene((256, 256), seed=41, density=1.5e-3)
        run = run_pipelines(["SingleFrame"], DEFINITIONS, _inputs(scene, templates=[]))
        cls.calexp = run.outputs["calexp"]
        cls.tmp = tempfile.TemporaryDirectory()
        cls.path = write_exposure(cls.calexp, Path(cls.tmp.name) / "calexp.fits")

    @classmethod
    def tearDownClass(cls) -> None:
        cls.tmp.cleanup()

    def test_round_trip(self) -> None:
        back = read_exposure(self.path)
        np.testing.assert_array_equal(back.image, self.calexp.image)
        np.testing.assert_array_equal(back.mask, self.calexp.mask)
        np.testing.assert_array_equal(back.variance, self.calexp.variance)
        self.assertEqual(back.zero_point, self.calexp.zero_point)
        np.testing.assert_allclose(back.psf.coeffs, self.calexp.psf.coeffs)
        self.assertAlmostEqual(back.psf.fwhm, self.calexp.psf.fwhm, places=6)
        xy = np.array([[0.0, 0.0], [100.5, 37.2], [255.0, 255.0]])
        sky = self.calexp.wcs.all_pix2world(xy, 0)
        np.testing.assert_allclose(back.wcs.all_pix2world(xy, 0), sky, atol=1e-9)
        self.assertEqual(back.metadata["NASTROM"], self.calexp.metadata["NASTROM"])
        with fits.open(self.path) as hdul:
            self.assertEqual([h.name for h in hdul], ["PRIMARY", "IMAGE", "MASK", "VARIANCE", "PSF"])
            self.assertEqual(hdul[0].header["MP_SAT"], 1)

    def test_corrupt_files(self) -> None:
        data = self.path.read_bytes()
        truncated = Path(self.tmp.name) / "truncated.fits"
        truncated.write_bytes(data[: len(data) // 2 + 17])
        with self.assertRaisesRegex(CorruptFileError, rf"^read_exposure: {truncated}: "):
            read_exposure(truncated)
        garbage = Path(self.tmp.name) / "garbage.fits"
        garbage.write_bytes(b"not a fits file at all" * 200)
        expected = rf"^read_exposure: {garbage}: not a readable FITS file"
        with self.assertRaisesRegex(CorruptFileError, expected):
            read_exposure(garbage)
        partial = Path(self.tmp.name) / "partial.fits"
        fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((4, 4)), name="IMAGE")]).writeto(partial)
        with self.assertRaisesRegex(CorruptFileError, r"missing or empty extension\(s\) MASK, VARIANCE"):
            read_exposure(partial)
        with self.assertRaisesRegex(CorruptFileError, r"no such file"):
            read_exposure(Path(self.tmp.name) / "absent.fits")

    def test_wrong_shapes(self) -> None:
        with self.assertRaisesRegex(BadImageError, r"^exposure: image \(4, 4\), mask \(3, 3\)"):
            Exposure(image=np.zeros((4, 4)), mask=np.zeros((3, 3)), variance=np.zeros((4, 4)))
        ones = np.ones((4, 4))
        exposure = Exposure(image=ones, mask=np.zeros((4, 4)), variance=ones, zero_point=31.4)
        self.assertAlmostEqual(exposure.njy_per_count, 1.0)
        exposure.wcs = make_wcs((4, 4))
        copy = exposure.copy()
        copy.image[0, 0] = 5.0
        self.assertEqual(exposure.image[0, 0], 1.0)


if __name__ == "__main__":
    unittest.main()
