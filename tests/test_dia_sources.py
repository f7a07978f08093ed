"""Tests for `workflow.science.dia_sources`."""

from __future__ import annotations

import importlib.resources
import unittest

import numpy as np
import yaml
from science_images import make_scene, make_wcs, njy_per_count
from scipy.spatial import cKDTree

from workflow.science.calibrate import calibrate
from workflow.science.dia_sources import DIA_COLUMNS, detect_dia_sources, dia_source_ids
from workflow.science.errors import ScienceDataError
from workflow.science.exposure import Exposure
from workflow.science.masks import MaskPlane
from workflow.science.psf import PsfModel
from workflow.science.subtract import subtract_images
from workflow.science.template_warp import TemplatePatch, warp_template

SHAPE = (256, 256)
NOISE = 10.0


def synthetic_difference(sources, seed: int = 1) -> Exposure:  # noqa: ANN001
    """A flat-noise difference exposure with point sources (x, y, counts)."""
    rng = np.random.default_rng(seed)
    psf = PsfModel.gaussian(3.5, 25)
    image = rng.normal(0.0, NOISE, SHAPE)
    for x, y, counts in sources:
        stamps, ix, iy = psf.realize(np.array([x]), np.array([y]))
        image[iy[0] - 12 : iy[0] + 13, ix[0] - 12 : ix[0] + 13] += counts * stamps[0]
    return Exposure(
        image=image,
        mask=np.zeros(SHAPE, np.int32),
        variance=np.full(SHAPE, NOISE**2),
        wcs=make_wcs(SHAPE),
        psf=psf,
        zero_point=31.4,
    )


def _detect(difference: Exposure, **kwargs):  # noqa: ANN003, ANN202
    return detect_dia_sources(
        difference, visit=2024_11_28_0042, detector=3, band="r", midpoint_mjd_tai=60642.1, **kwargs
    )


class SchemaTestCase(unittest.TestCase):
    """Tests that the output follows the APDB DiaSource schema."""

    def test_columns_exist_in_apdb_schema(self) -> None:
        text = importlib.resources.files("lsst.sdm.schemas").joinpath("apdb.yaml").read_text()
        table = next(t for t in yaml.safe_load(text)["tables"] if t["name"] == "DiaSource")
        names = {c["name"] for c in table["columns"]}
        self.assertEqual(sorted(set(DIA_COLUMNS) - names), [])
        required = {c["name"] for c in table["columns"] if c.get("nullable") is False}
        self.assertEqual(sorted(required - set(DIA_COLUMNS) - {"diaObjectId", "ssObjectId"}), [])

    def test_ids(self) -> None:
        ids = dia_source_ids(2024_11_28_0042, 188, 100)
        self.assertEqual(len(set(ids.tolist())), 100)
        self.assertTrue((ids > 0).all())
        self.assertNotEqual(dia_source_ids(1, 2, 1)[0], dia_source_ids(1, 3, 1)[0])
        message = r"^detect_dia_sources: cannot pack ids for visit 1, detector 300"
        with self.assertRaisesRegex(ScienceDataError, message):
            dia_source_ids(1, 300, 1)


class SyntheticDifferenceTestCase(unittest.TestCase):
    """Tests of detection and measurement on hand-made difference images."""

    def test_positive_negative_and_flux(self) -> None:
        diff = synthetic_difference([(60.3, 70.6, 3000.0), (180.0, 150.2, -2500.0)])
        table = _detect(diff)
        self.assertEqual(len(table), 2)
        pos, neg = table.sort_values("snr", ascending=False).iloc[0], table.sort_values("snr").iloc[0]
        self.assertAlmostEqual(pos["x"], 60.3, delta=0.3)
        self.assertAlmostEqual(pos["y"], 70.6, delta=0.3)
        self.assertAlmostEqual(pos["psfFlux"], 3000.0, delta=3 * pos["psfFluxErr"])
        self.assertFalse(pos["isNegative"])
        self.assertTrue(neg["isNegative"])
        self.assertAlmostEqual(neg["psfFlux"], -2500.0, delta=3 * neg["psfFluxErr"])
        expected_err = NOISE / np.sqrt((diff.psf.image_at(0, 0) ** 2).sum())
        self.assertAlmostEqual(pos["psfFluxErr"], expected_err, delta=0.05 * expected_err)
        ra, dec = diff.wcs.all_pix2world(pos["x"], pos["y"], 0)
        self.assertAlmostEqual(pos["ra"], float(ra), places=9)
        self.assertAlmostEqual(pos["dec"], float(dec), places=9)
        self.assertEqual(table["band"].tolist(), ["r", "r"])
        self.assertEqual(list(table.columns), DIA_COLUMNS)
        self.assertTrue(((table["reliability"] >= 0) & (table["reliability"] <= 1)).all())

    def test_dipole(self) -> None:
        diff = synthetic_difference([(100.0, 100.0, 4000.0), (102.5, 100.0, -4000.0)])
        table = _detect(diff)
        self.assertEqual(len(table), 1)
        row = table.iloc[0]
        self.assertTrue(row["isDipole"])
        self.assertAlmostEqual(row["x"], 101.25, delta=0.5)
        self.assertAlmostEqual(row["dipoleLength"], 2.5 * 0.2, delta=0.1)
        self.assertAlmostEqual(row["dipoleMeanFlux"], 4000.0, delta=600.0)
        self.assertLess(abs(row["dipoleFluxDiff"]), 800.0)
        # Position angle of the negative-to-positive lobe vector: -x is east here.
        self.assertAlmostEqual(row["dipoleAngle"], 90.0, delta=10.0)
        self.assertGreater(row["dipoleMeanFlux"], 1000.0)
        self.assertLess(row["reliability"], 0.5)

    def test_mask_flags(self) -> None:
        diff = synthetic_difference(
            [(50.0, 50.0, 3000.0), (128.0, 20.0, 3000.0), (200.0, 200.0, 3000.0), (160.0, 150.0, 3000.0)]
        )
        diff.mask[49:52, 53:56] |= MaskPlane.SAT
        diff.mask[:18, :] |= MaskPlane.NO_DATA
        diff.mask[198:203, 200] |= MaskPlane.CR
        diff.mask[149:152, 159:162] |= MaskPlane.SAT  # centred on saturation: dropped (Rubin badSourceFlags)
        table = _detect(diff).sort_values("x").reset_index(drop=True)
        self.assertEqual(len(table), 3)
        self.assertTrue(table.loc[0, "pixelFlags_saturated"])
        self.assertFalse(table.loc[0, "pixelFlags_saturatedCenter"])
        self.assertTrue(table.loc[1, "pixelFlags_edge"] and table.loc[1, "pixelFlags_nodata"])
        self.assertTrue(table.loc[2, "pixelFlags_cr"] and table.loc[2, "pixelFlags_crCenter"])
        self.assertFalse(table.loc[2, "pixelFlags_saturated"])
        self.assertTrue((table["reliability"] < 1.0).all())

    def test_nothing_and_errors(self) -> None:
        table = _detect(synthetic_difference([]))
        self.assertEqual(len(table), 0)
        self.assertEqual(list(table.columns), DIA_COLUMNS)
        diff = synthetic_difference([])
        diff.psf = None
        with self.assertRaisesRegex(ScienceDataError, r"^detect_dia_sources: difference exposure lacks psf"):
            _detect(diff)


