"""Our version, and start-up checks of the versions we must agree with.

prompt-snake's version is the package metadata's (PEP 440, no leading ``v``; release
tags are ``v<version>``, images ``...:<version>``).  Before a night (stream shim
start, replay) `check_startup` refuses, with a message saying what is supported and
what was found:

- an APDB whose schema or implementation major version we do not support
  (`workflow.apdb.store.SUPPORTED_MAJOR_VERSIONS`, checked by `workflow.apdb.store.open_apdb`);
- a central repository whose dimension universe (namespace, version) is not one we
  support (`SUPPORTED_DIMENSION_UNIVERSES`), read from the repository's registry
  (``butler_attributes`` row ``config:dimensions.json``, via ``Butler.dimensions``);
- an alert schema whose major version is not `SUPPORTED_ALERT_SCHEMA_MAJOR`, or that
  the installed lsst-alert-packet does not ship.

`check_startup` runs at stream shim start (`stream_shim.service.StreamShim.run`, after
the health checks) and before a replay (`workflow.runtime.replay.replay`).
`release_facts` gathers what a release must state (``scripts/release_notes.py``).
"""

from __future__ import annotations

__all__ = [
    "PACKAGE_NAME",
    "SUPPORTED_DIMENSION_UNIVERSES",
    "SUPPORTED_ALERT_SCHEMA_MAJOR",
    "RepoVersionError",
    "AlertSchemaVersionError",
    "project_version",
    "check_version_string",
    "read_universe_version",
    "check_universe",
    "check_central_repo",
    "available_alert_schemas",
    "check_alert_schema",
    "check_apdb",
    "check_startup",
    "release_facts",
]

import copy
import functools
import importlib.metadata
import importlib.util
import logging
import platform
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from workflow.core.config import PROJECT_ROOT
from workflow.core.exceptions import ConfigError, NonRetriableError

_log = logging.getLogger(__name__)

PACKAGE_NAME = "prompt-snake"

SUPPORTED_DIMENSION_UNIVERSES: Mapping[str, frozenset[int]] = {"daf_butler": frozenset({8})}
"""Dimension universes (namespace -> versions) a central repository may use.

Version 8 is lsst-daf-butler 30.2026.4300's default and what every test and the demo
build.  Version 7 differs only by lacking the ``ssp_*`` solar-system elements, which
we do not use; add it here after a replay against a version-7 repository passes.
"""

SUPPORTED_ALERT_SCHEMA_MAJOR = 11
"""Alert schema major version our alerts may use (the default is `workflow.apdb.alerts.SCHEMA_VERSION`)."""


class RepoVersionError(NonRetriableError, RuntimeError):
    """The central repository's dimension universe is not one we support."""


class AlertSchemaVersionError(NonRetriableError, RuntimeError):
    """The alert schema we would write is unsupported or not installed."""


def check_version_string(text: str) -> str:
    """Return ``text`` if it is a normalized PEP 440 version without a leading ``v``.

    Raises
    ------
    ConfigError
        If it is not PEP 440, not in normalized form, or starts with ``v``.
    """
    try:
        normalized = str(Version(text))
    except InvalidVersion as exc:
        raise ConfigError(f"version {text!r} is not a PEP 440 version") from exc
    if text != normalized or text.startswith("v"):
        raise ConfigError(f"version {text!r} is not in normalized PEP 440 form; expected {normalized!r}")
    return text


def project_version() -> str:
    """Return prompt-snake's version, from the installed package metadata.

    Falls back to ``pyproject.toml`` when the package is not installed (a bare checkout).

    Raises
    ------
    ConfigError
        If the version is not a normalized PEP 440 version.
    """
    try:
        text = importlib.metadata.version(PACKAGE_NAME)
    except importlib.metadata.PackageNotFoundError:
        with open(PROJECT_ROOT / "pyproject.toml", "rb") as stream:
            text = tomllib.load(stream)["project"]["version"]
    return check_version_string(text)


def _supported_universes() -> str:
    return "; ".join(
        f"namespace {ns!r} version(s) {', '.join(map(str, sorted(v)))}"
        for ns, v in SUPPORTED_DIMENSION_UNIVERSES.items()
    )


