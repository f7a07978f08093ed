"""Write the APDB config file that ``apdb-cli`` and the ``Apdb`` API read.

``apdb-cli create-sql <db_url> <config>`` writes a small YAML (``db_url``,
``implementation_type``) that every other ``apdb-cli`` command and
``Apdb.from_uri`` take.  The embedded default configures the APDB by
``apdb.db_url`` alone and creates the SQLite file on first use, so nothing wrote
that file; `write_apdb_config` writes it (creating the APDB if needed) so that
``apdb-cli metadata show demo/apdb/<instrument>.yaml`` works after ``make demo``.
"""

from __future__ import annotations

__all__ = ["default_config_path", "write_apdb_config"]

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sqlalchemy
from lsst.dax.apdb.sql import ApdbSqlConfig

from workflow.apdb.store import normalize_db_url, open_apdb

_log = logging.getLogger(__name__)


def default_config_path(apdb_config: Mapping[str, Any], instrument: str, *, base_dir: str | Path | None = None) -> Path:
    """Return where the config file of an APDB goes: beside a SQLite file, else the cwd.

    Parameters
    ----------
    apdb_config : `~collections.abc.Mapping`
        The ``apdb`` config section.
    instrument : `str`
        Instrument name (the file is ``<instrument>.yaml``).
    base_dir : `str` or `~pathlib.Path`, optional
        Directory relative paths are relative to (default: the cwd).
    """
    base = Path(base_dir or Path.cwd())
    if apdb_config.get("config_file"):
        return base / apdb_config["config_file"]
    url = sqlalchemy.make_url(normalize_db_url(apdb_config["db_url"], base_dir=base))
    if url.get_backend_name() == "sqlite" and url.database and not url.database.startswith(":"):
        return Path(url.database.removeprefix("file:")).parent / f"{instrument}.yaml"
    return base / f"{instrument}.yaml"


def write_apdb_config(apdb_config: Mapping[str, Any], path: str | Path, *, base_dir: str | Path | None = None) -> Path:
    """Create the configured SQL APDB if it is missing and write its ``apdb-cli`` config.

    Parameters
    ----------
    apdb_config : `~collections.abc.Mapping`
        The ``apdb`` config section (``db_url``).  With ``config_file`` (an
        ``apdb-cli`` YAML already) nothing is written and that file is returned.
    path : `str` or `~pathlib.Path`
        Where the config YAML goes.
    base_dir : `str` or `~pathlib.Path`, optional
        Directory a relative SQLite path is relative to (default: the cwd, as for
        the stages).

    Returns
    -------
    path : `~pathlib.Path`
        The config file, with an absolute ``db_url`` so it works from any directory.

    Raises
    ------
    workflow.apdb.store.ApdbUnavailableError
        If a database server cannot be reached.
    workflow.apdb.store.ApdbVersionError
        If an existing APDB has a version we do not support.
    """
    if apdb_config.get("config_file"):
        return Path(base_dir or Path.cwd()) / apdb_config["config_file"]
    open_apdb(apdb_config, base_dir=base_dir, create=True)  # creates a missing SQLite APDB under a lock
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ApdbSqlConfig(db_url=normalize_db_url(apdb_config["db_url"], base_dir=base_dir)).save(str(path))
    _log.info("wrote APDB config %s", path)
    return path
