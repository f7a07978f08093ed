"""Open, create and check the APDB; preload its catalogs; store one detector-visit.

All database access goes through ``lsst.dax.apdb``.  Backends: SQLite (embedded
default, ``sqlite:///<path>``), PostgreSQL (``postgresql+psycopg2://``; plain
``postgresql://`` would pick psycopg 3 and break ``store``, so it is rewritten), and
Cassandra through an ``apdb-cli create-cassandra`` config file.

`open_apdb` refuses an APDB whose schema or implementation major version we do not
support (`SUPPORTED_MAJOR_VERSIONS`, read from the APDB metadata).
`store_detector_visit` calls ``Apdb.store`` once per detector-visit, only after
``Apdb.containsVisitDetector`` said nothing is there yet (retry safety).
"""

from __future__ import annotations

__all__ = [
    "SUPPORTED_MAJOR_VERSIONS",
    "ApdbNotFoundError",
    "ApdbUnavailableError",
    "ApdbVersionError",
    "Preload",
    "StoreOutcome",
    "check_versions",
    "create_apdb",
    "load_preload",
    "normalize_db_url",
    "open_apdb",
    "preload",
    "required_columns",
    "save_preload",
    "store_detector_visit",
]

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import astropy.time
import lsst.sphgeom as sphgeom
import numpy as np
import pandas as pd
import sqlalchemy
from lsst.dax.apdb import Apdb, ApdbConfig, ApdbTables
from lsst.dax.apdb.sql import ApdbSql, ApdbSqlConfig
from lsst.dax.apdb.versionTuple import IncompatibleVersionError

from workflow.apdb.association import InvalidDiaSourceTable, validate_dia_sources
from workflow.core.exceptions import ConfigError, NonRetriableError, RetriableError

_log = logging.getLogger(__name__)

SUPPORTED_MAJOR_VERSIONS: Mapping[str, int] = {"schema": 10, "ApdbSql": 1, "ApdbCassandra": 1}
"""Supported major versions, by APDB metadata key ``version:<name>``."""


class ApdbUnavailableError(RetriableError, ConnectionError):
    """The APDB server cannot be reached now; the message names the URL or hosts."""


class ApdbVersionError(NonRetriableError, RuntimeError):
    """The APDB schema or implementation version is not one we support."""


