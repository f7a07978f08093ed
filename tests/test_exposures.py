"""Tests for `workflow.sim.exposures`."""

from __future__ import annotations

import types
import unittest

from astropy.time import Time

from workflow.core.config import load_config
from workflow.core.exposure_info import to_tai
from workflow.core.instrument import Instrument
from workflow.sim.exposures import exposure_from_visit, make_exposures


class ExposuresTestCase(unittest.TestCase):
    """Tests for exposure identities."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.lsstcam = Instrument.from_config(load_config(instrument="LSSTCam"))
        cls.hsc = Instrument.from_config(load_config(instrument="HSC"))

    def test_lsst_ids(self) -> None:
        # 10:00 TAI is still the previous day_obs (TAI - 12 h).
        exp = make_exposures(
            self.lsstcam,
            start="2026-03-01T10:00:00",
            seq_num=42,
            ra=1.0,
            dec=2.0,
            rotation_deg=3.0,
            physical_filter="i_39",
        )[0]
        self.assertEqual(exp.day_obs, 20260228)
        self.assertEqual(exp.exposure_id, 2026022800042)
        self.assertEqual(exp.obs_id, "MC_O_20260228_000042")
        self.assertEqual(exp.group_id, "2026-03-01T10:00:00.000")
        self.assertEqual(exp.exptime, 30.0)
        self.assertAlmostEqual((exp.end - exp.start).sec, 30.0)
        later = make_exposures(
            self.lsstcam,
            start="2026-03-01T12:00:01",
            seq_num=1,
            ra=1.0,
            dec=2.0,
            rotation_deg=3.0,
            physical_filter="i_39",
        )[0]
        self.assertEqual(later.day_obs, 20260301)

    def test_snaps_and_generic(self) -> None:
        exps = make_exposures(
            self.hsc,
            start=Time("2026-03-01T05:00:00", scale="utc"),
            seq_num=7,
            ra=1.0,
            dec=2.0,
            rotation_deg=0.0,
            physical_filter="HSC-G",
            n_snaps=2,
        )
        self.assertEqual([e.snap for e in exps], [0, 1])
        self.assertEqual(exps[0].exptime, 15.0)
        self.assertEqual(exps[0].obs_id, "HSC-2026022800007")
        self.assertEqual(exps[1].group_id, exps[0].group_id)
        self.assertEqual(exps[0].group_id, "2026022800007")
        self.assertAlmostEqual((exps[1].start - exps[0].start).sec, 17.0)
        self.assertEqual(exps[0].start.scale, "tai")
        with self.assertRaisesRegex(KeyError, "unknown physical filter 'r_57'"):
            make_exposures(self.hsc, start=0.0, seq_num=1, ra=0, dec=0, rotation_deg=0, physical_filter="r_57")

    def test_from_visit(self) -> None:
        start = to_tai("2026-03-01T04:00:00").unix_tai
        visit = types.SimpleNamespace(
            position=[150.0, 2.0], cameraAngle=45.0, groupId="g1", filters="r_57,i_39", startTime=start, nimages=1
        )
        (exp,) = exposure_from_visit(self.lsstcam, visit, seq_num=3)
        self.assertEqual((exp.ra, exp.dec, exp.rotation_deg), (150.0, 2.0, 45.0))
        self.assertEqual(exp.physical_filter, "r_57")
        self.assertEqual(exp.group_id, "g1")
        self.assertEqual(exp.start.isot, "2026-03-01T04:00:00.000")


if __name__ == "__main__":
    unittest.main()