def check_universe(namespace: str, version: int, where: str) -> tuple[str, int]:
    """Refuse a dimension universe we do not support.

    Raises
    ------
    RepoVersionError
        If ``(namespace, version)`` is not in `SUPPORTED_DIMENSION_UNIVERSES`; the
        message names the repository, what it holds and what is supported.
    """
    if version not in SUPPORTED_DIMENSION_UNIVERSES.get(namespace, ()):
        raise RepoVersionError(
            f"central repo {where}: dimension universe namespace {namespace!r} version {version} "
            f"is not supported; supported: {_supported_universes()}"
        )
    return namespace, version


def read_universe_version(repo: str | Path) -> tuple[str, int]:
    """Return the ``(namespace, version)`` of the dimension universe stored in a repository.

    Raises
    ------
    RepoVersionError
        If daf_butler itself refuses the registry's schema (its message is kept).
    NonRetriableError
        If there is no repository at ``repo``.
    """
    from lsst.daf.butler.registry.versions import (
        IncompatibleVersionError,
        ManagerMismatchError,
        MissingManagerError,
    )

    from workflow.repo.central_repo import open_central_repo

    try:
        butler = open_central_repo(repo)
    except (IncompatibleVersionError, ManagerMismatchError, MissingManagerError) as exc:
        raise RepoVersionError(
            f"central repo {repo}: registry not readable by this daf_butler: {exc}; "
            f"supported dimension universes: {_supported_universes()}"
        ) from exc
    try:
        universe = butler.dimensions
        return universe.namespace, int(universe.version)
    finally:
        butler.close()


def check_central_repo(repo: str | Path) -> tuple[str, int]:
    """Read a repository's dimension universe and refuse it unless supported (`check_universe`)."""
    return check_universe(*read_universe_version(repo), str(repo))


def available_alert_schemas() -> list[tuple[int, int]]:
    """Return the ``(major, minor)`` alert schemas the installed lsst-alert-packet ships.

    Read from its ``schema/<major>/<minor>/`` directories without importing it.
    """
    spec = importlib.util.find_spec("lsst.alert.packet")
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(list(spec.submodule_search_locations)[0]) / "schema"
    return sorted(
        (int(minor.parent.name), int(minor.name))
        for minor in root.glob("*/*")
        if minor.parent.name.isdigit() and minor.name.isdigit() and any(minor.glob("*.avsc"))
    )


def check_alert_schema(
    wanted: tuple[int, int] | None = None, available: Iterable[tuple[int, int]] | None = None
) -> tuple[int, int]:
    """Refuse an alert schema of another major version, or one that is not installed.

    Parameters
    ----------
    wanted : `tuple` [`int`, `int`], optional
        Schema our alerts use (``alerts.schema_version``; default `workflow.apdb.alerts.SCHEMA_VERSION`).
    available : iterable of `tuple` [`int`, `int`], optional
        Schemas installed (default `available_alert_schemas`).

    Raises
    ------
    AlertSchemaVersionError
        With what is supported and what was found.
    """
    if wanted is None:
        from workflow.apdb.alerts import SCHEMA_VERSION

        wanted = SCHEMA_VERSION
    shipped = sorted(available_alert_schemas() if available is None else available)
    found = ", ".join(f"{a}.{b}" for a, b in shipped) or "none"
    name = f"alert schema {wanted[0]}.{wanted[1]}"
    if wanted[0] != SUPPORTED_ALERT_SCHEMA_MAJOR:
        raise AlertSchemaVersionError(
            f"{name} is not supported: supported major version {SUPPORTED_ALERT_SCHEMA_MAJOR}; found {wanted[0]}"
        )
    if tuple(wanted) not in shipped:
        raise AlertSchemaVersionError(
            f"{name} is not in the installed lsst-alert-packet "
            f"{_dist_version('lsst-alert-packet')}: found {found}; supported major "
            f"version {SUPPORTED_ALERT_SCHEMA_MAJOR}"
        )
    return tuple(wanted)  # type: ignore[return-value]


