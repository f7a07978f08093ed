"""Tests for `workflow.repo.central_repo`, `workflow.repo.butler_ingest`, `workflow.repo.queries`,
`workflow.sim.demo_repo`,
`workflow.repo.formatters` and ``scripts/make_central_repo.py``."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
import unittest
from pathlib import Path

import lsst.sphgeom as sphgeom
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time, TimeDelta
from astropy.wcs import WCS
from lsst.daf.butler import Butler, DatasetType

import workflow.repo.butler_ingest as ri
import workflow.repo.central_repo as cr
import workflow.repo.queries as rq
import workflow.sim.demo_repo as dr
from workflow.core.config import PROJECT_ROOT, load_config
from workflow.core.exceptions import NonRetriableError
from workflow.core.instrument import Instrument
from workflow.core.skymap import RingsSkyMap
from workflow.repo.formatters import STORAGE_CLASS
from workflow.sim.exposures import make_exposures
from workflow.sim.refcat import make_shard, shard_ids
from workflow.sim.simulate import raw_header

T0 = Time("2025-01-01T00:00:00", scale="tai")
T1 = Time("2025-02-01T00:00:00", scale="tai")
INSIDE = Time("2025-01-15T00:00:00", scale="tai")
FIELDS = {"LSSTComCamSim": (150.0, 2.2, 30.0), "HSC": (150.2, 2.0, 0.0)}
"""Boresight ra, dec and rotation of the stand-in visits of each instrument."""
SCALE = 0.02


def _image(value: float = 1.0) -> fits.HDUList:
    return fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.full((4, 5), value, dtype=np.float32), name="IMAGE")])


def _instrument(name: str) -> Instrument:
    return Instrument.from_config(load_config(instrument=name), scale=SCALE)


def _exposures(instrument: Instrument, filt: str) -> list:
    ra, dec, rot = FIELDS[instrument.name]
    return [
        e
        for seq in (1, 2, 3)
        for e in make_exposures(
            instrument,
            start=T0 + TimeDelta(seq * 600.0, format="sec"),
            seq_num=seq,
            ra=ra,
            dec=dec,
            rotation_deg=rot,
            physical_filter=filt,
            n_snaps=1,
        )
    ]


def _write_raws(directory: Path, instrument: Instrument, filt: str, detectors: list[int]) -> list[str]:
    """Write tiny raws with the simulator's real primary header (no pixels needed here)."""
    directory.mkdir(exist_ok=True)
    paths = []
    for info in _exposures(instrument, filt):
        for det in detectors:
            path = directory / f"{info.exposure_id}-{det}.fits"
            if not path.exists():
                hdu = fits.PrimaryHDU(np.zeros((3, 3), dtype=np.int32), header=raw_header(instrument, det, info))
                fits.HDUList([hdu]).writeto(path)
            paths.append(str(path))
    return paths


