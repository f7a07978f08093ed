"""Tests for `workflow.sim.calibs`."""

from __future__ import annotations

import unittest

import numpy as np
from astropy.time import Time

from workflow.core.config import load_config
from workflow.core.instrument import Instrument
from workflow.sim.calibs import (
    amp_bias_levels,
    bad_columns,
    bias_pattern,
    flat_pattern,
    make_bias,
    make_defects,
    make_flat,
)


class CalibsTestCase(unittest.TestCase):
    """Tests for detector signatures and calib products."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.inst = Instrument.from_config(load_config(instrument="LSSTComCamSim"), scale=0.125)

    def test_flat(self) -> None:
        flat = flat_pattern(self.inst, 0, "r", seed=2)
        self.assertEqual(flat.shape, self.inst.geometry.shape)
        self.assertEqual(flat.dtype, np.float32)
        self.assertFalse(flat.flags.writeable)
        self.assertTrue(0.8 < flat.min() and flat.max() < 1.1)
        # Per-amplifier steps: amplifier medians differ by ~1.5 %.
        medians = [np.median(flat[a.bbox.slices]) for a in self.inst.geometry.amplifiers]
        self.assertGreater(np.std(medians), 0.003)
        # Corner detector is more vignetted than the central one.
        self.assertLess(
            np.median(flat_pattern(self.inst, 0, "r", seed=2)), np.median(flat_pattern(self.inst, 4, "r", seed=2))
        )
        np.testing.assert_array_equal(flat, flat_pattern(self.inst, 0, "r", seed=2))
        self.assertFalse(np.array_equal(flat, flat_pattern(self.inst, 0, "r", seed=3)))

    def test_bias(self) -> None:
        bias = bias_pattern(self.inst, 1, seed=2)
        self.assertLess(np.abs(np.median(bias)), 2.0)
        self.assertLess(np.abs(bias).max(), 12.0)
        levels = amp_bias_levels(self.inst, 1, seed=2)
        self.assertEqual(set(levels), {a.name for a in self.inst.geometry.amplifiers})
        self.assertTrue(all(abs(v - 20000.0) < 1000.0 for v in levels.values()))

    def test_products(self) -> None:
        bias = make_bias(self.inst, "R22_S01", seed=2, valid_start="2025-01-01T00:00:00")
        self.assertEqual(bias.detector, 1)
        self.assertEqual(bias.header["OBSTYPE"], "bias")
        self.assertEqual(bias.header["VALIDSTA"], "2025-01-01T00:00:00.000")
        self.assertTrue(bias.is_valid(Time("2026-01-01T00:00:00", scale="tai")))
        self.assertFalse(bias.is_valid(Time("2024-01-01T00:00:00", scale="tai")))
        self.assertLess(np.std(bias.image - bias_pattern(self.inst, 1, seed=2)), 0.4)
        electrons = make_bias(self.inst, 1, seed=2, unit="electron")
        np.testing.assert_allclose(electrons.image, bias.image * 1.6, rtol=1e-6)
        self.assertEqual(electrons.header["BUNIT"], "electron")
        with self.assertRaisesRegex(ValueError, "unit must be 'adu' or 'electron', got 'e'"):
            make_bias(self.inst, 1, unit="e")
        flat = make_flat(self.inst, 1, "g_01", seed=2)
        self.assertEqual(flat.header["FILTER"], "g_01")
        self.assertEqual(flat.header["BAND"], "g")
        self.assertLess(np.std(flat.image / flat_pattern(self.inst, 1, "g", seed=2) - 1), 0.002)
        self.assertEqual(len(flat.to_hdulist()), 1)
        with self.assertRaisesRegex(KeyError, "unknown physical filter 'r_57'"):
            make_flat(self.inst, 1, "r_57")

    def test_defects(self) -> None:
        cols = bad_columns(self.inst, 3, seed=2)
        defects = make_defects(self.inst, 3, seed=2)
        self.assertEqual(len(cols), len(defects))
        self.assertTrue(1 <= len(cols) <= 4)
        np.testing.assert_array_equal(defects["x1"] - defects["x0"], 1)
        self.assertTrue(np.all(defects["y1"] <= self.inst.geometry.ny))
        self.assertEqual(defects.meta["OBSTYPE"], "defects")


if __name__ == "__main__":
    unittest.main()
