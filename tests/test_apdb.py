"""Tests for `workflow.apdb.store` against real SQLite and PostgreSQL APDBs (and no Cassandra)."""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import astropy.time
import numpy as np
import pandas as pd
import pytest
import sqlalchemy
from lsst.dax.apdb import Apdb
from lsst.dax.apdb.cassandra import ApdbCassandraConfig
from lsst.dax.apdb.sql import ApdbSqlConfig

from stream_shim.testbed.local_services import PostgresServer, free_port
from workflow.apdb.association import InvalidDiaSourceTable, associate, padded_region
from workflow.apdb.load import associate_store_alert
from workflow.apdb.store import (
    ApdbNotFoundError,
    ApdbUnavailableError,
    ApdbVersionError,
    check_versions,
    create_apdb,
    load_preload,
    normalize_db_url,
    open_apdb,
    preload,
    save_preload,
    store_detector_visit,
)
from workflow.core.exceptions import ConfigError, NonRetriableError, RetriableError
from workflow.stages.target import classify_error

RA, DEC, DETECTOR, RADIUS = 150.0, 2.0, 4, 1.0
REGION = padded_region([RA - 0.05, RA + 0.05, RA + 0.05, RA - 0.05], [DEC - 0.05] * 2 + [DEC + 0.05] * 2, 50.0)


def dia_sources(visit: int, mjd: float, rng: np.random.Generator, n: int = 12) -> pd.DataFrame:
    """One detector-visit: row 0 is a variable at (RA, DEC) with 0.05" jitter, the rest random."""
    ra = np.r_[RA + rng.normal(0, 0.05 / 3600), RA + rng.uniform(-0.04, 0.04, n - 1)]
    dec = np.r_[DEC + rng.normal(0, 0.05 / 3600), DEC + rng.uniform(-0.04, 0.04, n - 1)]
    return pd.DataFrame(
        {
            "diaSourceId": (np.int64(visit) << 22) | (np.int64(DETECTOR) << 14) | np.arange(n, dtype=np.int64),
            "visit": visit,
            "detector": DETECTOR,
            "midpointMjdTai": mjd,
            "ra": ra,
            "dec": dec,
            "x": rng.uniform(0, 4000, n).astype(np.float32),
            "y": rng.uniform(0, 4000, n).astype(np.float32),
            "xErr": 0.1,
            "yErr": 0.1,
            "psfFlux": np.r_[1000.0 * (1 + visit % 3), rng.normal(500, 20, n - 1)],
            "psfFluxErr": 20.0,
            "snr": 25.0,
            "psfNdata": 30,
            "trailNdata": 0,
            "dipoleNdata": 0,
            "isDipole": False,
            "timeProcessedMjdTai": mjd + 0.001,
            "bboxSize": 17,
            "band": "r",
            "pixelFlags_bad": False,
        }
    )


def tai(mjd: float) -> astropy.time.Time:
    return astropy.time.Time(mjd, format="mjd", scale="tai")


@pytest.fixture(params=["sqlite", "postgresql"])
def apdb_section(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A fresh APDB: SQLite by ``db_url``, PostgreSQL (own namespace) by ``config_file``."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/apdb/test.sqlite3"
        create_apdb(url)
        yield {"db_url": url}
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        config = tmp_path / "apdb.yaml"
        create_apdb(server.url, namespace=f"t{uuid.uuid4().hex[:12]}", config_path=config)
        yield {"config_file": str(config)}


def _count(apdb: Apdb, table: str, where: str = "1=1") -> int:
    """Row count straight from SQL, bypassing dax_apdb."""
    config = apdb.getConfig()
    name = f'"{config.namespace}"."{table}"' if config.namespace else f'"{table}"'
    engine = sqlalchemy.create_engine(config.db_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sqlalchemy.text(f"SELECT COUNT(*) FROM {name} WHERE {where}")).scalar())
    finally:
        engine.dispose()


def _run_visit(apdb: Apdb, visit: int, mjd: float, rng: np.random.Generator, tmp_path: Path) -> Any:
    """Preload (through parquet, like the prep step), associate, store."""
    loaded = preload(apdb, REGION, tai(mjd))
    paths = tmp_path / f"pre{visit}_obj.parquet", tmp_path / f"pre{visit}_src.parquet"
    save_preload(loaded, *paths)
    staged = load_preload(*paths)
    return associate_store_alert(
        apdb,
        dia_sources(visit, mjd, rng),
        staged,
        visit=visit,
        detector=DETECTOR,
        visit_time=tai(mjd),
        radius_arcsec=RADIUS,
    )


