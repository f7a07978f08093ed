"""Tests for `workflow.apdb.association` and `workflow.apdb.dia_objects` (no database)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from lsst.dax.apdb import ApdbTables
from lsst.dax.apdb.apdbSchema import ApdbSchema

from workflow.apdb.association import (
    InvalidDiaSourceTable,
    associate,
    match_sources,
    padded_region,
    validate_dia_sources,
)
from workflow.apdb.dia_objects import bands_in, new_object_ids, summarize_objects

ARCSEC = 1.0 / 3600.0


@pytest.fixture(scope="module")
def object_columns() -> list[str]:
    """DiaObject columns of the installed APDB schema (what a preload carries)."""
    schema = ApdbSchema("resource://lsst.sdm.schemas/apdb.yaml", "")
    return [c.name for c in schema.tableSchemas[ApdbTables.DiaObject].columns]


def _sources(
    visit: int,
    ra: list[float],
    dec: list[float],
    *,
    detector: int = 7,
    mjd: float = 60000.0,
    flux: list[float] | None = None,
    band: str = "r",
) -> pd.DataFrame:
    n = len(ra)
    return pd.DataFrame(
        {
            "diaSourceId": (np.int64(visit) << 22) | (np.int64(detector) << 14) | np.arange(n, dtype=np.int64),
            "visit": visit,
            "detector": detector,
            "midpointMjdTai": mjd,
            "ra": ra,
            "dec": dec,
            "raErr": 1e-5,
            "decErr": 1e-5,
            "x": np.arange(n, dtype=np.float32),
            "y": np.arange(n, dtype=np.float32),
            "psfFlux": flux if flux is not None else [100.0] * n,
            "psfFluxErr": 10.0,
            "psfNdata": 25,
            "trailNdata": 0,
            "dipoleNdata": 0,
            "timeProcessedMjdTai": mjd + 0.001,
            "bboxSize": 15,
            "band": band,
        }
    )


class TestMatchSources:
    """Tests for `workflow.apdb.association.match_sources`."""

    def test_nearest_within_radius(self) -> None:
        index, sep = match_sources(
            np.array([10.0, 10.0 + 5 * ARCSEC]),
            np.array([0.0, 0.0]),
            np.array([10.0 + 0.3 * ARCSEC, 20.0]),
            np.array([0.0, 0.0]),
            1.0,
        )
        assert index.tolist() == [0, -1]
        assert sep[0] == pytest.approx(0.3, abs=1e-3) and np.isnan(sep[1])

    def test_one_to_one_closest_wins(self) -> None:
        # Two sources near one object: the closer takes it, the other stays unmatched.
        index, _ = match_sources(
            np.array([10.0 + 0.6 * ARCSEC, 10.0 + 0.2 * ARCSEC]),
            np.array([0.0, 0.0]),
            np.array([10.0]),
            np.array([0.0]),
            1.0,
        )
        assert index.tolist() == [-1, 0]

    def test_greedy_prefers_globally_closest_pair(self) -> None:
        # Source 0 is nearest to object 1, source 1 is nearer still to object 1: 0 falls back to object 0.
        index, _ = match_sources(
            np.array([0.5 * ARCSEC, 0.9 * ARCSEC]),
            np.array([0.0, 0.0]),
            np.array([0.0, 0.8 * ARCSEC]),
            np.array([0.0, 0.0]),
            1.0,
        )
        assert index.tolist() == [0, 1]

    def test_ra_wrap_and_empty(self) -> None:
        index, _ = match_sources(np.array([359.99999]), np.array([1.0]), np.array([0.000001]), np.array([1.0]), 1.0)
        assert index.tolist() == [0]
        assert match_sources(np.zeros(0), np.zeros(0), np.array([1.0]), np.array([1.0]), 1.0)[0].size == 0
        assert match_sources(np.array([1.0]), np.array([1.0]), np.zeros(0), np.zeros(0), 1.0)[0].tolist() == [-1]


class TestValidateDiaSources:
    """Tests for `workflow.apdb.association.validate_dia_sources`."""

    def test_missing_column_names_detector_visit(self) -> None:
        table = _sources(5, [1.0], [2.0]).drop(columns=["midpointMjdTai"])
        with pytest.raises(InvalidDiaSourceTable, match=r"visit 5 detector 7: .*'midpointMjdTai'"):
            validate_dia_sources(table, visit=5, detector=7)

    def test_nan_coordinates(self) -> None:
        table = _sources(5, [1.0, np.nan], [2.0, 2.0])
        with pytest.raises(InvalidDiaSourceTable, match=r"visit 5 detector 7: column 'ra' has 1 null/NaN"):
            validate_dia_sources(table, visit=5, detector=7)
        table = _sources(5, [1.0], [np.inf])
        with pytest.raises(InvalidDiaSourceTable, match=r"column 'dec' has non-finite"):
            validate_dia_sources(table, visit=5, detector=7)

    def test_rows_of_another_detector(self) -> None:
        with pytest.raises(InvalidDiaSourceTable, match=r"visit 5 detector 8: column 'detector'"):
            validate_dia_sources(_sources(5, [1.0], [2.0]), visit=5, detector=8)


class TestAssociate:
    """Tests for `workflow.apdb.association.associate` and `workflow.apdb.dia_objects`."""

    def test_new_objects_take_source_ids(self, object_columns: list[str]) -> None:
        src = _sources(1, [10.0, 10.01], [-5.0, -5.0])
        empty = pd.DataFrame(columns=object_columns)
        result = associate(src, empty, pd.DataFrame(), visit=1, detector=7, radius_arcsec=1.0, visit_mjd_tai=60000.0)
        assert result.n_new == 2 and result.n_matched == 0
        assert result.sources["diaObjectId"].tolist() == src["diaSourceId"].tolist()
        assert list(result.objects.columns) == object_columns
        required = ["diaObjectId", "ra", "dec", "nDiaSources"] + [f"{b}_psfFluxNdata" for b in "ugrizy"]
        assert not result.objects[required].isna().any().any()
        assert result.objects["nDiaSources"].tolist() == [1, 1]
        assert result.objects["r_psfFluxNdata"].tolist() == [1, 1]
        assert result.objects["g_psfFluxNdata"].tolist() == [0, 0]
        assert (result.objects["validityStartMjdTai"] == 60000.0).all()
        again = associate(src, empty, pd.DataFrame(), visit=1, detector=7, radius_arcsec=1.0)
        assert again.objects["diaObjectId"].tolist() == result.objects["diaObjectId"].tolist()

    def test_matched_object_summary(self, object_columns: list[str]) -> None:
        first = _sources(1, [10.0], [-5.0], mjd=60000.0, flux=[100.0])
        one = associate(
            first, pd.DataFrame(columns=object_columns), pd.DataFrame(), visit=1, detector=7, radius_arcsec=1.0
        )
        second = _sources(2, [10.0 + 0.2 * ARCSEC, 10.5], [-5.0, -5.0], mjd=60001.0, flux=[140.0, 5.0])
        two = associate(second, one.objects, one.sources, visit=2, detector=7, radius_arcsec=1.0)
        assert two.n_matched == 1 and two.n_new == 1
        obj = two.objects.set_index("diaObjectId").loc[first["diaSourceId"].iloc[0]]
        assert obj["nDiaSources"] == 2
        assert obj["r_psfFluxNdata"] == 2
        assert obj["r_psfFluxMean"] == pytest.approx(120.0)
        assert obj["r_psfFluxMeanErr"] == pytest.approx(10.0 / np.sqrt(2))
        assert obj["r_psfFluxSigma"] == pytest.approx(np.std([100.0, 140.0], ddof=1))
        assert obj["r_psfFluxMin"] == 100.0 and obj["r_psfFluxMax"] == 140.0
        assert obj["r_psfFluxMaxSlope"] == pytest.approx(40.0)
        assert obj["ra"] == pytest.approx(10.0 + 0.1 * ARCSEC, abs=1e-9)
        assert (obj["firstDiaSourceMjdTai"], obj["lastDiaSourceMjdTai"]) == (60000.0, 60001.0)
        assert two.sources["diaObjectId"].iloc[0] == first["diaSourceId"].iloc[0]

    def test_invalid_table_is_refused(self, object_columns: list[str]) -> None:
        bad = _sources(3, [1.0], [np.nan])
        with pytest.raises(InvalidDiaSourceTable, match=r"visit 3 detector 7: column 'dec'"):
            associate(bad, pd.DataFrame(columns=object_columns), pd.DataFrame(), visit=3, detector=7, radius_arcsec=1.0)


class TestDiaObjects:
    """Tests for `workflow.apdb.dia_objects`."""

    def test_bands_from_schema(self, object_columns: list[str]) -> None:
        assert bands_in(object_columns) == list("ugrizy")
        assert bands_in(["diaObjectId", "r_psfFluxNdata"]) == ["r"]

    def test_only_schema_columns(self) -> None:
        src = _sources(1, [10.0], [-5.0])
        src["diaObjectId"] = new_object_ids(src["diaSourceId"])
        out = summarize_objects(src["diaObjectId"], src, ["diaObjectId", "ra", "dec", "nDiaSources", "r_psfFluxNdata"])
        assert list(out.columns) == ["diaObjectId", "ra", "dec", "nDiaSources", "r_psfFluxNdata"]
        assert out.iloc[0].tolist() == pytest.approx([src["diaSourceId"].iloc[0], 10.0, -5.0, 1, 1])


def test_padded_region_covers_footprint() -> None:
    region = padded_region([10.0, 10.2, 10.2, 10.0], [-5.0, -5.0, -4.8, -4.8], padding_arcsec=50.0)
    inside = np.radians([10.1, 10.0, 10.2 + 40 * ARCSEC]), np.radians([-4.9, -5.0, -4.8])
    outside = np.radians([10.1, 10.4]), np.radians([-4.7, -4.9])
    assert np.asarray(region.contains(*inside)).all()
    assert not np.asarray(region.contains(*outside)).any()