class InjectionTestCase(unittest.TestCase):
    """Injected point sources are recovered through calibrate, warp and subtract."""

    @classmethod
    def setUpClass(cls) -> None:
        shape = (768, 768)
        snr = np.linspace(8.0, 30.0, 40)
        cls.scene = make_scene(shape, inject_snr=snr, seed=21)
        sim = cls.scene.science
        exposure = Exposure(image=sim.image, mask=np.zeros(shape, np.int32), variance=sim.variance)
        cls.cal = calibrate(exposure, cls.scene.refcat, cls.scene.wcs_guess, band="r")
        template = warp_template([cls.scene.template], cls.cal.exposure.wcs, shape)
        diff = subtract_images(cls.cal.exposure, template, stars=cls.cal.sources).difference
        cls.table = _detect(diff, science=cls.cal.exposure)

    def test_recovered(self) -> None:
        inj = self.scene.injected
        dist, idx = cKDTree(self.table[["x", "y"]].to_numpy()).query(inj[["x", "y"]].to_numpy())
        self.assertTrue((dist < 1.0).all(), dist)
        matched = self.table.iloc[idx]
        pull = (matched["psfFlux"].to_numpy() - inj["flux_njy"].to_numpy()) / matched["psfFluxErr"].to_numpy()
        self.assertLess(abs(float(np.mean(pull))), 0.4)
        self.assertTrue(0.6 < float(np.std(pull)) < 1.4, pull)
        self.assertLess(float(np.median(dist)), 0.3)
        self.assertGreater(float(np.median(matched["reliability"])), 0.8)
        snr_ratio = matched["snr"].to_numpy() / inj["snr"].to_numpy()
        self.assertAlmostEqual(float(np.median(snr_ratio)), 1.0, delta=0.15)
        # Few detections besides the injections (static stars subtract).
        self.assertLessEqual(len(self.table) - len(inj), 2)
        self.assertAlmostEqual(njy_per_count(self.cal.exposure.zero_point), njy_per_count(31.0), delta=0.02)

    def test_science_flux(self) -> None:
        inj = self.scene.injected
        _, idx = cKDTree(self.table[["x", "y"]].to_numpy()).query(inj[["x", "y"]].to_numpy())
        ratio = self.table["scienceFlux"].to_numpy()[idx] / inj["flux_njy"].to_numpy()
        self.assertAlmostEqual(float(np.median(ratio)), 1.0, delta=0.1)

    def test_negative_source_from_template(self) -> None:
        shape = self.cal.exposure.shape
        patch = self.scene.template
        image = patch.image.copy()
        tx, ty = self.scene.science.wcs.all_pix2world([[300.0, 400.0]], 0)[0]
        px, py = patch.wcs.all_world2pix([[tx, ty]], 0)[0]
        image += synthetic_like(image.shape, px, py, 6000.0, 2.5)
        changed = TemplatePatch(image=image, variance=patch.variance, wcs=patch.wcs)
        template = warp_template([changed], self.cal.exposure.wcs, shape)
        diff = subtract_images(self.cal.exposure, template, stars=self.cal.sources).difference
        table = _detect(diff)
        near = table[np.hypot(table["x"] - 300.0, table["y"] - 400.0) < 2.0]
        self.assertEqual(len(near), 1)
        self.assertTrue(near["isNegative"].iloc[0])
        self.assertAlmostEqual(near["psfFlux"].iloc[0], -6000.0, delta=4 * near["psfFluxErr"].iloc[0])


def synthetic_like(shape, x, y, flux, fwhm):  # noqa: ANN001, ANN201
    """A single Gaussian point source image."""
    from science_images import render

    return render(shape, [x], [y], [flux], fwhm).astype(np.float32)


if __name__ == "__main__":
    unittest.main()