class ApdbNotFoundError(NonRetriableError, LookupError):
    """No APDB exists at the configured location (it was never created)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Preload:
    """DiaObjects around a detector (latest versions) and their recent DiaSources."""

    objects: pd.DataFrame
    sources: pd.DataFrame


@dataclasses.dataclass(frozen=True, kw_only=True)
class StoreOutcome:
    """What `store_detector_visit` did; ``stored`` is `False` (with a ``reason``) on a rerun."""

    visit: int
    detector: int
    stored: bool
    n_objects: int
    n_sources: int
    reason: str
    seconds: float


def normalize_db_url(db_url: str, *, base_dir: str | Path | None = None) -> str:
    """Return the SQLAlchemy URL to use: absolute SQLite path, psycopg2 driver.

    Parameters
    ----------
    db_url : `str`
        ``sqlite:///path`` or ``postgresql+psycopg2://...`` (``postgresql://`` is rewritten).
    base_dir : `str` or `~pathlib.Path`, optional
        Directory a relative SQLite path is relative to (default: the cwd).

    Returns
    -------
    url : `str`
        The URL to connect with.

    Raises
    ------
    ConfigError
        For an unparsable URL or a PostgreSQL driver other than psycopg2.
    """
    try:
        url = sqlalchemy.make_url(db_url)
    except sqlalchemy.exc.ArgumentError as exc:
        raise ConfigError(f"APDB db_url {db_url!r} is not an SQLAlchemy URL: {exc}") from exc
    if url.get_backend_name() == "postgresql":
        if url.drivername == "postgresql":
            _log.warning("APDB URL %s: using postgresql+psycopg2 (plain postgresql:// picks psycopg 3)", _safe(url))
            url = url.set(drivername="postgresql+psycopg2")
        elif url.drivername != "postgresql+psycopg2":
            raise ConfigError(
                f"APDB URL {_safe(url)}: driver {url.drivername!r} is not supported; use postgresql+psycopg2://"
            )
    elif url.get_backend_name() == "sqlite" and url.database and not url.database.startswith(":"):
        prefix, path = ("file:" if url.database.startswith("file:") else ""), Path(url.database.removeprefix("file:"))
        url = url.set(database=prefix + str((Path(base_dir or Path.cwd()) / path).resolve()))
    return url.render_as_string(hide_password=False)


def _safe(url: str | sqlalchemy.URL) -> str:
    """URL with the password hidden, for messages."""
    return sqlalchemy.make_url(url).render_as_string(hide_password=True)


def _sqlite_path(db_url: str) -> Path | None:
    url = sqlalchemy.make_url(db_url)
    if url.get_backend_name() == "sqlite" and url.database and not url.database.startswith(":"):
        return Path(url.database.removeprefix("file:"))
    return None


def create_apdb(
    db_url: str, *, drop: bool = False, config_path: str | Path | None = None, **kwargs: Any
) -> ApdbSqlConfig:
    """Create the tables of a new SQL APDB (like ``apdb-cli create-sql``).

    Parameters
    ----------
    db_url : `str`
        SQLite or PostgreSQL URL, see `normalize_db_url`.
    drop : `bool`, optional
        Drop existing APDB tables first.
    config_path : `str` or `~pathlib.Path`, optional
        Also write the APDB config YAML here.
    **kwargs
        Passed to ``ApdbSql.init_database``.

    Returns
    -------
    config : `lsst.dax.apdb.sql.ApdbSqlConfig`
        Config of the new APDB.

    Raises
    ------
    ApdbUnavailableError
        If the database server cannot be reached.
    """
    db_url = normalize_db_url(db_url)
    if (path := _sqlite_path(db_url)) is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    config = _guard(lambda: ApdbSql.init_database(db_url=db_url, drop=drop, **kwargs), _safe(db_url))
    if config_path is not None:
        config.save(str(config_path))
    _log.info("created APDB at %s", _safe(db_url))
    return config


def _make_config(apdb_config: Mapping[str, Any], base_dir: str | Path | None, timeout: float) -> ApdbConfig:
    """Build the dax_apdb config from our ``apdb`` config section."""
    if apdb_config.get("config_file"):
        path = Path(base_dir or Path.cwd()) / apdb_config["config_file"]
        if not path.is_file():
            raise ApdbNotFoundError(f"APDB config file {path} not found")
        config = ApdbConfig.from_uri(str(path))
    else:
        config = ApdbSqlConfig(db_url=apdb_config["db_url"])
    if isinstance(config, ApdbSqlConfig):
        config.db_url = normalize_db_url(config.db_url, base_dir=base_dir)
        if config.connection_config.connection_timeout is None:
            config.connection_config.connection_timeout = int(timeout)
    else:
        from lsst.dax.apdb.cassandra import ApdbCassandraConfig

        assert isinstance(config, ApdbCassandraConfig)  # an APDB config is SQL or Cassandra
        extra = {"connect_timeout": timeout, "control_connection_timeout": timeout}
        config.connection_config.extra_parameters = extra | dict(config.connection_config.extra_parameters)
    return config


def open_apdb(
    apdb_config: Mapping[str, Any],
    *,
    base_dir: str | Path | None = None,
    create: bool = False,
    connect_timeout: float = 10.0,
) -> Apdb:
    """Open the APDB named by our ``apdb`` config section and check its versions.

    Parameters
    ----------
    apdb_config : `~collections.abc.Mapping`
        The ``apdb`` section: ``db_url`` or ``config_file`` (an ``apdb-cli`` YAML).
    base_dir : `str` or `~pathlib.Path`, optional
        Directory that relative paths are relative to (default: the cwd).
    create : `bool`, optional
        Create a missing SQLite APDB (the embedded default).
    connect_timeout : `float`, optional
        Seconds to wait for a server (PostgreSQL, Cassandra).

    Returns
    -------
    apdb : `lsst.dax.apdb.Apdb`
        The opened APDB.

    Raises
    ------
    ApdbUnavailableError
        If the server cannot be reached (the message names the URL or hosts).
    ApdbNotFoundError
        If there is no APDB at that location (and ``create`` is false).
    ApdbVersionError
        If its schema or implementation major version is not supported.
    """
    config = _make_config(apdb_config, base_dir, connect_timeout)
    if isinstance(config, ApdbSqlConfig):
        where = _safe(config.db_url)
        path = _sqlite_path(config.db_url)
        if path is not None and create:
            _create_once(path, config.db_url)  # under a lock: never open a half-created file
        elif path is not None and not path.exists():
            raise ApdbNotFoundError(f"no APDB at {where}; create it with `apdb-cli create-sql`")
    else:
        from lsst.dax.apdb.cassandra import ApdbCassandraConfig

        assert isinstance(config, ApdbCassandraConfig)  # an APDB config is SQL or Cassandra
        where = f"Cassandra hosts {list(config.contact_points)} keyspace {config.keyspace!r}"
    apdb = _guard(lambda: Apdb.from_config(config), where)
    check_versions(_guard(lambda: dict(apdb.metadata.items()), where), where)  # Cassandra connects here
    _log.debug("opened APDB at %s", where)
    return apdb


def _create_once(path: Path, db_url: str) -> None:
    """Create a SQLite APDB unless a concurrent target already did (file lock)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".create-lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            create_apdb(db_url)