class TestStore:
    """Tests for `workflow.apdb.store.store_detector_visit` and `workflow.apdb.store.preload`."""

    def test_three_visits_one_object(self, apdb_section: dict[str, Any], tmp_path: Path) -> None:
        apdb = open_apdb(apdb_section)
        rng = np.random.default_rng(42)
        results = [_run_visit(apdb, visit, 60000.0 + k, rng, tmp_path) for k, visit in enumerate((101, 102, 103))]
        assert [r.store.stored for r in results] == [True, True, True]
        assert [r.association.n_matched for r in results] == [0, 1, 1]
        object_id = int(dia_sources(101, 60000.0, np.random.default_rng(42))["diaSourceId"].iloc[0])
        objects = apdb.getDiaObjects(REGION).set_index("diaObjectId")
        assert objects.loc[object_id, "nDiaSources"] == 3
        assert objects.loc[object_id, "r_psfFluxNdata"] == 3
        assert abs(objects.loc[object_id, "ra"] - RA) * 3600 < 0.2
        sources = apdb.getDiaSources(REGION, [object_id], tai(60003.0))
        assert sorted(sources["visit"].tolist()) == [101, 102, 103]
        assert _count(apdb, "DiaSource", f'"diaObjectId" = {object_id}') == 3
        assert _count(apdb, "DiaObject", f'"diaObjectId" = {object_id}') == 3  # three versions...
        live = f'"diaObjectId" = {object_id} AND "validityEndMjdTai" IS NULL'
        assert _count(apdb, "DiaObject", live) == 1  # ...one of them current
        assert _count(apdb, "DiaSource") == 36 and len(objects) == 34

    def test_rerun_adds_no_rows(self, apdb_section: dict[str, Any], tmp_path: Path) -> None:
        apdb = open_apdb(apdb_section)
        first = _run_visit(apdb, 201, 60010.0, np.random.default_rng(1), tmp_path)
        counts = (_count(apdb, "DiaObject"), _count(apdb, "DiaSource"))
        again = _run_visit(apdb, 201, 60010.0, np.random.default_rng(1), tmp_path)
        assert first.store.stored and not again.store.stored
        assert "visit 201 detector 4 is already in the APDB" in again.store.reason
        assert (_count(apdb, "DiaObject"), _count(apdb, "DiaSource")) == counts

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            (lambda t: t.drop(columns=["bboxSize"]), r"visit 301 detector 4: .*'bboxSize'"),
            (
                lambda t: t.assign(ra=np.where(np.arange(len(t)) == 3, np.nan, t["ra"])),
                r"visit 301 detector 4: column 'ra' has 1 null/NaN",
            ),
            (lambda t: t.assign(timeProcessedMjdTai=np.nan), r"visit 301 detector 4: column 'timeProcessedMjdTai'"),
        ],
        ids=["missing-column", "nan-ra", "null-required"],
    )
    def test_bad_table_stores_nothing(self, apdb_section: dict[str, Any], change: Any, message: str) -> None:
        apdb = open_apdb(apdb_section)
        good = dia_sources(301, 60020.0, np.random.default_rng(3))
        result = associate(
            good, apdb.getDiaObjects(REGION), pd.DataFrame(), visit=301, detector=DETECTOR, radius_arcsec=RADIUS
        )
        with pytest.raises(InvalidDiaSourceTable, match=message) as info:
            store_detector_visit(
                apdb, tai(60020.0), result.objects, change(result.sources), visit=301, detector=DETECTOR
            )
        assert isinstance(info.value, NonRetriableError)
        assert not apdb.containsVisitDetector(301, DETECTOR)
        assert _count(apdb, "DiaObject") == 0 and _count(apdb, "DiaSource") == 0


