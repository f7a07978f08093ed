"""Tests for `workflow.runtime.versions` and ``scripts/release_notes.py``: our version, and the
start-up checks against real SQLite APDBs and real Butler repositories of other
dimension universes."""

from __future__ import annotations

import json
import re
import runpy
import shutil
import sqlite3
import tomllib
from pathlib import Path

import lsst.daf.butler
import pytest
import yaml
from lsst.daf.butler import Butler, DimensionConfig

from workflow.apdb.store import ApdbVersionError, create_apdb
from workflow.core.config import PROJECT_ROOT
from workflow.core.exceptions import ConfigError, NonRetriableError
from workflow.runtime.versions import (
    SUPPORTED_DIMENSION_UNIVERSES,
    AlertSchemaVersionError,
    RepoVersionError,
    available_alert_schemas,
    check_alert_schema,
    check_apdb,
    check_central_repo,
    check_startup,
    check_version_string,
    project_version,
    read_universe_version,
    release_facts,
)

OLD_DIMENSIONS = Path(lsst.daf.butler.__file__).parent / "configs" / "old_dimensions"
"""Earlier dimension universes shipped with daf_butler (daf_butler_universe<N>.yaml)."""


def _pyproject_version() -> str:
    with open(PROJECT_ROOT / "pyproject.toml", "rb") as stream:
        return tomllib.load(stream)["project"]["version"]


class TestProjectVersion:
    """Tests for `workflow.runtime.versions.project_version`."""

    def test_version_is_pyproject_version_pep440(self):
        assert project_version() == _pyproject_version() == check_version_string(_pyproject_version())
        assert not project_version().startswith("v")

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("v0.1.0", "version 'v0.1.0' is not in normalized PEP 440 form; expected '0.1.0'"),
            ("1.0.0-rc1", "version '1.0.0-rc1' is not in normalized PEP 440 form; expected '1.0.0rc1'"),
            ("tuesday", "version 'tuesday' is not a PEP 440 version"),
        ],
    )
    def test_bad_versions(self, text, message):
        with pytest.raises(ConfigError) as info:
            check_version_string(text)
        assert str(info.value) == message


@pytest.fixture(scope="module")
def apdb_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh SQLite APDB (schema 10.0.0, ApdbSql 1.2.1), created once."""
    path = tmp_path_factory.mktemp("apdb") / "apdb.sqlite3"
    create_apdb(f"sqlite:///{path}")
    return path


def _apdb_with(tmp_path: Path, apdb_file: Path, **versions: str) -> dict[str, str]:
    """Copy of the APDB with its metadata table rows ``version:<key>`` set by SQL."""
    path = tmp_path / "edited.sqlite3"
    shutil.copy(apdb_file, path)
    with sqlite3.connect(path) as db:
        for key, value in versions.items():
            assert db.execute("UPDATE metadata SET value = ? WHERE name = ?", (value, f"version:{key}")).rowcount == 1
    return {"db_url": f"sqlite:///{path}"}


class TestApdbVersions:
    """Tests for `workflow.runtime.versions.check_apdb` (via `workflow.apdb.store.check_versions`)."""

    def test_current_apdb_accepted(self, apdb_file, tmp_path):
        assert check_apdb(_apdb_with(tmp_path, apdb_file)) == {"schema": "10.0.0", "ApdbSql": "1.2.1"}

    @pytest.mark.parametrize(
        ("key", "value"), [("schema", "9.0.0"), ("schema", "11.0.0"), ("ApdbSql", "0.9.0"), ("ApdbSql", "2.0.0")]
    )
    def test_old_and_new_apdb_refused(self, apdb_file, tmp_path, key, value):
        with pytest.raises(ApdbVersionError) as info:
            check_apdb(_apdb_with(tmp_path, apdb_file, **{key: value}))
        message = str(info.value)
        assert "is not supported" in message and value in message, message
        assert message.endswith("supported: schema 10.x, ApdbSql 1.x, ApdbCassandra 1.x"), message
        assert isinstance(info.value, NonRetriableError)


def _make_repo(root: Path, dimensions: Path | DimensionConfig | None = None) -> Path:
    config = DimensionConfig(str(dimensions)) if isinstance(dimensions, Path) else dimensions
    Butler.makeRepo(str(root), dimensionConfig=config)
    return root


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Butler repositories: the current universe (8) and the previous one (7)."""
    root = tmp_path_factory.mktemp("repos")
    return {
        "current": _make_repo(root / "v8"),
        "v7": _make_repo(root / "v7", OLD_DIMENSIONS / "daf_butler_universe7.yaml"),
    }