def _guard(action: Callable[[], Any], where: str) -> Any:
    """Run ``action``, turning connection and version failures into our errors."""
    try:
        return action()
    except IncompatibleVersionError as exc:
        raise ApdbVersionError(f"APDB at {where} is not supported: {exc}; supported: {_supported()}") from exc
    except sqlalchemy.exc.NoSuchTableError as exc:
        raise ApdbNotFoundError(f"no APDB at {where} (no table {exc}); create it with `apdb-cli create-sql`") from exc
    except sqlalchemy.exc.OperationalError as exc:
        raise ApdbUnavailableError(f"APDB at {where} is unreachable: {exc.orig}") from exc
    except sqlalchemy.exc.DBAPIError as exc:
        # A connection the server cut (restart, failover) may surface as another DBAPI class
        # (psycopg2's InterfaceError "connection already closed"); SQLAlchemy flags it invalidated.
        if exc.connection_invalidated or isinstance(exc, sqlalchemy.exc.InterfaceError):
            raise ApdbUnavailableError(f"APDB at {where}: connection lost: {exc.orig}") from exc
        raise
    except (sqlalchemy.exc.TimeoutError, sqlalchemy.exc.DisconnectionError) as exc:  # pool wait, pool disconnect
        raise ApdbUnavailableError(f"APDB at {where} is unreachable: {exc}") from exc
    except Exception as exc:
        if type(exc).__name__ in ("NoHostAvailable", "OperationTimedOut"):  # cassandra-driver
            raise ApdbUnavailableError(f"APDB at {where} is unreachable: {exc}") from exc
        raise


def _location(apdb: Apdb) -> str:
    """Where an opened APDB lives (URL without password, or Cassandra hosts), for messages."""
    config = apdb.getConfig()
    if isinstance(config, ApdbSqlConfig):
        return _safe(config.db_url)
    return f"Cassandra hosts {list(getattr(config, 'contact_points', []))}"


def check_versions(metadata: Mapping[str, str], where: str) -> dict[str, str]:
    """Refuse an APDB whose versions (from its metadata) we do not support.

    Parameters
    ----------
    metadata : `~collections.abc.Mapping` [`str`, `str`]
        APDB metadata items (``version:schema``, ``version:ApdbSql``, ...).
    where : `str`
        The APDB location, for the message.

    Returns
    -------
    versions : `dict` [`str`, `str`]
        The versions found, by name (``schema``, ``ApdbSql`` ...).

    Raises
    ------
    ApdbVersionError
        If the schema or implementation version is missing or of an unsupported
        major version; the message says what is supported and what was found.
    """
    found = {k.removeprefix("version:"): v for k, v in metadata.items() if k.startswith("version:")}
    relevant = {k: v for k, v in found.items() if k in SUPPORTED_MAJOR_VERSIONS}
    bad = [k for k, v in relevant.items() if v.split(".")[0] != str(SUPPORTED_MAJOR_VERSIONS[k])]
    if "schema" not in relevant or bad or len(relevant) < 2:
        shown = ", ".join(f"{k} {v}" for k, v in relevant.items()) or "no version keys"
        raise ApdbVersionError(f"APDB at {where} is not supported: found {shown}; supported: {_supported()}")
    return relevant


def _supported() -> str:
    return ", ".join(f"{k} {v}.x" for k, v in SUPPORTED_MAJOR_VERSIONS.items())


def required_columns(apdb: Apdb, table: ApdbTables) -> list[str]:
    """Return the non-nullable columns of an APDB table in its schema (``lsst.sdm.schemas``).

    Columns that ``Apdb.store`` fills itself (``validity*``, spatial index) are left out.
    """
    return [
        c.name
        for c in _schema_columns(apdb, table)
        if not c.nullable and not c.name.startswith(("validity", "apdb_")) and c.name != "pixelId"
    ]


def _schema_columns(apdb: Apdb, table: ApdbTables) -> list[Any]:
    table_def = apdb.schema.tableSchemas.get(table)
    return list(table_def.columns) if table_def is not None else []


