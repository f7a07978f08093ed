"""Tests for `workflow.core.amplifiers`."""

from __future__ import annotations

import unittest

import numpy as np

from workflow.core.amplifiers import Box, DetectorGeometry, assemble_image, disassemble_image
from workflow.core.config import load_config
from workflow.core.exceptions import ConfigError, NonRetriableError


class GeometryTestCase(unittest.TestCase):
    """Tests for `DetectorGeometry` and `Amplifier`."""

    def setUp(self) -> None:
        self.geom = DetectorGeometry.from_config(load_config(instrument="LSSTCam")["detector"])

    def test_boxes(self) -> None:
        amp = self.geom.amplifier("C00")
        self.assertEqual(amp.raw_shape, (2048, 576))
        self.assertEqual(amp.raw_prescan, Box(0, 0, 3, 2000))
        self.assertEqual(amp.raw_data, Box(3, 0, 512, 2000))
        self.assertEqual(amp.raw_serial_overscan, Box(512, 0, 576, 2000))
        self.assertEqual(amp.raw_parallel_overscan, Box(3, 2000, 512, 2048))
        self.assertEqual(amp.bbox, Box(0, 0, 509, 2000))
        top_right = self.geom.amplifier("C17")
        self.assertEqual(top_right.bbox, Box(7 * 509, 2000, 4072, 4000))
        self.assertTrue(top_right.flip_x and top_right.flip_y)
        self.assertFalse(amp.flip_x or amp.flip_y)
        self.assertEqual(top_right.header_cards()["DETSEC"], "[4072:3564,4000:2001]")
        self.assertEqual(amp.header_cards()["BIASSEC"], "[513:576,1:2000]")

    def test_amplifiers_tile_detector(self) -> None:
        cover = np.zeros(self.geom.shape, dtype=int)
        for amp in self.geom.amplifiers:
            cover[amp.bbox.slices] += 1
        self.assertTrue(np.all(cover == 1))

    def test_round_trip(self) -> None:
        image = np.arange(self.geom.nx * self.geom.ny, dtype=np.float32).reshape(self.geom.shape)
        segments = disassemble_image(image, self.geom, fill=-1.0)
        amp = self.geom.amplifier("C17")
        seg = segments["C17"]
        self.assertEqual(seg.shape, amp.raw_shape)
        self.assertTrue(np.all(seg[amp.raw_serial_overscan.slices] == -1.0))
        # Readout starts at the detector's top-right corner for C17.
        self.assertEqual(seg[0, amp.raw_data.x0], image[-1, -1])
        np.testing.assert_array_equal(assemble_image(segments, self.geom), image)
        trimmed = {name: s[self.geom.amplifier(name).raw_data.slices] for name, s in segments.items()}
        np.testing.assert_array_equal(assemble_image(trimmed, self.geom), image)

    def test_errors(self) -> None:
        with self.assertRaisesRegex(NonRetriableError, "amplifier C00 missing"):
            assemble_image({}, self.geom)
        with self.assertRaisesRegex(NonRetriableError, "amplifier C00 has shape"):
            assemble_image({a.name: np.zeros((3, 3)) for a in self.geom.amplifiers}, self.geom)
        with self.assertRaisesRegex(NonRetriableError, "disassemble: image shape"):
            disassemble_image(np.zeros((3, 3)), self.geom)
        with self.assertRaisesRegex(KeyError, "no amplifier 'X'"):
            self.geom.amplifier("X")
        config = dict(load_config(instrument="LSSTCam")["detector"], nx=4073)
        with self.assertRaisesRegex(ConfigError, "nx=4073, ny=4000 is not a multiple"):
            DetectorGeometry.from_config(config)


if __name__ == "__main__":
    unittest.main()