def check_apdb(
    apdb_config: Mapping[str, Any], *, base_dir: str | Path | None = None, create: bool = False
) -> dict[str, str]:
    """Open the configured APDB and return its versions; refuse unsupported ones.

    ``create``: create a missing SQLite APDB first, as the workflow's stages do.

    Raises
    ------
    workflow.apdb.store.ApdbVersionError
        If its schema or implementation major version is not supported (the message
        says what was found and what is supported).
    workflow.apdb.store.ApdbNotFoundError, workflow.apdb.store.ApdbUnavailableError
        If there is no APDB there, or its server cannot be reached.
    """
    from workflow.apdb.store import check_versions, open_apdb

    apdb = open_apdb(apdb_config, base_dir=base_dir, create=create)
    where = str(apdb_config.get("db_url") or apdb_config.get("config_file"))
    return check_versions(dict(apdb.metadata.items()), where)


def check_startup(
    config: Mapping[str, Any], *, base_dir: str | Path | None = None, create_apdb: bool = False
) -> dict[str, Any]:
    """Run every start-up version check on a merged configuration.

    Parameters
    ----------
    config : `~collections.abc.Mapping`
        Merged configuration (``apdb``, ``central_repo`` and ``alerts`` sections).
    base_dir : `str` or `~pathlib.Path`, optional
        Directory relative paths are relative to (default: the cwd).
    create_apdb : `bool`, optional
        Create a missing SQLite APDB before checking it (replay: the stages would).

    Returns
    -------
    found : `dict`
        ``apdb`` (versions), ``dimensions`` (namespace, version), ``alert_schema``.

    Raises
    ------
    workflow.apdb.store.ApdbVersionError, RepoVersionError, AlertSchemaVersionError
        On the first incompatibility (all `NonRetriableError`).
    """
    repo = str(config["central_repo"])
    if "://" not in repo and not Path(repo).is_absolute():
        repo = str(Path(base_dir or Path.cwd()) / repo)
    from workflow.apdb.alerts import AlertSchema

    found = {
        "alert_schema": ".".join(map(str, check_alert_schema(AlertSchema.from_config(config).version))),
        "apdb": check_apdb(config["apdb"], base_dir=base_dir, create=create_apdb),
        "dimensions": check_central_repo(repo),
    }
    _log.info("start-up checks passed: %s", found)
    return found


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def release_facts() -> dict[str, Any]:
    """Return what a release must state: our version and those we are compatible with."""
    return copy.deepcopy(_release_facts())


@functools.cache
def _release_facts() -> dict[str, Any]:
    """`release_facts`, computed once per process (parsing the APDB schema takes ~1 s)."""
    from lsst.daf.butler import DimensionUniverse
    from lsst.dax.apdb.apdbSchema import ApdbSchema
    from lsst.dax.apdb.sql import ApdbSql, ApdbSqlConfig

    from workflow.apdb.alerts import SCHEMA_VERSION
    from workflow.apdb.store import SUPPORTED_MAJOR_VERSIONS

    try:
        from lsst.dax.apdb.cassandra import ApdbCassandra

        cassandra = str(ApdbCassandra.apdbImplementationVersion())
    except ImportError:  # cassandra-driver missing
        cassandra = "unavailable (cassandra-driver not installed)"
    sql_config = ApdbSqlConfig(db_url="sqlite://")
    universe = DimensionUniverse()
    return {
        "prompt_snake": project_version(),
        "apdb": {
            "schema": str(ApdbSchema(sql_config.schema_file, "").schemaVersion()),
            "ApdbSql": str(ApdbSql.apdbImplementationVersion()),
            "ApdbCassandra": cassandra,
            "lsst-dax-apdb": _dist_version("lsst-dax-apdb"),
            "lsst-sdm-schemas": _dist_version("lsst-sdm-schemas"),
            "accepts": {k: f"{v}.x" for k, v in SUPPORTED_MAJOR_VERSIONS.items()},
        },
        "dimensions": {
            "namespace": universe.namespace,
            "version": universe.version,
            "lsst-daf-butler": _dist_version("lsst-daf-butler"),
            "accepts": {ns: sorted(v) for ns, v in SUPPORTED_DIMENSION_UNIVERSES.items()},
        },
        "alert_schema": {
            "version": f"{SCHEMA_VERSION[0]}.{SCHEMA_VERSION[1]}",
            "lsst-alert-packet": _dist_version("lsst-alert-packet"),
            "accepts_major": SUPPORTED_ALERT_SCHEMA_MAJOR,
        },
        "snakemake": _dist_version("snakemake"),
        "python": platform.python_version(),
    }