def preload(apdb: Apdb, region: sphgeom.Region, visit_time: astropy.time.Time) -> Preload:
    """Load the DiaObjects in a region and their recent DiaSources.

    Parameters
    ----------
    apdb : `lsst.dax.apdb.Apdb`
        Opened APDB.
    region : `lsst.sphgeom.Region`
        Detector footprint padded by ``preload_padding_arcsec``
        (`workflow.apdb.association.padded_region`).
    visit_time : `astropy.time.Time`
        Visit time; DiaSources of the APDB's ``read_sources_months`` before it are read.

    Returns
    -------
    preload : `Preload`
        Objects inside ``region`` and the DiaSources of those objects; empty
        tables keep the schema's columns.

    Raises
    ------
    ApdbUnavailableError
        If the database cannot be reached.
    """
    where = _location(apdb)
    objects = _guard(lambda: apdb.getDiaObjects(region), where)
    if len(objects):
        lon, lat = np.radians(objects["ra"].to_numpy(float)), np.radians(objects["dec"].to_numpy(float))
        objects = objects[np.asarray(region.contains(lon, lat), bool)].reset_index(drop=True)
    ids = [int(i) for i in objects["diaObjectId"]]
    sources = _guard(lambda: apdb.getDiaSources(region, ids, visit_time), where)
    if sources is None:  # read_sources_months == 0
        sources = pd.DataFrame(columns=[c.name for c in _schema_columns(apdb, ApdbTables.DiaSource)])
    _log.info("preloaded %d DiaObjects and %d DiaSources", len(objects), len(sources))
    return Preload(objects=objects, sources=sources.reset_index(drop=True))


def save_preload(result: Preload, objects_path: str | Path, sources_path: str | Path) -> None:
    """Write a `Preload` to two parquet files (staged into the work area)."""
    for frame, path in ((result.objects, objects_path), (result.sources, sources_path)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(path, index=False)


def load_preload(objects_path: str | Path, sources_path: str | Path) -> Preload:
    """Read a `Preload` written by `save_preload`."""
    return Preload(objects=pd.read_parquet(objects_path), sources=pd.read_parquet(sources_path))


def store_detector_visit(
    apdb: Apdb,
    visit_time: astropy.time.Time,
    objects: pd.DataFrame,
    sources: pd.DataFrame,
    *,
    visit: int,
    detector: int,
) -> StoreOutcome:
    """Store one detector-visit's DiaObjects and DiaSources, at most once.

    Parameters
    ----------
    apdb : `lsst.dax.apdb.Apdb`
        Opened APDB.
    visit_time : `astropy.time.Time`
        Visit time (start of the new DiaObject versions).
    objects, sources : `pandas.DataFrame`
        Output of `workflow.apdb.association.associate`.
    visit, detector : `int`
        The detector-visit.

    Returns
    -------
    outcome : `StoreOutcome`
        ``stored=False`` with a reason if the APDB already had this detector-visit.

    Raises
    ------
    InvalidDiaSourceTable
        If a column the schema requires is missing or null, or coordinates are not
        finite; nothing is written.
    ApdbUnavailableError
        If the database cannot be reached; ``store`` is one SQL transaction, so
        nothing is partially written.
    """
    start = time.monotonic()
    validate_dia_sources(sources, visit=visit, detector=detector, required=required_columns(apdb, ApdbTables.DiaSource))
    bad = [c for c in required_columns(apdb, ApdbTables.DiaObject) if c not in objects or objects[c].isna().any()]
    if bad:
        raise InvalidDiaSourceTable(f"visit {visit} detector {detector}: DiaObject column(s) {bad} missing or null")
    where = f"{_location(apdb)} (visit {visit} detector {detector})"
    if _guard(lambda: apdb.containsVisitDetector(visit, detector), where):
        reason = f"visit {visit} detector {detector} is already in the APDB; skipped store (retry)"
        _log.warning("%s", reason)
        return StoreOutcome(
            visit=visit,
            detector=detector,
            stored=False,
            n_objects=0,
            n_sources=0,
            reason=reason,
            seconds=time.monotonic() - start,
        )
    keep = {t: {c.name for c in _schema_columns(apdb, t)} for t in (ApdbTables.DiaObject, ApdbTables.DiaSource)}
    objs = objects[[c for c in objects.columns if c in keep[ApdbTables.DiaObject]]]
    srcs = sources[[c for c in sources.columns if c in keep[ApdbTables.DiaSource]]]
    try:
        _guard(lambda: apdb.store(visit_time, objs, srcs), where)
    except sqlalchemy.exc.IntegrityError as exc:
        raise RetriableError(f"APDB at {where}: rows appeared concurrently ({exc.orig}); retry skips") from exc
    seconds = time.monotonic() - start
    _log.info(
        "visit %d detector %d: stored %d DiaObjects, %d DiaSources in %.3f s",
        visit,
        detector,
        len(objs),
        len(srcs),
        seconds,
    )
    return StoreOutcome(
        visit=visit,
        detector=detector,
        stored=True,
        n_objects=len(objs),
        n_sources=len(srcs),
        reason="stored",
        seconds=seconds,
    )
