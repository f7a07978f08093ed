"""Tests for `workflow.science.isr`."""

from __future__ import annotations

import unittest
from types import SimpleNamespace

import numpy as np
from science_images import make_raw, make_refcat, make_wcs, observe

from workflow.science.errors import BadImageError
from workflow.science.isr import AmpGeometry, Box, assemble, find_cosmic_rays, run_isr, subtract_overscan
from workflow.science.masks import MaskPlane

SHAPE = (256, 320)


def _truth(seed: int = 2):
    wcs = make_wcs(SHAPE)
    return observe(make_refcat(wcs, SHAPE, density=1e-3, seed=1), wcs, SHAPE, fwhm=3.5, seed=seed)


class IsrTestCase(unittest.TestCase):
    """Tests for `workflow.science.isr`."""

    def test_overscan_assembly_gain(self) -> None:
        truth = np.arange(SHAPE[0] * SHAPE[1], dtype=np.float32).reshape(SHAPE) % 997 + 500.0
        raw, amps = make_raw(truth, read_noise=0.0)
        image, read_var, saturated = assemble(raw, amps, smooth_rows=1)
        np.testing.assert_allclose(image, truth, atol=0.05)
        self.assertEqual(read_var.max(), 0.0)
        self.assertFalse(saturated.any())
        # Per-amplifier arrays give the same answer as one raw array.
        pieces = [raw for _ in amps]
        np.testing.assert_allclose(assemble(pieces, amps, smooth_rows=1)[0], image)

    def test_overscan_noise_smoothing(self) -> None:
        raw, amps = make_raw(np.full(SHAPE, 1000.0, np.float32), read_noise=6.0)
        data = subtract_overscan(raw, amps[0], smooth_rows=11)
        # Level removed to well below the per-pixel read noise (6/1.6 ADU).
        self.assertLess(abs(float(np.mean(data)) - 1000.0 / 1.6), 0.3)

    def test_bias_flat_variance_masks(self) -> None:
        sim = _truth()
        rng = np.random.default_rng(5)
        flat = rng.uniform(0.9, 1.1, SHAPE).astype(np.float32)
        bias = np.full(SHAPE, 7.0, np.float32)
        raw, amps = make_raw(sim.image * flat + bias, read_noise=6.0)
        exposure = run_isr([raw], amps, bias=bias, flat=flat, bad_columns=[100], crs=False)
        good = exposure.mask == 0
        resid = (exposure.image - sim.image)[good]
        self.assertLess(abs(float(np.median(resid))), 0.5)
        self.assertLess(float(np.std(resid)), 6.5)  # read noise only
        np.testing.assert_allclose(np.median(exposure.variance[good]), np.median(sim.variance), rtol=0.05)
        self.assertTrue((exposure.mask[:, 100] & MaskPlane.BAD).all())
        self.assertTrue((exposure.mask[:, 100] & MaskPlane.INTRP).all())
        self.assertTrue((exposure.mask[0, :] & MaskPlane.EDGE).all())
        self.assertLess(abs(float(np.median(exposure.image[10:-10, 100] - sim.image[10:-10, 100]))), 5.0)

    def test_saturation(self) -> None:
        image = np.full(SHAPE, 1000.0, np.float32)
        image[50:53, 60:62] = 1.7e5  # 106k ADU above bias: over the 100k ADU full well
        raw, amps = make_raw(image)
        exposure = run_isr([raw], amps, crs=False)
        sat = (exposure.mask & MaskPlane.SAT) != 0
        self.assertEqual(int(sat.sum()), 6)
        self.assertTrue(sat[50:53, 60:62].all())

    def test_cosmic_rays_single_snap(self) -> None:
        sim = _truth()
        image = sim.image.copy()
        hits = [(40, 40), (120, 200), (200, 77)]
        for y, x in hits:
            image[y, x] += 3000.0
        image[150, 10:16] += 2000.0  # a short track
        cr = find_cosmic_rays(image - sim.sky, sim.variance, min_fwhm=2.0)
        for y, x in hits + [(150, 12)]:
            self.assertTrue(cr[y, x], (y, x))
        # No star core is flagged: flagged pixels are only near the hits.
        expected = np.zeros(SHAPE, bool)
        for y, x in hits:
            expected[y - 1 : y + 2, x - 1 : x + 2] = True
        expected[149:152, 9:17] = True
        self.assertEqual(int((cr & ~expected).sum()), 0)

    def test_two_snaps(self) -> None:
        wcs = make_wcs(SHAPE)
        refcat = make_refcat(wcs, SHAPE, density=1e-3, seed=1)
        snaps = [observe(refcat, wcs, SHAPE, sky=500.0, seed=s) for s in (10, 11)]
        snaps[1].image[77, 88] += 5000.0
        raws = [make_raw(s.image, seed=20 + i)[0] for i, s in enumerate(snaps)]
        amps = make_raw(snaps[0].image)[1]
        exposure = run_isr(raws, amps)
        self.assertTrue(exposure.mask[77, 88] & MaskPlane.CR)
        self.assertLess(int(((exposure.mask & MaskPlane.CR) != 0).sum()), 30)
        self.assertLess(abs(exposure.image[77, 88] - (snaps[0].image[77, 88] * 2)), 300.0)
        total = snaps[0].image + snaps[1].image
        good = exposure.mask == 0
        self.assertLess(abs(float(np.median((exposure.image - total)[good]))), 1.0)

    def test_from_amplifier(self) -> None:
        truth = np.arange(SHAPE[0] * SHAPE[1], dtype=np.float32).reshape(SHAPE) % 101 + 50.0
        raw, amps = make_raw(truth, read_noise=0.0)

        # Objects shaped like workflow.core.amplifiers.Amplifier (other attribute names, any Box type).
        def boxes(b: Box) -> SimpleNamespace:
            return SimpleNamespace(x0=b.x0, y0=b.y0, x1=b.x1, y1=b.y1)

        foreign = [
            SimpleNamespace(
                name=a.name,
                raw_data=boxes(a.data_box),
                raw_serial_overscan=boxes(a.serial_overscan_box),
                raw_parallel_overscan=boxes(a.parallel_overscan_box),
                bbox=boxes(a.detector_box),
                flip_x=a.flip_x,
                flip_y=a.flip_y,
                gain=a.gain,
                read_noise=a.read_noise,
                saturation=a.saturation,
            )
            for a in amps
        ]
        converted = [AmpGeometry.from_amplifier(f) for f in foreign]
        np.testing.assert_allclose(assemble(raw, converted, smooth_rows=1)[0], truth, atol=0.05)

    def test_errors(self) -> None:
        raw, amps = make_raw(np.full(SHAPE, 10.0, np.float32))
        with self.assertRaisesRegex(BadImageError, r"^isr: raw has no finite pixels"):
            run_isr([np.full_like(raw, np.nan)], amps)
        with self.assertRaisesRegex(BadImageError, r"^isr: amplifier C00: data_box .* outside raw"):
            run_isr([raw[:10, :10]], amps)
        with self.assertRaisesRegex(BadImageError, r"^isr: flat has shape \(10, 10\), expected \(256, 320\)"):
            run_isr([raw], amps, flat=np.ones((10, 10)))
        with self.assertRaisesRegex(BadImageError, r"expected 1 or 2 snaps, got 3"):
            run_isr([raw] * 3, amps)
        self.assertEqual(Box(0, 1, 2, 4).shape, (3, 2))


if __name__ == "__main__":
    unittest.main()