def _build(root: Path, work: Path, **create) -> Butler:
    """Build a tiny central repo for two instruments from cheap stand-in data."""
    butler = cr.create_central_repo(root, **create)
    for name in FIELDS:
        config = load_config(instrument=name)
        instrument, skymap = Instrument.from_config(config, scale=SCALE), RingsSkyMap.from_config(config)
        region = instrument.visit_region(*FIELDS[name])
        cr.register_instrument(butler, instrument)
        cr.register_skymap(butler, skymap, skymap.tracts_overlapping(region))
        dets, filt = [0, 1], next(iter(instrument.filters))
        calibs = [
            ri.CalibInput(dataset_type="bias", detector=d, begin=T0, end=T1, source=lambda: _image(0.0)) for d in dets
        ]
        calibs += [
            ri.CalibInput(dataset_type="flat", detector=d, begin=T0, end=T1, physical_filter=filt, source=_image(1.0))
            for d in dets
        ]
        ri.ingest_calibs(butler, name, calibs)
        ri.ingest_refcat_shards(butler, {i: (lambda i=i: make_shard(i)) for i in shard_ids(region)})
        ri.ingest_templates(
            butler,
            name,
            skymap.name,
            [(p.tract, p.id, instrument.filters[filt], _image(2.0)) for p in skymap.patches_overlapping(region)],
        )
        ri.ingest_raws(butler, instrument, _write_raws(work / f"raws-{name}", instrument, filt, dets))
        ri.define_defaults_chain(butler, name)
    return butler


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny central repo (SQLite + local files) for LSSTComCamSim and HSC."""
    work = tmp_path_factory.mktemp("central")
    _build(work / "repo", work)
    return work


class FitsHDUListFormatterTestCase(unittest.TestCase):
    """Tests for `workflow.repo.formatters.FitsHDUListFormatter`."""

    @pytest.fixture(autouse=True)
    def _inject(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp_path, self.monkeypatch = tmp_path, monkeypatch

    def _butler(self, butler: Butler) -> tuple[Butler, DatasetType]:
        butler.registry.insertDimensionData("instrument", {"name": "X", "detector_max": 2})
        butler.registry.insertDimensionData("detector", {"instrument": "X", "id": 1, "full_name": "d1"})
        dt = DatasetType("img", ["instrument", "detector"], STORAGE_CLASS, universe=butler.dimensions)
        butler.registry.registerDatasetType(dt)
        butler.registry.registerRun("run")
        return butler, dt

    def test_round_trip(self) -> None:
        butler, dt = self._butler(cr.create_central_repo(self.tmp_path / "repo"))
        hdul = _image(3.5)
        hdul[0].header["EXPID"] = 42
        ref = butler.put(hdul, dt, instrument="X", detector=1, run="run")
        self.assertTrue(butler.getURI(ref).geturl().endswith(".fits"))
        again = Butler.from_config(str(self.tmp_path / "repo")).get(ref)
        self.assertIsInstance(again, fits.HDUList)
        self.assertEqual(again[0].header["EXPID"], 42)
        self.assertEqual(again["IMAGE"].data.dtype.newbyteorder("="), np.float32)
        np.testing.assert_array_equal(again["IMAGE"].data, hdul["IMAGE"].data)

    def test_wrong_type(self) -> None:
        butler, dt = self._butler(cr.create_central_repo(self.tmp_path / "repo"))
        with self.assertRaisesRegex(TypeError, "convert 'dict' to 'astropy.io.fits.hdu.hdulist.HDUList'"):
            butler.put({"a": 1}, dt, instrument="X", detector=1, run="run")

    def test_corrupt_file(self) -> None:
        butler, dt = self._butler(cr.create_central_repo(self.tmp_path / "repo"))
        ref = butler.put(_image(), dt, instrument="X", detector=1, run="run")
        path = butler.getURI(ref).ospath
        Path(path).write_bytes(b"x" * Path(path).stat().st_size)  # same size: passes the integrity check
        with self.assertRaisesRegex(Exception, f"{path}: not a readable FITS file"):
            butler.get(ref)

    def test_config_path_directory(self) -> None:
        """config/butler also works as DAF_BUTLER_CONFIG_PATH for a repo made without our seed."""
        self.monkeypatch.setenv("DAF_BUTLER_CONFIG_PATH", str(cr.BUTLER_CONFIG_DIR))
        Butler.makeRepo(str(self.tmp_path / "plain"))
        butler, dt = self._butler(Butler.from_config(str(self.tmp_path / "plain"), writeable=True))
        ref = butler.put(_image(2.0), dt, instrument="X", detector=1, run="run")
        self.assertEqual(float(butler.get(ref)["IMAGE"].data[0, 0]), 2.0)


class CentralRepoQueryTestCase(unittest.TestCase):
    """Tests for the ingest and query functions of `workflow.repo.butler_ingest` and `workflow.repo.queries`."""

    @pytest.fixture(autouse=True)
    def _inject(self, small_repo: Path) -> None:
        self.work = small_repo
        self.butler = cr.open_central_repo(small_repo / "repo")

    def test_rerun_adds_nothing(self) -> None:
        before = cr.count_datasets(self.butler)
        self.assertEqual(
            {k: v for k, v in before.items() if k in ("raw", "bias", "flat", "defects")},
            {"raw": 12, "bias": 4, "flat": 4, "defects": 0},
        )
        self.assertGreater(before["refcat"], 0)
        self.assertGreater(before["template_coadd"], 0)
        _build(self.work / "repo", self.work)
        self.assertEqual(cr.count_datasets(self.butler), before)

    def test_calib_validity(self) -> None:
        for name in FIELDS:
            with self.subTest(instrument=name):
                filt = next(iter(_instrument(name).filters))
                bias = rq.find_calib(self.butler, name, "bias", 0, INSIDE)
                self.assertEqual(bias.run, f"{name}/calib/bias/20250101T000000")
                flat = rq.find_calib(self.butler, name, "flat", 1, INSIDE, physical_filter=filt)
                self.assertEqual(flat.dataId["physical_filter"], filt)
                self.assertIsInstance(self.butler.get(flat), fits.HDUList)
                for outside in (Time("2024-12-31T23:59:00", scale="tai"), T1):
                    self.assertIsNone(rq.find_calib(self.butler, name, "bias", 0, outside))
                self.assertIsNone(rq.find_calib(self.butler, name, "flat", 1, INSIDE, physical_filter="nope"))

    def test_refcat_shards_overlapping(self) -> None:
        region = _instrument("LSSTComCamSim").detector_region(4, *FIELDS["LSSTComCamSim"], padding_arcsec=50.0)
        refs = rq.refcat_shards_overlapping(self.butler, region, collections=cr.defaults_collection("LSSTComCamSim"))
        self.assertEqual({ref.dataId["htm7"] for ref in refs}, set(shard_ids(region)))
        table = self.butler.get(refs[0])
        self.assertIsInstance(table, Table)
        self.assertLessEqual({"ra", "dec", "r_flux"}, set(table.colnames))
        far = sphgeom.Circle(
            sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(10.0, -40.0)), sphgeom.Angle.fromDegrees(0.1)
        )
        self.assertEqual(rq.refcat_shards_overlapping(self.butler, far), [])

    def test_templates_overlapping(self) -> None:
        instrument, skymap = _instrument("HSC"), RingsSkyMap.from_config(load_config(instrument="HSC"))
        band = instrument.filters[next(iter(instrument.filters))]
        region = instrument.detector_region(0, *FIELDS["HSC"])
        refs = rq.templates_overlapping(self.butler, "HSC", skymap.name, region, band)
        expected = {(p.tract, p.id) for p in skymap.patches_overlapping(region, outer=True)}
        self.assertTrue(expected)
        self.assertEqual({(r.dataId["tract"], r.dataId["patch"]) for r in refs}, expected)
        padded = rq.templates_overlapping(self.butler, "HSC", skymap.name, region, band, padding_arcsec=1800.0)
        self.assertGreater(len(padded), len(refs))
        self.assertEqual(rq.templates_overlapping(self.butler, "HSC", skymap.name, region, "u"), [])

    def test_past_exposures(self) -> None:
        past = rq.past_exposures(self.butler, "HSC")
        ids = [e.exposure_id for e in _exposures(_instrument("HSC"), "HSC-G")]
        self.assertEqual([p.record.id for p in past], ids)
        self.assertEqual([r.dataId["detector"] for r in past[0].raws], [0, 1])
        self.assertEqual(past[0].record.tracking_ra, FIELDS["HSC"][0])
        self.assertEqual(len(rq.past_exposures(self.butler, "HSC", order="random", limit=2, seed=1)), 2)
        shuffled = rq.past_exposures(self.butler, "HSC", order="random", seed=3)
        self.assertEqual(sorted(p.record.id for p in shuffled), ids)
        with self.assertRaisesRegex(ValueError, "HSC: unknown replay order 'bogus'"):
            rq.past_exposures(self.butler, "HSC", order="bogus")

    def test_visit_records(self) -> None:
        info = _exposures(_instrument("LSSTComCamSim"), "u_02")[0]
        (visit,) = self.butler.query_dimension_records(
            "visit", instrument="LSSTComCamSim", where=f"visit = {info.exposure_id}"
        )
        self.assertEqual(visit.day_obs, 20241231)
        self.assertIsNotNone(visit.region)
        regions = self.butler.query_dimension_records(
            "visit_detector_region", instrument="LSSTComCamSim", visit=info.exposure_id
        )
        self.assertEqual(len(regions), 9)
        self.assertEqual(
            self.butler.registry.getCollectionChain(cr.defaults_collection("HSC")),
            ("HSC/calib", "HSC/templates", "refcats", "HSC/raw/all"),
        )

    def test_instrument_class_imports(self) -> None:
        # daf_butler imports a record's class_name (doImportType) and asks its translator
        # for the day_obs offset, as `butler import` of an old export does; pipe_base
        # instantiates it with a collection prefix.
        from lsst.daf.butler.transfers._yaml import _DayObsOffsetCalculator
        from lsst.utils import doImportType

        records = {r.name: r.class_name for r in self.butler.query_dimension_records("instrument")}
        self.assertEqual(set(records), set(FIELDS))
        for name, class_name in records.items():
            cls = doImportType(class_name)
            self.assertEqual(cls.getName(), name)
            self.assertEqual(cls().makeCalibrationCollectionName(), cr.calib_collection(name))
            self.assertEqual(cls().makeDefaultRawIngestRunName(), cr.raw_collection(name))
            calculator = _DayObsOffsetCalculator()
            calculator[name] = class_name
            self.assertEqual(calculator.get_offset(name, Time("2024-12-31T12:00:00", scale="tai")), 12 * 3600)

    def test_exposure_conflict(self) -> None:
        instrument = _instrument("HSC")
        info = _exposures(instrument, "HSC-G")[0]
        butler = cr.open_central_repo(self.work / "repo", writeable=True)
        cr.register_exposure(butler, info, instrument)  # same values as from the raw header: nothing to do
        moved = dataclasses.replace(info, ra=info.ra + 1.0)
        with self.assertRaisesRegex(NonRetriableError, f"HSC exposure {info.exposure_id}: already registered"):
            cr.register_exposure(butler, moved, instrument)


class RawHeaderTestCase(unittest.TestCase):
    """Tests for `workflow.repo.butler_ingest.exposure_info_from_header` and repo opening errors."""

    def test_simulator_header_round_trip(self) -> None:
        instrument = _instrument("LSSTComCamSim")
        info = _exposures(instrument, "r_03")[1]
        parsed, detector = ri.exposure_info_from_header(raw_header(instrument, 4, info))
        self.assertEqual(detector, 4)
        self.assertEqual(parsed.exposure_id, info.exposure_id)
        self.assertEqual((parsed.obs_id, parsed.group_id, parsed.day_obs), (info.obs_id, info.group_id, info.day_obs))
        self.assertAlmostEqual((parsed.start - info.start).sec, 0.0, places=3)

    def test_bad_headers(self) -> None:
        with self.assertRaisesRegex(NonRetriableError, r"^x\.fits: raw header has no boresight card"):
            ri.exposure_info_from_header({}, path="x.fits")
        with self.assertRaisesRegex(NonRetriableError, r"^x\.fits: bad or missing raw header card: 'MJD-OBS'"):
            ri.exposure_info_from_header({"RA": 1.0, "DEC": 2.0}, path="x.fits")

    def test_open_missing(self) -> None:
        with self.assertRaisesRegex(NonRetriableError, "no Butler repository"):
            cr.open_central_repo("/nonexistent/repo")


class CalibCertificationTestCase(unittest.TestCase):
    """Tests for `workflow.repo.butler_ingest.ingest_calibs` validity ranges."""

    @pytest.fixture(autouse=True)
    def _inject(self, tmp_path: Path) -> None:
        self.butler = cr.create_central_repo(tmp_path / "repo")
        cr.register_instrument(self.butler, _instrument("LSSTComCamSim"))

    def test_epochs_and_overlap(self) -> None:
        later = Time("2025-03-01T00:00:00", scale="tai")
        calibs = [
            ri.CalibInput(dataset_type="bias", detector=2, begin=T0, end=T1, source=_image(1.0)),
            ri.CalibInput(dataset_type="bias", detector=2, begin=T1, end=later, source=_image(2.0)),
        ]
        self.assertEqual(ri.ingest_calibs(self.butler, "LSSTComCamSim", calibs), 2)
        self.assertEqual(ri.ingest_calibs(self.butler, "LSSTComCamSim", calibs), 0)
        for when, value in ((INSIDE, 1.0), (T1, 2.0)):
            ref = rq.find_calib(self.butler, "LSSTComCamSim", "bias", 2, when)
            self.assertEqual(float(self.butler.get(ref)["IMAGE"].data[0, 0]), value)
        self.assertIsNone(rq.find_calib(self.butler, "LSSTComCamSim", "bias", 2, later))
        overlapping = ri.CalibInput(dataset_type="bias", detector=2, begin=INSIDE, end=later, source=_image(3.0))
        with self.assertRaisesRegex(
            NonRetriableError,
            "^LSSTComCamSim: cannot certify bias from run "
            "LSSTComCamSim/calib/bias/20250115T000000 into LSSTComCamSim/calib",
        ):
            ri.ingest_calibs(self.butler, "LSSTComCamSim", [overlapping])


def _cli():
    spec = importlib.util.spec_from_file_location(
        "make_central_repo", PROJECT_ROOT / "scripts" / "make_central_repo.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class DemoBuildTestCase(unittest.TestCase):
    """Tests for `workflow.sim.demo_repo.build_demo_repo` with the simulator, and its CLI."""

    @pytest.fixture(autouse=True)
    def _inject(self, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp_path, self.capsys = tmp_path, capsys
        monkeypatch.chdir(tmp_path)  # the CLI's APDB (a relative SQLite URL) lands here

    def test_build_simulated_and_rerun(self) -> None:
        args = {"n_visits": 2, "n_detectors": 1, "scale": 0.05, "progress": False}
        report = dr.build_demo_repo(self.tmp_path / "demo", ["LSSTComCamSim"], **args)
        counts = report["datasets"]
        self.assertEqual(
            {k: counts[k] for k in ("raw", "bias", "flat", "defects")}, {"raw": 2, "bias": 9, "flat": 54, "defects": 9}
        )
        again = dr.build_demo_repo(self.tmp_path / "demo", ["LSSTComCamSim"], **args)
        self.assertEqual(again["datasets"], counts)
        self.assertEqual({s["added"] for s in again["stages"]["LSSTComCamSim"].values()}, {0})
        self._check_template_covers_raw(cr.open_central_repo(self.tmp_path / "demo"))

    def _check_template_covers_raw(self, butler: Butler) -> None:
        plan = dr.plan_demo("LSSTComCamSim", n_visits=2, n_detectors=1, scale=0.05)
        past = rq.past_exposures(butler, "LSSTComCamSim")
        rec, raw_ref = past[0].record, past[0].raws[0]
        self.assertEqual(butler.get(raw_ref)[0].header["EXPID"], rec.id)
        det = raw_ref.dataId["detector"]
        pointing = (rec.tracking_ra, rec.tracking_dec, rec.sky_angle)
        refs = rq.templates_overlapping(
            butler,
            "LSSTComCamSim",
            plan.skymap.name,
            plan.instrument.detector_region(det, *pointing, padding_arcsec=50.0),
            plan.instrument.band(rec.physical_filter),
        )
        corners = plan.instrument.detector_corners(det, *pointing)
        covered = np.zeros(len(corners), dtype=bool)
        for ref in refs:
            image = butler.get(ref)["IMAGE"]
            x, y = WCS(image.header).all_world2pix(corners[:, 0], corners[:, 1], 0)
            covered |= (x >= 0) & (x < image.data.shape[1]) & (y >= 0) & (y < image.data.shape[0])
        self.assertTrue(covered.all())
        flat = rq.find_calib(
            butler, "LSSTComCamSim", "flat", det, rec.timespan.begin, physical_filter=rec.physical_filter
        )
        self.assertIsNotNone(flat)

    def test_cli(self) -> None:
        cli = _cli()
        repo = str(self.tmp_path / "cli")
        status = cli.main(
            [
                "--repo",
                repo,
                "--instruments",
                "LSSTComCamSim",
                "--visits",
                "1",
                "--detectors",
                "1",
                "--scale",
                "0.03",
                "--bench",
                "--no-progress",
            ]
        )
        self.assertEqual(status, 0)
        report = json.loads(self.capsys.readouterr().out)
        self.assertEqual(report["datasets"]["raw"], 1)
        self.assertGreater(report["seconds"], 0)
        # The APDB config beside the configured SQLite APDB (relative to the cwd) reads
        # with Rubin's own tool, from any directory.
        (apdb_file,) = report["apdb_configs"]
        self.assertEqual(Path(apdb_file), self.tmp_path / "demo" / "apdb" / "LSSTComCamSim.yaml")
        shown = subprocess.run(
            [str(Path(sys.executable).with_name("apdb-cli")), "metadata", "show", apdb_file],
            capture_output=True,
            text=True,
            check=False,
            cwd="/",
        )
        self.assertEqual(shown.returncode, 0, shown.stderr)
        self.assertRegex(shown.stdout, r"version:schema: 10\.")
        self.assertEqual(cli.main(["--repo", repo, "--instruments", "Nope", "--no-progress"]), 1)
        err = self.capsys.readouterr().err.strip().splitlines()
        self.assertEqual(len(err), 1)
        self.assertRegex(err[0], r"^make_central_repo: error: unknown instrument 'Nope'")


class ServerBackedRepoTestCase(unittest.TestCase):
    """Tests for `workflow.repo.central_repo.create_central_repo` on PostgreSQL and S3 servers."""

    @pytest.fixture(autouse=True)
    def _inject(self, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.request, self.tmp_path, self.monkeypatch = request, tmp_path, monkeypatch

    def _check(self, root: Path, butler: Butler) -> dict[str, int]:
        counts = cr.count_datasets(butler)
        self.assertEqual((counts["raw"], counts["bias"], counts["flat"]), (12, 4, 4))
        _build(root, self.tmp_path)
        self.assertEqual(cr.count_datasets(cr.open_central_repo(root)), counts)
        self.assertIsNotNone(rq.find_calib(butler, "HSC", "bias", 1, INSIDE))
        self.assertIsNone(rq.find_calib(butler, "HSC", "bias", 1, T1))
        self.assertIn("postgresql", (root / "butler.yaml").read_text())
        return counts

    def test_postgres_registry(self) -> None:
        server = self.request.getfixturevalue("postgres_server")
        root = self.tmp_path / "pg-repo"
        self._check(root, _build(root, self.tmp_path, registry_url=server.url, registry_namespace="central_pg"))

    def test_postgres_registry_s3_datastore(self) -> None:
        postgres = self.request.getfixturevalue("postgres_server")
        s3 = self.request.getfixturevalue("s3_server")
        for key, value in (
            ("S3_ENDPOINT_URL", s3.endpoint_url),
            ("AWS_ACCESS_KEY_ID", s3.access_key),
            ("AWS_SECRET_ACCESS_KEY", s3.secret_key),
            ("AWS_DEFAULT_REGION", s3.region),
        ):
            self.monkeypatch.setenv(key, value)
        s3.client().create_bucket(Bucket="central")
        root = self.tmp_path / "s3-repo"
        butler = _build(
            root,
            self.tmp_path,
            registry_url=postgres.url,
            registry_namespace="central_s3",
            datastore_s3="s3://central/repo",
        )
        self._check(root, butler)
        flat = rq.find_calib(butler, "HSC", "flat", 0, INSIDE, physical_filter="HSC-G")
        self.assertTrue(butler.getURI(flat).geturl().startswith("s3://central/repo/"))
        self.assertIsInstance(cr.open_central_repo(root).get(flat), fits.HDUList)
        keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket="central")["Contents"]]
        self.assertTrue(any(k.endswith(".fits") for k in keys))