class TestUniverseVersions:
    """Tests for `workflow.runtime.versions.check_central_repo` on real repositories."""

    def test_current_universe_accepted(self, repos):
        assert read_universe_version(repos["current"]) == ("daf_butler", 8)
        assert check_central_repo(repos["current"]) == ("daf_butler", 8)
        assert SUPPORTED_DIMENSION_UNIVERSES == {"daf_butler": frozenset({8})}

    def test_other_universe_version_refused(self, repos):
        assert read_universe_version(repos["v7"]) == ("daf_butler", 7)
        with pytest.raises(RepoVersionError) as info:
            check_central_repo(repos["v7"])
        assert str(info.value) == (
            f"central repo {repos['v7']}: dimension universe namespace 'daf_butler' version 7 "
            "is not supported; supported: namespace 'daf_butler' version(s) 8"
        )

    def test_other_namespace_refused(self, repos, tmp_path):
        """The universe is read from the registry: edit its stored dimensions config."""
        repo = shutil.copytree(repos["current"], tmp_path / "acme")
        with sqlite3.connect(repo / "gen3.sqlite3") as db:
            (text,) = db.execute("SELECT value FROM butler_attributes WHERE name = 'config:dimensions.json'").fetchone()
            stored = json.loads(text)
            db.execute(
                "UPDATE butler_attributes SET value = ? WHERE name = 'config:dimensions.json'",
                (json.dumps({**stored, "namespace": "acme", "version": 1}),),
            )
        with pytest.raises(
            RepoVersionError,
            match="namespace 'acme' version 1 is not supported; supported: namespace 'daf_butler' version",
        ):
            check_central_repo(repo)

    def test_missing_repo(self, tmp_path):
        with pytest.raises(NonRetriableError, match="no Butler repository"):
            check_central_repo(tmp_path / "nothing")


class TestAlertSchema:
    """Tests for `workflow.runtime.versions.check_alert_schema`."""

    def test_installed_schema_accepted(self):
        assert {(10, 0), (11, 0), (11, 1)} <= set(available_alert_schemas())
        assert check_alert_schema() == (11, 0)  # Rubin production, the default

    def test_other_major_refused(self):
        with pytest.raises(AlertSchemaVersionError) as info:
            check_alert_schema((12, 0), available=[(11, 1), (12, 0)])
        assert str(info.value) == "alert schema 12.0 is not supported: supported major version 11; found 12"

    def test_missing_schema_refused(self):
        with pytest.raises(AlertSchemaVersionError) as info:
            check_alert_schema((11, 9), available=[(10, 0), (11, 0)])
        assert str(info.value).startswith("alert schema 11.9 is not in the installed lsst-alert-packet 30.")
        assert str(info.value).endswith(": found 10.0, 11.0; supported major version 11")


class TestStartupAndReleaseNotes:
    """Tests for `workflow.runtime.versions.check_startup` and ``scripts/release_notes.py``."""

    def test_check_startup(self, repos, apdb_file, tmp_path):
        good = {"central_repo": str(repos["current"]), "apdb": _apdb_with(tmp_path, apdb_file)}
        assert check_startup(good) == {
            "alert_schema": "11.0",
            "apdb": {"schema": "10.0.0", "ApdbSql": "1.2.1"},
            "dimensions": ("daf_butler", 8),
        }
        relative = {**good, "central_repo": repos["current"].name}
        assert check_startup(relative, base_dir=repos["current"].parent)["dimensions"] == ("daf_butler", 8)
        with pytest.raises(RepoVersionError):
            check_startup({**good, "central_repo": str(repos["v7"])})

    def test_release_notes(self, capsys, repos, apdb_file, tmp_path):
        main = runpy.run_path(str(PROJECT_ROOT / "scripts" / "release_notes.py"), run_name="release_notes")["main"]
        assert main(["--json"]) == 0
        facts = json.loads(capsys.readouterr().out)
        assert facts == {**release_facts(), "container_image": facts["container_image"]}
        assert facts["apdb"]["schema"] == "10.0.0" and facts["apdb"]["ApdbSql"] == "1.2.1"
        assert facts["dimensions"]["namespace"] == "daf_butler" and facts["dimensions"]["version"] == 8
        assert facts["alert_schema"]["version"] == "11.0" and facts["snakemake"] == "9.27.1"
        assert main([]) == 0
        text = capsys.readouterr().out
        for line in (
            f"prompt-snake {project_version()}",
            "APDB schema 10.0.0, ApdbSql 1.2.1, ApdbCassandra 1.",
            "dimensions config: namespace daf_butler version 8",
            "alert schema 11.0",
            "Snakemake 9.27.1",
            "Python 3.11.",
        ):
            assert line in text, text
        extra = tmp_path / "site.yaml"
        extra.write_text(yaml.safe_dump({"central_repo": str(repos["v7"]), "apdb": _apdb_with(tmp_path, apdb_file)}))
        assert main(["--check", "--extra-config", str(extra)]) == 2
        assert "RepoVersionError: central repo" in capsys.readouterr().err