class TestOpen:
    """Tests for `workflow.apdb.store.open_apdb` and `workflow.apdb.store.create_apdb`."""

    @pytest.mark.parametrize(
        ("key", "value", "found"),
        [("version:schema", "9.0.0", "schema version .*9.0.0"), ("version:ApdbSql", "2.0.0", "code version .*2.0.0")],
    )
    def test_unsupported_version_refused(self, apdb_section: dict[str, Any], key: str, value: str, found: str) -> None:
        open_apdb(apdb_section).metadata.set(key, value, force=True)
        with pytest.raises(ApdbVersionError, match=found) as info:
            open_apdb(apdb_section)
        assert "supported: schema 10.x, ApdbSql 1.x" in str(info.value)

    def test_check_versions(self) -> None:
        assert check_versions({"version:schema": "10.0.0", "version:ApdbSql": "1.2.1"}, "x") == {
            "schema": "10.0.0",
            "ApdbSql": "1.2.1",
        }
        with pytest.raises(ApdbVersionError, match="found no version keys"):
            check_versions({}, "x")

    def test_sqlite_missing_and_created(self, tmp_path: Path) -> None:
        with pytest.raises(ApdbNotFoundError, match="apdb-cli create-sql"):
            open_apdb({"db_url": "sqlite:///deep/dir/apdb.sqlite3"}, base_dir=tmp_path)
        apdb = open_apdb({"db_url": "sqlite:///deep/dir/apdb.sqlite3"}, base_dir=tmp_path, create=True)
        assert (tmp_path / "deep" / "dir" / "apdb.sqlite3").is_file()
        assert apdb.metadata.get("version:schema").startswith("10.")

    def test_postgres_urls(self) -> None:
        assert normalize_db_url("postgresql://u@db.example:5432/apdb") == "postgresql+psycopg2://u@db.example:5432/apdb"
        with pytest.raises(ConfigError, match="postgresql\\+psycopg2://"):
            normalize_db_url("postgresql+psycopg://u@db.example/apdb")

    def test_postgres_unreachable_is_retriable(self) -> None:
        url = f"postgresql+psycopg2://nobody:secret@127.0.0.1:{free_port()}/apdb"
        with pytest.raises(ApdbUnavailableError, match=r"nobody:\*\*\*@127\.0\.0\.1") as info:
            open_apdb({"db_url": url}, connect_timeout=2)
        assert isinstance(info.value, RetriableError) and "secret" not in str(info.value)

    def test_postgres_without_tables(self, postgres_server: PostgresServer, tmp_path: Path) -> None:
        # Plain postgresql:// is rewritten to psycopg2; an empty namespace has no APDB.
        url = postgres_server.url.replace("postgresql+psycopg2://", "postgresql://")
        ApdbSqlConfig(db_url=url, namespace="no_apdb_here").save(str(tmp_path / "apdb.yaml"))
        with pytest.raises(ApdbNotFoundError, match="create-sql"):
            open_apdb({"config_file": str(tmp_path / "apdb.yaml")})

    def test_cassandra_without_server_fails_fast(self, tmp_path: Path) -> None:
        port = free_port()
        ApdbCassandraConfig(contact_points=("127.0.0.1",), keyspace="apdb").model_copy(
            update={"connection_config": ApdbCassandraConfig().connection_config.model_copy(update={"port": port})}
        ).save(str(tmp_path / "cassandra.yaml"))
        start = time.monotonic()
        with pytest.raises(ApdbUnavailableError, match=r"Cassandra hosts \['127\.0\.0\.1'\] .*unreachable"):
            open_apdb({"config_file": "cassandra.yaml"}, base_dir=tmp_path, connect_timeout=2)
        assert time.monotonic() - start < 15


class _CutConnection:
    """An APDB whose server cut the connection in a way psycopg2 reports as an ``InterfaceError``."""

    def getConfig(self) -> ApdbSqlConfig:
        return ApdbSqlConfig(db_url="postgresql+psycopg2://someone@db.example:5432/apdb")

    def getDiaObjects(self, region: Any) -> pd.DataFrame:
        raise sqlalchemy.exc.InterfaceError("SELECT 1", {}, Exception("connection already closed"))


class TestOutage:
    """A PostgreSQL APDB that goes away in the middle of a session, and comes back."""

    def test_outage_mid_session_is_retriable_and_heals(self, tmp_path: Path) -> None:
        base = Path(tempfile.mkdtemp(prefix="pg-apdb-"))
        base.chmod(0o755)  # the server's OS user keeps its cluster there across the restart
        try:
            with PostgresServer(base) as server:
                config = tmp_path / "apdb.yaml"
                create_apdb(server.url, namespace=f"t{uuid.uuid4().hex[:12]}", config_path=config)
                apdb = open_apdb({"config_file": str(config)})  # its pool holds a live connection
                assert not apdb.containsVisitDetector(401, DETECTOR)
                server.stop()
                for attempt in (
                    lambda: _run_visit(apdb, 401, 60020.0, np.random.default_rng(4), tmp_path),
                    lambda: open_apdb({"config_file": str(config)}, connect_timeout=2),
                ):
                    with pytest.raises(ApdbUnavailableError, match=f"127.0.0.1:{server.port}") as info:
                        attempt()
                    assert classify_error(info.value)["retriable"] is True  # the stage's failed.json
                server.start()
                healed = _run_visit(apdb, 401, 60020.0, np.random.default_rng(4), tmp_path)  # same object
                assert healed.store.stored and _count(apdb, "DiaSource", '"visit" = 401') == 12
        finally:
            shutil.rmtree(base, ignore_errors=True)

    def test_a_cut_connection_is_retriable(self) -> None:
        cut: Any = _CutConnection()
        with pytest.raises(ApdbUnavailableError, match="db.example:5432/apdb: connection lost") as info:
            preload(cut, REGION, tai(60000.0))
        assert isinstance(info.value, RetriableError)
