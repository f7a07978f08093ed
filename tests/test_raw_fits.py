"""Tests for `workflow.core.raw_fits`."""

from __future__ import annotations

import json
import tempfile
import unittest
from pathlib import Path

import numpy as np
from astropy.io import fits

from workflow.core.amplifiers import DetectorGeometry, disassemble_image
from workflow.core.config import load_config
from workflow.core.raw_fits import RawImage, raw_sidecar, read_raw, write_raw


class RawFitsTestCase(unittest.TestCase):
    """Tests for raw files and sidecars."""

    def setUp(self) -> None:
        self.geom = DetectorGeometry.from_config(load_config(instrument="LATISS")["detector"], scale=0.05)
        image = np.arange(self.geom.nx * self.geom.ny, dtype=np.int32).reshape(self.geom.shape)
        header = fits.Header({"INSTRUME": "LATISS", "GROUPID": "g", "EXPTIME": 30.0, "DETECTOR": 0})
        header["COMMENT"] = "not in the sidecar"
        self.raw = RawImage(header=header, segments=disassemble_image(image, self.geom, fill=7), segment_headers={})
        self.image = image

    def test_round_trip(self) -> None:
        for suffix in (".fits", ".fz"):
            with tempfile.TemporaryDirectory() as tmp:
                path = write_raw(Path(tmp) / f"x{suffix}", self.raw)
                back = read_raw(path, self.geom)
                np.testing.assert_array_equal(back.assemble(self.geom), self.image)
                self.assertEqual(back.segments["C00"][0, 0], 7)
                self.assertEqual(back.segment_headers["C10"]["EXTNAME"], "C10")

    def test_sidecar(self) -> None:
        sidecar = raw_sidecar(self.raw.header)
        self.assertEqual(sidecar, {"INSTRUME": "LATISS", "GROUPID": "g", "EXPTIME": 30.0, "DETECTOR": 0})
        json.dumps(sidecar)


if __name__ == "__main__":
    unittest.main()