def _site_config(repos: dict[str, Path], apdb: dict[str, str], **changes: object) -> dict[str, object]:
    """The merged LSSTComCamSim config on a given repo and APDB (``changes`` replace sections)."""
    from workflow.core.config import load_config

    config = load_config(instrument="LSSTComCamSim")
    return {**config, "central_repo": str(repos["current"]), "apdb": apdb, **changes}


REFUSALS = {
    "dimensions": (
        RepoVersionError,
        "dimension universe namespace 'daf_butler' version 7 is not supported; "
        "supported: namespace 'daf_butler' version(s) 8",
    ),
    "apdb": (ApdbVersionError, "supported: schema 10.x, ApdbSql 1.x, ApdbCassandra 1.x"),
    "alert_schema": (AlertSchemaVersionError, "alert schema 12.0 is not supported: supported major version 11"),
}


def _refused(kind: str, repos: dict[str, Path], apdb_file: Path, tmp_path: Path) -> dict[str, object]:
    good = _apdb_with(tmp_path, apdb_file)
    if kind == "dimensions":
        return _site_config(repos, good, central_repo=str(repos["v7"]))
    if kind == "apdb":
        return _site_config(repos, _apdb_with(tmp_path, apdb_file, schema="9.0.0"))
    return _site_config(repos, good, alerts={"schema_version": "12.0", "schema_id": None})


class TestStartupChecksRun:
    """`check_startup` refuses at stream shim start and before a replay, naming what is supported."""

    @pytest.mark.parametrize("kind", sorted(REFUSALS))
    def test_shim_refuses_to_start(self, kind, repos, apdb_file, tmp_path, monkeypatch):
        import threading

        import stream_shim.service as service

        monkeypatch.setattr(service, "run_health_checks", lambda *args, **kwargs: None)  # no broker here
        config = _refused(kind, repos, apdb_file, tmp_path)
        shim = service.StreamShim(service.ShimOptions(instrument="LSSTComCamSim", workdir=tmp_path / "run"), config)
        error, message = REFUSALS[kind]
        with pytest.raises(error, match=re.escape(message)):
            shim.run(threading.Event())
        assert shim.status.state != "running" and not (tmp_path / "run" / "shim" / "status.json").exists()

    def test_shim_starts_past_the_checks_when_supported(self, repos, apdb_file, tmp_path, monkeypatch):
        import threading

        import stream_shim.service as service

        class Reached(Exception):
            pass

        def stop_here(*args, **kwargs):
            raise Reached

        monkeypatch.setattr(service, "run_health_checks", lambda *args, **kwargs: None)
        monkeypatch.setattr(service.StreamShim, "_start_export_writer", stop_here, raising=False)
        monkeypatch.setattr(service.ArrivalIndex, "prune", stop_here)
        config = _site_config(repos, _apdb_with(tmp_path, apdb_file))
        shim = service.StreamShim(service.ShimOptions(instrument="LSSTComCamSim", workdir=tmp_path / "run"), config)
        with pytest.raises(Reached):
            shim.run(threading.Event())

    @pytest.mark.parametrize("kind", sorted(REFUSALS))
    def test_replay_refuses_before_writing(self, kind, repos, apdb_file, tmp_path, monkeypatch):
        from workflow.runtime.replay import replay

        monkeypatch.chdir(tmp_path)
        config = _refused(kind, repos, apdb_file, tmp_path)
        error, message = REFUSALS[kind]
        with pytest.raises(error, match=re.escape(message)):
            replay(config, instrument_file="config/instruments/LSSTComCamSim.yaml", limit=1)
        assert not (tmp_path / "visits").exists() and not (tmp_path / "work_area").exists()
