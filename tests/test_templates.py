"""Tests for `workflow.sim.templates`."""

from __future__ import annotations

import unittest

import numpy as np

from workflow.core.amplifiers import Box, assemble_image
from workflow.core.config import load_config
from workflow.core.instrument import Instrument
from workflow.core.skymap import RingsSkyMap
from workflow.sim.calibs import make_bias, make_flat
from workflow.sim.exposures import make_exposures
from workflow.sim.simulate import simulate_raw
from workflow.sim.sky_model import SkyModel
from workflow.sim.templates import TemplateOptions, make_template

SEED = 5
SKY = SkyModel(seed=SEED, variable_density_per_deg2=40000.0, transient_density_per_deg2=20000.0)
FIELD = {"ra": 150.2, "dec": 2.3, "rotation_deg": 0.0}


def _mad_sigma(values: np.ndarray) -> float:
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


class TemplateTestCase(unittest.TestCase):
    """Tests for `make_template`."""

    @classmethod
    def setUpClass(cls) -> None:
        config = load_config(instrument="LSSTComCamSim")
        cls.inst = Instrument.from_config(config, scale=0.125)
        cls.skymap = RingsSkyMap.from_config(config)
        tract = cls.skymap.find_tract(FIELD["ra"], FIELD["dec"])
        x, y = tract.wcs.all_world2pix([[FIELD["ra"], FIELD["dec"]]], 0)[0]
        cls.patch = cls.skymap.patch(tract, (int(x // 4000), int(y // 4000)))
        x0, y0 = int(x) - 300, int(y) - 300
        cls.bbox = Box(x0, y0, x0 + 600, y0 + 600)
        cls.template = make_template(cls.skymap, cls.patch, "r", seed=SEED, sky=SKY, bbox=cls.bbox)

    def test_identity(self) -> None:
        tmpl = self.template
        self.assertEqual(tmpl.image.shape, (600, 600))
        self.assertEqual(tmpl.header["BUNIT"], "nJy")
        self.assertEqual(tmpl.header["TRACT"], self.patch.tract)
        self.assertEqual(tmpl.header["PATCH"], self.patch.id)
        self.assertAlmostEqual(tmpl.psf.fwhm * self.skymap.pixel_scale_arcsec, 0.9, places=6)
        # Image pixel (0, 0) is tract pixel (bbox.x0, bbox.y0).
        tract = self.skymap.tract(self.patch.tract)
        np.testing.assert_allclose(
            tmpl.wcs.all_pix2world([[0.0, 0.0]], 0),
            tract.wcs.all_pix2world([[self.bbox.x0, self.bbox.y0]], 0),
            atol=1e-10,
        )
        self.assertEqual(len(tmpl.to_hdulist()), 3)

    def test_static_sky_only(self) -> None:
        variables = self.template.variables
        self.assertGreater(len(variables), 3)
        self.assertEqual(set(variables["kind"]), {"variable"})
        np.testing.assert_array_equal(variables["flux"], variables["mean_flux"])

    def test_sub_box_consistent(self) -> None:
        inner = Box(self.bbox.x0 + 100, self.bbox.y0 + 150, self.bbox.x0 + 300, self.bbox.y0 + 250)
        part = make_template(self.skymap, self.patch, "r", seed=SEED, sky=SKY, bbox=inner)
        np.testing.assert_allclose(part.image, self.template.image[150:250, 100:300], rtol=1e-5, atol=1e-3)
        with self.assertRaisesRegex(ValueError, "is not inside patch"):
            make_template(self.skymap, self.patch, "r", bbox=Box(-(10**6), 0, 10, 10))
        with self.assertRaisesRegex(ValueError, "unknown band 'q'"):
            make_template(self.skymap, self.patch, "q")

    def test_lower_noise_than_visit(self) -> None:
        exposure = make_exposures(self.inst, start="2026-03-01T03:00:00", seq_num=1, physical_filter="r_03", **FIELD)[0]
        raw = simulate_raw(self.inst, 4, exposure, seed=SEED, sky=SKY)
        geom = self.inst.geometry
        segments = {}
        for amp in geom.amplifiers:
            seg = raw.segments[amp.name].astype(np.float64)
            segments[amp.name] = seg[amp.raw_data.slices] - np.mean(seg[amp.raw_serial_overscan.slices])
        image = assemble_image(segments, geom, dtype=np.float64) - make_bias(self.inst, 4, seed=SEED).image
        image = image / make_flat(self.inst, 4, "r_03", seed=SEED).image * geom.gain
        visit_sigma_njy = _mad_sigma(image) / raw.truth.meta["e_per_nJy"]
        template_sigma_njy = _mad_sigma(self.template.image)
        self.assertLess(template_sigma_njy, visit_sigma_njy / 3.0)
        expected = float(np.sqrt(np.median(self.template.variance)))
        self.assertAlmostEqual(template_sigma_njy / expected, 1.0, delta=0.15)

    def test_options(self) -> None:
        shallow = make_template(
            self.skymap,
            self.patch,
            "r",
            seed=SEED,
            sky=SKY,
            bbox=self.bbox,
            options=TemplateOptions(depth_visits=1.0, fwhm_arcsec=1.2),
        )
        self.assertGreater(_mad_sigma(shallow.image), 3.0 * _mad_sigma(self.template.image))
        self.assertAlmostEqual(shallow.psf.fwhm * 0.2, 1.2, places=6)


if __name__ == "__main__":
    unittest.main()
